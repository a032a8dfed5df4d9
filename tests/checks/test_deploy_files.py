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

from imgtrain.errors import EXIT_CONFIG, EXIT_FAILURE, EXIT_NO_QUORUM

from conftest import K8S_DIR, REPO, render

pytestmark = [pytest.mark.slow]

SCRIPTS = sorted(
    [*(REPO / "scripts").glob("*.sh"), *(REPO / "deploy").rglob("*.sbatch"), REPO / ".ci" / "run"]
)
PYTORCHJOB = K8S_DIR / "pytorchjob" / "pytorchjob.yaml"
# Plain manifests outside the kustomize tree (rendezvous stores) and the StorageClass examples.
STANDALONE = sorted(
    {*(REPO / "deploy").rglob("*kubernetes*.yaml"), *(K8S_DIR / "storage-classes").glob("*.yaml")}
)


def _load(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _is_kubeflow(doc: dict) -> bool:
    return str(doc.get("apiVersion", "")).startswith("kubeflow.org/")


def test_every_overlay_renders_a_job_and_its_settings(rendered):
    assert {"operator", "indexed", "aws", "gke"} <= set(rendered)
    for name, docs in rendered.items():
        kinds = [d["kind"] for d in docs]
        assert kinds.count("ConfigMap") >= 1 and ("PyTorchJob" in kinds) != ("Job" in kinds), (name, kinds)
        assert "PodMonitor" in kinds and "PersistentVolumeClaim" in kinds, (name, kinds)


def test_kubernetes_manifests_validate_against_schemas(rendered):
    kv = pytest.importorskip("kubernetes_validate")
    docs = [(f"overlays/{name}", d) for name, ds in rendered.items() for d in ds]
    docs += [(p.name, d) for p in STANDALONE for d in _load(p)]
    checked = 0
    for where, doc in docs:
        if _is_kubeflow(doc) or doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # CRDs: checked against their own models below
        try:
            kv.validate(doc, "1.30.0", strict=True)
        except Exception as e:  # noqa: BLE001 - name the object that failed
            raise AssertionError(f"{where}: {doc['kind']}/{doc['metadata'].get('name')}: {e}") from None
        checked += 1
    assert checked >= 15


def _pods(docs: list[dict]) -> list[dict]:
    """Pod templates of the training workloads."""
    out = []
    for d in docs:
        if d["kind"] == "PyTorchJob":
            out += [r["template"] for r in d["spec"]["pytorchReplicaSpecs"].values()]
        elif d["kind"] == "Job":
            out.append(d["spec"]["template"])
    return out


def test_podmonitor_scrapes_the_training_pods_metrics_ports(rendered):
    for name, docs in rendered.items():
        (mon,) = [d for d in docs if d["kind"] == "PodMonitor"]
        assert set(mon["spec"]) <= {"selector", "podMetricsEndpoints", "namespaceSelector", "jobLabel"}
        for tmpl in _pods(docs):
            assert set(mon["spec"]["selector"]["matchLabels"].items()) <= set(
                tmpl["metadata"]["labels"].items()
            )
            ports = {
                p["name"]: p["containerPort"] for c in tmpl["spec"]["containers"] for p in c.get("ports", [])
            }
            endpoints = [e["port"] for e in mon["spec"]["podMetricsEndpoints"]]
            # One exporter per local rank on 9450 + LOCAL_RANK, for up to 8 GPUs per pod.
            assert [ports[e] for e in endpoints] == list(range(9450, 9458)), (name, ports)
            overrides = dict(
                a.split("=", 1)
                for a in _argv(tmpl["spec"]["containers"][0])
                if "=" in a and a.startswith("monitoring.")
            )
            assert overrides.get("monitoring.prometheus.port") == "9450", name


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_shell_scripts_pass_shellcheck(path):
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (Debian: shellcheck)")
    proc = subprocess.run(["shellcheck", "-x", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_launch_script_sets_the_documented_rendezvous_settings():
    text = (REPO / "scripts" / "launch_training.sh").read_text()
    doc = (REPO / "docs" / "fault_tolerance.md").read_text()
    for setting in (
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1",
        "last_call_timeout=1",
        "keep_alive_interval=1",
        "keep_alive_max_attempt=3",
        "heartbeat_timeout=5",
    ):
        assert setting in text and setting in doc


# ---------------------------------------------------------------------------------------------------
# Kubernetes launch path (deploy/kubernetes/)


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


def _jobs(rendered, kind: str) -> list[tuple[str, dict]]:
    return [(name, d) for name, docs in rendered.items() for d in docs if d["kind"] == kind]


def test_pytorchjob_matches_the_kubeflow_training_models(rendered):
    pytest.importorskip("kubeflow.training")
    from kubeflow.training import ApiClient, KubeflowOrgV1PyTorchJob

    jobs = _jobs(rendered, "PyTorchJob")
    assert {name for name, _ in jobs} >= {"operator", "aws", "gke"}
    for name, doc in jobs:
        assert _pytorchjob_errors(doc) == [], name

        # The SDK's own deserializer must accept it too (types, enums, required fields).
        class _Response:
            data = json.dumps(doc)

        job = ApiClient().deserialize(_Response(), "KubeflowOrgV1PyTorchJob")
        assert isinstance(job, KubeflowOrgV1PyTorchJob)
        assert job.spec.elastic_policy is not None and job.spec.elastic_policy.rdzv_conf
        assert set(job.spec.pytorch_replica_specs) == {"Worker"}, (
            "elastic PyTorchJobs have Worker replicas only"
        )
        worker = job.spec.pytorch_replica_specs["Worker"]
        # The operator finds the container and the rendezvous port by these names.
        containers = {c.name: c for c in worker.template.spec.containers}
        assert "pytorch" in containers
        ports = {p.name: p.container_port for p in containers["pytorch"].ports or []}
        assert "pytorchjob-port" in ports
        assert job.spec.elastic_policy.rdzv_port in (None, ports["pytorchjob-port"])


def test_pytorchjob_pod_templates_validate_against_schemas(rendered):
    kv = pytest.importorskip("kubernetes_validate")
    for _, doc in _jobs(rendered, "PyTorchJob"):
        for name, replica in doc["spec"]["pytorchReplicaSpecs"].items():
            pod_template = {
                "apiVersion": "v1",
                "kind": "PodTemplate",
                "metadata": {"name": name.lower()},
                "template": replica["template"],
            }
            kv.validate(pod_template, "1.30.0", strict=True)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d["spec"]["elasticPolicy"].__setitem__("rdzvConfs", []),
        lambda d: d["spec"]["elasticPolicy"]["rdzvConf"][0].__setitem__("name", "x"),
        lambda d: d["spec"]["elasticPolicy"].__setitem__("minReplicas", "1"),
        lambda d: d["spec"]["pytorchReplicaSpecs"]["Worker"].__setitem__("restartPolicyy", "Never"),
        lambda d: d["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0].__setitem__(
            "enviroment", []
        ),
        lambda d: d["spec"].__setitem__("nProcPerNodes", "8"),
    ],
    ids=["elasticPolicy", "rdzvConf-item", "int-as-string", "replica-spec", "container", "spec"],
)
def test_pytorchjob_check_rejects_unknown_fields(mutate):
    pytest.importorskip("kubeflow.training")
    doc = copy.deepcopy(_load(PYTORCHJOB)[0])
    assert _pytorchjob_errors(doc) == []
    mutate(doc)
    assert _pytorchjob_errors(doc)


def _settings(docs: list[dict]) -> dict[str, str]:
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "imgtrain-settings"]
    return cm["data"]


