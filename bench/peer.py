"""The naive peer that bench/pipeline.py measures Lightbox against.

What a straightforward hospital AI service does: one Celery task per study (solo pool), the
same model loaded once per process and run with PyTorch eager at batch size 1, and one commit
per finding, with the same database and job rows. Its decoding is chosen by
``BENCH_PEER_DECODE``: ``full`` decodes every pixel and then windows and resizes
(:mod:`bench.full_size`, what a straightforward service does); ``lightbox`` uses Lightbox's own
:func:`~lightbox.preprocess.prepare_file` (reduced-resolution JPEG 2000, block means), so that
the comparison is about the pipeline alone.

Run by the benchmark as ``python -m celery -A bench.peer worker --pool=solo``; the model is
the file named by ``BENCH_PEER_MODEL`` (a whole pickled torch module: this is a benchmark, not
the worker, and may import torch).
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from sqlalchemy import select

from bench.full_size import prepare_full_size
from db.models import Finding, Instance, Job, JobState, Series
from db.session import session_scope
from lightbox.celery_app import make_celery
from lightbox.manifest import load_manifest
from lightbox.preprocess import prepare_file
from lightbox.roots import stored_file
from lightbox.settings import get_settings

PEER_TASK = "bench.peer_study"

settings = get_settings()
app = make_celery(settings, start_redis=False)
# All cores, torch's default: a naive service does not tune threads, and one process decoding
# then inferring leaves the cores free while the model runs (the harder baseline to beat).
torch.set_num_threads(os.cpu_count() or 1)
_prepare = prepare_full_size if os.environ.get("BENCH_PEER_DECODE") == "full" else prepare_file
_model: torch.nn.Module | None = None


def _load() -> torch.nn.Module:
    global _model
    if _model is None:
        _model = torch.load(os.environ["BENCH_PEER_MODEL"], weights_only=False)
        _model.eval()
    return _model


@app.task(name=PEER_TASK, acks_late=True)
def peer_study(job_id: int, bundle_dir: str) -> int:
    model, manifest = _load(), load_manifest(Path(bundle_dir), False)
    with session_scope(settings.sqlalchemy_url) as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.state, job.started_at = JobState.running, datetime.now(timezone.utc)
        images = session.execute(
            select(Instance.sop_instance_uid, Series.series_instance_uid, Instance.stored_path)
            .join(Series, Instance.series_id == Series.id)
            .where(Series.study_id == job.study_id)).all()
        study_id = job.study_id
    for sop, series, path in images:
        tensor = torch.from_numpy(_prepare(str(stored_file(settings, path)), manifest)[None])
        with torch.no_grad():
            out = model(tensor)
        out = out[0] if isinstance(out, tuple) else out
        score = float(np.asarray(out).reshape(-1)[0])
        with session_scope(settings.sqlalchemy_url) as session:  # one commit per finding
            label = manifest.labels[0]
            threshold = manifest.threshold_for(label)
            session.add(Finding(job_id=job_id, study_id=study_id, series_instance_uid=series,
                                sop_instance_uid=sop, label=label, score=score,
                                threshold=threshold, positive=score >= threshold))
    with session_scope(settings.sqlalchemy_url) as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.state, job.finished_at = JobState.succeeded, datetime.now(timezone.utc)
    return len(images)
