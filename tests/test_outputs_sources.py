"""SR and heatmap SC built from sources as real modalities send them (issue 19, items 6, 7):
Type 2 attributes missing or multi-valued, no Laterality; validated by dciodvfy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from lightbox.errors import OutputBuildError
from lightbox.synthetic import write_study
from scheduler.export.dicom.common import FindingItem, ModelInfo
from scheduler.export.dicom.heatmap_sc import build_heatmap_sc
from scheduler.export.dicom.sr import PRIVATE_SCHEME, build_sr
from tests.pacs_peers import require

MODEL = ModelInfo("chest", "1.0")


def _source(tmp_path: Path) -> Dataset:
    """A CR as some modalities send it: no PatientSex, no StudyID, no PatientID, no
    Laterality, and a PatientName with two values."""
    study = write_study(tmp_path / "in", np.random.default_rng(0), label=1, size=64)
    ds = dcmread(study.paths[0])
    for keyword in ("PatientSex", "StudyID", "PatientID", "Laterality", "AccessionNumber"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.PatientName = ["DOE^JOHN", "DOE^J"]
    return ds


def _dciodvfy(ds: Dataset, path: Path) -> list[str]:
    import subprocess

    require("dciodvfy")
    ds.save_as(path, enforce_file_format=True)
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (out.stdout + out.stderr).splitlines()
            if line.startswith(("Error", "Warning"))]


def _problems(lines: list[str]) -> list[str]:
    """The kinds of dciodvfy findings issue 19 names: errors, the private scheme, Laterality,
    missing Type 2 attributes."""
    return [line for line in lines if line.startswith("Error") or any(
        word in line for word in (PRIVATE_SCHEME, "Laterality", "Type 2"))]


def test_sr_and_sc_from_a_source_missing_type2_attributes(tmp_path: Path) -> None:
    source = _source(tmp_path)
    finding = FindingItem("pneumonia", 0.8, 0.5, True, str(source.SOPInstanceUID))
    sr = build_sr([source], [finding], MODEL)
    sc = build_heatmap_sc(source, np.random.default_rng(1).random((8, 8)), "pneumonia", MODEL,
                          series_instance_uid="1.2.826.0.1.3680043.8.498.1",
                          instance_number=1)
    for obj in (sr, sc):
        for keyword in ("PatientSex", "StudyID", "PatientID"):
            assert keyword in obj and obj.data_element(keyword).value in ("", None), keyword
        assert str(obj.PatientName) == "DOE^JOHN"
    assert "Laterality" not in sc and sc.BodyPartExamined == "CHEST"
    assert "PatientSex" not in source  # the source itself is not changed
    assert _problems(_dciodvfy(sr, tmp_path / "sr.dcm")) == []
    assert _problems(_dciodvfy(sc, tmp_path / "sc.dcm")) == []


def test_private_labels_are_declared(tmp_path: Path) -> None:
    source = _source(tmp_path)
    sr = build_sr([source], [FindingItem("consolidation-x", 0.2, 0.5, False)], MODEL)
    (declared,) = [item for item in sr.CodingSchemeIdentificationSequence
                   if item.CodingSchemeDesignator == PRIVATE_SCHEME]
    assert declared.CodingSchemeName
    standard = build_sr([source], [FindingItem("pneumonia", 0.2, 0.5, False)], MODEL)
    assert PRIVATE_SCHEME not in str(standard)  # a standard label needs no private scheme


def test_build_failure_names_the_attribute(tmp_path: Path) -> None:
    source = _source(tmp_path)
    del source.SOPClassUID
    with pytest.raises(OutputBuildError, match="SOPClassUID") as caught:
        build_sr([source], [FindingItem("pneumonia", 0.2, 0.5, False)], MODEL)
    assert "DOE" not in str(caught.value)