def _argv(container: dict, env: dict[str, str] | None = None) -> list[str]:
    """The container's command line with $(VAR) expanded as the kubelet does (``env``: name -> value)."""
    argv = [str(a) for a in [*container.get("command", []), *container.get("args", [])]]
    if env is None:
        return argv
    return [re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), a) for a in argv]


def _container_env(container: dict, docs: list[dict]) -> dict[str, str]:
    env: dict[str, str] = {}
    for src in container.get("envFrom", []):
        if ref := src.get("configMapRef"):
            (cm,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == ref["name"]]
            env.update({src.get("prefix", "") + k: v for k, v in cm["data"].items()})
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    # The downward API's values, as the kubelet would fill them in (an example pod IP).
    env.update(
        {
            e["name"]: "10.0.0.7"
            for e in container.get("env", [])
            if e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "status.podIP"
        }
    )
    return env


def _training_pod(docs: list[dict]) -> tuple[dict, dict, dict, list[str]]:
    """(pod spec, training container, rendezvous settings, expanded argv) of a rendered overlay."""
    for doc in docs:
        if doc["kind"] == "PyTorchJob":
            pod = doc["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
            container = next(c for c in pod["containers"] if c["name"] == "pytorch")
            rdzv = {item["key"]: str(item["value"]) for item in doc["spec"]["elasticPolicy"]["rdzvConf"]}
            return pod, container, rdzv, _argv(container, _container_env(container, docs))
        if doc["kind"] == "Job":
            pod = doc["spec"]["template"]["spec"]
            container = pod["containers"][0]
            argv = _argv(container, _container_env(container, docs))
            confs = [a.split("=", 1)[1] for a in argv if a.startswith("--rdzv-conf=")]
            assert len(confs) == (0 if "--standalone" in argv else 1), argv  # standalone: its own rendezvous
            rdzv = dict(kv.split("=", 1) for kv in confs[0].split(",")) if confs else {}
            return pod, container, rdzv, argv
    raise AssertionError("no PyTorchJob or Job")


def _override(argv: list[str], key: str) -> str | None:
    values = [a.split("=", 1)[1] for a in argv if a.startswith(key + "=")]
    assert len(values) <= 1, values
    return values[0] if values else None


def _shared_claim(path: str, pod: dict, container: dict, docs: list[dict]) -> dict | None:
    """The ReadWriteMany claim that ``path`` lies on inside the container, if any."""
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    mount = next((m for m in mounts if path.startswith(m.rstrip("/") + "/")), None)
    vol = next((v for v in pod["volumes"] if mount and v["name"] == mounts[mount]), {})
    claim = vol.get("persistentVolumeClaim", {}).get("claimName")
    return next(
        (
            d
            for d in docs
            if d["kind"] == "PersistentVolumeClaim"
            and d["metadata"]["name"] == claim
            and "ReadWriteMany" in d["spec"]["accessModes"]
        ),
        None,
    )


def test_training_manifests_carry_the_fault_tolerance_settings(rendered):
    from imgtrain.config import FaultToleranceConfig

    for name, docs in rendered.items():
        pod, container, rdzv, argv = _training_pod(docs)
        env = _container_env(container, docs)
        assert env.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE") == "1"
        replicated = _override(argv, "fault_tolerance.mode") == "replicated"
        # Replicated mode: each group is a single-node agent of its own (--standalone), whose rendezvous has
        # no peers to wait for; the cross-group settings are checked in test_replicated_overlay_*.
        for key, value in {
            "keep_alive_interval": "1",
            "keep_alive_max_attempt": "3",
            "last_call_timeout": "1",
            "heartbeat_timeout": "5",
            "read_timeout": "15",
            "close_timeout": "5",
        }.items():
            assert replicated or rdzv.get(key) == value, (name, key, rdzv)

        # The SIGTERM checkpoint must fit: grace_period < torchrun's SIGKILL delay < the pod's grace.
        grace = _override(argv, "fault_tolerance.grace_period")
        grace_period = float(grace) if grace is not None else FaultToleranceConfig().grace_period
        pod_grace = pod.get("terminationGracePeriodSeconds", 30)
        torch_kill = float(env.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT") or 30)  # torch's default: 30 s
        assert grace_period < torch_kill < pod_grace, name

        # /dev/shm as a memory emptyDir, GPUs requested, no literal credentials.
        shm = [m["name"] for m in container.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"]
        assert shm and any(
            v["name"] == shm[0] and v.get("emptyDir", {}).get("medium") == "Memory" for v in pod["volumes"]
        )
        assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
        for e in container.get("env", []):
            if re.search(r"SECRET|KEY_ID|TOKEN|PASSWORD", e["name"]):
                assert "value" not in e and "secretKeyRef" in e.get("valueFrom", {}), e["name"]
        assert _override(argv, "distributed.timeout") is not None
        # Replicated mode: each group's checkpoints are in output_dir/group-<id>/checkpoints.
        ckpt = (
            _override(argv, "checkpoint.dir") or (_override(argv, "output_dir") if replicated else "") or ""
        )
        assert ckpt.startswith(("s3://", "gs://", "/")), (name, ckpt)
        if ckpt.startswith("/"):  # a path must be on a volume every pod shares
            assert _shared_claim(ckpt, pod, container, docs), (name, ckpt)
        # The run directory is on the shared claim whenever the checkpoints are.
        output = _override(argv, "output_dir") or ""
        assert output.startswith("/"), (name, output)
        assert _shared_claim(output, pod, container, docs) or not ckpt.startswith("/"), (name, output)
        # The image's user (deploy/docker/Dockerfile) and a group that can write the claims.
        uid = int(re.search(r"^USER (\d+)", (REPO / "deploy/docker/Dockerfile").read_text(), re.M).group(1))
        sc = pod["securityContext"]
        assert sc["runAsNonRoot"] and sc["runAsUser"] == uid and sc["fsGroup"] == uid, (name, sc)
        data = _override(argv, "data.root") or ""
        assert any(data.startswith(m["mountPath"]) for m in container["volumeMounts"]), (name, data)


def test_manifest_overrides_are_valid_imgtrain_config(rendered):
    """Every section.key=value a manifest passes is accepted by imgtrain's schema, so a typo in a
    manifest fails here instead of in the cluster."""
    from imgtrain.config import load_config

    for docs in rendered.values():
        _, _, _, argv = _training_pod(docs)
        tail = argv[argv.index("train") + 1 :]
        overrides = [a for a in tail if "=" in a and not a.startswith("-")]
        assert len(overrides) >= 5, tail
        load_config(REPO / tail[tail.index("--config") + 1], overrides)  # every one, unknown keys included


def test_settings_configmap_is_the_one_place_to_change(tmp_path):
    """Editing only an overlay's settings.yaml changes image, node counts, GPUs per pod and data location
    everywhere they appear."""
    tree = tmp_path / "kubernetes"
    shutil.copytree(K8S_DIR, tree)
    shutil.copytree(
        REPO / "deploy" / "monitoring", tmp_path / "monitoring"
    )  # the dashboard ConfigMap's source
    new = {
        "IMAGE": "registry.example/imgtrain:9.9",
        "MIN_NODES": "2",
        "MAX_NODES": "6",
        "GPUS_PER_NODE": "4",
        "DATA_ROOT": "/data/other",
        "CHECKPOINT_DIR": "s3://b/run7",
        "OUTPUT_DIR": "/checkpoints/run7",
    }
    for overlay in ("operator", "indexed"):
        path = tree / "overlays" / overlay / "settings.yaml"
        doc = yaml.safe_load(path.read_text())
        doc["data"] = new
        path.write_text(yaml.safe_dump(doc))
        docs = render(tree / "overlays" / overlay)
        pod, container, _, argv = _training_pod(docs)
        images = {c["image"] for c in [*pod["containers"], *pod.get("initContainers", [])]}
        assert images == {new["IMAGE"]}
        gpus = container["resources"]
        assert gpus["limits"]["nvidia.com/gpu"] == gpus["requests"]["nvidia.com/gpu"] == 4
        assert (
            _override(argv, "data.root") == "/data/other"
            and _override(argv, "checkpoint.dir") == "s3://b/run7"
        )
        assert _override(argv, "output_dir") == "/checkpoints/run7"
        (job,) = [d for d in docs if d["kind"] in ("PyTorchJob", "Job")]
        if job["kind"] == "PyTorchJob":
            policy = job["spec"]["elasticPolicy"]
            assert (policy["minReplicas"], policy["maxReplicas"]) == (2, 6)
            assert job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 6
            assert job["spec"]["nprocPerNode"] == "4"
        else:
            assert job["spec"]["completions"] == job["spec"]["parallelism"] == 6
            assert "--nnodes=2:6" in argv and "--nproc-per-node=4" in argv


def test_indexed_job_lets_torchrun_restart_and_reaches_pod_zero(rendered):
    docs = rendered["indexed"]
    service = next(d for d in docs if d["kind"] == "Service")
    job = next(d for d in docs if d["kind"] == "Job")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["parallelism"] == spec["completions"]
    assert service["spec"]["clusterIP"] == "None"
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == service["metadata"]["name"]
    assert set(service["spec"]["selector"].items()) <= set(spec["template"]["metadata"]["labels"].items())
    _, container, _, argv = _training_pod(docs)
    assert argv[:2] == ["imgtrain", "launch"]  # torchrun's arguments, pre-imported workers
    settings = _settings(docs)
    assert f"--nnodes={settings['MIN_NODES']}:{spec['completions']}" in argv
    assert f"--nproc-per-node={container['resources']['limits']['nvidia.com/gpu']}" in argv
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
    # A config error (2, passed on by `imgtrain launch`) fails the same way on every node and every retry.
    assert any(r["action"] == "FailJob" and EXIT_CONFIG in r["onExitCodes"]["values"] for r in rules)
    assert spec["backoffLimit"] >= spec["completions"]


def test_pytorchjob_wait_container_targets_the_operator_rendezvous_endpoint(rendered):
    for name, doc in _jobs(rendered, "PyTorchJob"):
        policy = doc["spec"]["elasticPolicy"]
        host = policy.get("rdzvHost", f"{doc['metadata']['name']}-worker-0")  # the operator's default
        pod = doc["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
        wait = next(c for c in pod["initContainers"] if c["name"] == "wait-for-rendezvous")
        assert {"name": "RDZV_ENDPOINT", "value": f"{host}:{policy['rdzvPort']}"} in wait["env"]
        settings = _settings(rendered[name])
        assert (policy["minReplicas"], policy["maxReplicas"]) == (
            int(settings["MIN_NODES"]),
            int(settings["MAX_NODES"]),
        )
        assert policy.get("rdzvBackend", "c10d") == "c10d"
        assert (
            doc["spec"]["nprocPerNode"]
            == settings["GPUS_PER_NODE"]
            == str(
                next(c for c in pod["containers"] if c["name"] == "pytorch")["resources"]["limits"][
                    "nvidia.com/gpu"
                ]
            )
        )


def test_slurm_script_runs_one_agent_per_node_and_requeues_before_the_time_limit():
    from imgtrain.config import FaultToleranceConfig

    text = (REPO / "deploy" / "slurm" / "imgtrain.sbatch").read_text()
    directives = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", text, re.M))
    assert "requeue" in directives and directives["ntasks-per-node"] == "1"
    signal, lead = directives["signal"].split("@")
    assert signal == "B:TERM"  # to the batch shell, whose trap forwards it and requeues
    # The warning must leave time for torchrun's SIGKILL delay (> the trainer's preemption grace).
    shutdown = float(re.search(r"TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-(\d+)", text).group(1))
    assert FaultToleranceConfig().grace_period < shutdown < float(lead)
    assert re.search(r"trap requeue TERM", text) and "scontrol requeue" in text
    srun = text[text.index("srun ") :]
    assert "--ntasks-per-node=1" in srun and "--rdzv-backend=c10d" in srun and "head_node" in text
    assert "checkpoint.resume" not in text  # resume: auto (the default) picks up the newest good checkpoint


def test_grafana_dashboard_configmap_is_rendered_when_the_dashboard_exists(rendered):
    dashboard = REPO / "deploy" / "monitoring" / "grafana" / "dashboards" / "imgtrain.json"
    if not dashboard.exists():
        pytest.skip(f"{dashboard.relative_to(REPO)} is not in this checkout")
    for name, docs in rendered.items():
        maps = [
            d
            for d in docs
            if d["kind"] == "ConfigMap" and d["metadata"].get("labels", {}).get("grafana_dashboard")
        ]
        assert maps, f"overlays/{name}: enable ../../../monitoring/grafana in components/monitoring"
        assert json.loads(maps[0]["data"]["imgtrain.json"]) == json.loads(dashboard.read_text())


def test_replicated_overlay_runs_one_replica_group_per_index_restarted_alone(rendered):
    """fault_tolerance.mode=replicated on Kubernetes: one pod per replica group (REPLICA_GROUP_ID = its
    completion index), each its own single-node agent; a failed group is retried on its own budget and
    exit 2 fails only its index; peers reach it under its fully qualified host name."""
    docs = rendered["replicated"]
    settings = _settings(docs)
    service = next(d for d in docs if d["kind"] == "Service")
    (job,) = [d for d in docs if d["kind"] == "Job"]
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == int(settings["MAX_NODES"])
    # A per-index budget and no job-wide one: one group failing again and again ends only that group.
    assert spec["backoffLimitPerIndex"] >= 1 and "backoffLimit" not in spec
    rules = spec["podFailurePolicy"]["rules"]
    disruption = {"type": "DisruptionTarget", "status": "True"}
    assert any(r["action"] == "Ignore" and disruption in r.get("onPodConditions", []) for r in rules)
    assert not [r for r in rules if r["action"] == "FailJob"]
    # `imgtrain launch` passes a worker's config error on as 2: it fails only that index; a crash (1) and
    # no quorum (6: the lighthouse may come back) use up the index's retries instead.
    fail_index = {c for r in rules if r["action"] == "FailIndex" for c in r["onExitCodes"]["values"]}
    assert EXIT_CONFIG in fail_index and not fail_index & {EXIT_FAILURE, EXIT_NO_QUORUM}
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    # torchft advertises the host name: with the FQDN, the headless Service resolves it in every pod.
    assert pod["setHostnameAsFQDN"] is True and pod["subdomain"] == service["metadata"]["name"]
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert set(service["spec"]["selector"].items()) <= set(spec["template"]["metadata"]["labels"].items())

    _, container, _, argv = _training_pod(docs)
    assert argv[: argv.index("-m")] == [
        "imgtrain",
        "launch",
        "--standalone",
        "--nnodes=1",
        f"--nproc-per-node={container['resources']['limits']['nvidia.com/gpu']}",
        "--max-restarts=10",
    ]
    assert _override(argv, "fault_tolerance.mode") == "replicated"
    assert _override(argv, "fault_tolerance.replicated.num_groups") == str(spec["completions"])
    assert _override(argv, "fault_tolerance.replicated.min_replicas") == settings["MIN_NODES"]
    assert _override(argv, "checkpoint.dir") is None  # one directory per group, under output_dir
    env = {e["name"]: e for e in container["env"]}
    index = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    assert env["REPLICA_GROUP_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == index
    # Every server of the group listens on the pod's IP, not on every interface.
    assert "fault_tolerance.replicated.bind=$(POD_IP)" in _argv(container)
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    # The lighthouse: the Service of deploy/lighthouse, which the init container waits for.
    lighthouse = [
        d
        for d in _load(REPO / "deploy" / "lighthouse" / "lighthouse-kubernetes.yaml")
        if d["kind"] == "Service"
    ]
    (lh,) = lighthouse
    address = f"{lh['metadata']['name']}:{lh['spec']['ports'][0]['port']}"
    assert env["TORCHFT_LIGHTHOUSE"]["value"] == f"http://{address}"
    wait = next(c for c in pod["initContainers"] if c["name"] == "wait-for-rendezvous")
    assert {"name": "RDZV_ENDPOINT", "value": address} in wait["env"]


def test_replicated_settings_set_the_groups_and_gpus_everywhere(tmp_path):
    tree = tmp_path / "kubernetes"
    shutil.copytree(K8S_DIR, tree)
    shutil.copytree(REPO / "deploy" / "monitoring", tmp_path / "monitoring")
    path = tree / "overlays" / "replicated" / "settings.yaml"
    doc = yaml.safe_load(path.read_text())
    doc["data"].update({"IMAGE": "registry.example/imgtrain:9.9", "MIN_NODES": "2", "MAX_NODES": "6"})
    doc["data"].update({"GPUS_PER_NODE": "4", "OUTPUT_DIR": "/checkpoints/run7"})
    path.write_text(yaml.safe_dump(doc))
    docs = render(tree / "overlays" / "replicated")
    pod, container, _, argv = _training_pod(docs)
    assert {c["image"] for c in [*pod["containers"], *pod["initContainers"]]} == {
        "registry.example/imgtrain:9.9"
    }
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 4 and "--nproc-per-node=4" in argv
    (job,) = [d for d in docs if d["kind"] == "Job"]
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 6
    assert _override(argv, "fault_tolerance.replicated.num_groups") == "6"
    assert _override(argv, "fault_tolerance.replicated.min_replicas") == "2"
    assert _override(argv, "output_dir") == "/checkpoints/run7"
