"""The trust boundary of the shipped deployment files (docs/security.md): who may reach the rendezvous store,
etcd and the metrics ports, what the pods may do, and which identity may write the checkpoints. Offline:
manifests are rendered with `kubectl kustomize` and scanned with checkov; nothing is applied."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import psutil
import pytest
import yaml

from imgtrain.cli import EXIT_CONFIG, main
from imgtrain.distributed.rendezvous import is_wildcard

from conftest import REPO, TERRAFORM, checkov, hcl

RDZV = REPO / "deploy" / "rendezvous"
LIGHTHOUSE = REPO / "deploy" / "lighthouse"
STORE_PORT, METRICS_PORTS, LIGHTHOUSE_PORT = 29400, range(9450, 9458), 29510
# checkov's Kubernetes checks for what every pod must (not) do: privileged, host PID/IPC/network, privilege
# escalation, root, NET_RAW, seccomp, capabilities not dropped, service-account token, SYS_ADMIN.
POD_CHECKS = [
    "CKV_K8S_16",
    "CKV_K8S_17",
    "CKV_K8S_18",
    "CKV_K8S_19",
    "CKV_K8S_20",
    "CKV_K8S_23",
    "CKV_K8S_28",
    "CKV_K8S_31",
    "CKV_K8S_37",
    "CKV_K8S_38",
    "CKV_K8S_39",
]


def _load(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _pod_templates(docs: list[dict]) -> list[tuple[str, dict]]:
    """(kind/name, pod template) of every workload."""
    out = []
    for d in docs:
        where = f"{d['kind']}/{d['metadata']['name']}"
        if d["kind"] == "PyTorchJob":
            out += [(f"{where}/{r}", s["template"]) for r, s in d["spec"]["pytorchReplicaSpecs"].items()]
        elif d["kind"] in ("Job", "Deployment", "StatefulSet"):
            out.append((where, d["spec"]["template"]))
    return out


def _standalone_manifests() -> list[Path]:
    """Plain manifests beside the kustomize tree: rendezvous stores, etcd, the torchft lighthouse."""
    return sorted([*RDZV.glob("*kubernetes.yaml"), *LIGHTHOUSE.glob("*kubernetes.yaml")])


def _standalone() -> list[dict]:
    return [d for p in _standalone_manifests() for d in _load(p)]


def test_every_pod_runs_unprivileged_without_an_api_token(rendered):
    templates = [t for docs in rendered.values() for t in _pod_templates(docs)] + _pod_templates(
        _standalone()
    )
    assert "Deployment/imgtrain-lighthouse" in {where for where, _ in templates}
    assert len(templates) >= 7
    for where, tmpl in templates:
        pod = tmpl["spec"]
        assert pod.get("automountServiceAccountToken") is False, where
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
        for c in [*pod["containers"], *pod.get("initContainers", [])]:
            sc = c.get("securityContext", {})
            assert sc.get("allowPrivilegeEscalation") is False, (where, c["name"])
            assert sc.get("capabilities") == {"drop": ["ALL"]}, (where, c["name"])
            assert sc.get("seccompProfile", pod["securityContext"]["seccompProfile"]) == {
                "type": "RuntimeDefault"
            }
            assert not sc.get("privileged"), (where, c["name"])


def test_checkov_finds_no_privileged_pod(rendered, tmp_path):
    """checkov's pod checks over every rendered overlay and the rendezvous manifests; the PyTorchJob's pod
    template (a CRD checkov does not know) is scanned as the Pod the operator makes of it."""
    exe = checkov()
    if exe is None:
        pytest.skip("checkov is not installed (scripts/install.sh puts it in .tools/checkov)")
    for name, docs in rendered.items():
        pods = [
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": f"{d['metadata']['name']}-{r.lower()}"},
                "spec": s["template"]["spec"],
            }
            for d in docs
            if d["kind"] == "PyTorchJob"
            for r, s in d["spec"]["pytorchReplicaSpecs"].items()
        ]
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump_all([*docs, *pods]))
    for p in _standalone_manifests():
        shutil.copy(p, tmp_path / p.name)
    env = {**os.environ, "BC_SKIP_MAPPING": "TRUE"}
    proc = subprocess.run(
        [
            exe,
            "--skip-download",
            "--framework",
            "kubernetes",
            "-d",
            str(tmp_path),
            "--check",
            ",".join(POD_CHECKS),
            "--compact",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    passed = int(re.search(r"Passed checks: (\d+)", proc.stdout).group(1))
    # Every workload (4 overlays, the store, etcd, the lighthouse) passes every check.
    assert passed >= len(POD_CHECKS) * 7, proc.stdout


def _admits(policy: dict, labels: dict, namespace_labels: dict | None, port: int) -> bool:
    """Whether a NetworkPolicy admits TCP traffic from a pod (``namespace_labels`` None: the policy's own
    namespace) to ``port`` of the pods it selects. Only the selector forms the manifests use."""

    def matches(selector: dict | None, have: dict) -> bool:
        return selector is not None and set(selector.get("matchLabels", {}).items()) <= set(have.items())

    for rule in policy["spec"].get("ingress", []):
        ports = rule.get("ports")
        if ports and not any(p["port"] <= port <= p.get("endPort", p["port"]) for p in ports):
            continue
        for peer in rule.get("from", []):
            if "ipBlock" in peer:
                return True
            in_ns = (
                namespace_labels is None
                if "namespaceSelector" not in peer
                else (namespace_labels is not None and matches(peer["namespaceSelector"], namespace_labels))
            )
            if in_ns and ("podSelector" not in peer or matches(peer["podSelector"], labels)):
                return True
        if "from" not in rule:
            return True
    return False


def _policy_for(docs: list[dict], pod_labels: dict) -> dict:
    (policy,) = [
        d
        for d in docs
        if d["kind"] == "NetworkPolicy"
        and set(d["spec"]["podSelector"]["matchLabels"].items()) <= set(pod_labels.items())
    ]
    assert "Ingress" in policy["spec"]["policyTypes"]
    return policy


def test_network_policy_admits_only_the_job_and_prometheus_to_the_training_pods(rendered):
    monitoring_ns = {"kubernetes.io/metadata.name": "monitoring"}
    for name, docs in rendered.items():
        for where, tmpl in _pod_templates(docs):
            own = tmpl["metadata"]["labels"]
            policy = _policy_for(docs, own)
            # The job's pods reach the store-hosting agent and each other (Gloo/NCCL: any port).
            assert _admits(policy, own, None, STORE_PORT) and _admits(policy, own, None, 41234), where
            # Nothing else in the namespace or the cluster reaches the store or the metrics ports.
            for stranger, ns in (
                ({"app": "web"}, None),
                ({"app.kubernetes.io/name": "imgtrain"}, {"x": "y"}),
                ({"app.kubernetes.io/name": "prometheus"}, None),
            ):
                assert not any(_admits(policy, stranger, ns, p) for p in (STORE_PORT, *METRICS_PORTS)), (
                    name,
                    stranger,
                )
            # Prometheus scrapes the exporters, and only them.
            prom = {"app.kubernetes.io/name": "prometheus"}
            assert all(_admits(policy, prom, monitoring_ns, p) for p in METRICS_PORTS), name
            assert not _admits(policy, prom, monitoring_ns, STORE_PORT), name


def test_rendezvous_store_and_etcd_admit_only_the_job():
    docs = _standalone()
    trainer = {"app.kubernetes.io/name": "imgtrain", "app.kubernetes.io/instance": "imgtrain-r50"}
    store = _policy_for(docs, {"app.kubernetes.io/name": "imgtrain-rdzv"})
    assert _admits(store, trainer, None, STORE_PORT)
    assert not _admits(store, {"app": "web"}, None, STORE_PORT)
    etcd_labels = {"app.kubernetes.io/name": "imgtrain-etcd"}
    etcd = _policy_for(docs, etcd_labels)
    assert _admits(etcd, trainer, None, 2379) and not _admits(etcd, trainer, None, 2380)
    assert _admits(etcd, etcd_labels, None, 2380)
    assert not any(_admits(etcd, {"app": "web"}, None, p) for p in (2379, 2380))


def _container(kind: str, name: str) -> tuple[dict, dict]:
    (doc,) = [d for d in _standalone() if d["kind"] == kind and d["metadata"]["name"] == name]
    pod = doc["spec"]["template"]["spec"]
    return doc, pod["containers"][0]


def test_kubernetes_store_listens_on_the_pod_ip():
    _, c = _container("Deployment", "imgtrain-rdzv")
    argv = [*c["command"], *c.get("args", [])]
    assert argv[:2] == ["imgtrain", "rendezvous-store"] and "--host" not in argv
    assert {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}} in c["env"]


def _etcd_flags() -> tuple[dict, dict[str, str]]:
    doc, c = _container("StatefulSet", "imgtrain-etcd")
    flags = dict(a.removeprefix("--").split("=", 1) for a in c["command"][1:])
    return doc, flags


def test_etcd_speaks_tls_with_client_certificates_on_the_pod_address():
    doc, flags = _etcd_flags()
    for key in (
        "listen-client-urls",
        "listen-peer-urls",
        "advertise-client-urls",
        "initial-advertise-peer-urls",
        "initial-cluster",
    ):
        urls = re.findall(r"(\w+)://([^:,]+)", flags[key])
        assert urls and all(scheme == "https" for scheme, _ in urls), (key, flags[key])
        assert not any(is_wildcard(host) for _, host in urls), (key, flags[key])
    assert flags["client-cert-auth"] == flags["peer-client-cert-auth"] == "true"
    tls_files = {
        flags[k]
        for k in (
            "trusted-ca-file",
            "cert-file",
            "key-file",
            "peer-trusted-ca-file",
            "peer-cert-file",
            "peer-key-file",
        )
    }
    pod = doc["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
    secrets = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    for f in tls_files:
        mount = next(m for m in mounts if f.startswith(m + "/"))
        assert secrets.get(mounts[mount]) == "imgtrain-etcd-tls", f
    # The readiness probe must present a certificate too, else it never succeeds.
    probe = pod["containers"][0]["readinessProbe"]["exec"]["command"]
    assert any(a.startswith("--cert=") for a in probe) and any(
        a.startswith("https://") or "https://" in a for a in probe
    )


def test_etcd_members_keep_their_data_across_rescheduling():
    doc, flags = _etcd_flags()
    spec = doc["spec"]
    claims = {t["metadata"]["name"] for t in spec["volumeClaimTemplates"]}
    pod = spec["template"]["spec"]
    data_mount = next(
        m for m in pod["containers"][0]["volumeMounts"] if flags["data-dir"].startswith(m["mountPath"])
    )
    assert data_mount["name"] in claims, "the data directory must be on the member's own PersistentVolume"
    assert not any(v["name"] == data_mount["name"] for v in pod.get("volumes", [])), (
        "no emptyDir for the data"
    )
    # The cluster state is not baked into the command line: it must become "existing" after bootstrap.
    assert "initial-cluster-state" not in flags
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    ref = env["ETCD_INITIAL_CLUSTER_STATE"]["valueFrom"]["configMapKeyRef"]
    (cm,) = [d for d in _standalone() if d["kind"] == "ConfigMap" and d["metadata"]["name"] == ref["name"]]
    assert cm["data"][ref["key"]] in ("new", "existing")


def test_systemd_and_slurm_stores_never_bind_every_interface(tmp_path, monkeypatch, capsys):
    unit = (RDZV / "imgtrain-rendezvous-store.service").read_text()
    exec_start = shlex.split(re.search(r"^ExecStart=(.+)$", unit, re.M).group(1))
    host = exec_start[exec_start.index("--host") + 1]
    assert host == "${IMGTRAIN_RDZV_HOST}"
    # Shipped unset: the unit refuses to start (exit 2, not restarted) until the operator sets an address.
    default = re.search(r"^Environment=IMGTRAIN_RDZV_HOST=(.*)$", unit, re.M).group(1)
    monkeypatch.delenv("POD_IP", raising=False)
    assert main(["rendezvous-store", "--host", default]) == EXIT_CONFIG
    assert "--host" in capsys.readouterr().err
    assert re.search(r"^RestartPreventExitStatus=.*\b2\b", unit, re.M)

    # The Slurm job passes the node's address, or the one given, to the store.
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "imgtrain").write_text('#!/bin/sh\necho "$@"\n')
    (fake / "imgtrain").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "IMGTRAIN_RDZV_HOST": "10.1.2.3"}
    script = RDZV / "rendezvous-store.sbatch"
    out = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, timeout=30)
    assert out.stdout.split() == ["rendezvous-store", "--host", "10.1.2.3", "--port", "29400"], out.stderr
    env.pop("IMGTRAIN_RDZV_HOST")
    out = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, timeout=30)
    if out.returncode == 0:
        bound = out.stdout.split()[2]
        assert not is_wildcard(bound) and not bound.startswith("127."), bound
    else:  # no routable address for this host: says so instead of binding everywhere
        assert out.returncode == 2 and "IMGTRAIN_RDZV_HOST" in out.stderr


# ---------------------------------------------------------------------------------------------------
# The torchft lighthouse of replicated mode (deploy/lighthouse/): no authentication, and its HTTP page can
# kill a replica group, so the same exposure rules as the rendezvous store.


def _lighthouse_argv() -> tuple[dict, list[str]]:
    doc, c = _container("Deployment", "imgtrain-lighthouse")
    return doc, [*c["command"], *c.get("args", [])]


def test_kubernetes_lighthouse_admits_only_the_job_and_binds_the_pod_ip():
    docs = _standalone()
    trainer = {"app.kubernetes.io/name": "imgtrain", "app.kubernetes.io/instance": "imgtrain-r50"}
    policy = _policy_for(docs, {"app.kubernetes.io/name": "imgtrain-lighthouse"})
    assert _admits(policy, trainer, None, LIGHTHOUSE_PORT)
    for stranger, ns in (({"app": "web"}, None), (trainer, {"x": "y"})):
        assert not _admits(policy, stranger, ns, LIGHTHOUSE_PORT), stranger
    doc, argv = _lighthouse_argv()
    assert doc["spec"]["replicas"] == 1 and doc["spec"]["strategy"]["type"] == "Recreate"
    # torchft_lighthouse binds [::]:29510 (every interface) unless told otherwise.
    bind = argv[argv.index("--bind") + 1]
    assert bind == f"$(POD_IP):{LIGHTHOUSE_PORT}", bind
    (c,) = doc["spec"]["template"]["spec"]["containers"]
    assert {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}} in c["env"]
    (svc,) = [d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "imgtrain-lighthouse"]
    assert svc["spec"]["selector"] == doc["spec"]["template"]["metadata"]["labels"]
    assert [p["targetPort"] for p in svc["spec"]["ports"]] == [LIGHTHOUSE_PORT]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert ports[c[probe]["httpGet"]["port"]] == LIGHTHOUSE_PORT, probe


def test_replica_groups_reach_each_other_and_the_lighthouse_and_nobody_else(rendered):
    """The replicated overlay's groups: each admits the others on any port (store, torchft manager and
    checkpoint server, Gloo: ports the system picks) and nobody else but Prometheus on the exporters;
    the lighthouse's policy admits them, on its port only."""
    docs = rendered["replicated"]
    ((_, tmpl),) = _pod_templates(docs)
    group = tmpl["metadata"]["labels"]
    policy = _policy_for(docs, group)
    ephemeral = (29400, 33117, 41234, 60999)
    assert all(_admits(policy, group, None, port) for port in ephemeral)
    for stranger, ns in (
        ({"app": "web"}, None),
        (group, {"x": "y"}),
        ({"app.kubernetes.io/name": "imgtrain"}, None),
    ):
        assert not any(_admits(policy, stranger, ns, port) for port in ephemeral), stranger
    lighthouse = _policy_for(_standalone(), {"app.kubernetes.io/name": "imgtrain-lighthouse"})
    assert _admits(lighthouse, group, None, LIGHTHOUSE_PORT)
    assert not _admits(lighthouse, group, None, 29511) and not _admits(
        lighthouse, {"app": "web"}, None, LIGHTHOUSE_PORT
    )


