"""The worker's layout rule (worker/layout.py) for 2, 16 and 64 cores, with and without a
GPU; explicit settings win; ``lightbox worker --explain-layout`` prints it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lightbox.manifest import load_manifest
from lightbox.settings import Settings
from worker.layout import model_batch_limit, node_layout, sized_settings

# cores, gpu -> (jobs in flight, decode processes, batch, wait ms, onnx threads, onnx runs)
EXPECTED = {
    (2, False): (8, 2, 16, 10.0, 1, 2),
    (16, False): (32, 16, 16, 10.0, 1, 16),
    (64, False): (128, 64, 16, 10.0, 1, 64),
    (2, True): (16, 2, 64, 5.0, 1, 2),
    (16, True): (60, 15, 64, 5.0, 1, 16),
    (64, True): (128, 63, 64, 5.0, 1, 64),
}


@pytest.mark.parametrize(("cores", "gpu"), sorted(EXPECTED))
def test_rule_for_the_node(tmp_path: Path, cores: int, gpu: bool) -> None:
    layout = node_layout(Settings(data_dir=tmp_path), cores=cores, gpu=gpu)
    assert (layout.worker_concurrency, layout.decode_workers, layout.batch_max_size,
            layout.batch_max_wait_ms, layout.onnx_threads,
            layout.onnx_parallel_runs) == EXPECTED[(cores, gpu)]
    assert "explicit" not in layout.explain()


def test_explicit_settings_win(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, worker_concurrency=3, decode_workers=5,
                        batch_max_size=7, batch_max_wait_ms=0.0, onnx_threads=2)
    layout = node_layout(settings, cores=16, gpu=True)
    assert (layout.worker_concurrency, layout.decode_workers, layout.batch_max_size,
            layout.batch_max_wait_ms, layout.onnx_threads, layout.onnx_parallel_runs) == (
        3, 5, 7, 0.0, 2, 8)
    assert layout.why["batch_max_wait_ms"] == "explicit setting"
    sized = sized_settings(settings, layout)
    assert sized_settings(sized) == sized  # idempotent: nothing left on auto


def test_forced_onnx_runtime_is_a_cpu_layout(tmp_path: Path) -> None:
    layout = node_layout(Settings(data_dir=tmp_path, runtime="onnxruntime"), cores=16)
    assert not layout.gpu and layout.decode_workers == 16


def test_model_part_of_the_rule(model_bundle: Path) -> None:
    manifest = load_manifest(model_bundle)
    assert model_batch_limit(manifest, 64) == 64
    static = manifest.model_copy(update={"input": manifest.input.model_copy(
        update={"dynamic_batch": False})})
    assert model_batch_limit(static, 64) == 1
    huge = manifest.model_copy(update={"input": manifest.input.model_copy(
        update={"height": 2048, "width": 2048})})
    assert model_batch_limit(huge, 64) == 4  # 64 MiB of 16 MiB images


def test_explain_layout_prints_and_exits(tmp_path: Path) -> None:
    env = {"LIGHTBOX_DATA_DIR": str(tmp_path), "LIGHTBOX_DECODE_WORKERS": "3",
           "LIGHTBOX_RUNTIME": "onnxruntime", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-m", "cli.main", "worker", "--explain-layout"],
                         env=env, capture_output=True, text=True, timeout=120, check=True)
    assert "decode_workers = 3  (explicit setting)" in out.stdout
    assert "worker_concurrency = " in out.stdout and "GPU detection: no" in out.stdout
