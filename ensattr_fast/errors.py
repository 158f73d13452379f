"""The faults a user can meet, one class each, all under :class:`EnsattrError`.

Every error says what is wrong with which input in one line; the command line prints any
``EnsattrError`` as that line and exits with status 2. They subclass ``ValueError`` so that
code written against earlier versions, which caught ``ValueError``, still works.
"""

__all__ = ["EnsattrError", "CodeError", "DataError", "ArchitectureError", "CheckpointError",
           "StoreError", "DiskError", "MethodError", "ConfigError"]


class EnsattrError(ValueError):
    """Any input that ensattr_fast refuses."""


class CodeError(EnsattrError):
    """A code or design request that cannot give exact ablations, or unit ids outside it."""


class DataError(EnsattrError):
    """Training or query images that cannot be used, or that do not fit the plan."""


class ArchitectureError(EnsattrError):
    """A member architecture that is unknown or does not fit the data."""


class CheckpointError(EnsattrError):
    """A checkpoint file that is missing, truncated, corrupt or of another format."""


class StoreError(EnsattrError):
    """A results or plan file that is unreadable, incomplete, or from another ensemble."""


class DiskError(StoreError):
    """The system refused to write or read a file: a full disk, a read-only or forbidden folder,
    a file another process holds. What was on disk before is as it was; run again once the
    cause is gone."""


class MethodError(EnsattrError):
    """An attribution method that does not exist."""


class ConfigError(EnsattrError):
    """Options (flags or a config file) that a step does not take or cannot use."""
