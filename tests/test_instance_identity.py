"""One instance, one identity (issue 19, item 8): the same data set re-sent with other file
meta, in Implicit VR, or in another transfer syntax is a duplicate, not a corrected instance;
only a real content change reopens the study. Folder ingest and the SCP's batched path."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from sqlalchemy import func, select, update

from db.migrate import upgrade
from db.models import Event, Instance, Study, StudyStatus
from db.session import session_scope
from lightbox.roots import stored_file
from lightbox.settings import Settings
from scheduler.ingest.header import read_header
from scheduler.ingest.registration import Outcome, Received, register_file, register_received
from scheduler.ingest.storage import file_sha256


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    settings = Settings(data_dir=tmp_path / "data")
    upgrade(settings.sqlalchemy_url)
    return settings


def _processed(settings: Settings) -> None:
    """The study was dispatched (its jobs ran): a corrected instance would reopen it."""
    with session_scope(settings.sqlalchemy_url) as session:
        session.execute(update(Study).values(status=StudyStatus.dispatched))


def _study(settings: Settings) -> tuple[int, str, int]:
    with session_scope(settings.sqlalchemy_url) as session:
        study = session.scalars(select(Study)).one()
        reopened = session.scalar(select(func.count()).select_from(Event).where(
            Event.kind == "study_reopened"))
        return study.revision, study.status.value, int(reopened or 0)


def _variant(name: str, path: Path, *, syntax: str | None = None, implicit: bool = False,
             change: str | None = None, decompress: bool = False) -> Path:
    ds = pydicom.dcmread(get_testdata_file(name))
    if decompress:
        ds.decompress(generate_instance_uid=False)
    ds.file_meta.ImplementationVersionName = "OTHER_SENDER"  # file meta differs
    ds.file_meta.SourceApplicationEntityTitle = "MODALITY9"
    if change:
        ds.SeriesDescription = change
    path.parent.mkdir(parents=True, exist_ok=True)
    if implicit:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        ds.save_as(path, implicit_vr=True, little_endian=True, enforce_file_format=True)
    else:
        if syntax:
            ds.file_meta.TransferSyntaxUID = syntax
        ds.save_as(path, enforce_file_format=True)
    return path


def test_reencoded_instance_is_a_duplicate_and_a_change_reopens(settings: Settings,
                                                                 tmp_path: Path) -> None:
    first = register_file(settings, Path(get_testdata_file("CT_small.dcm")))
    assert first.outcome is Outcome.registered
    _processed(settings)
    stored = Path(settings.storage_dir.rglob("*.dcm").__next__())
    before = file_sha256(stored)
    implicit = _variant("CT_small.dcm", tmp_path / "a" / "ct.dcm", implicit=True)
    assert file_sha256(implicit)[0] != before[0]
    assert register_file(settings, implicit).outcome is Outcome.duplicate
    assert _study(settings) == (1, "dispatched", 0)
    assert file_sha256(stored) == before  # the stored bytes stay those of the first arrival

    changed = _variant("CT_small.dcm", tmp_path / "b" / "ct.dcm", change="corrected")
    assert register_file(settings, changed).outcome is Outcome.registered
    assert _study(settings) == (2, "receiving", 1)


def test_other_transfer_syntax_same_pixels_is_a_duplicate(settings: Settings,
                                                          tmp_path: Path) -> None:
    assert register_file(settings, Path(get_testdata_file("MR_small_RLE.dcm"))).outcome \
        is Outcome.registered
    _processed(settings)
    plain = _variant("MR_small_RLE.dcm", tmp_path / "a" / "mr.dcm", decompress=True,
                     syntax=ExplicitVRLittleEndian)
    assert register_file(settings, plain).outcome is Outcome.duplicate
    assert _study(settings) == (1, "dispatched", 0)


def test_scp_batch_path_uses_the_same_identity(settings: Settings, tmp_path: Path) -> None:
    def received(path: Path) -> Received:
        sha, size = file_sha256(path)
        return Received(path, read_header(path), sha, size, "scp:MODALITY9")

    original = _variant("CT_small.dcm", tmp_path / "a" / "ct.dcm")
    [result] = register_received(settings, [received(original)])
    assert result.outcome is Outcome.registered
    _processed(settings)
    again = _variant("CT_small.dcm", tmp_path / "b" / "ct.dcm", implicit=True)
    [result] = register_received(settings, [received(again)])
    assert result.outcome is Outcome.duplicate
    assert _study(settings) == (1, "dispatched", 0)
    assert not again.exists()  # the spool file is removed as for any registered instance
    with session_scope(settings.sqlalchemy_url) as session:
        row = session.scalars(select(Instance)).one()
        stored = stored_file(settings, row.stored_path or "")
        assert stored.is_file()
        assert row.sha256 == file_sha256(stored)[0]
