"""Operations hardening (issue 19): configuration errors are one line with exit code 2, read-only
commands never create a database, files are private, quarantine keeps no names, a FIFO in a
watched folder is quarantined once, `lightbox status` marks killed workers gone."""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from db.migrate import upgrade
from db.models import Event, QuarantinedFile, WorkerNode
from db.session import session_scope
from lightbox.settings import Settings
from lightbox.synthetic import write_study
from scheduler.ingest.folder import watch
from scheduler.ingest.quarantine import digest
from tests.conftest import run_cli

REPO = Path(__file__).resolve().parents[1]


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIGHTBOX_")}
    env["LIGHTBOX_DATA_DIR"] = str(tmp_path / "data")
    env.update(extra)
    return env


def _cli(env: dict[str, str], *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """In process: the commands' answers are the point here; processes are where they are."""
    return run_cli(env, *args, cwd=cwd)


# -- item 16: configuration errors ---------------------------------------------------------

@pytest.mark.parametrize(("extra", "variable", "allowed"), [
    ({"LIGHTBOX_RUNTIME": "tensorrtx"}, "LIGHTBOX_RUNTIME", "auto, onnxruntime, tensorrt"),
    ({"LIGHTBOX_QUIET_SECONDS": "abc"}, "LIGHTBOX_QUIET_SECONDS", "number"),
    ({"LIGHTBOX_LOG_LEVEL": "LOUD"}, "LIGHTBOX_LOG_LEVEL", "DEBUG"),
    ({"LIGHTBOX_EXPORT_DESTINATIONS": '[{"name": "p", "type": "ftp"}]'},
     "LIGHTBOX_EXPORT_DESTINATIONS", "dicom, stow"),
    ({"LIGHTBOX_EXPORT_DESTINATIONS": '[{"name": "p", "type": "dicom", "host": "h"}]'},
     "LIGHTBOX_EXPORT_DESTINATIONS", "ae_title, port"),
    ({"LIGHTBOX_EXPORT_DESTINATIONS": "not json"}, "LIGHTBOX_EXPORT_DESTINATIONS", "JSON"),
    ({"LIGHTBOX_QUIET_SECOND": "5"}, "LIGHTBOX_QUIET_SECOND", "LIGHTBOX_QUIET_SECONDS"),
    ({"LIGHTBOX_DATABASE_URL": "postgresql+psycopg://u:hunter2@127.0.0.1:1/none"},
     "LIGHTBOX_DATABASE_URL", "not reachable"),
])
def test_configuration_errors_are_one_line_exit_2(tmp_path: Path, extra: dict[str, str],
                                                  variable: str, allowed: str) -> None:
    out = _cli(_env(tmp_path, **extra), "status")
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.strip().splitlines() if " INFO " not in line]
    assert len(lines) == 1, out.stderr  # (log lines aside: the data dir and database used)
    assert lines[0].startswith("lightbox: ") and lines[0] == out.stderr.strip().splitlines()[-1]
    assert variable in lines[0] and allowed in lines[0]
    assert "Traceback" not in out.stderr and "hunter2" not in out.stderr


@pytest.mark.parametrize("args", [("db", "--help"), ("worker", "--help"), ("--help",)])
def test_help_works_with_a_broken_configuration(tmp_path: Path, args: tuple[str, ...]) -> None:
    """The operator reads the help when the configuration is wrong: it must not demand a valid
    one first; a real command still refuses it."""
    env = _env(tmp_path, LIGHTBOX_QUIET_SECOND="5")
    out = _cli(env, *args)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("Usage: ") and "configuration error" not in out.stderr
    refused = _cli(env, *[a for a in args if a != "--help"] or ["status"])
    assert refused.returncode == 2 and "LIGHTBOX_QUIET_SECOND" in refused.stderr


def test_scp_without_allow_list_is_one_line_exit_2(tmp_path: Path) -> None:
    out = _cli(_env(tmp_path), "scp")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("lightbox: configuration error:")
    assert "LIGHTBOX_SCP_ALLOWED_CALLERS" in out.stderr and "Traceback" not in out.stderr


def test_test_variables_are_not_settings_errors(tmp_path: Path) -> None:
    env = _env(tmp_path, LIGHTBOX_TEST_POSTGRES_URL="postgresql://x/y")
    out = _cli(env, "config", "check")
    assert out.returncode == 0, out.stderr
    assert "configuration OK" in out.stdout


def test_config_show_masks_secrets(tmp_path: Path) -> None:
    env = _env(tmp_path, LIGHTBOX_API_TOKEN="s3cret-token",
               LIGHTBOX_DATABASE_URL="postgresql+psycopg://u:hunter2@db/lightbox",
               LIGHTBOX_EXPORT_DESTINATIONS='[{"name": "w", "type": "stow", "url": "https://h",'
                                            ' "token": "tok-abc"}]')
    out = _cli(env, "config", "show", "--format", "json")
    assert out.returncode == 0, out.stderr
    values = json.loads(out.stdout)
    assert values["LIGHTBOX_API_TOKEN"] == "***"
    assert values["LIGHTBOX_EXPORT_DESTINATIONS"][0]["token"] == "***"
    assert "hunter2" not in out.stdout and "s3cret" not in out.stdout and "tok-abc" not in out.stdout
    assert values["LIGHTBOX_DATABASE_URL"].startswith("postgresql+psycopg://u:***@db")


