"""The exception hierarchy: one root, one small subclass per area."""


class LifelongError(Exception):
    """Root of every error this package raises on purpose."""


class ConfigError(LifelongError):
    """A configuration key is missing, unknown or has a bad value."""


class InvalidEvent(LifelongError):
    """An event does not follow schema v1; ``field`` names the offending field."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem

    @property
    def kind(self) -> str:
        """The field without names chosen by the sender (``x.amount`` -> ``x``): safe as a metric label."""
        return self.field.split(".", 1)[0]


class StateError(LifelongError):
    """Saved state is missing, corrupt, or does not match the configuration."""
