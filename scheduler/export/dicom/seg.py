"""A volume job's lesion mask as a DICOM Segmentation (highdicom): binary, one segment per
label, frames referencing the source CT/MR instances they were computed on.

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

from scheduler.export.dicom.common import MANUFACTURER, ModelInfo

SEG_SERIES_NUMBER = 9903
# SNOMED CT property types by label; a label not listed is a "Lesion" of its own name.
PROPERTY_TYPES = {"lesion": codes.SCT.Lesion}


def build_seg(sources: Sequence[Dataset], mask: np.ndarray, labels: Sequence[str],
              model: ModelInfo, *, synthetic: bool = False,
              sop_instance_uid: str | None = None) -> Dataset:
    """``mask`` (slices, rows, columns) holds label numbers 1..len(labels) (0 = none), its
    slices in the order of ``sources`` (single-frame instances of one series)."""
    if len(sources) != mask.shape[0]:
        raise ValueError(f"mask has {mask.shape[0]} slices for {len(sources)} source instances")
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
            source_images=list(sources),
            pixel_array=np.ascontiguousarray(mask.astype(np.uint8)),
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=generate_uid(), series_number=SEG_SERIES_NUMBER,
            sop_instance_uid=sop_instance_uid or generate_uid(), instance_number=1,
            manufacturer=MANUFACTURER, manufacturer_model_name=model.name[:64],
            software_versions=model.version[:64], device_serial_number=model.version[:64],
            series_description=f"AI segmentation {model.description}{note}"[:64],
            content_label="AI_SEG", content_description=f"unverified AI output{note}"[:64],
            omit_empty_frames=True)