# -- item 17: first contact -------------------------------------------------------------------

def test_read_only_commands_never_create_a_database(tmp_path: Path) -> None:
    env = _env(tmp_path)
    env.pop("LIGHTBOX_DATA_DIR")  # the relative default, run from an empty folder
    for args in (("status",), ("results",), ("jobs", "list")):
        out = _cli(env, *args, cwd=tmp_path)
        assert out.returncode == 2, out.stderr
        errors = [line for line in out.stderr.strip().splitlines() if " INFO " not in line]
        assert len(errors) == 1 and "no Lightbox database" in errors[0], out.stderr
    assert not (tmp_path / "lightbox-data" / "lightbox.db").exists()


def test_commands_log_data_dir_and_database_version_and_paths(tmp_path: Path) -> None:
    env = _env(tmp_path)
    out = _cli(env, "db", "upgrade")
    assert out.returncode == 0, out.stderr
    assert f"data dir {tmp_path / 'data'}" in out.stderr and "lightbox.db" in out.stderr
    status = _cli(env, "status", "--format", "json")
    assert status.returncode == 0 and json.loads(status.stdout)["jobs"] is not None
    assert f"data dir {tmp_path / 'data'}" in status.stderr

    missing = _cli(env, "ingest", str(tmp_path / "nonexistent"))
    assert missing.returncode != 0 and "does not exist" in missing.stderr

    version = _cli(env, "--version")
    assert version.returncode == 0 and version.stdout.startswith("lightbox, version ")


def test_watch_on_a_missing_folder_says_so(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    upgrade(settings.sqlalchemy_url)
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "watch",
                             str(tmp_path / "no-such-inbox")], env=_env(tmp_path),
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        line = ""
        deadline = time.monotonic() + 120
        while "does not exist" not in line and time.monotonic() < deadline:
            line = proc.stderr.readline() if proc.stderr else ""
            if not line and proc.poll() is not None:
                break
        assert "does not exist" in line
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# -- item 14: private files --------------------------------------------------------------------

