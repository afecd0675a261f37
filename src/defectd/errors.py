"""One exception hierarchy. The message of every error is one line an operator can act on."""


class DefectdError(Exception):
    """Base of every error defectd raises on purpose; ``str(err)`` is shown to the user as is."""


class ConfigError(DefectdError):
    """A station config or command-line value is missing or invalid; the message names the key."""


class DataError(DefectdError):
    """A dataset, image or mask cannot be used; the message names the file."""


class ModelError(DefectdError):
    """A model file or its card is missing, unreadable or inconsistent."""


class EngineError(DefectdError):
    """An inference engine cannot be built, loaded or run."""


class CameraError(DefectdError):
    """A camera cannot be found, configured or read."""


class PublishError(DefectdError):
    """Results cannot be published or stored for publishing."""


class CalibrationError(DefectdError):
    """A calibration cannot be computed from the given inputs."""
