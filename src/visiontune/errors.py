"""Errors a user can cause. The CLI prints them in one line and exits 2; anything else is a bug."""


class VisiontuneError(Exception):
    """Base class: a problem with the user's input, stated as what and where."""

    exit_code = 2


class DatasetError(VisiontuneError):
    """The dataset cannot be used as given (wrong path, no images, one class, bad manifest)."""


class SplitError(VisiontuneError):
    """A split cannot be made or is inconsistent (class too small, class sets differ)."""


class ImageDecodeError(VisiontuneError):
    """One image cannot be decoded; `path` says which, `reason` says why."""

    def __init__(self, where: str, reason: str):
        super().__init__(f"{where}: {reason}")
        self.where = where
        self.reason = reason


class ModelError(VisiontuneError):
    """A model name, weight file or model bundle cannot be used."""


class ConfigError(VisiontuneError):
    """A setting has a value that cannot work."""


class ExportError(VisiontuneError):
    """An export cannot be made or does not match the model it came from (parity check failed)."""


class DiskFullError(VisiontuneError):
    """A write failed for lack of space (or quota); the message names the file and what is still intact."""


class TrackingError(VisiontuneError):
    """The experiment tracker or model registry cannot be used (not installed, unreachable, no such model)."""
