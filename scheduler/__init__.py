"""Ingest, readiness, routing and dispatch: everything between a file arriving and a job
message in Redis. Talks to workers only through the database and Celery task names."""
