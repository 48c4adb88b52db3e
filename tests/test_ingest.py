"""Registration and folder ingest on real DICOM files: pydicom's test files (good and deliberately
broken), cut-short copies, synthetic CRs. Each test has its own data dir and SQLite database."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError

from db.migrate import upgrade
from db.models import Event, Instance, QuarantinedFile, Series, Study, StudyStatus
from db.session import session_scope
from lightbox.roots import stored_file
from lightbox.settings import Settings
from lightbox.synthetic import write_study
from scheduler.ingest.folder import ingest_paths, watch
from scheduler.ingest.quarantine import digest
from scheduler.ingest.registration import Outcome, RegisterResult, register_file

# Writing deliberately invalid UIDs makes pydicom warn; that is the point of those files.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    settings = Settings(data_dir=tmp_path / "data")
    upgrade(settings.sqlalchemy_url)
    return settings


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def instance_uids(settings: Settings) -> set[str]:
    with session_scope(settings.sqlalchemy_url) as session:
        return set(session.scalars(select(Instance.sop_instance_uid)))


def quarantined_rows(settings: Settings) -> list[QuarantinedFile]:
    with session_scope(settings.sqlalchemy_url) as session:
        return list(session.scalars(select(QuarantinedFile).order_by(QuarantinedFile.id)))


def count(settings: Settings, model: type) -> int:
    with session_scope(settings.sqlalchemy_url) as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def fresh(name: str) -> Dataset:
    """A pydicom test file with new study/series/SOP UIDs (pixels and syntax untouched)."""
    ds = pydicom.dcmread(get_testdata_file(name))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return ds


def write(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def copy_testdata(name: str, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(get_testdata_file(name), target)
    return target


def is_inside(path: Path, root: Path) -> bool:
    return path.parent.resolve().is_relative_to(root.resolve())


# --- idempotence and byte-exact storage --------------------------------------------------------


@pytest.mark.parametrize("name", ["CT_small.dcm", "JPEG2000.dcm", "MR_small_RLE.dcm"])
def test_same_file_twice_gives_one_row_and_byte_identical_storage(
    settings: Settings, tmp_path: Path, name: str
) -> None:
    source = copy_testdata(name, tmp_path / "in" / name)
    original = pydicom.dcmread(source)

    first = register_file(settings, source)
    second = register_file(settings, source)

    assert first.outcome is Outcome.registered
    assert second.outcome is Outcome.duplicate
    assert first.sop_instance_uid == second.sop_instance_uid == original.SOPInstanceUID
    expected = (settings.storage_dir / original.StudyInstanceUID / original.SeriesInstanceUID
                / f"{original.SOPInstanceUID}.dcm")
    with session_scope(settings.sqlalchemy_url) as session:
        rows = list(session.scalars(select(Instance)))
        assert len(rows) == 1
        assert count(settings, Study) == count(settings, Series) == 1
        row = rows[0]
        assert stored_file(settings, row.stored_path or "") == expected
        assert row.sha256 == sha256(source)
        assert row.size_bytes == source.stat().st_size
        assert row.transfer_syntax_uid == original.file_meta.TransferSyntaxUID
    # Stored byte for byte: no re-encoding, the (compressed) transfer syntax is kept.
    assert expected.read_bytes() == source.read_bytes()
    assert pydicom.dcmread(expected).file_meta.TransferSyntaxUID == (
        original.file_meta.TransferSyntaxUID)
    assert source.exists()  # move=False by default: ingest copies
    leftovers = [p for p in expected.parent.iterdir() if p.name.startswith(".incoming-")]
    assert leftovers == []


def test_same_uid_with_new_bytes_replaces_the_instance(settings: Settings, tmp_path: Path) -> None:
    ds = fresh("CT_small.dcm")
    path = write(ds, tmp_path / "in" / "a.dcm")
    assert register_file(settings, path).outcome is Outcome.registered
    ds.SeriesDescription = "corrected"
    corrected = write(ds, tmp_path / "in" / "b.dcm")

    result = register_file(settings, corrected)

    assert result.outcome is Outcome.registered
    with session_scope(settings.sqlalchemy_url) as session:
        (row,) = session.scalars(select(Instance))
        assert row.sha256 == sha256(corrected)
        assert stored_file(settings, row.stored_path or "").read_bytes() == corrected.read_bytes()


def test_one_batch_registers_new_duplicate_and_corrected_instances(settings: Settings,
                                                                   tmp_path: Path) -> None:
    """A batch (the SCP registrar's unit) follows the one-at-a-time rules per instance, in
    order: new rows (bulk inserted), the same bytes twice (duplicate), the same UID with new
    bytes within the batch (the later bytes win) and a UID already in the database."""
    from scheduler.ingest.registration import register_received
    from scheduler.ingest.spool import received

    known = fresh("CT_small.dcm")
    assert register_file(settings, write(known, tmp_path / "known.dcm")).outcome \
        is Outcome.registered
    first, second = fresh("CT_small.dcm"), fresh("MR_small.dcm")
    paths = [write(first, tmp_path / "spool" / "1.dcm"), write(second, tmp_path / "spool" / "2.dcm")]
    paths.append(write(first, tmp_path / "spool" / "3.dcm"))  # same bytes again
    second.SeriesDescription = "corrected"
    paths.append(write(second, tmp_path / "spool" / "4.dcm"))  # same UID, new bytes
    paths.append(write(known, tmp_path / "spool" / "5.dcm"))  # already registered
    expected_sha = {first.SOPInstanceUID: sha256(paths[0]),
                    second.SOPInstanceUID: sha256(paths[3]),
                    known.SOPInstanceUID: sha256(paths[4])}

    results = register_received(settings, [received(p, p.read_bytes(), "scp:MOD") for p in paths])

    assert [r.outcome for r in results] == [Outcome.registered, Outcome.registered,
                                            Outcome.duplicate, Outcome.registered,
                                            Outcome.duplicate]
    with session_scope(settings.sqlalchemy_url) as session:
        rows = {r.sop_instance_uid: r for r in session.scalars(select(Instance))}
        assert {uid: r.sha256 for uid, r in rows.items()} == expected_sha
        assert rows[second.SOPInstanceUID].source == "scp:MOD"
        for uid, row in rows.items():
            assert sha256(stored_file(settings, row.stored_path or "")) == expected_sha[uid]
            assert row.series.series_instance_uid == (
                {first.SOPInstanceUID: first, second.SOPInstanceUID: second,
                 known.SOPInstanceUID: known}[uid].SeriesInstanceUID)
    assert not any(p.exists() for p in paths)  # spool names removed once committed


# --- move semantics ------------------------------------------------------------------------------


def test_move_removes_source_after_registration(settings: Settings, tmp_path: Path) -> None:
    source = copy_testdata("MR_small.dcm", tmp_path / "in" / "mr.dcm")
    data = source.read_bytes()

    result = register_file(settings, source, move=True)

    assert result.outcome is Outcome.registered
    assert not source.exists()
    with session_scope(settings.sqlalchemy_url) as session:
        (row,) = session.scalars(select(Instance))
        assert stored_file(settings, row.stored_path or "").read_bytes() == data


def test_without_move_source_is_kept(settings: Settings, tmp_path: Path) -> None:
    source = copy_testdata("MR_small.dcm", tmp_path / "in" / "mr.dcm")
    assert register_file(settings, source, move=False).outcome is Outcome.registered
    assert source.exists()
    assert instance_uids(settings) == {pydicom.dcmread(source).SOPInstanceUID}


def test_source_is_kept_when_the_registration_transaction_fails(tmp_path: Path) -> None:
    # A database without tables: the transaction fails, so the source must not be removed.
    settings = Settings(data_dir=tmp_path / "unmigrated")
    source = copy_testdata("MR_small.dcm", tmp_path / "in" / "mr.dcm")
    data = source.read_bytes()

    with pytest.raises(OperationalError, match="no such table"):
        register_file(settings, source, move=True)

    assert source.read_bytes() == data


def test_bad_file_is_moved_into_quarantine_with_move(settings: Settings, tmp_path: Path) -> None:
    source = tmp_path / "in" / "notes.txt"
    source.parent.mkdir()
    source.write_text("not an image\n")

    result = register_file(settings, source, move=True)

    assert result.outcome is Outcome.quarantined
    assert not source.exists()
    (row,) = quarantined_rows(settings)
    assert row.reason_code == "not_dicom"
    assert Path(row.quarantine_path).read_text() == "not an image\n"
    assert is_inside(Path(row.quarantine_path), settings.quarantine_dir)


# --- bad input, mixed with good files in one folder ---------------------------------------------

# pydicom's deliberately odd files, judged one by one (None: registered, else the reason).
PYDICOM_FILES: dict[str, str | None] = {
    # No preamble/'DICM' and no file meta: not Part 10.
    "no_meta.dcm": "not a DICOM Part 10 file",
    "ExplVR_LitEndNoMeta.dcm": "not a DICOM Part 10 file",
    # File meta without a transfer syntax: the data set cannot be interpreted.
    "meta_missing_tsyntax.dcm": "no TransferSyntaxUID",
    # MR_small cut inside its (native) pixel data.
    "MR_truncated.dcm": "truncated",
    # rtplan.dcm cut mid-element. pydicom reads it without a word (it stops at end of file and
    # drops the last 27 elements), so the header check must find the short element itself.
    "rtplan_truncated.dcm": "truncated",
    # An element whose value does not match its VR: fails when the element is read.
    "badVR.dcm": "malformed DICOM element",
    # Hex digests where UIDs belong: such a UID would become a storage path.
    "bad_sequence.dcm": "invalid StudyInstanceUID",
    # pydicom-data's cut JPEG 2000 file is a stripped data set without any study UID.
    "emri_small_jpeg_2k_lossless_too_short.dcm": "missing StudyInstanceUID",
    # Fragments made for pydicom's parser tests, not instances: no UIDs to register under...
    "no_meta_group_length.dcm": "missing StudyInstanceUID",
    "priv_SQ.dcm": "missing StudyInstanceUID",
    # ...or Pixel Data without Bits Allocated, so its size cannot be checked.
    "nested_priv_SQ.dcm": "malformed DICOM element",
    "UN_sequence.dcm": "missing StudyInstanceUID",
    "empty_charset_LEI.dcm": "missing StudyInstanceUID",
    # Read fine by pydicom and complete: odd but valid, so registered.
    # YBR_FULL_422 native pixel data is 2/3 the size of RGB (chroma subsampled): complete.
    "SC_ybr_full_422_uncompressed.dcm": None,
    # An SR with empty IS/DS values: no pixels, all UIDs valid.
    "reportsi_with_empty_number_tags.dcm": None,
    # Complete and well-formed; its 12-bit JPEG stream is one libjpeg refuses, but registration
    # does not decode (the worker does, and reports PixelDecodeError), so it is accepted.
    "JPEG-lossy.dcm": None,
}


def _cut_in_pixel_data(tmp: Path) -> tuple[Path, str]:
    ds = fresh("CT_small.dcm")
    full = write(ds, tmp / "full-ct.dcm").read_bytes()
    path = tmp / "in" / "ct-cut-in-pixels.dcm"
    path.write_bytes(full[: len(full) - 5000])
    return path, ds.SOPInstanceUID


def _cut_in_header(tmp: Path, where: str) -> tuple[Path, str]:
    """CT_small with new UIDs, cut inside the Rows value ('value') or exactly before the Pixel
    Data element ('boundary'), where pydicom sees a complete but pixel-less data set."""
    ds = fresh("CT_small.dcm")
    source = write(ds, tmp / f"full-{where}.dcm")
    parsed = pydicom.dcmread(source)
    if where == "value":
        cut = parsed.get_item("Rows").value_tell + 1
    else:
        cut = parsed.get_item("PixelData").value_tell - 12  # tag, VR, reserved, length
    path = tmp / "in" / f"ct-cut-in-header-{where}.dcm"
    path.write_bytes(source.read_bytes()[:cut])
    return path, ds.SOPInstanceUID


def test_folder_of_good_and_bad_files(settings: Settings, tmp_path: Path) -> None:
    inbox = tmp_path / "in"
    good: dict[Path, str] = {}  # path -> SOP Instance UID
    bad: dict[Path, str] = {}  # path -> expected reason fragment
    bad_sops: set[str] = set()

    for name in ("CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "SC_rgb_rle.dcm"):
        ds = fresh(name)
        good[write(ds, inbox / name)] = ds.SOPInstanceUID
    study = write_study(inbox / "synthetic", np.random.default_rng(1), label=0, images=2)
    good.update(zip(study.paths, study.sop_instance_uids, strict=True))
    # Path-like characters in folder and file names are only names; the UIDs place the file.
    ds = fresh("MR_small_RLE.dcm")
    good[write(ds, inbox / "a..%2F..%2Fb" / "c\\..\\d" / "x..%2F..%2Fetc.dcm")] = (
        ds.SOPInstanceUID)

    for name, reason in PYDICOM_FILES.items():
        path = copy_testdata(name, inbox / "pydicom" / name)
        if reason is None:
            good[path] = pydicom.dcmread(path).SOPInstanceUID
        else:
            bad[path] = reason

    (inbox / "notes.txt").write_text("patient list, not DICOM\n")
    bad[inbox / "notes.txt"] = "not a DICOM Part 10 file"
    (inbox / "empty.dcm").write_bytes(b"")
    bad[inbox / "empty.dcm"] = "empty file"
    for (path, sop), reason in (
        (_cut_in_pixel_data(tmp_path), "truncated"),
        (_cut_in_header(tmp_path, "value"), "truncated"),
        (_cut_in_header(tmp_path, "boundary"), "image without pixel data"),
    ):
        bad[path] = reason
        bad_sops.add(sop)

    ds = fresh("CT_small.dcm")
    del ds.SOPInstanceUID
    bad[write(ds, inbox / "no-sop.dcm")] = "missing SOPInstanceUID"
    ds = fresh("CT_small.dcm")
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.abc"
    bad[write(ds, inbox / "bad-uid.dcm")] = "invalid SOPInstanceUID"
    ds = fresh("CT_small.dcm")
    ds.StudyInstanceUID = "1.2.3/../../../etc"
    bad[write(ds, inbox / "traversal-uid.dcm")] = "invalid StudyInstanceUID"
    bad_sops.add(ds.SOPInstanceUID)
    (inbox / "x..%2F..%2Fetc%2Fpasswd").write_bytes(b"root:x:0:0::/root:/bin/sh\n")
    bad[inbox / "x..%2F..%2Fetc%2Fpasswd"] = "not a DICOM Part 10 file"

    # A symlink in the folder to a valid DICOM file outside it: refused, target untouched.
    outside_ds = fresh("CT_small.dcm")
    outside = write(outside_ds, tmp_path / "outside" / "secret.dcm")
    outside_bytes = outside.read_bytes()
    (inbox / "link-out.dcm").symlink_to(outside)
    bad[inbox / "link-out.dcm"] = "symbolic link pointing outside"
    bad_sops.add(outside_ds.SOPInstanceUID)
    # A symlink to a file inside the folder is fine: the same instance again.
    (inbox / "link-in.dcm").symlink_to(inbox / "CT_small.dcm")
    # A dot-file is an in-progress write by convention and is left alone.
    (inbox / ".partial-upload").write_text("still copying")

    results: dict[Path, RegisterResult] = {}
    counts = ingest_paths(settings, [inbox], on_result=lambda p, r: results.__setitem__(p, r))

    assert counts == {"registered": len(good), "quarantined": len(bad), "duplicate": 1}
    assert results[inbox / "link-in.dcm"].outcome is Outcome.duplicate
    for path, sop in good.items():
        assert results[path].outcome is Outcome.registered, (path.name, results[path].reason)
        assert results[path].sop_instance_uid == sop
    for path, reason in bad.items():
        assert results[path].outcome is Outcome.quarantined, path.name
        assert reason in (results[path].reason or ""), (path.name, results[path].reason)

    # Exactly the good files are registered and stored; nothing of the bad ones.
    assert instance_uids(settings) == set(good.values())
    assert instance_uids(settings).isdisjoint(bad_sops)
    stored = {p.stem for p in settings.storage_dir.rglob("*.dcm")}
    assert stored == set(good.values())

    # One quarantine row per bad file, with its reason, and the file itself in quarantine.
    rows = quarantined_rows(settings)
    assert sorted(r.name_digest for r in rows) == sorted(digest(settings, p.name) for p in bad)
    for row in rows:
        assert row.reason_code in {"ingest", "not_dicom"}
        assert row.reason
        quarantined = Path(row.quarantine_path)
        assert is_inside(quarantined, settings.quarantine_dir), row.quarantine_path
        assert os.path.lexists(quarantined)
        assert "/" not in quarantined.name and not quarantined.name.startswith(".")
    names = {digest(settings, p.name): p.name for p in bad}
    by_name = {names[r.name_digest]: r for r in rows}
    assert by_name["notes.txt"].reason_code == "not_dicom"
    assert Path(by_name["notes.txt"].quarantine_path).read_text() == "patient list, not DICOM\n"
    assert by_name["empty.dcm"].size_bytes == 0
    link_copy = Path(by_name["link-out.dcm"].quarantine_path)
    assert link_copy.is_symlink() and link_copy.resolve() == outside.resolve()
    assert outside.read_bytes() == outside_bytes
    # Without move, ingest copies: every source is still in place, the dot-file untouched.
    assert all(os.path.lexists(p) for p in [*good, *bad])
    assert (inbox / ".partial-upload").read_text() == "still copying"
    assert ".partial-upload" not in by_name


@pytest.mark.parametrize("move", [False, True])
def test_quarantine_of_relative_symlink_keeps_its_target(settings: Settings, tmp_path: Path,
                                                         move: bool) -> None:
    outside = write(fresh("MR_small.dcm"), tmp_path / "elsewhere" / "mr.dcm")
    inbox = tmp_path / "in"
    inbox.mkdir()
    link = inbox / "rel-link.dcm"
    link.symlink_to(Path("..") / "elsewhere" / "mr.dcm")

    result = register_file(settings, link, root=inbox, move=move)

    assert result.outcome is Outcome.quarantined
    (row,) = quarantined_rows(settings)
    copy = Path(row.quarantine_path)
    assert copy.is_symlink()
    # The quarantined link must point where the original did, not somewhere relative to
    # the quarantine folder.
    assert copy.resolve() == outside.resolve()
    assert instance_uids(settings) == set()
    assert os.path.lexists(link) is not move
    assert outside.is_file()  # the target itself is never moved


@pytest.mark.parametrize("name", ["..%2F..%2Fetc", "..\\..\\evil.dcm", "...", "-rf"])
def test_path_like_names_are_quarantined_inside_quarantine_dir(
    settings: Settings, tmp_path: Path, name: str
) -> None:
    inbox = tmp_path / "in"
    inbox.mkdir()
    path = inbox / name
    path.write_bytes(b"\x00" * 300)

    result = register_file(settings, path, root=inbox, move=True)

    assert result.outcome is Outcome.quarantined
    (row,) = quarantined_rows(settings)
    target = Path(row.quarantine_path)
    assert row.name_digest == digest(settings, name)
    assert is_inside(target, settings.quarantine_dir)
    assert target.read_bytes() == b"\x00" * 300
    assert not target.name.startswith(".")
    assert list(inbox.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "in"]


# --- no patient data in reasons or logs ---------------------------------------------------------

PATIENT_NAME, PATIENT_ID = "DOE^JANE", "PID-SECRET-123"


def _with_patient(ds: Dataset) -> Dataset:
    ds.PatientName, ds.PatientID = PATIENT_NAME, PATIENT_ID
    return ds


def _assert_no_patient_data(text: str) -> None:
    for secret in (PATIENT_NAME, PATIENT_ID, "DOE", "JANE", "SECRET"):
        assert secret not in text


def test_quarantine_reason_and_logs_name_no_patient(
    settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    bad_uid = _with_patient(fresh("CT_small.dcm"))
    bad_uid.SOPInstanceUID = bad_uid.file_meta.MediaStorageSOPInstanceUID = "1.2.abc"
    missing = _with_patient(fresh("MR_small.dcm"))
    del missing.StudyInstanceUID
    cut = write(_with_patient(fresh("CT_small.dcm")), tmp_path / "full.dcm").read_bytes()
    inbox = tmp_path / "in"
    files = [write(bad_uid, inbox / "a.dcm"), write(missing, inbox / "b.dcm")]
    (inbox / "c.dcm").write_bytes(cut[:-100])
    files.append(inbox / "c.dcm")

    results = [register_file(settings, f) for f in files]

    assert [r.outcome for r in results] == [Outcome.quarantined] * 3
    rows = quarantined_rows(settings)
    assert len(rows) == 3
    for result, row in zip(results, rows, strict=True):
        _assert_no_patient_data(result.reason or "")
        _assert_no_patient_data(row.reason)
    with session_scope(settings.sqlalchemy_url) as session:
        for event in session.scalars(select(Event)):
            _assert_no_patient_data(repr(event.detail))
    assert "quarantined" in caplog.text  # the log did record the events...
    _assert_no_patient_data(caplog.text)  # ...without patient data


def test_registration_stores_and_logs_no_patient_data(
    settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    ds = _with_patient(fresh("CT_small.dcm"))
    path = write(ds, tmp_path / "in" / "ct.dcm")

    assert register_file(settings, path).outcome is Outcome.registered

    assert ds.SOPInstanceUID in caplog.text
    _assert_no_patient_data(caplog.text)
    with session_scope(settings.sqlalchemy_url) as session:
        (series,) = session.scalars(select(Series))
        assert series.tags["Modality"] == "CT"
        _assert_no_patient_data(repr(series.tags))


# --- study revisions -----------------------------------------------------------------------------


def test_instance_after_dispatch_reopens_study_as_new_revision(
    settings: Settings, tmp_path: Path
) -> None:
    study = write_study(tmp_path / "in", np.random.default_rng(7), label=1, images=2)
    first, second = study.paths
    assert register_file(settings, first).outcome is Outcome.registered
    with session_scope(settings.sqlalchemy_url) as session:
        row = session.scalars(select(Study)).one()
        assert (row.status, row.revision) == (StudyStatus.receiving, 1)
        row.status, row.dispatched_revision = StudyStatus.dispatched, 1

    assert register_file(settings, second).outcome is Outcome.registered

    with session_scope(settings.sqlalchemy_url) as session:
        row = session.scalars(select(Study)).one()
        assert row.status is StudyStatus.receiving
        assert row.revision == 2
        revisions = dict(session.execute(
            select(Instance.sop_instance_uid, Instance.study_revision)).all())
        assert revisions == {study.sop_instance_uids[0]: 1, study.sop_instance_uids[1]: 2}
        reopened = session.scalars(select(Event).where(Event.kind == "study_reopened")).all()
        assert [e.detail["revision"] for e in reopened] == [2]
        # Dispatched again; a duplicate delivery of a known instance must not reopen it.
        row.status, row.dispatched_revision = StudyStatus.dispatched, 2

    assert register_file(settings, first).outcome is Outcome.duplicate
    with session_scope(settings.sqlalchemy_url) as session:
        row = session.scalars(select(Study)).one()
        assert (row.status, row.revision) == (StudyStatus.dispatched, 2)


# --- watch ---------------------------------------------------------------------------------------


def test_watch_ingests_dropped_files_and_empties_inbox(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", watch_settle_seconds=0.2,
                        watch_rescan_seconds=1)
    upgrade(settings.sqlalchemy_url)
    inbox, staging = tmp_path / "inbox", tmp_path / "staging"
    inbox.mkdir()
    expected: set[str] = set()
    # Present before the watcher starts: found by the first scan.
    early = fresh("CT_small.dcm")
    write(early, inbox / "early.dcm")
    expected.add(early.SOPInstanceUID)

    stop = threading.Event()
    outcome: dict[str, object] = {}
    thread = threading.Thread(
        target=lambda: outcome.setdefault("counts", watch(settings, inbox, stop)), daemon=True)
    thread.start()
    try:
        # A folder written elsewhere and renamed in whole (how a careful sender drops files)...
        study = write_study(staging / "batch" / "deeper", np.random.default_rng(3), label=0,
                            images=2)
        os.replace(staging / "batch", inbox / "batch")
        expected.update(study.sop_instance_uids)
        # ...written in place under a .part name, then renamed...
        late = fresh("JPEG2000.dcm")
        write(late, inbox / "late.dcm.part")
        os.replace(inbox / "late.dcm.part", inbox / "late.dcm")
        expected.add(late.SOPInstanceUID)
        # ...and one bad file, which must be moved to quarantine.
        (inbox / "junk.bin").write_bytes(b"junk" * 10)

        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            remaining = [p for p in inbox.rglob("*") if p.is_file()]
            if instance_uids(settings) == expected and not remaining and quarantined_rows(
                    settings):
                break
            time.sleep(0.1)
    finally:
        stop.set()
        thread.join(timeout=10)

    assert not thread.is_alive()
    assert instance_uids(settings) == expected
    assert [p for p in inbox.rglob("*") if p.is_file()] == []
    (row,) = quarantined_rows(settings)
    assert row.name_digest == digest(settings, "junk.bin")
    assert Path(row.quarantine_path).read_bytes() == b"junk" * 10
    assert outcome["counts"] == {"registered": len(expected), "quarantined": 1}


def test_fifo_in_ingest_folder_is_recorded_not_read(tmp_path: Path) -> None:
    """A named pipe among good files: recorded as quarantined (never opened), the rest goes on."""
    settings = Settings(data_dir=tmp_path / "data")
    upgrade(settings.sqlalchemy_url)
    folder = tmp_path / "in"
    study = write_study(folder, np.random.default_rng(0), label=0)
    os.mkfifo(folder / "pipe.dcm")
    counts = ingest_paths(settings, [folder], move=False)
    assert counts["registered"] == len(study.paths) and counts["quarantined"] == 1
    with session_scope(settings.sqlalchemy_url) as session:
        [row] = session.scalars(select(QuarantinedFile)).all()
        assert row.name_digest == digest(settings, "pipe.dcm")
        assert row.reason == "not a regular file"
