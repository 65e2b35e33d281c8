"""lifelong: lifelong online learning on task-tagged event streams."""

__version__ = "0.1.0"
