"""`lightbox demo` as a user runs it: nothing running beforehand, everything under
LIGHTBOX_DATA_DIR, findings for every study (the real chest CRs included), twice in a row."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from lightbox.redis_server import embedded_redis_running
from lightbox.settings import Settings


def _demo(data_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIGHTBOX_")}
    env["LIGHTBOX_DATA_DIR"] = str(data_dir)
    return subprocess.run([sys.executable, "-m", "cli.main", "demo", "--studies", "3"],
                          env=env, capture_output=True, text=True, timeout=900)


def test_demo_runs_twice(tmp_path: Path) -> None:
    data_dir = tmp_path / "lightbox-data"
    first = _demo(data_dir)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    assert "training the seed CNN" in first.stdout
    assert "real chest CRs (pydicom-data): 2 finding(s)" in first.stdout
    assert "throughput:" in first.stdout and "pneumonia" in first.stdout
    assert "(name kept only as a digest)" in first.stdout
    assert "notes.txt" not in first.stdout and "truncated.dcm" not in first.stdout
    assert not embedded_redis_running(Settings(data_dir=data_dir))  # it stopped what it started
    # The 3-D models are trained on SYNTHETIC phantoms; the shuffled CT series gets its series
    # findings and result objects (SR always; a SEG when the lesion is found).
    assert "training a tiny 3-D segmentation network on SYNTHETIC CT phantoms" in first.stdout
    assert "Series findings (SYNTHETIC CT)" in first.stdout and "SR written" in first.stdout

    second = _demo(data_dir)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    assert "is in production" in second.stdout  # the model from the first run is reused
    assert "real chest CRs (pydicom-data): 2 finding(s)" in second.stdout
    assert not embedded_redis_running(Settings(data_dir=data_dir))
    assert {"lightbox.db", "models", "quarantine", "redis", "storage"} <= {
        p.name for p in data_dir.iterdir()}  # all state under LIGHTBOX_DATA_DIR
