"""etcd as deploy/rendezvous/etcd-kubernetes.yaml runs it, with the certificates docs/security.md makes: a
client without a certificate is refused, torch's etcd-v2 rendezvous client with the documented --rdzv-conf
keys gets in. One member on 127.0.0.1 stands in for the StatefulSet; the manifest's own flags are used."""

from __future__ import annotations

import re
import shutil
import ssl
import subprocess
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import REPO, free_port, wait_for

pytestmark = pytest.mark.integration
DOC = REPO / "docs" / "security.md"
MANIFEST = REPO / "deploy" / "rendezvous" / "etcd-kubernetes.yaml"


def _doc_cert_commands() -> str:
    text = DOC.read_text()
    section = text[text.index("## etcd: certificates") :]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


def _etcd_argv(tmp: Path, client: int, peer: int) -> tuple[list[str], dict[str, str]]:
    docs = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    (sts,) = [d for d in docs if d["kind"] == "StatefulSet"]
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    container = sts["spec"]["template"]["spec"]["containers"][0]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    argv = ["etcd"]
    for arg in container["command"][1:]:
        arg = arg.replace("$(POD_NAME)", "imgtrain-etcd-0").replace("$(POD_IP)", "127.0.0.1")
        arg = re.sub(r"imgtrain-etcd-\d\.imgtrain-etcd-peers", "127.0.0.1", arg)
        arg = arg.replace(":2379", f":{client}").replace(":2380", f":{peer}")
        arg = arg.replace(mounts["tls"], str(tmp)).replace(mounts["data"], str(tmp / "data"))
        if arg.startswith("--initial-cluster="):  # one member here
            arg = f"--initial-cluster=imgtrain-etcd-0=https://127.0.0.1:{peer}"
        argv.append(arg)
    return argv, dict(cm["data"])


def test_etcd_refuses_clients_without_the_jobs_certificate(tmp_path):
    if shutil.which("etcd") is None or shutil.which("openssl") is None:
        pytest.skip("etcd (Debian: etcd-server) and openssl are needed")
    pytest.importorskip("etcd", reason="torch's etcd-v2 rendezvous needs python-etcd")
    # The documented commands; kubectl records what it would have stored in the Secrets.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "kubectl").write_text('#!/bin/sh\necho "$@" >> kubectl.log\n')
    (bin_dir / "kubectl").chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin"}
    subprocess.run(
        ["bash", "-euo", "pipefail", "-c", _doc_cert_commands()],
        cwd=tmp_path,
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    secrets = (tmp_path / "kubectl.log").read_text()
    assert "imgtrain-etcd-tls --from-file=ca.crt --from-file=tls.crt --from-file=tls.key" in secrets
    assert "imgtrain-etcd-client-tls" in secrets and "tls.key=client.key" in secrets

    client, peer = free_port(), free_port()
    argv, cm_env = _etcd_argv(tmp_path, client, peer)
    log = open(tmp_path / "etcd.log", "w")
    proc = subprocess.Popen(argv, env={**env, **cm_env}, stdout=log, stderr=subprocess.STDOUT)
    try:
        import etcd
        from torch.distributed.elastic.rendezvous import RendezvousParameters
        from torch.distributed.elastic.rendezvous.etcd_rendezvous_backend import _create_etcd_client

        # The documented --rdzv-conf keys, pointing at the client certificate.
        params = RendezvousParameters(
            "etcd-v2",
            f"127.0.0.1:{client}",
            "job",
            1,
            1,
            protocol="https",
            ca_cert=str(tmp_path / "ca.crt"),
            ssl_cert=str(tmp_path / "client.crt"),
            ssl_cert_key=str(tmp_path / "client.key"),
        )

        def written():
            try:
                c = _create_etcd_client(params)
                c.write("/imgtrain-test", "ok")
                return c
            except Exception:  # noqa: BLE001 - not up yet
                return None

        c = wait_for(
            written,
            60,
            "etcd to take a write over TLS",
            ended=lambda: proc.poll() is not None,
            context=lambda: (tmp_path / "etcd.log").read_text()[-3000:],
        )
        assert c.read("/imgtrain-test").value == "ok"
        # The CA alone (no client certificate) is refused at the TLS handshake.
        ctx = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
        with pytest.raises((ssl.SSLError, ConnectionError, urllib.error.URLError)):
            urllib.request.urlopen(
                f"https://127.0.0.1:{client}/v2/keys/imgtrain-test", context=ctx, timeout=10
            )
        # Plain HTTP is not served at all.
        plain = etcd.Client(host="127.0.0.1", port=client, protocol="http")
        with pytest.raises(Exception):  # noqa: B017 - python-etcd wraps the failure in several types
            plain.read("/imgtrain-test")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
