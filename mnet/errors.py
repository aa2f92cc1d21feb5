"""The MnetError hierarchy: every user mistake the library detects raises one of these.

The CLI turns any MnetError into one line on stderr and exit code 2, so a message must name the
bad value (file, field, option) and say what to do about it.
"""

__all__ = [
    "MnetError",
    "ConfigError",
    "DataError",
    "CheckpointError",
    "ExportError",
    "BackendError",
    "SourceError",
]


class MnetError(Exception):
    """Base class for errors meant for the user (no traceback in the CLI)."""


class ConfigError(MnetError, ValueError):
    """An invalid contract field, option or preset."""


class DataError(MnetError):
    """A dataset, CSV, image or video that cannot be used as given."""


class CheckpointError(MnetError):
    """A checkpoint, arch.json or run directory that is missing, corrupt or foreign."""


class ExportError(MnetError):
    """ONNX / INT8 / TensorRT export that failed or did not verify."""


class BackendError(MnetError):
    """An inference backend that is missing or cannot run the given model."""


class SourceError(MnetError):
    """A video source URI that cannot be opened."""
