"""The SCP's spool registrar (scheduler/ingest/spool.py), run as the spawned process it is in
`lightbox scp`, fed through its queue with instances written into real spool slots."""

from __future__ import annotations

import io
import multiprocessing
import os
import queue

from sqlalchemy import select

from db.models import Event, Instance
from db.queries import status
from db.session import session_scope
from scheduler.ingest.registration import Received
from scheduler.ingest.spool import Spool, received, run_registrar, spool_dir
from tests.conftest import Backend, wait_for
from tests.pacs_peers import ct_instances


def _spooled(spool: Spool, count: int) -> list[Received]:
    """``count`` CT instances of one study, each written and flushed into a slot."""
    items = []
    for ds in ct_instances(count):
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        data = buffer.getvalue()
        items.append(received(spool.write(data).wait(), data, "scp:MODALITY"))
    return items


def _registered(backend: Backend) -> set[str]:
    with session_scope(backend.settings.sqlalchemy_url) as session:
        return set(session.scalars(select(Instance.sop_instance_uid)))


def test_a_slot_removed_before_registration_does_not_hold_back_the_rest(
        sqlite_backend: Backend) -> None:
    """A spool file deleted under a running SCP (by hand, by a clean-up job) can never be
    registered. It used to count as a transient OSError and be retried for ever, and every
    instance received after it waited behind it until the SCP restarted."""
    backend = sqlite_backend
    spool = Spool(spool_dir(backend.settings))
    gone, *later = _spooled(spool, 3)
    gone.path.unlink()
    context = multiprocessing.get_context("spawn")
    items: multiprocessing.Queue[Received | None] = context.Queue()
    results: multiprocessing.Queue[dict[str, int]] = context.Queue()
    registrar = context.Process(target=run_registrar, daemon=True,
                                args=(backend.settings, items, results, os.getpid()))
    registrar.start()
    try:
        items.put(gone)
        outcome = results.get(timeout=60)  # the batch holding only the vanished instance
        assert outcome == {"vanished": 1}
        for item in later:  # arrive after it, while the registrar keeps running
            items.put(item)
        wait_for(lambda: _registered(backend) == {i.header.sop_instance_uid for i in later},
                 60, what="the instances received after the vanished one")
        assert registrar.is_alive()
        assert not any(item.path.exists() for item in later)  # slots freed once committed
    finally:
        items.put(None)
        registrar.join(60)
    assert registrar.exitcode == 0
    counts: dict[str, int] = {}
    try:
        while True:
            for key, value in results.get(timeout=1).items():
                counts[key] = counts.get(key, 0) + value
    except queue.Empty:
        pass
    assert counts == {"registered": 2}
    with session_scope(backend.settings.sqlalchemy_url) as session:
        details = list(session.scalars(
            select(Event.detail).where(Event.kind == "spool_instance_vanished")))
        report = status(session)
    lost = [{"sop_instance_uid": gone.header.sop_instance_uid,
             "study_instance_uid": gone.header.study_instance_uid}]
    assert details == [{"instances": lost}]
    assert report["vanished_instances"] == lost  # `lightbox status` tells the operator
