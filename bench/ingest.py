"""Ingest benchmark: the same corpus sent by dcmtk `storescu` to Lightbox's SCP and to Orthanc,
in one run, on loopback. Prints JSON and a one-line summary, and writes a PNG.

Corpus: ``--ct`` small CT instances (pydicom's CT_small, 128×128, new UIDs, studies of 50)
and ``--cr`` chest CRs (the real pydicom-data radiographs, alternately uncompressed and JPEG
2000). Each target gets its own storescu run over the whole folder (one association,
``TCP_NODELAY=1``; ``--associations N``: N storescu at once, each over every N-th file).
Lightbox's time ends when every instance has its row in the database (registration
included: the SCP answers once the bytes are flushed into its spool and registers in batches,
so the clock runs until the last row is committed); Orthanc's when it reports the instance
count. Both flush every instance to disk before answering (Orthanc's
``SyncStorageArea`` is on by default). ``--database-url`` (PostgreSQL) runs Lightbox on a new
database created for the run and dropped afterwards.

    .venv/bin/python bench/ingest.py [--ct 2000] [--cr 10] [--associations 1]
                                     [--database-url URL] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from rich.console import Console
from rich.progress import Progress

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

console = Console(stderr=True)
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_corpus(folder: Path, ct: int, cr: int) -> tuple[int, int]:
    """Write the corpus; returns (instances, bytes)."""
    folder.mkdir(parents=True)
    ct_template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    cr_templates = [pydicom.dcmread(get_testdata_file(n)) for n in ("RG1_UNCR.dcm",
                                                                      "RG1_J2KR.dcm")]
    total = 0
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("writing corpus", total=ct + cr)
        study = series = ""
        for i in range(ct):
            if i % 50 == 0:
                study, series = generate_uid(), generate_uid()
            ds = ct_template
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.InstanceNumber = i % 50 + 1
            path = folder / f"ct-{i:06d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            total += path.stat().st_size
            progress.advance(task)
        for i in range(cr):
            ds = cr_templates[i % 2]
            ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            path = folder / f"cr-{i:04d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            total += path.stat().st_size
            progress.advance(task)
    return ct + cr, total


def storescu(port: int, called: str, corpus: Path) -> float:
    """Send the folder in one association per subfolder (all at once) or, without
    subfolders, one association; returns seconds. -xv proposes JPEG 2000 lossless and the
    uncompressed syntaxes: each file goes as it is stored."""
    env = {**os.environ, "TCP_NODELAY": "1"}
    folders = sorted(p for p in corpus.iterdir() if p.is_dir()) or [corpus]
    start = time.perf_counter()
    senders = [subprocess.Popen(["storescu", "-xv", "+sd", "-aet", "BENCH", "-aec", called,
                                 "127.0.0.1", str(port), str(folder)],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True) for folder in folders]
    errors = [sender.communicate()[1] for sender in senders]
    elapsed = time.perf_counter() - start
    for sender, error in zip(senders, errors, strict=True):
        if sender.returncode != 0:
            raise RuntimeError(f"storescu to {called} failed: {error[-2000:]}")
    return elapsed


def split_corpus(corpus: Path, associations: int) -> None:
    """Hard-link every file into ``associations`` subfolders, round robin (one sender each)."""
    if associations <= 1:
        return
    files = sorted(p for p in corpus.iterdir() if p.is_file())
    for i in range(associations):
        (corpus / f"part-{i}").mkdir()
    for j, path in enumerate(files):
        os.link(path, corpus / f"part-{j % associations}" / path.name)
        path.unlink()


def wait_until(predicate, timeout: float = 600.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("benchmark target did not finish")
        time.sleep(0.05)


def bench_orthanc(work: Path, corpus: Path, count: int) -> float:
    http_port, dicom_port = free_port(), free_port()
    config = {"Name": "bench", "StorageDirectory": str(work / "orthanc-storage"),
              "IndexDirectory": str(work / "orthanc-storage"), "HttpPort": http_port,
              "DicomPort": dicom_port, "DicomAet": "ORTHANC", "RemoteAccessAllowed": True,
              "AuthenticationEnabled": False, "DicomAlwaysAllowStore": True,
              "DicomCheckCalledAet": False, "StorageCompression": False, "Plugins": []}
    (work / "orthanc.json").write_text(json.dumps(config))
    log = (work / "orthanc.log").open("wb")
    proc = subprocess.Popen(["Orthanc", str(work / "orthanc.json")], stdout=log,
                            stderr=subprocess.STDOUT, env={**os.environ, "TCP_NODELAY": "1"})
    url = f"http://127.0.0.1:{http_port}"
    try:
        wait_until(lambda: _get(url + "/system") is not None, 60)
        start = time.perf_counter()
        storescu(dicom_port, "ORTHANC", corpus)
        wait_until(lambda: (_get(url + "/statistics") or {}).get("CountInstances") == count)
        return time.perf_counter() - start
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def _get(url: str) -> dict | None:  # type: ignore[type-arg]
    try:
        response = httpx.get(url, timeout=5)
        return response.json() if response.status_code == 200 else None
    except httpx.HTTPError:
        return None


@contextmanager
def fresh_database(database_url: str | None) -> Iterator[str | None]:
    """A PostgreSQL URL gets a new database of its own for the run (dropped afterwards), so
    the count of rows is this run's and no shared database is written to."""
    if not database_url:
        yield None
        return
    import sqlalchemy as sa

    name = f"lightbox_bench_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(database_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield sa.make_url(database_url).set(database=name).render_as_string(hide_password=False)
    finally:
        from db.session import sessionmaker_for

        sessionmaker_for.cache_clear()
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def bench_lightbox(work: Path, corpus: Path, count: int, database_url: str | None) -> float:
    from sqlalchemy import func, select

    from db.migrate import upgrade
    from db.models import Instance
    from db.session import session_scope
    from lightbox.settings import Settings

    port = free_port()
    data = work / "lightbox-data"
    env = {**os.environ, "LIGHTBOX_DATA_DIR": str(data), "LIGHTBOX_SCP_PORT": str(port),
           "LIGHTBOX_SCP_BIND_ADDRESS": "127.0.0.1", "LIGHTBOX_SCP_ALLOWED_CALLERS": "BENCH",
           "LIGHTBOX_LOG_LEVEL": "WARNING", "LIGHTBOX_SCP_MIN_FREE_MB": "64"}
    if database_url:
        env["LIGHTBOX_DATABASE_URL"] = database_url
    settings = Settings(data_dir=data, database_url=database_url)
    upgrade(settings.sqlalchemy_url)
    log = (work / "scp.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "scp"], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT)

    def rows() -> int:
        with session_scope(settings.sqlalchemy_url) as session:
            return int(session.scalar(select(func.count()).select_from(Instance)) or 0)

    try:
        wait_until(lambda: _listening(port), 60)
        start = time.perf_counter()
        storescu(port, "LIGHTBOX", corpus)
        wait_until(lambda: rows() >= count)
        return time.perf_counter() - start
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def plot(results: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.5))
    for axis, key, title in ((axes[0], "instances_per_s", "instances/s"),
                             (axes[1], "mb_per_s", "MB/s")):
        axis.bar(names, [results[n][key] for n in names], color=["#4c72b0", "#dd8452"])
        axis.set_title(title)
    fig.suptitle("storescu → SCP, registration included (same corpus)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ct", type=int, default=2000, help="small CT instances")
    parser.add_argument("--cr", type=int, default=10, help="chest CRs (half JPEG 2000)")
    parser.add_argument("--associations", type=int, default=1,
                        help="storescu senders at once, to each target")
    parser.add_argument("--database-url", default=None, help="Lightbox DB (default SQLite)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    for binary in ("storescu", "Orthanc"):
        if shutil.which(binary) is None:
            console.print(f"needs {binary} (apt-get install dcmtk orthanc)")
            return 2
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lightbox-bench-") as tmp:
        work = Path(tmp)
        count, size = write_corpus(work / "corpus", args.ct, args.cr)
        split_corpus(work / "corpus", args.associations)
        mb = size / 1e6
        console.print(f"corpus: {count} instances, {mb:.1f} MB")
        timings = {}
        console.print("sending to Orthanc ...")
        timings["orthanc"] = bench_orthanc(work, work / "corpus", count)
        console.print("sending to Lightbox ...")
        with fresh_database(args.database_url) as url:
            timings["lightbox"] = bench_lightbox(work, work / "corpus", count, url)
    results = {name: {"seconds": round(t, 3), "instances_per_s": round(count / t, 1),
                      "mb_per_s": round(mb / t, 2)} for name, t in timings.items()}
    report = {"corpus": {"instances": count, "ct": args.ct, "cr": args.cr, "mb": round(mb, 1)},
              "associations": args.associations,
              "database": "postgresql" if args.database_url else "sqlite",
              "results": results,
              "lightbox_vs_orthanc": round(timings["orthanc"] / timings["lightbox"], 3)}
    png = args.out / "ingest.png"
    plot(results, png)
    (args.out / "ingest.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    lb, orth = results["lightbox"], results["orthanc"]
    print(f"ingest: Lightbox {lb['instances_per_s']} inst/s {lb['mb_per_s']} MB/s vs Orthanc "
          f"{orth['instances_per_s']} inst/s {orth['mb_per_s']} MB/s "
          f"(x{report['lightbox_vs_orthanc']}, {count} instances, {args.associations} "
          f"association(s), {report['database']}); "
          f"plot {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