def _fake_bin(tmp_path: Path, **scripts: str) -> Path:
    """A directory of stand-in executables (name -> sh body) to put first on PATH."""
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    for name, body in scripts.items():
        (fake / name).write_text("#!/bin/sh\n" + body)
        (fake / name).chmod(0o755)
    return fake


@pytest.mark.slow
def test_kubernetes_lighthouse_command_serves_its_probes(tmp_path):
    """The manifest's own command line, with the kubelet's $(POD_IP) expansion, starts a lighthouse that
    listens on that address only and answers every probe the manifest declares."""
    if shutil.which("torchft_lighthouse") is None:
        pytest.skip("torchft is not installed (pip install 'imgtrain[ft]')")
    import urllib.request

    from conftest import free_port, wait_for

    doc, argv = _lighthouse_argv()
    port = free_port()
    argv = [a.replace("$(POD_IP)", "127.0.0.1").replace(str(LIGHTHOUSE_PORT), str(port)) for a in argv]
    (c,) = doc["spec"]["template"]["spec"]["containers"]
    log = tmp_path / "lighthouse.log"
    with log.open("w") as out:
        # RUST_LOG=info: its "listening on" line is an info log, whatever RUST_LOG the environment carries.
        env = {**os.environ, "RUST_LOG": "info"}
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        # Its first lines may be warnings (a loaded machine, RUST_LOG): wait for the one that says it listens.
        wait_for(
            lambda: "listening on" in log.read_text(),
            60,
            "the lighthouse to listen",
            ended=lambda: proc.poll() is not None,
            context=log.read_text,
        )
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            url = f"http://127.0.0.1:{port}{c[probe]['httpGet']['path']}"
            with urllib.request.urlopen(url, timeout=10) as r:
                assert r.status == 200, (probe, url)
        # Bound to the address given, not to every interface.
        listening = [
            conn.laddr
            for conn in psutil.Process(proc.pid).net_connections("tcp")
            if conn.status == psutil.CONN_LISTEN
        ]
        assert listening and all(addr.ip == "127.0.0.1" for addr in listening), listening
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _unit_exec_start(unit: str) -> list[str]:
    """ExecStart as systemd splits it: continuation lines joined, '$$' -> '$'."""
    joined = re.sub(r"\\\n", " ", unit)
    line = re.search(r"^ExecStart=(.+)$", joined, re.M).group(1)
    return [w.replace("$$", "$") for w in shlex.split(line)]


