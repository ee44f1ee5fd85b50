"""Exception classes.

Every error a user can cause derives from :class:`FedMedError`; the CLI turns these into a
readable message and exit code 1, without a traceback. Messages name the parameter or file,
what was expected, what arrived and how to fix it.
"""

from __future__ import annotations


class FedMedError(Exception):
    """Base class of every error caused by input (files, config, arguments)."""


class ConfigError(FedMedError):
    """The federation config (YAML) is missing, malformed or inconsistent."""


class ImageReadError(FedMedError):
    """An image file or DICOM folder cannot be read as a 3D/4D image."""


class ImageWriteError(FedMedError):
    """An image cannot be written (bad array, bad path, unsupported format)."""


class DatasetFormatError(FedMedError):
    """A site folder is not in a supported layout, or its manifest is malformed."""


class PreprocessingError(FedMedError):
    """A case cannot be preprocessed (geometry, missing modalities, empty foreground)."""


class ModelConfigError(FedMedError):
    """A network cannot be built from the given arguments."""


class TrainingError(FedMedError):
    """Training or evaluation cannot proceed (no cases, bad checkpoint, device)."""


class CheckpointError(FedMedError):
    """A model or run checkpoint is missing, corrupt or incompatible."""


class FederationError(FedMedError):
    """The federation cannot run (sites, strategy, run directory, resume)."""


class PrivacyError(FedMedError):
    """Differential-privacy settings or the privacy ledger are invalid."""


class PrivacyBudgetExhausted(PrivacyError):
    """A site's next round would exceed its ``max_epsilon``."""


class SecurityError(FedMedError):
    """Certificates or keys cannot be created or read."""
