"""The one exception tree. Messages carry UIDs, never patient data.

    LightboxError
    ├── ConfigurationError        settings or rules that cannot work
    ├── IngestError               a file that cannot be registered (it is quarantined)
    │   └── NotDicomError         not DICOM at all
    ├── PixelDecodeError          pixels that cannot be decoded for a model
    │   └── VolumeGeometryError   a series whose slices do not make one regular volume (says where)
    ├── ManifestError             a model bundle that is incomplete or altered
    ├── ModelNotFoundError        no such model / no production version
    ├── RuntimeUnavailableError   the chosen model runtime cannot run on this node
    │   ├── TensorRTUnavailable   TensorRT or a CUDA device is missing (the reason says which)
    │   └── EngineBuildError      TensorRT is here but cannot build an engine for this model
    └── JobStateError             a job transition that is not allowed
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
