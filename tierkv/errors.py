"""The few exception classes tierkv raises. Each message names the bad value and the fix."""


class TierKVError(Exception):
    """Base class of every error tierkv raises on purpose."""


class ConfigError(TierKVError, ValueError):
    """A setting is invalid; raised before anything is allocated."""


class CapacityError(TierKVError):
    """A request needs more KV blocks than the tiers can give; nothing stored was changed."""


class StoreError(TierKVError):
    """The NVMe store cannot be used: disk full, directory locked by another process, I/O failure."""


class CorruptBlockError(StoreError):
    """A block read back from a tier does not match the checksum recorded when it was written."""

    def __init__(self, message: str, slots: list[int] | None = None) -> None:
        super().__init__(message)
        self.slots = list(slots or [])


class WorkerError(TierKVError):
    """A tensor-parallel worker died or stopped answering; the message names its rank."""
