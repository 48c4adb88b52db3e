"""Celery task names: the contract between the scheduler (which sends) and the worker (which
runs). Components refer to these names, never to each other's functions."""

PROCESS_JOB = "lightbox.process_job"
QUEUE = "lightbox"

# Redis transport: lower number = served first. STAT before routine.
PRIORITY_STAT = 0
PRIORITY_ROUTINE = 5
PRIORITY_STEPS = [PRIORITY_STAT, PRIORITY_ROUTINE]
