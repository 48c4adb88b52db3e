"""`lightbox scheduler`: the reconciliation loop. The database is the source of truth; each
pass makes the queue agree with it: quiet studies are routed into jobs, failed jobs whose
backoff passed are requeued, every queued job without a sent message is sent, and routine
jobs that waited too long are sent again at STAT priority. Every ``reconcile_interval`` the
loop also requeues running jobs whose heartbeat stopped, resends jobs whose message Redis
lost, and applies pixel retention.

Several schedulers may run at once: every step claims its rows with ``FOR UPDATE SKIP LOCKED``
on PostgreSQL (SQLite has a single writer), and a message sent twice is harmless.
"""

from __future__ import annotations

import logging
import threading
import time

from celery import Celery

from lightbox.settings import Settings
from scheduler.scheduling.dispatch import PassReport, dispatch_ready, send_pending
from scheduler.scheduling.reconcile import (
    clear_finished_reservations,
    escalate_waiting,
    requeue_stale,
    resend_lost,
)
from scheduler.scheduling.retention import delete_expired_pixels
from scheduler.scheduling.route import Rule, load_rules

log = logging.getLogger(__name__)


def reconcile(settings: Settings, report: PassReport) -> None:
    """The slower checks: heartbeats, lost messages, retention."""
    requeue_stale(settings, report)
    resend_lost(settings, report)
    clear_finished_reservations(settings, report)
    report.pixels_deleted += delete_expired_pixels(settings)


def run_pass(settings: Settings, app: Celery, rules: list[Rule], *,
             reconcile_now: bool = True) -> PassReport:
    report = PassReport()
    dispatch_ready(settings, rules, report)
    if reconcile_now:
        reconcile(settings, report)
    send_pending(settings, app, report)
    escalate_waiting(settings, app, report)
    return report


def run_scheduler(settings: Settings, app: Celery, stop: threading.Event) -> None:
    rules = load_rules(settings.rules_file)
    log.info("scheduler started: %d rule(s), quiet time %.1fs", len(rules), settings.quiet_seconds)
    next_reconcile = 0.0
    while not stop.is_set():
        due = time.monotonic() >= next_reconcile
        try:
            report = run_pass(settings, app, rules, reconcile_now=due)
        except Exception:  # noqa: BLE001 - a pass that fails (DB or Redis restarting) is retried
            log.exception("scheduler pass failed; retrying in %.1fs", settings.scheduler_interval)
        else:
            if due:
                next_reconcile = time.monotonic() + settings.reconcile_interval
            if report:
                log.info("pass: %s", report)
        stop.wait(settings.scheduler_interval)
