"""Decode once: a study routed to several models decodes each image once per preprocessing
spec (worker/shared_decode.py), with real decode processes, and each model's findings are its
own."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from db.model_registry import register_bundle
from db.models import Finding, Job, Model
from db.session import session_scope
from lightbox.manifest import load_manifest
from lightbox.preprocess import prepare_file
from lightbox.synthetic import write_study
from scheduler.ingest.registration import register_file
from scheduler.scheduling.dispatch import PassReport, dispatch_ready
from scheduler.scheduling.route import load_rules
from tests.conftest import Backend
from worker.decode_pool import DecodePool, InlineDecoder
from worker.model_cache import ModelCache
from worker.pipeline import WorkerPipeline
from worker.process import run_job
from worker.runtime_onnx import OnnxRuntime
from worker.shared_decode import SharedDecoder, spec_key

NAMES = ["chest", "chest-b", "chest-c", "chest-d"]


def _renamed(bundle: Path, to: Path, name: str) -> Path:
    """The same weights registered under another model name (files keep their digests)."""
    shutil.copytree(bundle, to)
    manifest_path = to / "manifest.json"
    data = json.loads(manifest_path.read_text())
    data["name"] = name
    manifest_path.write_text(json.dumps(data))
    return to


class _Gate:
    """A decoder whose decodes finish only when the test says so (to hold them in flight)."""

    workers = 1

    def __init__(self) -> None:
        self.futures: list[Future[np.ndarray]] = []

    def submit(self, path: str | Path, manifest: object) -> Future[np.ndarray]:
        future: Future[np.ndarray] = Future()
        self.futures.append(future)
        return future

    def warm_up(self) -> None:
        return None

    def close(self) -> None:
        return None


def test_one_jobs_cancel_leaves_the_shared_decode_to_the_others(model_bundle: Path) -> None:
    manifest = load_manifest(model_bundle)
    gate = _Gate()
    shared = SharedDecoder(gate, 1 << 20)
    first, second = shared.submit("a.dcm", manifest), shared.submit("a.dcm", manifest)
    assert len(gate.futures) == 1 and (shared.decodes, shared.shared) == (1, 1)
    assert first.cancel()
    assert not gate.futures[0].cancelled()  # the other job still waits for it
    gate.futures[0].set_running_or_notify_cancel()
    gate.futures[0].set_result(np.ones((1, 4, 4), np.float32))
    assert second.result(timeout=5).sum() == 16
    # Finished: kept (read-only) for the jobs that ask later, without a new decode.
    third = shared.submit("a.dcm", manifest)
    assert third.result(timeout=5) is second.result() and not third.result().flags.writeable
    assert shared.decodes == 1
    # Everyone cancelled: the decode itself is cancelled and forgotten.
    lone = shared.submit("b.dcm", manifest)
    assert lone.cancel() and gate.futures[1].cancelled()
    again = shared.submit("b.dcm", manifest)
    assert len(gate.futures) == 3 and not again.done()


def test_failures_are_not_kept_and_sharing_off_decodes_every_time(model_bundle: Path,
                                                                  tmp_path: Path) -> None:
    manifest = load_manifest(model_bundle)
    shared = SharedDecoder(InlineDecoder(), 1 << 20)
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"not dicom")
    with pytest.raises(Exception):  # noqa: B017, PT011 - whatever the reader raises
        shared.submit(bad, manifest).result()
    with pytest.raises(Exception):  # noqa: B017, PT011
        shared.submit(bad, manifest).result()
    assert shared.decodes == 2  # a failure is retried, never served from the cache
    off = SharedDecoder(InlineDecoder(), 0)
    study = write_study(tmp_path / "in", np.random.default_rng(3), label=0, images=1)
    for _ in range(3):
        off.submit(study.paths[0], manifest).result()
    assert (off.decodes, off.shared) == (3, 0)


def test_lru_is_bounded_by_bytes(model_bundle: Path) -> None:
    manifest = load_manifest(model_bundle)
    gate = _Gate()
    shared = SharedDecoder(gate, 3 * 64)  # three 4×4 float32 tensors
    for name in "abcd":
        shared.submit(f"{name}.dcm", manifest)
        gate.futures[-1].set_running_or_notify_cancel()
        gate.futures[-1].set_result(np.zeros((1, 4, 4), np.float32))
    assert shared.held_bytes() == 3 * 64
    shared.submit("a.dcm", manifest)  # the oldest was released: decoded again
    assert len(gate.futures) == 5


def test_spec_key_separates_preprocessing(model_bundle: Path) -> None:
    manifest = load_manifest(model_bundle)
    other = manifest.model_copy(update={"preprocessing": manifest.preprocessing.model_copy(
        update={"mean": manifest.preprocessing.mean + 0.1})})
    renamed = manifest.model_copy(update={"name": "another"})
    assert spec_key(manifest) == spec_key(renamed) != spec_key(other)


def test_study_routed_to_four_models_decodes_each_image_once(
        sqlite_backend: Backend, model_bundle: Path, tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - name: four-chest-models\n    match: {Modality: [CR, DX]}\n"
                     f"    models: [{', '.join(NAMES)}]\n")
    settings = sqlite_backend.settings.model_copy(update={
        "quiet_seconds": 0.0, "decode_workers": 2, "rules_file": rules})
    bundles = [model_bundle, *(_renamed(model_bundle, tmp_path / name, name)
                               for name in NAMES[1:])]
    with session_scope(settings.sqlalchemy_url) as session:
        for bundle in bundles:
            register_bundle(session, bundle, promote=True)
    study = write_study(tmp_path / "in", np.random.default_rng(7), label=1, images=3)
    for path in study.paths:
        register_file(settings, path)
    dispatch_ready(settings, load_rules(rules), PassReport())
    with session_scope(settings.sqlalchemy_url) as session:
        jobs = list(session.scalars(select(Job.id).order_by(Job.id)))
    assert len(jobs) == 4

    pipeline = WorkerPipeline(settings, ModelCache(settings, "onnxruntime"),
                              DecodePool(2))  # real spawned decode processes
    try:
        with ThreadPoolExecutor(4) as threads:  # the four jobs in flight together
            states = list(threads.map(lambda job: run_job(settings, pipeline, job), jobs))
    finally:
        pipeline.close()
    assert states == ["succeeded"] * 4
    assert pipeline.decoder.decodes == len(study.paths)  # not 4 × as many
    assert pipeline.decoder.shared == 3 * len(study.paths)

    manifest = load_manifest(model_bundle)
    runtime = OnnxRuntime(model_bundle / "model.onnx", threads=1, parallel_runs=1)
    tensors = np.stack([prepare_file(path, manifest) for path in study.paths])
    expected = np.asarray(runtime.infer(tensors)[manifest.output_name])[:, 0]
    sops = [str(sop) for sop in study.sop_instance_uids]
    with session_scope(settings.sqlalchemy_url) as session:
        rows = session.execute(select(Model.name, Finding.sop_instance_uid, Finding.score)
                               .join(Job, Finding.job_id == Job.id)
                               .join(Model, Job.model_id == Model.id)).all()
    assert sorted({name for name, _, _ in rows}) == sorted(NAMES)
    for name in NAMES:
        scores = {sop: score for model, sop, score in rows if model == name}
        assert len(scores) == len(sops)
        got = np.array([scores[sop] for sop in sops])
        np.testing.assert_allclose(got, expected, atol=1e-5)
