"""Celery task names: the contract between the scheduler (which sends) and the worker (which
runs). Components refer to these names, never to each other's functions."""

PROCESS_JOB = "lightbox.process_job"
QUEUE = "lightbox"

# Redis transport: lower number = served first. STAT before routine.
PRIORITY_STAT = 0
PRIORITY_ROUTINE = 5
PRIORITY_STEPS = [PRIORITY_STAT, PRIORITY_ROUTINE]


def queue_keys() -> list[str]:
    """The Redis lists kombu keeps for :data:`QUEUE`, one per priority step (step 0 has no
    suffix), e.g. for measuring queue depth."""
    return [QUEUE if step == 0 else f"{QUEUE}:{step}" for step in PRIORITY_STEPS]
