"""Lightbox core: settings, CLI, Celery app, model manifest and the DICOM/pixel primitives
shared by the trainer and the worker.

Components (``scheduler``, ``worker``, ``trainer``) never import each other; they meet in the
database (``db``) and through the Celery task names defined in :mod:`lightbox.task_names`.
"""

__version__ = "0.1.0"
