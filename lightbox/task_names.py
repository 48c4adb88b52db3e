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

TASK_ID_PREFIX = "lightbox-job-"


def job_task_id(job_id: int, nonce: str) -> str:
    """Celery task id of a job's message. It carries the job id, so the scheduler can tell
    which jobs have a message in Redis without decoding message bodies (lost-message check)."""
    return f"{TASK_ID_PREFIX}{job_id}-{nonce}"


def job_id_of_task(task_id: str) -> int | None:
    """The job id in a task id made by :func:`job_task_id`; None for any other task id."""
    if not task_id.startswith(TASK_ID_PREFIX):
        return None
    head = task_id[len(TASK_ID_PREFIX):].split("-", 1)[0]
    return int(head) if head.isdigit() else None
