"""The exception hierarchy: one root, one small subclass per area."""

import importlib
from types import ModuleType
from typing import TypeVar

T = TypeVar("T")


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


class MissingExtra(LifelongError):
    """A feature needs an optional dependency that is not installed."""


def require(module: str, extra: str, feature: str) -> ModuleType:
    """Import ``module`` for ``feature``, or raise ``MissingExtra`` naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtra(
            f"{feature} needs {module.split('.')[0]}, which is not installed: pip install 'lifelong[{extra}]'"
        ) from None


def started(client: T | None) -> T:
    """A Kafka client the daemon has opened (using one earlier is a bug, said plainly, not an ``assert``)."""
    if client is None:
        raise LifelongError("used before the Kafka clients were started")
    return client
