"""Crash safety of `lightbox scp`: a C-STORE success is a promise, so every instance that got
0x0000 ends registered even when the SCP is killed with SIGKILL.

The reply goes out once the bytes are flushed into the spool; rows follow in batches. These
tests kill the real SCP process between the two and check that its next start registers
what the spool holds."""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE, StoragePresentationContexts
from pynetdicom.dsutils import encode
from sqlalchemy import func, select, text
from sqlalchemy.engine import make_url

from db.models import Instance, QuarantinedFile
from db.session import make_engine, session_scope
from lightbox.roots import stored_file
from tests.conftest import Backend, stop_processes, wait_for
from tests.pacs_peers import ct_instances, echo_ok, free_port, with_env


@contextmanager
def scp_process(backend: Backend, log: Path, port: int) -> Iterator[subprocess.Popen[bytes]]:
    """A real `lightbox scp` (the test may SIGKILL it); yields once it answers C-ECHO."""
    peer = with_env(backend, LIGHTBOX_SCP_PORT=str(port), LIGHTBOX_SCP_BIND_ADDRESS="127.0.0.1",
                    LIGHTBOX_SCP_ALLOWED_CALLERS="*", LIGHTBOX_SCP_MIN_FREE_MB="0")
    proc = peer.spawn("scp", log=log)
    try:
        wait_for(lambda: proc.poll() is not None or echo_ok(port), 60, what="scp answering")
        assert proc.poll() is None, log.read_text()[-3000:]
        yield proc
    finally:
        stop_processes([proc])


def _send(port: int, datasets: list[pydicom.Dataset], *, kill: subprocess.Popen[bytes] | None
          = None, kill_after: int = 0) -> dict[str, int]:
    """C-STORE each data set in one association; SIGKILL ``kill`` after ``kill_after`` successes.
    Returns the status of every store that got an answer."""
    ae = AE(ae_title="MODALITY")
    ae.requested_contexts = StoragePresentationContexts[:100]
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 10
    assoc = ae.associate("127.0.0.1", port, ae_title="LIGHTBOX")
    assert assoc.is_established
    statuses: dict[str, int] = {}
    try:
        for ds in datasets:
            if not assoc.is_established:
                break
            status = assoc.send_c_store(ds)
            if "Status" in status:
                statuses[str(ds.SOPInstanceUID)] = int(status.Status)
            # Once: the association can still look established for the next store (no answer,
            # so the count stays at kill_after) and the process is gone by then.
            if kill is not None and kill.returncode is None and len(statuses) == kill_after:
                os.kill(kill.pid, signal.SIGKILL)
                kill.wait(30)
    finally:
        if assoc.is_established:
            assoc.release()
    return statuses


def _rows(backend: Backend) -> dict[str, Instance]:
    with session_scope(backend.settings.sqlalchemy_url) as session:
        return {i.sop_instance_uid: i for i in session.scalars(select(Instance))}


def _filled_slots(backend: Backend) -> list[Path]:
    spool = backend.settings.storage_dir / ".spool"
    return [p for p in spool.iterdir() if p.stat().st_size > 0] if spool.exists() else []


@contextmanager
def instances_locked(backend: Backend) -> Iterator[None]:
    """Hold the write lock on the instance rows: the SCP's registrar blocks on its commit,
    so acknowledged instances are in the spool and not yet registered."""
    url = backend.settings.sqlalchemy_url
    if backend.name == "sqlite":
        con = sqlite3.connect(str(make_url(url).database), isolation_level=None)
        con.execute("BEGIN EXCLUSIVE")
        try:
            yield
        finally:
            con.execute("ROLLBACK")
            con.close()
        return
    engine = make_engine(url)
    with engine.connect() as conn:
        conn.execute(text("LOCK TABLE instances IN EXCLUSIVE MODE"))
        try:
            yield
        finally:
            conn.rollback()
    engine.dispose()


def _check_registered(backend: Backend, datasets: list[pydicom.Dataset],
                      uids: set[str]) -> None:
    rows = wait_for(lambda: (r := _rows(backend)).keys() >= uids and r, 120,
                    what=f"rows for {len(uids)} acknowledged instances")
    by_uid = {str(ds.SOPInstanceUID): ds for ds in datasets}
    for uid in uids:
        row = rows[uid]
        assert row.source == "scp:MODALITY"
        stored = stored_file(backend.settings, row.stored_path)
        assert hashlib.sha256(stored.read_bytes()).hexdigest() == row.sha256
        # Byte for byte: the stored data set is the sender's encoding in the negotiated syntax.
        syntax = pydicom.uid.UID(row.transfer_syntax_uid)
        sent = encode(by_uid[uid], syntax.is_implicit_VR, syntax.is_little_endian)
        assert _data_set_bytes(stored) == sent
    with session_scope(backend.settings.sqlalchemy_url) as session:
        doubled = list(session.execute(
            select(Instance.sop_instance_uid, func.count()).group_by(Instance.sop_instance_uid)
            .having(func.count() > 1)))
    assert doubled == []  # one row per SOP Instance UID


def _data_set_bytes(path: Path) -> bytes:
    """A Part 10 file minus preamble, prefix and file meta group."""
    meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
    return path.read_bytes()[132 + 12 + int(meta.FileMetaInformationGroupLength):]


@pytest.mark.slow
def test_spool_left_by_a_crash_is_registered_at_next_start(backend: Backend,
                                                           tmp_path: Path) -> None:
    datasets = ct_instances(12)
    port = free_port()
    with instances_locked(backend):
        with scp_process(backend, tmp_path / "scp1.log", port) as proc:
            statuses = _send(port, datasets)
            assert set(statuses.values()) == {0x0000} and len(statuses) == 12
            # Acknowledged, flushed, not registered: the registrar waits on the lock.
            wait_for(lambda: len(_filled_slots(backend)) == 12, 30, what="12 spooled files")
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(30)
    assert _rows(backend) == {}
    # A slot the crash cut short while receiving (never acknowledged): quarantined, not lost.
    cut = _filled_slots(backend)[0].read_bytes()[:-1000]
    (backend.settings.storage_dir / ".spool" / "slot-cut-short").write_bytes(cut)
    with scp_process(backend, tmp_path / "scp2.log", port):
        _check_registered(backend, datasets, set(statuses))
        assert _filled_slots(backend) == []
    with session_scope(backend.settings.sqlalchemy_url) as session:
        reasons = list(session.scalars(select(QuarantinedFile.reason)))
    assert len(reasons) == 1 and "truncated" in reasons[0], reasons


@pytest.mark.slow
def test_sigkill_mid_association_loses_no_acknowledged_instance(backend: Backend,
                                                                tmp_path: Path) -> None:
    datasets = ct_instances(60)
    port = free_port()
    with scp_process(backend, tmp_path / "scp1.log", port) as proc:
        statuses = _send(port, datasets, kill=proc, kill_after=35)
    acked = {uid for uid, status in statuses.items() if status == 0x0000}
    assert len(acked) == 35 and proc.returncode == -signal.SIGKILL
    with scp_process(backend, tmp_path / "scp2.log", port):
        _check_registered(backend, datasets, acked)
        assert _filled_slots(backend) == []
