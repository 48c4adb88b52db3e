"""A volume job's lesion mask as a DICOM Segmentation (highdicom): binary, one segment per
label, frames referencing the source CT/MR instances they were computed on: a single-frame
source instance per frame, or a frame (Referenced Frame Number) of an Enhanced multi-frame
CT/MR instance. The SEG's frames are in position order along the slice normal (highdicom sorts
them by their plane positions), whatever the order of the source's frames.

Codes are SNOMED CT where one exists, never a private scheme: segmented property category
"Morphologically abnormal structure" (SCT 49755003), type "Lesion" (SCT 52988006); the
algorithm family is DCM "Artificial Intelligence" (CID 7162). Series description and the
content label say the segmentation is AI output (and SYNTHETIC when the model was trained
on synthetic data).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from lightbox.errors import LightboxError
from lightbox.volume import slices_of
from scheduler.export.dicom.common import MANUFACTURER, ModelInfo

SEG_SERIES_NUMBER = 9903
# SNOMED CT property types by label; a label not listed is a "Lesion" of its own name.
PROPERTY_TYPES = {"lesion": codes.SCT.Lesion}


# Where two plane positions are the same (mm): positions are copied from the source's headers,
# so they agree to the digits written there.
POSITION_TOLERANCE_MM = 1e-3
SOURCE_IMAGE_PURPOSE = hd.sr.CodedConcept("121322", "DCM",
                                          "Source image for image processing operation")
SEGMENTATION_DERIVATION = hd.sr.CodedConcept("113076", "DCM", "Segmentation")


def build_seg(sources: Sequence[Dataset], mask: np.ndarray, labels: Sequence[str],
              model: ModelInfo, *, frames: Sequence[tuple[str, int]] | None = None,
              synthetic: bool = False, sop_instance_uid: str | None = None) -> Dataset:
    """``mask`` (slices, rows, columns) holds label numbers 1..len(labels) (0 = none).

    Without ``frames`` its slices are in the order of ``sources`` (single-frame instances of
    one series). With ``frames``, ``sources`` are the Enhanced multi-frame instances of the
    series (each once) and ``frames[i]`` is the (SOPInstanceUID, frame number) mask slice ``i``
    was assembled from."""
    if frames is not None:
        return _build_multiframe(sources, mask, labels, model, frames, synthetic=synthetic,
                                 sop_instance_uid=sop_instance_uid)
    if len(sources) != mask.shape[0]:
        raise ValueError(f"mask has {mask.shape[0]} slices for {len(sources)} source instances")
    return _segmentation(list(sources), [], mask, labels, model, None, synthetic=synthetic,
                         sop_instance_uid=sop_instance_uid)


def _build_multiframe(sources: Sequence[Dataset], mask: np.ndarray, labels: Sequence[str],
                      model: ModelInfo, frames: Sequence[tuple[str, int]], *, synthetic: bool,
                      sop_instance_uid: str | None) -> Dataset:
    """Planes given by the source frames' own positions (so the SEG's frames sit exactly on
    them); highdicom references the frames of a series held in ONE multi-frame instance, and
    leaves frames of a series split over several instances unreferenced: those get their
    source frame here, found by position."""
    if len(frames) != mask.shape[0]:
        raise ValueError(f"mask has {mask.shape[0]} slices for {len(frames)} source frames")
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    located: dict[tuple[str, int], tuple[float, float, float]] = {}
    for ds in sources:
        for ref in slices_of(ds, ""):
            located[(ref.sop_instance_uid, ref.frame or 1)] = ref.position
    try:
        positions = [located[(uid, int(frame))] for uid, frame in frames]
    except KeyError as exc:
        raise LightboxError(f"source frame {exc.args[0]} of the mask is not in the series "
                            "stored") from None
    planes = [hd.PlanePositionSequence(hd.CoordinateSystemNames.PATIENT, p) for p in positions]
    seg = _segmentation([by_uid[frames[0][0]]],
                        [ds for uid, ds in by_uid.items() if uid != frames[0][0]],
                        mask, labels, model, planes, synthetic=synthetic,
                        sop_instance_uid=sop_instance_uid)
    where = np.asarray(positions)
    for group in seg.PerFrameFunctionalGroupsSequence:
        if group.get("DerivationImageSequence"):
            continue
        position = np.asarray([float(v) for v in
                               group.PlanePositionSequence[0].ImagePositionPatient])
        distance = np.linalg.norm(where - position, axis=1)
        index = int(np.argmin(distance))
        if distance[index] > POSITION_TOLERANCE_MM:
            raise LightboxError(f"SEG frame at {tuple(position)} matches no source frame")
        uid, frame = frames[index]
        group.DerivationImageSequence = [_derivation(by_uid[uid], int(frame))]
    return seg


def _derivation(source: Dataset, frame: int) -> Dataset:
    """A Derivation Image Sequence item naming one source frame (as highdicom writes them)."""
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    reference.ReferencedFrameNumber = frame
    reference.SpatialLocationsPreserved = "YES"
    reference.PurposeOfReferenceCodeSequence = [SOURCE_IMAGE_PURPOSE]
    item = Dataset()
    item.SourceImageSequence = [reference]
    item.DerivationCodeSequence = [SEGMENTATION_DERIVATION]
    return item


def _segmentation(sources: list[Dataset], further: list[Dataset], mask: np.ndarray,
                  labels: Sequence[str], model: ModelInfo,
                  planes: list[hd.PlanePositionSequence] | None, *, synthetic: bool,
                  sop_instance_uid: str | None) -> Dataset:
    algorithm = hd.AlgorithmIdentificationSequence(
        name=model.name[:64], family=codes.cid7162.ArtificialIntelligence,
        version=model.version[:64])
    descriptions = []
    for number, label in enumerate(labels, start=1):
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=label[:64],
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=PROPERTY_TYPES.get(label.lower(), codes.SCT.Lesion),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm))
    note = " SYNTHETIC" if synthetic else ""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # highdicom echoes patient names
        return hd.seg.Segmentation(
            source_images=sources, further_source_images=further or None,
            plane_positions=planes, pixel_array=np.ascontiguousarray(mask.astype(np.uint8)),
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=generate_uid(), series_number=SEG_SERIES_NUMBER,
            sop_instance_uid=sop_instance_uid or generate_uid(), instance_number=1,
            manufacturer=MANUFACTURER, manufacturer_model_name=model.name[:64],
            software_versions=model.version[:64], device_serial_number=model.version[:64],
            series_description=f"AI segmentation {model.description}{note}"[:64],
            content_label="AI_SEG", content_description=f"unverified AI output{note}"[:64],
            omit_empty_frames=True)
