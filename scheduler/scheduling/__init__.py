"""Scheduling: readiness, routing rules, dispatch of job messages, reconciliation of the
database with the queue, retention."""
