"""`lightbox scheduler`: the reconciliation loop. The database is the source of truth; each
pass makes the queue agree with it: quiet studies are routed into jobs, failed jobs whose
backoff passed are requeued, and every queued job without a sent message is sent."""

from __future__ import annotations

import logging
import threading

from celery import Celery

from lightbox.settings import Settings
from scheduler.dispatch import PassReport, dispatch_ready, send_pending
from scheduler.route import load_rules

log = logging.getLogger(__name__)


def run_pass(settings: Settings, app: Celery, rules: list) -> PassReport:  # type: ignore[type-arg]
    report = PassReport()
    dispatch_ready(settings, rules, report)
    send_pending(settings, app, report)
    return report


def run_scheduler(settings: Settings, app: Celery, stop: threading.Event) -> None:
    rules = load_rules(settings.rules_file)
    log.info("scheduler started: %d rule(s), quiet time %.1fs", len(rules), settings.quiet_seconds)
    while not stop.is_set():
        try:
            report = run_pass(settings, app, rules)
        except Exception:  # noqa: BLE001 - a pass that fails (DB restarting) is retried next pass
            log.exception("scheduler pass failed; retrying in %.1fs", settings.scheduler_interval)
        else:
            if report.jobs_created or report.jobs_sent or report.studies_unrouted:
                log.info("pass: %s", report)
        stop.wait(settings.scheduler_interval)
