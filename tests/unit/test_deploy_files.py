"""Offline checks of the shipped deployment files: Kubernetes schemas, shell scripts."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S_DIR = REPO / "deploy" / "kubernetes"


def _is_kubeflow(path: Path) -> bool:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    return any(str(d.get("apiVersion", "")).startswith("kubeflow.org/") for d in docs)


# Plain Kubernetes objects: strict schema validation. Kubeflow CRDs (PyTorchJob): checked against the
# kubeflow-training models below (kubernetes-validate has no schema for them).
_ALL_K8S = sorted({*(REPO / "deploy").rglob("*kubernetes*.yaml"), *K8S_DIR.glob("*.yaml")})
K8S_FILES = [p for p in _ALL_K8S if not _is_kubeflow(p)]
KUBEFLOW_FILES = [p for p in _ALL_K8S if _is_kubeflow(p)]
PYTORCHJOB = K8S_DIR / "pytorchjob-elastic.yaml"
INDEXED_JOB = K8S_DIR / "indexed-job.yaml"
SCRIPTS = sorted([*(REPO / "scripts").glob("*.sh"), *(REPO / "deploy").rglob("*.sbatch"), REPO / ".ci" / "run"])


@pytest.mark.parametrize("path", K8S_FILES, ids=lambda p: p.name)
def test_kubernetes_manifests_validate_against_schemas(path):
    kv = pytest.importorskip("kubernetes_validate")
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs
    for doc in docs:
        kv.validate(doc, "1.30.0", strict=True)


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_shell_scripts_pass_shellcheck(path):
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (Debian: shellcheck)")
    proc = subprocess.run(["shellcheck", "-x", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_launch_script_sets_the_documented_rendezvous_settings():
    text = (REPO / "scripts" / "launch_training.sh").read_text()
    doc = (REPO / "docs" / "fault_tolerance.md").read_text()
    for setting in ("TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1", "last_call_timeout=1", "keep_alive_interval=1",
                    "keep_alive_max_attempt=3", "heartbeat_timeout=5"):
        assert setting in text and setting in doc


# ---------------------------------------------------------------------------------------------------
# Kubernetes launch path (deploy/kubernetes/)


def test_kubernetes_launch_manifests_are_all_validated():
    assert PYTORCHJOB in KUBEFLOW_FILES
    assert INDEXED_JOB in K8S_FILES
    for path in K8S_DIR.glob("*.yaml"):
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
        kubeflow = [str(d.get("apiVersion", "")).startswith("kubeflow.org/") for d in docs]
        # A file mixing both kinds would have its plain objects skipped by the strict schema test.
        assert all(kubeflow) or not any(kubeflow), f"{path.name} mixes Kubeflow and plain objects"


def _model_class(type_name: str):
    from kubeflow.training import models as kf_models
    from kubernetes.client import models as k8s_models

    for module in (kf_models, k8s_models):
        cls = getattr(module, type_name, None)
        if cls is not None and hasattr(cls, "attribute_map"):
            return cls
    return None


_PRIMITIVES = {"str": (str,), "int": (int,), "bool": (bool,), "float": (int, float)}


def _unknown_fields(value, type_name: str, where: str) -> list[str]:
    """Every key of ``value`` that the OpenAPI model ``type_name`` (recursively) does not define, and every
    scalar of the wrong type in Kubeflow's own models. The models' deserializer drops unknown keys
    silently, so a misspelled field (rdzvConfs, minReplica) would otherwise pass."""
    errors: list[str] = []
    if m := re.fullmatch(r"list\[(.+)\]", type_name):
        if not isinstance(value, list):
            return [f"{where}: expected a list, got {value!r}"]
        for i, item in enumerate(value):
            errors += _unknown_fields(item, m.group(1), f"{where}[{i}]")
        return errors
    if m := re.fullmatch(r"dict\(str, (.+)\)", type_name):
        if not isinstance(value, dict):
            return [f"{where}: expected a mapping, got {value!r}"]
        for k, item in value.items():
            errors += _unknown_fields(item, m.group(1), f"{where}.{k}")
        return errors
    if type_name in _PRIMITIVES:
        # Kubernetes quantities and int-or-string fields are typed "str" in the Kubernetes models and
        # accept numbers; the pod template's scalar types are checked by the strict schema test instead.
        if where.startswith("kubeflow:") and (
            not isinstance(value, _PRIMITIVES[type_name]) or (type_name == "int" and isinstance(value, bool))
        ):
            errors.append(f"{where}: expected {type_name}, got {value!r}")
        return errors
    if type_name == "object":
        return errors
    cls = _model_class(type_name)
    if cls is None:
        return [f"{where}: no model named {type_name}"]
    if not isinstance(value, dict):
        return [f"{where}: expected a {type_name} mapping, got {value!r}"]
    by_json_key = {json_key: attr for attr, json_key in cls.attribute_map.items()}
    kubeflow_model = cls.__module__.startswith("kubeflow.")
    for key, item in value.items():
        if key not in by_json_key:
            errors.append(f"{where}.{key}: not a field of {type_name} (known: {sorted(by_json_key)})")
            continue
        sub = f"kubeflow:{where}.{key}" if kubeflow_model else f"{where}.{key}".removeprefix("kubeflow:")
        errors += _unknown_fields(item, cls.openapi_types[by_json_key[key]], sub)
    return errors


def _pytorchjob_errors(doc: dict) -> list[str]:
    assert doc.get("apiVersion") == "kubeflow.org/v1" and doc.get("kind") == "PyTorchJob", doc.get("kind")
    return _unknown_fields(doc, "KubeflowOrgV1PyTorchJob", "PyTorchJob")


def _load(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.mark.parametrize("path", KUBEFLOW_FILES, ids=lambda p: p.name)
def test_pytorchjob_matches_the_kubeflow_training_models(path):
    pytest.importorskip("kubeflow.training")
    from kubeflow.training import ApiClient, KubeflowOrgV1PyTorchJob

    for doc in _load(path):
        assert _pytorchjob_errors(doc) == []

        # The SDK's own deserializer must accept it too (types, enums, required fields).
        class _Response:
            data = json.dumps(doc)

        job = ApiClient().deserialize(_Response(), "KubeflowOrgV1PyTorchJob")
        assert isinstance(job, KubeflowOrgV1PyTorchJob)
        assert job.spec.elastic_policy is not None and job.spec.elastic_policy.rdzv_conf
        assert set(job.spec.pytorch_replica_specs) == {"Worker"}, "elastic PyTorchJobs have Worker replicas only"
        worker = job.spec.pytorch_replica_specs["Worker"]
        # The operator finds the container and the rendezvous port by these names.
        containers = {c.name: c for c in worker.template.spec.containers}
        assert "pytorch" in containers
        ports = {p.name: p.container_port for p in containers["pytorch"].ports or []}
        assert "pytorchjob-port" in ports
        assert job.spec.elastic_policy.rdzv_port in (None, ports["pytorchjob-port"])


@pytest.mark.parametrize("path", KUBEFLOW_FILES, ids=lambda p: p.name)
def test_pytorchjob_pod_templates_validate_against_schemas(path):
    kv = pytest.importorskip("kubernetes_validate")
    for doc in _load(path):
        for name, replica in doc["spec"]["pytorchReplicaSpecs"].items():
            pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name.lower()},
                            "template": replica["template"]}
            kv.validate(pod_template, "1.30.0", strict=True)


@pytest.mark.parametrize("mutate", [
    lambda d: d["spec"]["elasticPolicy"].__setitem__("rdzvConfs", []),
    lambda d: d["spec"]["elasticPolicy"]["rdzvConf"][0].__setitem__("name", "x"),
    lambda d: d["spec"]["elasticPolicy"].__setitem__("minReplicas", "1"),
    lambda d: d["spec"]["pytorchReplicaSpecs"]["Worker"].__setitem__("restartPolicyy", "Never"),
    lambda d: d["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    .__setitem__("enviroment", []),
    lambda d: d["spec"].__setitem__("nProcPerNodes", "8"),
], ids=["elasticPolicy", "rdzvConf-item", "int-as-string", "replica-spec", "container", "spec"])
def test_pytorchjob_check_rejects_unknown_fields(mutate):
    pytest.importorskip("kubeflow.training")
    doc = copy.deepcopy(_load(PYTORCHJOB)[0])
    assert _pytorchjob_errors(doc) == []
    mutate(doc)
    assert _pytorchjob_errors(doc)


def _training_pod(path: Path) -> tuple[dict, dict, dict]:
    """(pod spec, training container, rendezvous settings) of a training manifest."""
    for doc in _load(path):
        if doc["kind"] == "PyTorchJob":
            pod = doc["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
            container = next(c for c in pod["containers"] if c["name"] == "pytorch")
            rdzv = {item["key"]: str(item["value"]) for item in doc["spec"]["elasticPolicy"]["rdzvConf"]}
            return pod, container, rdzv
        if doc["kind"] == "Job":
            pod = doc["spec"]["template"]["spec"]
            container = pod["containers"][0]
            argv = [*container.get("command", []), *container.get("args", [])]
            confs = [a.split("=", 1)[1] for a in argv if a.startswith("--rdzv-conf=")]
            assert len(confs) == 1, argv
            rdzv = dict(kv.split("=", 1) for kv in confs[0].split(","))
            return pod, container, rdzv
    raise AssertionError(f"{path.name}: no PyTorchJob or Job")


def _override(container: dict, key: str) -> str | None:
    argv = [str(a) for a in [*container.get("command", []), *container.get("args", [])]]
    values = [a.split("=", 1)[1] for a in argv if a.startswith(key + "=")]
    assert len(values) <= 1, values
    return values[0] if values else None


@pytest.mark.parametrize("path", [PYTORCHJOB, INDEXED_JOB], ids=lambda p: p.name)
def test_training_manifests_carry_the_fault_tolerance_settings(path):
    from imgtrain.config import FaultToleranceConfig

    pod, container, rdzv = _training_pod(path)
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    assert env.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE") == "1"
    for key, value in {"keep_alive_interval": "1", "keep_alive_max_attempt": "3", "last_call_timeout": "1",
                       "heartbeat_timeout": "5", "read_timeout": "15", "close_timeout": "5"}.items():
        assert rdzv.get(key) == value, (key, rdzv)

    # The SIGTERM checkpoint must fit: grace_period < torchrun's SIGKILL delay < the pod's grace.
    grace = _override(container, "fault_tolerance.grace_period")
    grace_period = float(grace) if grace is not None else FaultToleranceConfig().grace_period
    pod_grace = pod.get("terminationGracePeriodSeconds", 30)
    assert pod_grace > grace_period
    torch_kill = float(env.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT") or 30)   # torch's default: 30 s
    assert grace_period < torch_kill < pod_grace

    # /dev/shm as a memory emptyDir, GPUs requested, no literal credentials.
    shm = [m["name"] for m in container.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"]
    assert shm and any(v["name"] == shm[0] and v.get("emptyDir", {}).get("medium") == "Memory"
                       for v in pod["volumes"])
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    for e in container.get("env", []):
        if re.search(r"SECRET|KEY_ID|TOKEN|PASSWORD", e["name"]):
            assert "value" not in e and "secretKeyRef" in e.get("valueFrom", {}), e["name"]
    assert _override(container, "distributed.timeout") is not None
    assert (_override(container, "checkpoint.dir") or "").startswith(("s3://", "gs://", "/"))


def test_indexed_job_lets_torchrun_restart_and_reaches_pod_zero():
    docs = {d["kind"]: d for d in _load(INDEXED_JOB)}
    service, job = docs["Service"], docs["Job"]
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["parallelism"] == spec["completions"]
    assert service["spec"]["clusterIP"] == "None"
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == service["metadata"]["name"]
    assert set(service["spec"]["selector"].items()) <= set(spec["template"]["metadata"]["labels"].items())
    container = pod["containers"][0]
    argv = container["command"]
    assert argv[0] == "torchrun"
    assert f"--nnodes=1:{spec['completions']}" in argv
    # c10d at the pod of index 0 through the headless Service: <job>-0.<service>
    endpoint = f"{job['metadata']['name']}-0.{service['metadata']['name']}:29400"
    assert f"--rdzv-endpoint={endpoint}" in argv
    wait = next(c for c in pod["initContainers"] if c["name"] == "wait-for-rendezvous")
    assert {"name": "RDZV_ENDPOINT", "value": endpoint} in wait["env"]
    # Disruptions (eviction, spot reclaim) must not use up backoffLimit; podFailurePolicy needs Never.
    assert pod["restartPolicy"] == "Never"
    rules = spec["podFailurePolicy"]["rules"]
    disruption = {"type": "DisruptionTarget", "status": "True"}
    assert any(r["action"] == "Ignore" and disruption in r.get("onPodConditions", []) for r in rules)
    assert spec["backoffLimit"] >= spec["completions"]


def test_pytorchjob_wait_container_targets_the_operator_rendezvous_endpoint():
    doc = _load(PYTORCHJOB)[0]
    policy = doc["spec"]["elasticPolicy"]
    host = policy.get("rdzvHost", f"{doc['metadata']['name']}-worker-0")   # the operator's default
    pod = doc["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    wait = next(c for c in pod["initContainers"] if c["name"] == "wait-for-rendezvous")
    assert {"name": "RDZV_ENDPOINT", "value": f"{host}:{policy['rdzvPort']}"} in wait["env"]
    assert (policy["minReplicas"], policy["maxReplicas"]) == (1, 4)
    assert policy.get("rdzvBackend", "c10d") == "c10d"
    assert doc["spec"]["nprocPerNode"] == str(
        next(c for c in pod["containers"] if c["name"] == "pytorch")["resources"]["limits"]["nvidia.com/gpu"])
