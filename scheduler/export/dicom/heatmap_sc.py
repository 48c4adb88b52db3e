"""A class-activation heatmap overlaid on its source image, as a DICOM Secondary Capture.

The source is rendered the way a reader sees it (modality LUT, VOI window, MONOCHROME1
inverted: :mod:`lightbox.pixels`), the map is resized to the image and blended in colour where
it is warm, and the result is an RGB Secondary Capture in the source's study (highdicom copies
patient and study attributes from the source). The image carries no burned-in text; it is marked
derived and its series says it is unverified AI output.
"""

from __future__ import annotations

import warnings

import highdicom as hd
import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from lightbox.manifest import PreprocessSpec
from lightbox.pixels import decode_frame, to_display
from scheduler.export.dicom.common import (
    MANUFACTURER,
    SC_SERIES_NUMBER,
    ModelInfo,
    complete_source,
    naming_the_attribute,
)

# Below this the map is not drawn (keeps the anatomy readable where the model did not look).
ALPHA_FLOOR = 0.2
MAX_ALPHA = 0.5
# Large radiographs are reduced: a heatmap does not need 2k × 2k RGB (12 MB per object).
MAX_SIDE = 1024


def colormap(values: np.ndarray) -> np.ndarray:
    """A blue→cyan→yellow→red ramp ("jet"-like), values 0..1 → uint8 RGB. No matplotlib on
    worker/scheduler nodes, so the ramp is three piecewise-linear channels."""
    v = np.clip(values, 0.0, 1.0)
    red = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
    green = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
    blue = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
    return (np.stack([red, green, blue], axis=-1) * 255).astype(np.uint8)


def overlay(display: np.ndarray, heatmap: np.ndarray) -> np.ndarray:
    """Blend ``heatmap`` (h, w, 0..1, any size) over ``display`` (H, W, 0..1) → uint8 RGB."""
    height, width = display.shape
    scale = min(1.0, MAX_SIDE / max(height, width))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    base = Image.fromarray((np.clip(display, 0, 1) * 255).astype(np.uint8)).resize(
        size, Image.Resampling.BILINEAR)
    heat = Image.fromarray(np.asarray(heatmap, dtype=np.float32)).resize(
        size, Image.Resampling.BILINEAR)
    heat_arr = np.clip(np.asarray(heat, dtype=np.float32), 0, 1)
    gray = np.repeat(np.asarray(base, dtype=np.float32)[..., None], 3, axis=-1)
    alpha = np.where(heat_arr >= ALPHA_FLOOR, MAX_ALPHA * heat_arr, 0.0)[..., None]
    blended = gray * (1 - alpha) + colormap(heat_arr).astype(np.float32) * alpha
    return np.clip(blended + 0.5, 0, 255).astype(np.uint8)


def build_heatmap_sc(source: Dataset, heatmap: np.ndarray, label: str, model: ModelInfo, *,
                     series_instance_uid: str, instance_number: int,
                     sop_instance_uid: str | None = None) -> Dataset:
    """The SC for one source image and one label's map (``heatmap``: (h, w) in 0..1). Raises
    :class:`OutputBuildError` naming the source attribute it could not use."""
    display = to_display(decode_frame(source), source, PreprocessSpec())
    pixels = overlay(display, heatmap)
    source = complete_source(source)
    with warnings.catch_warnings(), naming_the_attribute("heatmap SC"):
        # highdicom warns with the value of odd person names: patient data must not reach logs.
        warnings.simplefilter("ignore", UserWarning)
        sc = _sc_image(source, pixels, model, series_instance_uid=series_instance_uid,
                       instance_number=instance_number, sop_instance_uid=sop_instance_uid)
    sc.ImageType = ["DERIVED", "SECONDARY"]
    # Laterality (Type 2C): the source's value when it has one; left out when the body part is
    # known (an unpaired part such as CHEST must not carry it, even empty); empty only when
    # the body part is unknown too, i.e. the side is "actually unknown".
    body_part = str(source.get("BodyPartExamined", "") or "").strip()
    if body_part:
        sc.BodyPartExamined = body_part
    laterality = str(source.get("Laterality", "") or "").strip()
    if laterality:
        sc.Laterality = laterality
    elif body_part:
        if "Laterality" in sc:
            del sc.Laterality
    else:
        sc.Laterality = ""
    sc.BurnedInAnnotation = "NO"
    sc.ImageComments = f"{label} class-activation map, {model.description}; not for diagnosis"[
        :10240]
    sc.DerivationDescription = f"heatmap of {label} overlaid on source"[:1024]
    source_ref = Dataset()
    source_ref.ReferencedSOPClassUID = source.SOPClassUID
    source_ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.SourceImageSequence = [source_ref]
    return sc


def _sc_image(source: Dataset, pixels: np.ndarray, model: ModelInfo, *,
              series_instance_uid: str, instance_number: int,
              sop_instance_uid: str | None) -> Dataset:
    return hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=pixels,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=series_instance_uid,
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=sop_instance_uid or generate_uid(),
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        patient_orientation=_orientation(source),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=f"AI heatmap {model.description} (unverified)"[:64],
        manufacturer_model_name=model.name[:64],
        software_versions=model.version[:64],
    )


def _orientation(source: Dataset) -> tuple[str, str]:
    value = source.get("PatientOrientation")
    if value is not None and len(value) == 2 and all(str(v) for v in value):
        return (str(value[0]), str(value[1]))
    return ("L", "F")  # a projection radiograph's usual orientation when none is given
