"""Dynamic batching across studies: images of different jobs share one runtime call, and each
result goes back to its own job and SOP instance; group commits; error isolation; heatmaps."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import pytest
import sqlalchemy as sa
from onnx import TensorProto, helper
from sqlalchemy import select

from db.model_registry import register_bundle
from db.models import Event, Finding, Job, JobState
from db.session import session_scope
from lightbox.celery_app import make_celery
from lightbox.heatmaps import heatmap_path, load_heatmap
from lightbox.manifest import Manifest, load_manifest, write_bundle_manifest
from lightbox.preprocess import prepare_file
from lightbox.settings import Settings
from lightbox.synthetic import write_study
from scheduler.ingest.registration import register_file
from scheduler.scheduling.dispatch import PassReport, dispatch_ready, send_pending
from scheduler.scheduling.route import load_rules
from tests.conftest import Backend, stop_processes, wait_for
from worker.batcher import Batcher
from worker.decode_pool import DecodePool, InlineDecoder
from worker.model_cache import LoadedModel, ModelCache
from worker.pipeline import WorkerPipeline
from worker.process import run_job
from worker.runtime import ModelRuntime, load_runtime
from worker.runtime_onnx import OnnxRuntime
from worker.writer import JobResult, ResultWriter


class RecordingRuntime:
    """The real ONNX Runtime, recording the batch size of every call it gets."""

    name = "onnxruntime"

    def __init__(self, inner: ModelRuntime) -> None:
        self.inner, self.calls = inner, []  # type: ignore[var-annotated]

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        self.calls.append(int(batch.shape[0]))
        return self.inner.infer(batch)


def _studies(backend: Backend, tmp_path: Path, count: int, images: int) -> dict[str, list]:
    rng = np.random.default_rng(11)
    studies = {}
    for i in range(count):
        study = write_study(tmp_path / f"s{i}", rng, label=i % 2, images=images)
        for path in study.paths:
            register_file(backend.settings, path)
        studies[study.study_instance_uid] = list(zip(study.sop_instance_uids, study.paths,
                                                     strict=True))
    dispatch_ready(backend.settings.model_copy(update={"quiet_seconds": 0.0}), load_rules(),
                   PassReport())
    return studies


def _expected_scores(bundle: Path, studies: dict[str, list]) -> dict[str, float]:
    """Each image scored ALONE (batch of one): what its finding must say after batching."""
    manifest = load_manifest(bundle)
    runtime = OnnxRuntime(bundle / "model.onnx", threads=1)
    expected = {}
    for images in studies.values():
        for sop, path in images:
            out = runtime.infer(prepare_file(path, manifest)[None])
            expected[sop] = float(np.asarray(out[manifest.output_name]).reshape(-1)[0])
    return expected


def _findings(settings: Settings) -> dict[str, tuple[int, float]]:
    with session_scope(settings.sqlalchemy_url) as session:
        rows = session.execute(select(Finding.sop_instance_uid, Finding.job_id, Finding.score))
        return {sop: (job, score) for sop, job, score in rows}


def _job_of_study(settings: Settings) -> dict[str, int]:
    from db.models import Study

    with session_scope(settings.sqlalchemy_url) as session:
        rows = session.execute(select(Study.study_instance_uid, Job.id).join(
            Job, Job.study_id == Study.id))
        return {uid: job for uid, job in rows}


def test_images_of_different_studies_share_one_runtime_call(
        backend: Backend, registered_model: tuple[int, str], model_bundle: Path,
        tmp_path: Path) -> None:
    studies = _studies(backend, tmp_path, count=3, images=2)
    # A full batch is exactly the six images, and the delay is long, so the batch runs when all
    # six have arrived: one call for three studies.
    settings = backend.settings.model_copy(update={"batch_max_size": 6,
                                                   "batch_max_wait_ms": 60_000.0})
    recorders: list[RecordingRuntime] = []

    def loader(kind: str, bundle: Path, s: Settings) -> ModelRuntime:
        recorders.append(RecordingRuntime(load_runtime(kind, bundle, s)))
        return recorders[-1]

    pipeline = WorkerPipeline(settings, ModelCache(settings, "onnxruntime", loader),
                              decoder=InlineDecoder())
    jobs = _job_of_study(settings)
    try:
        with ThreadPoolExecutor(3) as pool:
            outcomes = list(pool.map(lambda j: run_job(settings, pipeline, j), jobs.values()))
    finally:
        pipeline.close()
    assert outcomes == ["succeeded"] * 3
    assert len(recorders) == 1 and recorders[0].calls == [6]
    found, expected = _findings(settings), _expected_scores(model_bundle, studies)
    assert set(found) == set(expected)
    for study_uid, images in studies.items():
        for sop, _ in images:
            job, score = found[sop]
            assert job == jobs[study_uid]  # the finding is on its own job ...
            assert score == pytest.approx(expected[sop], abs=1e-5)  # ... with its own score
    assert len({round(s, 6) for s in expected.values()}) > 1  # the scores tell images apart
    with session_scope(settings.sqlalchemy_url) as session:
        events = session.scalars(select(Event).where(Event.kind == "inference_batches")).all()
        assert len(events) == 3
        for event in events:
            [batch] = event.detail["batches"]
            assert batch["size"] == 6 and batch["images"] == 2
            assert sorted(batch["jobs"]) == sorted(jobs.values())


@pytest.mark.slow
def test_real_worker_batches_across_studies(
        backend: Backend, registered_model: tuple[int, str], model_bundle: Path,
        tmp_path: Path) -> None:
    """A real `lightbox worker` (threads pool, spawned decode processes) over Redis."""
    studies = _studies(backend, tmp_path, count=3, images=2)
    send_pending(backend.settings, make_celery(backend.settings), PassReport())
    backend.env.update({"LIGHTBOX_BATCH_MAX_SIZE": "6", "LIGHTBOX_BATCH_MAX_WAIT_MS": "20000",
                        "LIGHTBOX_WORKER_CONCURRENCY": "4", "LIGHTBOX_DECODE_WORKERS": "2"})
    worker = backend.spawn("worker", log=tmp_path / "worker.log")
    try:
        def done() -> bool:
            with session_scope(backend.settings.sqlalchemy_url) as session:
                states = session.scalars(select(Job.state)).all()
                return len(states) == 3 and all(s == JobState.succeeded for s in states)

        wait_for(done, timeout=180, what="three jobs to succeed")
    finally:
        stop_processes([worker])
    jobs = _job_of_study(backend.settings)
    found, expected = _findings(backend.settings), _expected_scores(model_bundle, studies)
    for study_uid, images in studies.items():
        for sop, _ in images:
            assert found[sop][0] == jobs[study_uid]
            assert found[sop][1] == pytest.approx(expected[sop], abs=1e-5)
    with session_scope(backend.settings.sqlalchemy_url) as session:
        events = session.scalars(select(Event).where(Event.kind == "inference_batches")).all()
    shared = [b for e in events for b in e.detail["batches"] if len(b["jobs"]) > 1]
    assert shared, f"no batch held images of two studies: {[e.detail for e in events]}"


def test_failing_image_fails_only_its_own_result() -> None:
    class PoisonRuntime:
        name = "poison"

        def __init__(self) -> None:
            self.calls: list[int] = []

        def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
            self.calls.append(len(batch))
            if np.isnan(batch).any():
                raise ValueError("NaN input")
            return {"scores": batch.reshape(len(batch), -1).mean(axis=1, keepdims=True)}

    runtime = PoisonRuntime()
    batcher = Batcher(runtime, max_batch=3, max_wait_s=30.0)
    try:
        good_a = batcher.submit(np.full((1, 2, 2), 1.0, np.float32), job_id=1)
        bad = batcher.submit(np.full((1, 2, 2), np.nan, np.float32), job_id=2)
        good_b = batcher.submit(np.full((1, 2, 2), 3.0, np.float32), job_id=3)
        assert float(good_a.result(30).outputs["scores"][0]) == 1.0
        assert float(good_b.result(30).outputs["scores"][0]) == 3.0
        with pytest.raises(ValueError, match="NaN"):
            bad.result(30)
    finally:
        batcher.close()
    assert runtime.calls == [3, 1, 1, 1]  # the batch, then each image alone


def test_batcher_runs_partial_batch_after_max_wait() -> None:
    class Identity:
        name = "identity"

        def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
            return {"out": batch * 2}

    batcher = Batcher(Identity(), max_batch=64, max_wait_s=0.05)
    try:
        result = batcher.submit(np.ones((1, 1, 1), np.float32), job_id=7).result(30)
    finally:
        batcher.close()
    assert result.batch.size == 1 and result.batch.job_ids == (7,)
    assert float(result.outputs["out"].reshape(-1)[0]) == 2.0


def test_runner_threads_run_batches_at_once_and_fill_them_in_turn() -> None:
    """Two runners (ONNX Runtime's parallel runs): two calls in progress together, each with a
    full batch, and every image's row back on its own future."""

    class TwoAtOnce:
        name = "two-at-once"
        parallel_runs = 2

        def __init__(self) -> None:
            self.calls: list[int] = []
            self.lock = threading.Lock()
            self.together = threading.Barrier(2, timeout=30)  # breaks unless 2 calls overlap

        def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
            with self.lock:
                self.calls.append(len(batch))
            self.together.wait()
            return {"out": batch.reshape(len(batch), -1).sum(axis=1, keepdims=True)}

    runtime = TwoAtOnce()
    batcher = Batcher(runtime, max_batch=3, max_wait_s=30.0, runners=runtime.parallel_runs)
    try:
        futures = [batcher.submit(np.full((1, 1, 1), i, np.float32), job_id=i)
                   for i in range(6)]
        results = [future.result(30) for future in futures]
    finally:
        batcher.close()
    assert batcher.runners == 2 and runtime.calls == [3, 3]
    assert [float(r.outputs["out"][0]) for r in results] == [0, 1, 2, 3, 4, 5]
    assert [r.batch.job_ids for r in results] == [(0, 1, 2)] * 3 + [(3, 4, 5)] * 3
    assert batcher.batches_run == 2 and batcher.images_run == 6


def test_onnx_runs_fill_the_cores_one_thread_each_unless_told() -> None:
    from worker.runtime_onnx import run_layout

    assert run_layout(cores=8) == (1, 8)
    assert run_layout(threads=4, cores=8) == (4, 2)
    assert run_layout(parallel_runs=2, cores=8) == (4, 2)
    assert run_layout(threads=3, parallel_runs=1, cores=8) == (3, 1)
    assert run_layout(threads=16, cores=8) == (16, 1)


def test_worker_gives_an_onnx_model_one_runner_per_parallel_run(
        model_bundle: Path, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, onnx_parallel_runs=3, onnx_threads=1)
    runtime = load_runtime("onnxruntime", model_bundle, settings)
    assert isinstance(runtime, OnnxRuntime) and runtime.parallel_runs == 3
    assert runtime.session.get_session_options().intra_op_num_threads == 1
    pipeline = WorkerPipeline(settings, ModelCache(settings, "onnxruntime"),
                              decoder=InlineDecoder())
    try:
        batcher = pipeline.batcher_for(LoadedModel(1, load_manifest(model_bundle), runtime))
        assert batcher.runners == 3
    finally:
        pipeline.close()


def test_group_commit_isolates_a_bad_job(env_sqlite_jobs: tuple[Settings, list[int]]) -> None:
    settings, (good, bad, other) = env_sqlite_jobs

    def row(job: int, sop: str) -> dict[str, object]:
        return {"job_id": job, "study_id": 1, "series_instance_uid": "1.2", "label": "x",
                "sop_instance_uid": sop, "score": 0.7, "threshold": 0.5, "positive": True,
                "superseded": False}

    writer = ResultWriter(settings)
    barrier = threading.Barrier(3)
    errors: dict[int, BaseException] = {}

    def commit(result: JobResult) -> None:
        barrier.wait()
        try:
            writer.commit(result, timeout=60)
        except BaseException as exc:  # noqa: BLE001
            errors[result.job_id] = exc

    results = [JobResult(good, [row(good, "1.1")]),
               JobResult(bad, [row(bad, "1.9"), row(bad, "1.9")]),  # violates the unique key
               JobResult(other, [row(other, "1.3")])]
    threads = [threading.Thread(target=commit, args=(r,)) for r in results]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    writer.close()
    assert set(errors) == {bad}
    with session_scope(settings.sqlalchemy_url) as session:
        states = dict(session.execute(select(Job.id, Job.state)).all())
        counts = {j: len(session.scalars(select(Finding).where(Finding.job_id == j)).all())
                  for j in (good, bad, other)}
    assert states[good] == states[other] == JobState.succeeded
    assert states[bad] == JobState.running
    assert counts == {good: 1, bad: 0, other: 1}


@pytest.fixture
def env_sqlite_jobs(sqlite_backend: Backend, model_bundle: Path,
                    tmp_path: Path) -> tuple[Settings, list[int]]:
    """Three claimed (running) jobs in a SQLite backend."""
    from db import jobs as job_states

    with session_scope(sqlite_backend.settings.sqlalchemy_url) as session:
        register_bundle(session, model_bundle, promote=True)
    _studies(sqlite_backend, tmp_path, count=3, images=1)
    ids = sorted(_job_of_study(sqlite_backend.settings).values())
    with session_scope(sqlite_backend.settings.sqlalchemy_url) as session:
        for job_id in ids:
            job_states.claim(session, job_id, "test")
    return sqlite_backend.settings, ids


def _cam_bundle(directory: Path) -> Path:
    """A tiny two-output ONNX model: an 8×8 activation map and a score from its mean."""
    directory.mkdir(parents=True)
    nodes = [
        helper.make_node("AveragePool", ["image"], ["cam"], kernel_shape=[8, 8], strides=[8, 8]),
        helper.make_node("ReduceMean", ["cam", "axes"], ["pooled"], keepdims=0),
        helper.make_node("Sigmoid", ["pooled"], ["scores"]),
    ]
    graph = helper.make_graph(
        nodes, "cam-test",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 1, 64, 64])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["n", 1]),
         helper.make_tensor_value_info("cam", TensorProto.FLOAT, ["n", 1, 8, 8])],
        initializer=[helper.make_tensor("axes", TensorProto.INT64, [2], [2, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, directory / "model.onnx")
    manifest = Manifest(name="chest-cam", version="1", architecture="test-cam",
                        input={"height": 64, "width": 64}, cam_output="cam",
                        preprocessing={}, labels=["pneumonia"], thresholds={"pneumonia": 0.5})
    write_bundle_manifest(directory, manifest)
    return directory


@contextmanager
def heatmaps_at_findings_commit(settings: Settings) -> Iterator[list[tuple[int, str, bool]]]:
    """At the moment a transaction that inserted findings commits (SQLAlchemy's ``commit``
    connection event, before the database commits), record for each inserted (job, image)
    whether its heatmap file already exists."""
    pending: dict[int, list[tuple[int, str]]] = {}
    seen: list[tuple[int, str, bool]] = []
    lock = threading.Lock()

    def inserted(conn, cursor, statement, parameters, context, executemany) -> None:  # type: ignore[no-untyped-def]  # noqa: ANN001, E501
        if statement.lstrip().upper().startswith("INSERT INTO FINDINGS"):
            with lock:
                pending.setdefault(id(conn), []).extend(
                    (int(p["job_id"]), str(p["sop_instance_uid"]))
                    for p in context.compiled_parameters)

    def committing(conn) -> None:  # type: ignore[no-untyped-def]  # noqa: ANN001
        with lock:
            for job_id, sop in pending.pop(id(conn), []):
                seen.append((job_id, sop, heatmap_path(settings, job_id, sop).is_file()))

    sa.event.listen(sa.engine.Engine, "after_cursor_execute", inserted)
    sa.event.listen(sa.engine.Engine, "commit", committing)
    try:
        yield seen
    finally:
        sa.event.remove(sa.engine.Engine, "after_cursor_execute", inserted)
        sa.event.remove(sa.engine.Engine, "commit", committing)


def test_heatmaps_saved_for_each_image_before_commit(sqlite_backend: Backend,
                                                     tmp_path: Path) -> None:
    """Each image's heatmap is on disk when the transaction with its findings commits (so a
    succeeded job never lacks its maps), checked at that moment, not afterwards."""
    settings = sqlite_backend.settings
    bundle = _cam_bundle(tmp_path / "bundle")
    with session_scope(settings.sqlalchemy_url) as session:
        register_bundle(session, bundle, promote=True)
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - {name: c, match: {Modality: CR}, models: [chest-cam]}\n")
    rng = np.random.default_rng(5)
    studies = [write_study(tmp_path / f"s{i}", rng, label=1, images=2) for i in range(2)]
    for study in studies:
        for path in study.paths:
            register_file(settings, path)
    dispatch_ready(settings.model_copy(update={"quiet_seconds": 0.0}), load_rules(rules),
                   PassReport())
    pipeline = WorkerPipeline(settings, ModelCache(settings, "onnxruntime"),
                              decoder=DecodePool(2))
    try:
        jobs = _job_of_study(settings)
        with heatmaps_at_findings_commit(settings) as at_commit, ThreadPoolExecutor(2) as pool:
            outcomes = list(pool.map(lambda j: run_job(settings, pipeline, j), jobs.values()))
    finally:
        pipeline.close()
    assert outcomes == ["succeeded", "succeeded"]
    assert sorted(at_commit) == sorted(
        (jobs[s.study_instance_uid], sop, True) for s in studies for sop in s.sop_instance_uids)
    for study in studies:
        job = jobs[study.study_instance_uid]
        for sop in study.sop_instance_uids:
            cam = load_heatmap(settings, job, sop)
            assert cam is not None and cam.shape == (1, 8, 8)
            assert float(cam.min()) == 0.0 and float(cam.max()) == pytest.approx(1.0, abs=1e-3)
    assert len(_findings(settings)) == 4
