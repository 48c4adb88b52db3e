"""api: indexes behind the REST API's study list, study page and timeline

- studies (first_received_at, id): the list's keyset order (newest first) without a sort;
- jobs (study_id, study_revision, state): the derived study state (an EXISTS per study);
- findings (study_id, label, score): "has a finding with label L scoring at least S";
- series (study_id, modality): the modality filter;
- events (study_instance_uid) and events (job_id): a study's timeline without scanning the log;
- findings (created_at): the dashboard's throughput over the last hour.

Revision ID: 0004_api
Revises: 0003_reliability
"""
from alembic import op

revision = "0004_api"
down_revision = "0003_reliability"
branch_labels = None
depends_on = None

INDEXES = [
    ("ix_studies_first_received_id", "studies", ["first_received_at", "id"]),
    ("ix_jobs_study_rev_state", "jobs", ["study_id", "study_revision", "state"]),
    ("ix_findings_study_label_score", "findings", ["study_id", "label", "score"]),
    ("ix_series_study_modality", "series", ["study_id", "modality"]),
    ("ix_events_study_uid", "events", ["study_instance_uid"]),
    ("ix_events_job_id", "events", ["job_id"]),
    ("ix_findings_created_at", "findings", ["created_at"]),
]


def upgrade() -> None:
    for name, table, columns in INDEXES:
        op.create_index(name, table, columns)


def downgrade() -> None:
    for name, table, _ in reversed(INDEXES):
        op.drop_index(name, table_name=table)
