"""The deployment files: the Containerfile lints clean and its `cpu` image builds and runs the
demo (inside the build: containers cannot be started on these machines), compose renders, and
both Kubernetes overlays render and validate against the Kubernetes schema (KEDA and
ServiceMonitor objects against the fields their CRDs require)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from lightbox.task_names import queue_keys

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
CONTAINERFILE = DEPLOY / "container" / "Containerfile"
BIN = Path(sys.executable).parent
# Where the debootstrapped base lives between runs (minutes to make; .ci/run keeps it).
BASE_CACHE = Path(os.environ.get("LIGHTBOX_TEST_IMAGE_CACHE", "/var/cache/lightbox-ci"))
BASE_IMAGE = "localhost/lightbox-base:bookworm"
SECRETS = ["postgres_password", "lightbox_database_url", "lightbox_api_token",
           "lightbox_export_destinations"]


def _tool(name: str) -> str:
    path = shutil.which(name) or (str(BIN / name) if (BIN / name).exists() else None)
    if path is None:
        pytest.skip(f"{name} is not installed (.ci/run installs it)")
    return path


# -- Containerfile -----------------------------------------------------------------------------

def test_containerfile_lints_clean_and_has_the_three_targets() -> None:
    done = subprocess.run([_tool("hadolint"), str(CONTAINERFILE)], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    text = CONTAINERFILE.read_text()
    for target in ("cpu", "gpu", "train"):
        assert f" AS {target}\n" in text
    assert "ARG BASE_IMAGE=" in text and "FROM ${BASE_IMAGE} AS cpu" in text
    assert text.count("USER 10001:10001") == 2 and text.count("HEALTHCHECK") == 2
    assert "org.opencontainers.image.version" in text


def _ensure_base() -> None:
    """A minimal Debian bookworm made with debootstrap and imported into podman (no registry
    is reachable from these machines), kept in BASE_CACHE between runs."""
    podman = _tool("podman")
    if subprocess.run([podman, "image", "exists", BASE_IMAGE]).returncode == 0:
        return
    root = BASE_CACHE / "bookworm-base"
    if not (root / "usr" / "bin" / "python3").exists():
        debootstrap = _tool("debootstrap")
        partial = BASE_CACHE / "bookworm-base.tmp"
        shutil.rmtree(partial, ignore_errors=True)
        BASE_CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run([debootstrap, "--variant=minbase",
                        "--include=python3,python3-venv,ca-certificates,libgomp1", "bookworm",
                        str(partial), "http://deb.debian.org/debian"], check=True,
                       capture_output=True, timeout=1800)
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for item in (partial / junk).glob("*"):
                if item.is_file():
                    item.unlink()
        partial.rename(root)
    tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
    subprocess.run([podman, "import", "-", BASE_IMAGE], stdin=tar.stdout, check=True,
                   capture_output=True, timeout=600)
    assert tar.wait() == 0


def _build(*args: str, context: Path) -> subprocess.CompletedProcess[str]:
    ca = Path("/etc/ssl/certs/ca-certificates.crt")  # TLS to PyPI may be intercepted here
    tls = ["-v", f"{ca}:/run/lightbox-build-ca.crt:ro", "--build-arg",
           "PIP_CERT=/run/lightbox-build-ca.crt"] if ca.exists() else []
    return subprocess.run([_tool("podman"), "build", "--isolation", "chroot", *tls, *args,
                           str(context)], capture_output=True, text=True, timeout=3600)


@pytest.mark.slow
def test_cpu_image_builds_and_runs_the_demo(model_bundle: Path, tmp_path: Path) -> None:
    """The `cpu` target from a debootstrapped base; then, in a build FROM it (podman run fails
    in crun here), as the image's user: `lightbox --version`, a model registered, and a
    `lightbox demo` run end to end."""
    _ensure_base()
    built = _build("-f", str(CONTAINERFILE), "--target", "cpu", "--build-arg",
                   f"BASE_IMAGE={BASE_IMAGE}", "-t", "localhost/lightbox:cpu-test",
                   context=ROOT)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    check = tmp_path / "check"
    shutil.copytree(model_bundle, check / "bundle")
    (check / "Containerfile").write_text(
        "FROM localhost/lightbox:cpu-test\n"
        "COPY --chown=10001:10001 bundle /tmp/seed/chest\n"
        "ENV LIGHTBOX_DATA_DIR=/tmp/demo LIGHTBOX_STORAGE_DIR=/tmp/demo/storage "
        "LIGHTBOX_MODELS_DIR=/tmp/demo/models\n"
        "RUN lightbox --version | tee /tmp/version\n"
        "RUN python3 -c 'import torch' 2>/dev/null && exit 1 || true\n"
        "RUN lightbox models register /tmp/seed/chest --promote "
        "&& lightbox demo --studies 2 --timeout 600 "
        "|| (tail -n 30 /tmp/demo/logs/*.log; exit 1)\n")
    checked = _build("-f", str(check / "Containerfile"), "-t", "localhost/lightbox:cpu-check",
                     context=check)
    output = checked.stdout + checked.stderr
    assert checked.returncode == 0, output[-4000:]
    assert "lightbox, version" in output
    assert "throughput:" in output and "studies have no findings" not in output
    size = subprocess.run([_tool("podman"), "image", "inspect", "--format", "{{.Size}}",
                           "localhost/lightbox:cpu-test"], capture_output=True, text=True)
    print(f"lightbox:cpu image: {int(size.stdout.strip()) / 1e6:.0f} MB")


# -- compose -----------------------------------------------------------------------------------

def test_compose_renders_with_migration_probes_secrets_and_gpu_profile(tmp_path: Path) -> None:
    for name in ("compose.yaml", "rules.yaml"):
        shutil.copy(DEPLOY / name, tmp_path / name)
    (tmp_path / "secrets").mkdir()
    for secret in SECRETS:
        (tmp_path / "secrets" / secret).write_text("x")
    done = subprocess.run([_tool("podman-compose"), "--profile", "gpu", "config"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    config = yaml.safe_load(done.stdout)
    services = config["services"]
    assert set(services) >= {"postgres", "redis", "migrate", "scp", "api", "scheduler",
                             "export", "worker", "worker-gpu"}
    assert services["migrate"]["command"] == ["db", "upgrade"]
    apps = ["scp", "api", "scheduler", "export", "worker", "worker-gpu"]
    for name in apps:
        service = services[name]
        assert service["environment"]["LIGHTBOX_CLUSTER"] == "true"
        assert service["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        assert "readyz" in service["healthcheck"]["test"]
        assert service["read_only"] is True and service["user"] == "10001:10001"
        assert "storage:/var/lib/lightbox" in service["volumes"]
        assert "lightbox_database_url" in service["secrets"]
    assert "lightbox_api_token" in services["api"]["secrets"]
    assert services["worker-gpu"]["profiles"] == ["gpu"]
    [device] = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert set(config["secrets"]) == set(SECRETS)


# -- Kubernetes --------------------------------------------------------------------------------

def _render(overlay: str) -> list[dict[str, Any]]:
    done = subprocess.run([_tool("kubectl"), "kustomize",
                           str(DEPLOY / "kubernetes" / "overlays" / overlay)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def _one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    [doc] = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def _check_crd_objects(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The fields the KEDA ScaledObject and ServiceMonitor CRDs require (their schemas are not
    in kubernetes-validate)."""
    scaled = _one(docs, "ScaledObject", "lightbox-worker")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["spec"]["scaleTargetRef"]["name"] == "lightbox-worker"
    _one(docs, "Deployment", scaled["spec"]["scaleTargetRef"]["name"])
    triggers = scaled["spec"]["triggers"]
    assert all(t["type"] == "redis" and isinstance(t["metadata"], dict) for t in triggers)
    assert all(isinstance(v, str) for t in triggers for v in t["metadata"].values())
    assert {t["metadata"]["listName"] for t in triggers} == set(queue_keys())  # both lists
    monitor = _one(docs, "ServiceMonitor", "lightbox")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    selector = monitor["spec"]["selector"]["matchLabels"]
    scraped = [d for d in docs if d["kind"] == "Service"
               and selector.items() <= d["metadata"].get("labels", {}).items()]
    ports = {p["name"] for d in scraped for p in d["spec"]["ports"]}
    assert scraped and all(e["port"] in ports for e in monitor["spec"]["endpoints"])
    return scaled


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_kustomize_overlay_renders_and_validates(overlay: str) -> None:
    import kubernetes_validate

    docs = _render(overlay)
    version = kubernetes_validate.latest_version()
    builtin = [d for d in docs if d["apiVersion"].split("/")[0] in {
        "v1", "apps", "batch", "policy", "networking.k8s.io"}]
    assert len(builtin) == len(docs) - 2  # everything but the two CRD objects
    for doc in builtin:
        kubernetes_validate.validate(doc, version, strict=True)
    scaled = _check_crd_objects(docs)

    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    assert set(deployments) >= {f"lightbox-{c}" for c in
                                ("scp", "api", "scheduler", "export", "worker")}
    assert deployments["lightbox-scheduler"]["spec"]["replicas"] == 2
    for name, deployment in deployments.items():
        if name == "lightbox-redis":
            continue
        pod = deployment["spec"]["template"]["spec"]
        [container] = pod["containers"]
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert pod["securityContext"]["runAsNonRoot"] is True
        claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
                  if "persistentVolumeClaim" in v]
        assert claims == ["lightbox-storage"]
    assert _one(docs, "PersistentVolumeClaim", "lightbox-storage")["spec"]["accessModes"] == [
        "ReadWriteMany"]
    job = _one(docs, "Job", "lightbox-migrate")
    assert job["spec"]["template"]["spec"]["containers"][0]["args"] == ["db", "upgrade"]
    settings = _one(docs, "ConfigMap", "lightbox-settings")["data"]
    assert settings["LIGHTBOX_CLUSTER"] == "true"
    assert "LIGHTBOX_DATABASE_URL" in _one(docs, "Secret", "lightbox-secrets")["stringData"]
    # Only the SCP and the API take traffic from outside the namespace.
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    deny = _one(docs, "NetworkPolicy", "default-deny-ingress")
    assert deny["spec"]["podSelector"] == {} and "ingress" not in deny["spec"]
    open_to_all = {p["metadata"]["name"] for p in policies for rule in p["spec"].get("ingress", [])
                   if "from" not in rule}
    assert open_to_all == {"dicom-from-anywhere", "api-from-anywhere"}
    assert {d["metadata"]["name"] for d in docs if d["kind"] == "PodDisruptionBudget"} >= {
        "lightbox-scheduler", "lightbox-worker", "lightbox-api"}
    assert _one(docs, "Service", "lightbox-dicom")["spec"]["ports"][0]["port"] == 11112
    _one(docs, "Ingress", "lightbox-api")

    worker = deployments["lightbox-worker"]["spec"]["template"]["spec"]
    limits = worker["containers"][0]["resources"]["limits"]
    env = {e["name"]: e["value"] for e in worker["containers"][0].get("env", [])}
    if overlay == "gpu":
        assert limits["nvidia.com/gpu"] == 1
        assert worker["nodeSelector"] and worker["tolerations"][0]["key"] == "nvidia.com/gpu"
        assert env["LIGHTBOX_RUNTIME"] == "tensorrt"
        assert scaled["spec"]["minReplicaCount"] == 0  # scale to zero
        assert worker["containers"][0]["image"].endswith("-gpu")
    else:
        assert "nvidia.com/gpu" not in limits and "nodeSelector" not in worker
        assert env["LIGHTBOX_RUNTIME"] == "onnxruntime"
        assert scaled["spec"]["minReplicaCount"] >= 1
    print(json.dumps({"overlay": overlay, "objects": len(docs)}))
