"""defectd: real-time defect inspection for production lines."""

# The one place the version is written: the wheel's metadata reads it from here
# (pyproject.toml, dynamic version), and `defectd --version`, the daemon's status messages
# and the producer field of every model card it writes report it.
__version__ = "0.1.0"

__all__ = ["__version__"]