def test_files_are_private_by_default(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    write_study(folder, np.random.default_rng(0), label=0)
    (folder / "junk.bin").write_bytes(b"x" * 300)
    old = os.umask(0o022)  # the shell's usual mask: the command must not inherit it
    try:
        out = _cli(_env(tmp_path), "ingest", str(folder))
    finally:
        os.umask(old)
    assert out.returncode == 0, out.stderr
    data = tmp_path / "data"
    files = [p for p in data.rglob("*") if p.is_file() and not p.is_symlink()]
    assert any(p.suffix == ".dcm" for p in files) and (data / "lightbox.db").exists()
    for path in [data, *data.rglob("*")]:
        if path.is_symlink():
            continue
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o077 == 0, f"{path.relative_to(tmp_path)} is {oct(mode)}"


def test_systemd_units_set_umask() -> None:
    for unit in (REPO / "deploy" / "systemd").glob("*.service"):
        assert "\nUMask=0077\n" in unit.read_text(), unit.name


# -- items 11 and 13: quarantine -----------------------------------------------------------------

def test_fifo_in_watched_folder_is_quarantined_once_without_its_name(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings(data_dir=tmp_path / "data", watch_rescan_seconds=0.1,
                        watch_settle_seconds=0.0)
    upgrade(settings.sqlalchemy_url)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    os.mkfifo(inbox / "SMITH^JOHN_12345.dcm")
    stop = threading.Event()
    caplog.set_level(logging.INFO)
    thread = threading.Thread(target=watch, args=(settings, inbox, stop))
    thread.start()
    try:
        time.sleep(1.5)  # ~15 rescans
    finally:
        stop.set()
        thread.join(timeout=30)
    with session_scope(settings.sqlalchemy_url) as session:
        rows = session.scalars(select(QuarantinedFile)).all()
        events = session.scalars(select(Event).where(Event.kind == "file_quarantined")).all()
        assert len(rows) == 1 and len(events) == 1
        assert rows[0].name_digest == digest(settings, "SMITH^JOHN_12345.dcm")
        assert "SMITH" not in rows[0].quarantine_path and "SMITH" not in json.dumps(
            events[0].detail)
    assert "SMITH" not in caplog.text
    assert list(inbox.iterdir()) == []  # renamed into quarantine, never opened


def test_quarantine_keeps_no_name_anywhere(tmp_path: Path) -> None:
    env = _env(tmp_path)
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "SMITH^JOHN_12345.dcm").write_bytes(b"not dicom at all" * 20)
    out = _cli(env, "ingest", str(folder))
    assert out.returncode == 0, out.stderr
    status = _cli(env, "status")
    table = _cli(env, "status", "--format", "json")
    assert status.returncode == 0 and table.returncode == 0
    data = tmp_path / "data"
    settings = Settings(data_dir=data)
    assert digest(settings, "SMITH^JOHN_12345.dcm") in status.stdout
    for text in (out.stdout, out.stderr, status.stdout, status.stderr, table.stdout):
        assert "SMITH" not in text
    assert not [p for p in data.rglob("*") if "SMITH" in p.name]
    assert b"SMITH" not in (data / "lightbox.db").read_bytes()
    with session_scope(settings.sqlalchemy_url) as session:
        row = session.scalars(select(QuarantinedFile)).one()
        assert row.sender_digest == digest(settings, "folder")


# -- item 10: killed workers -----------------------------------------------------------------------

def test_status_marks_workers_not_seen_as_gone(tmp_path: Path) -> None:
    env = _env(tmp_path, LIGHTBOX_HEARTBEAT_TIMEOUT_SECONDS="60")
    settings = Settings(data_dir=tmp_path / "data")
    upgrade(settings.sqlalchemy_url)
    now = datetime.now(timezone.utc)
    with session_scope(settings.sqlalchemy_url) as session:
        session.add(WorkerNode(hostname="killed@node", runtime="onnxruntime", pid=1,
                               last_seen_at=now - timedelta(minutes=10)))
        session.add(WorkerNode(hostname="alive@node", runtime="onnxruntime", pid=2,
                               last_seen_at=now))
    out = _cli(env, "status", "--format", "json")
    assert out.returncode == 0, out.stderr
    states = {w["hostname"]: w["state"] for w in json.loads(out.stdout)["workers"]}
    assert states == {"killed@node": "gone", "alive@node": "alive"}
    text = _cli(env, "status").stdout
    assert "killed@node runtime=onnxruntime gone" in text


# -- item 12: one embedded Redis per data dir ---------------------------------------------------

_USER = """
import sys, time
from pathlib import Path
from lightbox.redis_server import ensure_embedded_redis
from lightbox.settings import Settings
ensure_embedded_redis(Settings(data_dir=Path(sys.argv[1])))
print("joined", flush=True)
while not Path(sys.argv[2]).exists():
    time.sleep(0.05)
"""


def _redis_servers(data: Path) -> list[int]:
    """redis-server processes of this data dir (each one runs in its ``dir``, redis/)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "name"]):
        try:
            if "redis" in (proc.info["name"] or "") and proc.cwd() == str(data / "redis"):
                found.append(proc.info["pid"])
        except (psutil.Error, OSError):
            continue
    return found


def test_processes_started_together_share_one_embedded_redis(tmp_path: Path) -> None:
    data, release = tmp_path / "data", tmp_path / "release"
    procs = [subprocess.Popen([sys.executable, "-c", _USER, str(data), str(release)],
                              stdout=subprocess.PIPE, text=True) for _ in range(4)]
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "joined"
        assert len(_redis_servers(data)) == 1
    finally:
        release.touch()
        for proc in procs:
            proc.wait(timeout=60)
    assert [p.returncode for p in procs] == [0, 0, 0, 0]
    from lightbox.redis_server import embedded_redis_running

    settings = Settings(data_dir=data)
    assert not embedded_redis_running(settings)  # the last process out stopped it
    deadline = time.monotonic() + 30
    while _redis_servers(data) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _redis_servers(data) == []


def test_lightbox_stop_and_status_when_redis_is_not_running(tmp_path: Path) -> None:
    data, release = tmp_path / "data", tmp_path / "release"
    env = _env(tmp_path)
    assert _cli(env, "db", "upgrade").returncode == 0
    holder = subprocess.Popen([sys.executable, "-c", _USER, str(data), str(release)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "joined"
        assert json.loads(_cli(env, "status", "--format", "json").stdout)[
            "embedded_redis"] == "running"
        out = _cli(env, "stop")
        assert out.returncode == 0 and "embedded Redis stopped" in out.stdout
        status = _cli(env, "status")
        assert "embedded Redis not running" in status.stdout
    finally:
        release.touch()
        holder.wait(timeout=60)
    assert _redis_servers(data) == []


# -- README: items 14, 16, 19 ------------------------------------------------------------------

def test_readme_says_which_storescu_exit_codes_and_data_dir_folders() -> None:
    text = (REPO / "README.md").read_text()
    assert "/usr/bin/storescu" in text and "pynetdicom's" in text  # dcmtk's, not the venv's
    assert "Exit codes of `lightbox`" in text
    assert "`outputs/`" in text.split("| `LIGHTBOX_DATA_DIR` |", 1)[1].split("\n", 1)[0]
    allow = [line for line in text.splitlines() if line.startswith(
        "| `LIGHTBOX_SCP_ALLOWED_CALLERS` |")]
    assert len(allow) == 2 and all("| empty" in line for line in allow)  # one default