def test_systemd_lighthouse_refuses_no_or_a_wildcard_address(tmp_path):
    unit = (LIGHTHOUSE / "imgtrain-lighthouse.service").read_text()
    if shutil.which("systemd-analyze"):
        copy = tmp_path / "imgtrain-lighthouse.service"
        copy.write_text(unit)
        verify = subprocess.run(
            ["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60
        )
        assert "Unknown" not in verify.stderr and "ignoring" not in verify.stderr, verify.stderr
    argv = _unit_exec_start(unit)
    assert argv[:2] == ["/bin/sh", "-c"]
    defaults = dict(re.findall(r"^Environment=(IMGTRAIN_LIGHTHOUSE_\w+)=(.*)$", unit, re.M))
    assert defaults["IMGTRAIN_LIGHTHOUSE_HOST"] == ""  # shipped unset: the operator must choose
    assert re.search(r"^RestartPreventExitStatus=.*\b2\b", unit, re.M)
    fake = _fake_bin(tmp_path, torchft_lighthouse='echo "$@"\n')
    for host, bind in (("10.0.0.5", "10.0.0.5:29510"), ("fd00::5", "[fd00::5]:29510")):
        env = {
            **os.environ,
            **defaults,
            "PATH": f"{fake}:{os.environ['PATH']}",
            "IMGTRAIN_LIGHTHOUSE_HOST": host,
        }
        out = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=30)
        assert out.returncode == 0, out.stderr
        words = out.stdout.split()
        assert words[words.index("--bind") + 1] == bind
        assert words[words.index("--heartbeat_timeout_ms") + 1] == "1000"
    for host in ("", "0.0.0.0", "::", "[::]"):
        assert host == "" or is_wildcard(host.strip("[]"))
        env = {
            **os.environ,
            **defaults,
            "PATH": f"{fake}:{os.environ['PATH']}",
            "IMGTRAIN_LIGHTHOUSE_HOST": host,
        }
        out = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=30)
        assert out.returncode == 2 and out.stdout == "", (host, out.stdout)
        assert "IMGTRAIN_LIGHTHOUSE_HOST" in out.stderr and len(out.stderr.splitlines()) == 1


