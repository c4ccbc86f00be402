"""A small error hierarchy: every user-facing failure is a ``ReidRayError``.

The CLI turns these into one clear message and a non-zero exit; anything else is a bug.
"""


class ReidRayError(Exception):
    """Base class for errors caused by the user's input or environment."""


class ConfigError(ReidRayError):
    """An invalid argument or configuration value."""


class ManifestError(ReidRayError):
    """A manifest that cannot be used at all (missing, empty, required column absent)."""


class ModelError(ReidRayError):
    """A model reference that cannot be resolved or loaded."""


class ImageError(ReidRayError):
    """One image that cannot be used; batch jobs record it in the errors table."""


class OutputError(ReidRayError):
    """An output location that cannot be written or holds incompatible results."""
