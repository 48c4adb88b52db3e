"""Bad input, all of it at once: every file pydicom ships (its deliberately broken ones
included), cut-short copies at every offset, zero-byte and non-DICOM files, absurd declared
lengths, path-traversal and newline file names, symlinks out of the watched folder. Each bad
file is quarantined with its reason (and `lightbox status` shows that reason), every good
file is registered and processed, and nothing raises."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
import pytest
from pydicom.data import get_testdata_file
from sqlalchemy import select

from db.models import Instance, QuarantinedFile
from db.session import session_scope
from lightbox.synthetic import write_study
from scheduler.ingest.folder import ingest_paths
from scheduler.ingest.header import read_header
from scheduler.ingest.quarantine import digest
from scheduler.ingest.registration import Outcome, register_file
from tests.conftest import Backend, run_cli
from tests.test_ingest import PYDICOM_FILES

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
PYDICOM_TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"
# pydicom-data's files (larger and more broken ones), found where pydicom finds them.
PYDICOM_DATA_FILES = Path(get_testdata_file("bad_sequence.dcm") or "").parent
# pydicom's deliberately broken files that must never be registered, with the reason's gist:
# the table test_ingest keeps (with why each is refused), less the files it registers.
BROKEN = {name: gist for name, gist in PYDICOM_FILES.items() if gist is not None}
MAX_SIZE = 4 << 20  # keep the test quick: skip pydicom-data's few very large files


def _pydicom_files() -> list[Path]:
    return sorted(p for root in (PYDICOM_TEST_FILES, PYDICOM_DATA_FILES)
                  for p in root.rglob("*") if p.is_file() and p.stat().st_size <= MAX_SIZE)


def _status(backend: Backend) -> dict[str, object]:
    out = run_cli(backend.env, "status", "--format", "json", "--limit", "0")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _synthetic_bytes(tmp_path: Path) -> bytes:
    study = write_study(tmp_path / "src", np.random.default_rng(0), label=0, images=1, size=16)
    return study.paths[0].read_bytes()


def _with_private_ob(tmp_path: Path, declared: int) -> bytes:
    """A valid CR with a private OB element before the pixels whose 4-byte length field is
    then patched to ``declared`` (the value is 4 bytes long)."""
    study = write_study(tmp_path / "ob", np.random.default_rng(1), label=0, images=1, size=16)
    ds = pydicom.dcmread(study.paths[0])
    ds.add_new(0x00091010, "OB", b"ABCD")
    ds.private_block(0x0009, "LIGHTBOX TEST", create=True)
    path = tmp_path / "ob.dcm"
    ds.save_as(path, enforce_file_format=True)
    data = bytearray(path.read_bytes())
    marker = struct.pack("<HH", 0x0009, 0x1010) + b"OB\x00\x00"
    at = data.index(marker) + len(marker)
    data[at:at + 4] = struct.pack("<I", declared)
    return bytes(data)


def test_every_pydicom_file_is_registered_or_quarantined_with_reason(
        sqlite_backend: Backend, tmp_path: Path) -> None:
    settings = sqlite_backend.settings
    files = _pydicom_files()
    assert len(files) > 100
    results = [(path.name, register_file(settings, path)) for path in files]  # never raises
    outcomes = dict(results)
    for name, gist in BROKEN.items():
        assert outcomes[name].outcome is Outcome.quarantined, name
        assert gist in (outcomes[name].reason or ""), (name, outcomes[name].reason)
    quarantined = [r for _, r in results if r.outcome is Outcome.quarantined]
    registered = [r for _, r in results if r.outcome is not Outcome.quarantined]
    assert quarantined and registered and all(r.reason for r in quarantined)
    status = _status(sqlite_backend)
    listed = status["quarantined"]
    assert status["quarantined_total"] == len(listed) == len(quarantined)
    assert sorted(q["reason"] for q in listed) == sorted(r.reason for r in quarantined)
    with session_scope(settings.sqlalchemy_url) as session:
        stored = set(session.scalars(select(Instance.sop_instance_uid)))
    assert {r.sop_instance_uid for r in registered} <= stored


def test_cut_at_every_offset_is_quarantined_never_registered(
        sqlite_backend: Backend, tmp_path: Path) -> None:
    """A file cut anywhere (preamble, file meta, an element, the pixel data) is refused."""
    settings = sqlite_backend.settings
    full = _synthetic_bytes(tmp_path)
    cuts = sorted({*range(0, len(full), 7), len(full) - 1})
    for cut in cuts:
        path = tmp_path / "cuts" / f"cut-{cut}.dcm"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(full[:cut])
        result = register_file(settings, path)
        assert result.outcome is Outcome.quarantined, f"cut at {cut} of {len(full)}"
    whole = tmp_path / "cuts" / "whole.dcm"
    whole.write_bytes(full)
    assert register_file(settings, whole).outcome is Outcome.registered
    with session_scope(settings.sqlalchemy_url) as session:
        codes = set(session.scalars(select(QuarantinedFile.reason_code)))
    assert codes <= {"not_dicom", "ingest"} and len(codes) == 2


@pytest.mark.parametrize("declared", [0x7FFFFFF0, 0xFFFFFFF0, 1 << 30])
def test_absurd_declared_length_is_quarantined(sqlite_backend: Backend, tmp_path: Path,
                                               declared: int) -> None:
    path = tmp_path / "absurd.dcm"
    path.write_bytes(_with_private_ob(tmp_path, declared))
    result = register_file(sqlite_backend.settings, path)
    assert result.outcome is Outcome.quarantined
    assert "truncated" in (result.reason or "") or "malformed" in (result.reason or "")


def test_absurd_rows_and_columns_are_quarantined(sqlite_backend: Backend,
                                                 tmp_path: Path) -> None:
    study = write_study(tmp_path / "rc", np.random.default_rng(2), label=0, images=1, size=16)
    ds = pydicom.dcmread(study.paths[0])
    ds.Rows = ds.Columns = 65535
    path = tmp_path / "huge.dcm"
    ds.save_as(path)
    result = register_file(sqlite_backend.settings, path)
    assert result.outcome is Outcome.quarantined and "pixel data truncated" in (result.reason or "")


@pytest.mark.slow
def test_hostile_folder_quarantines_each_bad_file_and_processes_the_rest(
        sqlite_backend: Backend, tmp_path: Path) -> None:
    settings = sqlite_backend.settings
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    good = write_study(inbox / "good", np.random.default_rng(3), label=0, images=2, size=32)
    full = _synthetic_bytes(tmp_path)
    outside = tmp_path / "outside-secret.dcm"
    outside.write_bytes(full)
    bad = {
        "%2e%2e%2f%2e%2e%2fetc%2fpasswd": b"root:x:0:0",
        "line\nbreak.dcm": full[:500],
        "x..\\..\\windows.dcm": b"",
        "x" * 200 + ".dcm": b"\x00" * 132,
        "DICM-but-junk.dcm": b"\x00" * 128 + b"DICM" + os.urandom(64),
        "absurd.dcm": _with_private_ob(tmp_path, 0xFFFFFFF0),
    }
    for name, data in bad.items():
        (inbox / name).write_bytes(data)
    (inbox / "escape.dcm").symlink_to(outside)
    (inbox / ".upload-in-progress.dcm").write_bytes(full[:100])  # dot files: still being written
    counts = ingest_paths(settings, [inbox], move=True)
    assert (inbox / ".upload-in-progress.dcm").exists()
    assert counts == {"registered": 2, "quarantined": len(bad) + 1}
    assert outside.read_bytes() == full  # a link out of the folder is never followed
    status = _status(sqlite_backend)
    names = {digest(settings, name): name for name in [*bad, "escape.dcm"]}
    reasons = {names[q["name_digest"]]: q["reason"] for q in status["quarantined"]}
    assert set(reasons) == {*bad, "escape.dcm"}
    assert reasons["escape.dcm"] == "symbolic link pointing outside the ingest folder"
    assert reasons["x..\\..\\windows.dcm"] == "empty file (0 bytes)"
    for q in status["quarantined"]:
        assert Path(q["path"]).parent.resolve().is_relative_to(settings.quarantine_dir.resolve())
    with session_scope(settings.sqlalchemy_url) as session:
        stored = set(session.scalars(select(Instance.sop_instance_uid)))
    assert stored == set(good.sop_instance_uids)
    table = run_cli(sqlite_backend.env, "status", "--limit", "0")
    assert table.returncode == 0 and "symbolic link pointing outside" in table.stdout
    # Names are not shown at all (digests only), so a newline in one cannot forge a line.
    assert "break.dcm" not in table.stdout and "passwd" not in table.stdout


def test_read_header_never_raises_anything_but_ingest_errors() -> None:
    """Over every pydicom test file: an accepted header says what pydicom itself reads (UIDs,
    syntax, size), a file pydicom does not take as DICOM is ``not_dicom``, anything else is an
    IngestError with its reason; each outcome occurs (any other exception fails the test)."""
    from lightbox.errors import IngestError

    outcomes: dict[str, list[str]] = {"accepted": [], "not_dicom": [], "rejected": []}
    for path in _pydicom_files():
        try:
            reference = pydicom.dcmread(path, stop_before_pixels=True)
        except pydicom.errors.InvalidDicomError:
            reference = None
        except Exception:  # noqa: BLE001 - pydicom's own failure: read_header must refuse too
            reference = False  # type: ignore[assignment]
        try:
            header = read_header(path)
        except IngestError as exc:
            assert str(exc), path.name
            if reference is None:
                assert exc.code == "not_dicom", (path.name, str(exc))
                outcomes["not_dicom"].append(path.name)
            else:
                assert exc.code != "not_dicom", (path.name, str(exc))
                outcomes["rejected"].append(path.name)
            continue
        assert reference, f"{path.name}: accepted, but pydicom cannot read it"
        assert (header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid,
                header.sop_class_uid, header.transfer_syntax_uid) == (
            reference.StudyInstanceUID, reference.SeriesInstanceUID, reference.SOPInstanceUID,
            reference.SOPClassUID, reference.file_meta.TransferSyntaxUID), path.name
        assert (header.rows, header.columns) == (reference.get("Rows"), reference.get("Columns"))
        outcomes["accepted"].append(path.name)
    assert "CT_small.dcm" in outcomes["accepted"] and "no_meta.dcm" in outcomes["not_dicom"]
    assert all(outcomes.values()), {k: len(v) for k, v in outcomes.items()}
