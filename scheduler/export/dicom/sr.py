"""A job's findings as a DICOM Comprehensive 3D SR (TID 1500 measurement report, highdicom).

One measurement group per finding: the model's score (with its decision threshold) and a
qualitative evaluation (present/absent), the algorithm identification (model name and
version), and references to the source image(s) it was computed on. The report is marked
``VerificationFlag`` UNVERIFIED and ``CompletionFlag`` PARTIAL: AI output awaiting a reader.
The source instances are listed as evidence, so a PACS files the SR under the same study.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from scheduler.export.dicom.common import (
    MANUFACTURER,
    SR_SERIES_NUMBER,
    FindingItem,
    ModelInfo,
    complete_source,
    naming_the_attribute,
)

# Model labels with a standard code (SNOMED CT, DICOM): a PACS or reader understands these.
STANDARD_LABELS: dict[str, hd.sr.CodedConcept] = {
    "pneumonia": hd.sr.CodedConcept("233604007", "SCT", "Pneumonia"),
    "cardiomegaly": hd.sr.CodedConcept("287272002", "SCT", "Cardiomegaly"),
    "effusion": hd.sr.CodedConcept("60046008", "SCT", "Pleural effusion"),
    "pleural_effusion": hd.sr.CodedConcept("60046008", "SCT", "Pleural effusion"),
    "pneumothorax": hd.sr.CodedConcept("36118008", "SCT", "Pneumothorax"),
    "nodule": hd.sr.CodedConcept("27925004", "SCT", "Nodule"),
    "mass": hd.sr.CodedConcept("4147007", "SCT", "Mass"),
    "edema": hd.sr.CodedConcept("79654002", "SCT", "Edema"),
    "opacity": hd.sr.CodedConcept("112001", "DCM", "Opacity"),
}
# Any other label is the model's own vocabulary: a private scheme, declared in the Coding
# Scheme Identification Sequence of every SR that uses it.
PRIVATE_SCHEME = "99LIGHTBOX"
PRIVATE_SCHEME_NAME = "Lightbox model labels"
UNITLESS = hd.sr.CodedConcept("1", "UCUM", "no units")
SCORE = hd.sr.CodedConcept("122157", "DCM", "Probability")  # the model's score, 0..1
THRESHOLD = hd.sr.CodedConcept("122411", "DCM", "Threshold Value")


def label_concept(label: str) -> hd.sr.CodedConcept:
    known = STANDARD_LABELS.get(label.lower().replace(" ", "_"))
    return known if known is not None else hd.sr.CodedConcept(label[:16], PRIVATE_SCHEME,
                                                               label[:64])


def _group(finding: FindingItem, model: ModelInfo,
           by_uid: dict[str, Dataset]) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    algorithm = hd.sr.AlgorithmIdentification(name=model.name[:64], version=model.version[:64])
    sources = [by_uid[finding.sop_instance_uid]] if finding.sop_instance_uid in by_uid else \
        list(by_uid.values())
    referenced = [hd.sr.SourceImageForMeasurement(str(ds.SOPClassUID), str(ds.SOPInstanceUID))
                  for ds in sources]
    group_sources = [hd.sr.SourceImageForMeasurementGroup(str(ds.SOPClassUID),
                                                          str(ds.SOPInstanceUID))
                     for ds in sources]
    if finding.distribution is not None:
        measurements, evaluations = _class_items(finding, algorithm, referenced)
    else:
        measurements = [
            hd.sr.Measurement(
                name=SCORE, value=float(finding.score), unit=UNITLESS, algorithm_id=algorithm,
                referenced_images=referenced),
            hd.sr.Measurement(
                name=THRESHOLD, value=float(finding.threshold), unit=UNITLESS,
                algorithm_id=algorithm),
        ]
        evaluations = [hd.sr.QualitativeEvaluation(
            name=label_concept(finding.label),
            value=codes.SCT.Present if finding.positive else codes.SCT.Absent)]
    where = finding.sop_instance_uid or "study"
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=generate_uid(), identifier=f"{finding.label} {where}"[:64]),
        algorithm_id=algorithm,
        finding_type=label_concept(finding.label),
        measurements=measurements,
        qualitative_evaluations=evaluations or None,
        source_images=group_sources,
    )


def _class_items(finding: FindingItem, algorithm: hd.sr.AlgorithmIdentification,
                 referenced: list[hd.sr.SourceImageForMeasurement],
                 ) -> tuple[list[hd.sr.Measurement], list[hd.sr.QualitativeEvaluation]]:
    """A multiclass image: the class distribution as numeric measurements; present/absent only
    for what is a finding. A decided finding class is present; a decided background class
    makes every other class absent; an indeterminate image asserts nothing."""
    distribution = finding.distribution or {}
    measurements = [
        hd.sr.Measurement(name=label_concept(label), value=float(p), unit=UNITLESS,
                          algorithm_id=algorithm, referenced_images=referenced)
        for label, p in distribution.items()]
    if finding.threshold > 0:
        measurements.append(hd.sr.Measurement(
            name=THRESHOLD, value=float(finding.threshold), unit=UNITLESS,
            algorithm_id=algorithm))
    if finding.indeterminate:
        return measurements, []
    if finding.positive:
        return measurements, [hd.sr.QualitativeEvaluation(name=label_concept(finding.label),
                                                          value=codes.SCT.Present)]
    return measurements, [hd.sr.QualitativeEvaluation(name=label_concept(label),
                                                      value=codes.SCT.Absent)
                          for label in distribution if label != finding.label]


NOT_FOR_CLINICAL_USE = ("Model trained on SYNTHETIC data: this result is not for clinical "
                        "use.")


def _synthetic_comment(report: hd.sr.MeasurementReport) -> None:
    """A TEXT comment at the root: the result of a SYNTHETIC-trained model, not for clinical
    use (readers and PACS show it with the findings)."""
    report[0].ContentSequence.append(hd.sr.TextContentItem(
        name=codes.DCM.Comment, value=NOT_FOR_CLINICAL_USE,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))


def build_sr(sources: Sequence[Dataset], findings: Sequence[FindingItem], model: ModelInfo,
             *, sop_instance_uid: str | None = None) -> Dataset:
    """The SR for one job. ``sources``: the job's source instances (headers are enough).
    Raises :class:`OutputBuildError` naming the source attribute it could not use."""
    if not sources:
        raise ValueError("an SR needs at least one source instance as evidence")
    sources = [complete_source(ds) for ds in sources]
    with naming_the_attribute("SR"):
        return _build(sources, findings, model, sop_instance_uid)


def _build(sources: Sequence[Dataset], findings: Sequence[FindingItem], model: ModelInfo,
           sop_instance_uid: str | None) -> Dataset:
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(), name=model.description, manufacturer_name=MANUFACTURER,
            model_name=model.name[:64], serial_number=model.version[:64]),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.SCT.ImagingProcedure,
        imaging_measurements=[_group(f, model, by_uid) for f in findings],
        title=codes.DCM.ImagingMeasurementReport,
    )
    if model.synthetic:
        _synthetic_comment(report)
    with warnings.catch_warnings():
        # highdicom warns with the value of odd person names: patient data must not reach logs.
        warnings.simplefilter("ignore", UserWarning)
        document = _document(sources, report, model, sop_instance_uid)
    labels = {f.label for f in findings} | {c for f in findings for c in f.distribution or {}}
    if any(label_concept(label).scheme_designator == PRIVATE_SCHEME for label in labels):
        declared = Dataset()
        declared.CodingSchemeDesignator = PRIVATE_SCHEME
        declared.CodingSchemeName = PRIVATE_SCHEME_NAME
        declared.CodingSchemeResponsibleOrganization = MANUFACTURER
        document.CodingSchemeIdentificationSequence = [
            *document.get("CodingSchemeIdentificationSequence", []), declared]
    return document


def _document(sources: Sequence[Dataset], report: hd.sr.MeasurementReport, model: ModelInfo,
              sop_instance_uid: str | None) -> Dataset:
    return hd.sr.Comprehensive3DSR(
        evidence=list(sources),
        content=report,
        series_instance_uid=generate_uid(),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=sop_instance_uid or generate_uid(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=False,
        is_final=False,
        is_verified=False,
        series_description=(f"AI findings {model.description} "
                            f"({'SYNTHETIC, not clinical' if model.synthetic else 'unverified'})"
                            )[:64],
        manufacturer_model_name=model.name[:64],
        software_versions=model.version[:64],
    )
