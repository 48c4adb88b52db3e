"""A volume job's series-level findings as a Comprehensive 3D SR (TID 1500, highdicom), kept
apart from the 2-D SR (:mod:`scheduler.export.dicom.sr`).

One volumetric measurement group per lesion label (TID 1411), referencing the segment of the
DICOM SEG it was measured on and the source series: Volume (SCT 118565006, mL) and largest
Diameter (SCT 81827009, mm), with the model's score as an AI score (DCM "Probability") and a
qualitative evaluation present/absent (SCT 52101004 / 2667000). Without a SEG (negative series, classifiers) the group
references the source images instead. UNVERIFIED, PARTIAL: AI output awaiting a reader.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from scheduler.export.dicom.common import MANUFACTURER, SR_SERIES_NUMBER, ModelInfo

PRESENT = hd.sr.CodedConcept("52101004", "SCT", "Present")
ABSENT = hd.sr.CodedConcept("2667000", "SCT", "Absent")
FINDING = hd.sr.CodedConcept("52988006", "SCT", "Lesion")


@dataclass(frozen=True)
class SeriesResult:
    label: str
    score: float
    threshold: float
    positive: bool
    lesion_count: int | None = None
    volume_ml: float | None = None
    largest_diameter_mm: float | None = None


def build_volume_sr(sources: Sequence[Dataset], results: Sequence[SeriesResult],
                    model: ModelInfo, *, seg: Dataset | None = None,
                    sop_instance_uid: str | None = None) -> Dataset:
    if not sources:
        raise ValueError("an SR needs at least one source instance as evidence")
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(), name=model.description, manufacturer_name=MANUFACTURER,
            model_name=model.name[:64], serial_number=model.version[:64]))
    algorithm = hd.sr.AlgorithmIdentification(name=model.name[:64], version=model.version[:64])
    groups: list[hd.sr.MeasurementsAndQualitativeEvaluations |
                 hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations] = []
    series_uid = str(sources[0].SeriesInstanceUID)
    for number, result in enumerate(results, start=1):
        evaluation = hd.sr.QualitativeEvaluation(
            name=FINDING, value=PRESENT if result.positive else ABSENT)
        measurements = []
        if result.volume_ml is not None:
            measurements.append(hd.sr.Measurement(
                name=codes.SCT.Volume, value=float(result.volume_ml),
                unit=hd.sr.CodedConcept("mL", "UCUM", "milliliter"), algorithm_id=algorithm))
        if result.largest_diameter_mm:
            measurements.append(hd.sr.Measurement(
                name=codes.SCT.Diameter, value=float(result.largest_diameter_mm),
                unit=hd.sr.CodedConcept("mm", "UCUM", "millimeter"), algorithm_id=algorithm))
        measurements.append(hd.sr.Measurement(
            name=codes.DCM.Probability, value=float(result.score), unit=hd.sr.CodedConcept("1", "UCUM", "no units"),
            algorithm_id=algorithm))
        tracking = hd.sr.TrackingIdentifier(uid=generate_uid(),
                                            identifier=f"{result.label} {number}"[:64])
        if seg is not None and result.positive:
            groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking,
                referenced_segment=hd.sr.ReferencedSegment(
                    sop_class_uid=str(seg.SOPClassUID), sop_instance_uid=str(seg.SOPInstanceUID),
                    segment_number=number,
                    source_series=hd.sr.SourceSeriesForSegmentation(series_uid)),
                finding_type=FINDING, algorithm_id=algorithm, measurements=measurements,
                qualitative_evaluations=[evaluation]))
        else:
            groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking, finding_type=FINDING, algorithm_id=algorithm,
                source_images=[hd.sr.SourceImageForMeasurementGroup(
                    str(ds.SOPClassUID), str(ds.SOPInstanceUID)) for ds in sources[:1]],
                measurements=measurements, qualitative_evaluations=[evaluation]))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.SCT.ImagingProcedure,
        imaging_measurements=groups, title=codes.DCM.ImagingMeasurementReport)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return hd.sr.Comprehensive3DSR(
            evidence=[*sources, *([seg] if seg is not None else [])], content=report,
            series_instance_uid=generate_uid(), series_number=SR_SERIES_NUMBER,
            sop_instance_uid=sop_instance_uid or generate_uid(), instance_number=1,
            manufacturer=MANUFACTURER, is_complete=False, is_final=False, is_verified=False,
            series_description=f"AI volume findings {model.description} (unverified)"[:64],
            manufacturer_model_name=model.name[:64], software_versions=model.version[:64])
