"""The one exception tree. Messages carry UIDs, never patient data.

    LightboxError
    ├── ConfigurationError        settings or rules that cannot work
    ├── IngestError               a file that cannot be registered (it is quarantined)
    │   └── NotDicomError         not DICOM at all
    ├── StorageFullError          storage full or below its floor: nothing kept (C-STORE 0xA700)
    ├── StowRequestError          a request that is not STOW-RS as a whole (HTTP 415); a ValueError
    ├── PullError                 the PACS cannot be queried or retrieved from
    ├── PixelDecodeError          pixels that cannot be decoded for a model
    │   └── VolumeGeometryError   a series whose slices do not make one regular volume (says where)
    ├── ManifestError             a model bundle that is incomplete or altered
    ├── ModelNotFoundError        no such model / no production version
    ├── PromotionRefused          a candidate that scores worse than production (no --force)
    ├── RuntimeUnavailableError   the chosen model runtime cannot run on this node
    │   ├── TensorRTUnavailable   TensorRT or a CUDA device is missing (the reason says which)
    │   └── EngineBuildError      TensorRT is here but cannot build an engine for this model
    ├── JobStateError             a job transition that is not allowed
    └── OutputBuildError          an SR/SC cannot be built from the source (names the attribute)
"""

from __future__ import annotations


class LightboxError(Exception):
    """Base of every error Lightbox raises on purpose. ``code`` is stored on failed jobs."""

    code = "lightbox_error"


class ConfigurationError(LightboxError):
    code = "configuration"


class IngestError(LightboxError):
    code = "ingest"


class NotDicomError(IngestError):
    code = "not_dicom"


class StorageFullError(LightboxError):
    """Storage is full or below its free-space floor: nothing was stored or registered.

    Network receivers answer it with "out of resources" (C-STORE 0xA700) so the sender retries
    later instead of losing the instance."""

    code = "storage_full"


class StowRequestError(LightboxError, ValueError):
    """The request as a whole is not a STOW-RS request (HTTP 415). Also a ``ValueError``: it
    is bad input, and callers that caught it as one keep working."""

    code = "stow_request"


class PullError(LightboxError):
    """C-FIND or C-MOVE/C-GET against the PACS failed (no association, no response, a failure
    status)."""

    code = "pull"


class PixelDecodeError(LightboxError):
    code = "pixel_decode"


class VolumeGeometryError(PixelDecodeError):
    """Slices that disagree (orientation, spacing, size), duplicate positions, a gap or irregular
    spacing. A subclass of PixelDecodeError because retrying cannot help: the job fails at once,
    with the reason naming the instance or the position along the slice normal."""

    code = "volume_geometry"


class ManifestError(LightboxError):
    code = "manifest"


class ModelNotFoundError(LightboxError):
    code = "model_not_found"


class PromotionRefused(LightboxError):
    """A candidate scored worse than the production version it would replace. ``comparison``
    holds what was compared (metric, both values, evaluation set)."""

    code = "promotion_refused"

    def __init__(self, message: str, comparison: dict[str, object] | None = None) -> None:
        super().__init__(message)
        self.comparison = comparison or {}


class RuntimeUnavailableError(LightboxError):
    code = "runtime_unavailable"


class TensorRTUnavailable(RuntimeUnavailableError):
    code = "tensorrt_unavailable"


class EngineBuildError(RuntimeUnavailableError):
    """The TensorRT parser or builder failed for one model (an unsupported operator, no engine
    returned, out of GPU memory). One type for every way a build fails, so callers catch this
    instead of whatever TensorRT or pycuda raised (that stays chained as ``__cause__``)."""

    code = "engine_build"


class JobStateError(LightboxError):
    code = "job_state"


class OutputBuildError(LightboxError):
    """A result object (SR, SC) cannot be built from its source; the message names the source
    attribute that caused it (never its value: it may be patient data)."""

    code = "build_failed"