def _run_sbatch(tmp_path: Path, nodes: list[str], *args: str, **env_vars: str):
    """deploy/lighthouse/replicated.sbatch under a fake Slurm: every srun (several run at once) writes its
    arguments and the variables a replica group reads to a JSON file of its own, and returns at once."""
    log = tmp_path / "srun"
    shutil.rmtree(log, ignore_errors=True)
    log.mkdir()
    fake = _fake_bin(
        tmp_path,
        scontrol='[ "$1 $2" = "show hostnames" ] && printf "%s\\n" ' + " ".join(nodes) + "\n",
        srun=(
            f'python3 -c \'import json, os, sys; print(json.dumps({{"argv": sys.argv[1:], '
            f'"group": os.environ.get("REPLICA_GROUP_ID"), "lighthouse": os.environ.get("TORCHFT_LIGHTHOUSE")}}))\' '
            f'"$@" > {log}/$$.json\n'
        ),
    )
    env = {
        **os.environ,
        "PATH": f"{fake}:{os.environ['PATH']}",
        "SLURM_JOB_NODELIST": "n[1-3]",
        "SLURM_JOB_ID": "7",
        "SLURM_GPUS_ON_NODE": "8",
        **env_vars,
    }
    out = subprocess.run(
        ["bash", str(LIGHTHOUSE / "replicated.sbatch"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    return out, [json.loads(p.read_text()) for p in sorted(log.glob("*.json"))]


def test_slurm_lighthouse_runs_on_the_first_node_and_one_group_per_node(tmp_path):
    nodes = ["n1", "n2", "n3"]
    out, calls = _run_sbatch(
        tmp_path, nodes, "--config", "c.yaml", "data.root=/d", IMGTRAIN_LIGHTHOUSE_HOST="10.1.2.3"
    )
    assert out.returncode == 0, out.stderr
    lighthouse = [c for c in calls if "torchft_lighthouse" in c["argv"]]
    groups = [c for c in calls if "imgtrain" in c["argv"]]
    (lh,) = lighthouse
    argv = lh["argv"]
    assert "--nodelist=n1" in argv and "--overlap" in argv
    assert argv[argv.index("--bind") + 1] == "10.1.2.3:29510"
    assert sorted(g["group"] for g in groups) == ["0", "1", "2"]
    for g in groups:
        argv = g["argv"]
        assert f"--nodelist={nodes[int(g['group'])]}" in argv
        assert g["lighthouse"] == "http://10.1.2.3:29510"
        tail = argv[argv.index("train") + 1 :]
        assert tail[:2] == ["fault_tolerance.mode=replicated", "fault_tolerance.replicated.num_groups=3"]
        assert tail[2:] == ["--config", "c.yaml", "data.root=/d"]
        assert "--standalone" in argv and "--max-restarts=10" in argv
    # A lighthouse outside the allocation: no lighthouse step, every group pointed at it.
    out, calls = _run_sbatch(tmp_path, nodes, IMGTRAIN_LIGHTHOUSE="http://10.9.9.9:29510")
    assert out.returncode == 0, out.stderr
    assert not [c for c in calls if "torchft_lighthouse" in c["argv"]]
    assert {c["lighthouse"] for c in calls} == {"http://10.9.9.9:29510"} and len(calls) == 3
    # A wildcard address is refused before anything starts.
    out, calls = _run_sbatch(tmp_path, nodes, IMGTRAIN_LIGHTHOUSE_HOST="0.0.0.0")
    assert out.returncode == 2 and calls == [] and "IMGTRAIN_LIGHTHOUSE_HOST" in out.stderr


def test_slurm_replicated_overrides_are_valid_config():
    from imgtrain.config import FaultToleranceConfig, load_config

    if "mode" not in FaultToleranceConfig.__dataclass_fields__:
        pytest.skip("fault_tolerance.mode (replicated mode, issue 19) is not in this tree yet")
    text = (LIGHTHOUSE / "replicated.sbatch").read_text()
    overrides = re.findall(r"(fault_tolerance\.[\w.]+=[^\"\s]+)", text)
    assert overrides
    load_config(None, [o.replace("${#nodes[@]}", "3") for o in overrides])


# ---------------------------------------------------------------------------------------------------
# Who may write the checkpoints (Terraform)


def _unquote(v):
    """python-hcl2 keeps the quotes of names and strings: '"x"' -> 'x', recursively."""
    if isinstance(v, str):
        return v[1:-1] if len(v) >= 2 and v[0] == v[-1] == '"' else v
    if isinstance(v, dict):
        return {_unquote(k): _unquote(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_unquote(x) for x in v]
    return v


def _resources(tf: dict, kind: str) -> dict[str, dict]:
    return {
        name: body
        for block in _unquote(tf.get("resource", []))
        for k, named in block.items()
        if k == kind
        for name, body in named.items()
    }


def test_aws_checkpoint_bucket_is_the_job_service_accounts_not_the_nodes():
    tf = hcl(TERRAFORM["aws"])
    policies = _resources(tf, "aws_iam_role_policy")
    bucket_policies = {n: p for n, p in policies.items() if "aws_s3_bucket.checkpoints" in str(p["policy"])}
    assert bucket_policies, "some role must be able to write the checkpoints"
    for name, p in bucket_policies.items():
        assert "aws_iam_role.trainer" in str(p["role"]), f"{name}: the bucket belongs to the job's IRSA role"
    attached = _resources(tf, "aws_iam_role_policy_attachment")
    assert not any("S3" in str(a.get("policy_arn")) for a in attached.values())
    trust = str(_resources(tf, "aws_iam_role")["trainer"]["assume_role_policy"])
    assert "sts:AssumeRoleWithWebIdentity" in trust and ":sub" in trust and "trainer_subject" in trust
    assert "system:serviceaccount:${var.kubernetes_namespace}:imgtrain" in str(tf["locals"])
    # The nodes' metadata service (and so the node role) is out of the pods' reach.
    (template,) = _resources(tf, "aws_launch_template").values()
    assert template["metadata_options"][0]["http_put_response_hop_limit"] == 1


def test_aws_and_gke_overlays_run_as_the_service_account_terraform_trusts(rendered):
    for overlay, annotation in (
        ("aws", "eks.amazonaws.com/role-arn"),
        ("gke", "iam.gke.io/gcp-service-account"),
    ):
        docs = rendered[overlay]
        (sa,) = [d for d in docs if d["kind"] == "ServiceAccount"]
        assert sa["metadata"]["name"] == "imgtrain" and annotation in sa["metadata"]["annotations"]
        for where, tmpl in _pod_templates(docs):
            assert tmpl["spec"].get("serviceAccountName") == "imgtrain", (overlay, where)


def test_gcp_checkpoint_bucket_is_bound_to_the_job_service_account_only():
    tf = hcl(TERRAFORM["gcp"])
    members = _resources(tf, "google_storage_bucket_iam_member")
    assert members and all(
        m["member"] == "serviceAccount:${google_service_account.trainer.email}" for m in members.values()
    )
    assert not _resources(tf, "google_storage_bucket_iam_binding")
    node_roles = {r["role"] for r in _resources(tf, "google_project_iam_member").values()}
    assert not any("storage" in str(r) for r in node_roles), node_roles
    (wi,) = _resources(tf, "google_service_account_iam_member").values()
    assert wi["role"] == "roles/iam.workloadIdentityUser"
    assert wi["member"].endswith("[${var.kubernetes_namespace}/imgtrain]")
    # Pods see the GKE metadata server, not the node's service account.
    text = "\n".join(p.read_text() for p in TERRAFORM["gcp"].glob("*.tf"))
    assert text.count('mode = "GKE_METADATA"') >= 3
