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
    """An image file or DICOM folder cannot be read as a 3D/4D image, or is refused.

    Args:
        message: names the file, what was expected, what arrived and how to fix it.
        kind: why, for callers that classify (``fedmed data check``): one of
            :data:`fedmed.data.read_rules.ReadFailure` (``"corrupt"``, ``"too_large"``,
            ``"non_finite"``, ``"bad_affine"``, ...).
    """

    def __init__(self, message: str, kind: str = "corrupt") -> None:
        super().__init__(message)
        self.kind = kind


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


class ExportError(FedMedError):
    """A run cannot be exported (MONAI Bundle, DICOM SEG) or an export fails validation."""


class FederationError(FedMedError):
    """The federation cannot run (sites, strategy, run directory, resume)."""


class PrivacyError(FedMedError):
    """Differential-privacy settings or the privacy ledger are invalid."""


class PrivacyBudgetExhausted(PrivacyError):
    """A site's next round would exceed its ``max_epsilon``."""


class SecurityError(FedMedError):
    """Certificates or keys cannot be created or read."""


class PolicyError(FedMedError):
    """A site policy is missing, malformed, or cannot be updated."""


class RequestRefused(FedMedError):
    """A site refuses a coordinator's request.

    Only :attr:`code` (a :class:`fedmed.policy.ReasonCode` value) and its fixed sentence
    leave the site; the message (which may name files or values) stays in the site's log.

    Args:
        code: the reason code, e.g. ``"dp-required"``.
        detail: what exactly was refused, for the site's own log.
    """

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"refused ({code}): {detail}")
        self.code = code
        self.detail = detail
