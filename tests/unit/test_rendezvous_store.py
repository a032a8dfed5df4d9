"""`imgtrain rendezvous-store` listens on the one address it is given, never on every interface unless asked:
torch's rendezvous unpickles what agents write into the store, so whoever reaches it runs code in the job."""

from __future__ import annotations

import socket
import threading

import pytest

from imgtrain.cli import EXIT_CONFIG, main
from imgtrain.distributed.rendezvous import serve_store, store_address

from conftest import free_port


@pytest.mark.parametrize(
    "argv",
    [[], ["--host", "0.0.0.0"], ["--host", "::"], ["--host", "[::]"]],
    ids=["no-host", "ipv4-any", "ipv6-any", "ipv6-any-brackets"],
)
def test_store_refuses_to_start_without_an_address_or_on_a_wildcard(argv, monkeypatch, capsys):
    monkeypatch.delenv("POD_IP", raising=False)
    assert main(["rendezvous-store", *argv, "--port", str(free_port())]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert ("--allow-wildcard-bind" in err) if argv else ("--host" in err and "POD_IP" in err)


def test_store_refuses_an_address_that_is_not_this_machines(capsys):
    # 192.0.2.0/24 is TEST-NET-1: never assigned to a host.
    assert main(["rendezvous-store", "--host", "192.0.2.7", "--port", str(free_port())]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "192.0.2.7" in err and "Traceback" not in err


def _reachable(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=5).close()
        return True
    except OSError:
        return False


@pytest.fixture
def serve():
    threads = []

    def start(host: str) -> int:
        port, stop = free_port(), threading.Event()
        t = threading.Thread(target=serve_store, args=(host, port, stop), daemon=True)
        t.start()
        threads.append((t, stop))
        # The store is up once its own address answers (serve_store binds before it returns control).
        for _ in range(600):
            if _reachable("127.0.0.1", port) or not t.is_alive():
                break
            threading.Event().wait(0.05)
        assert t.is_alive()
        return port

    yield start
    for t, stop in threads:
        stop.set()
        t.join(timeout=30)


def test_store_listens_on_its_address_only(serve, monkeypatch):
    # 127.0.0.2 is this machine too (all of 127/8 is loopback): a wildcard listener would answer there.
    # torch's TCPStore alone listens on every interface whatever host it is given.
    monkeypatch.delenv("POD_IP", raising=False)
    port = serve(store_address("127.0.0.1"))
    assert _reachable("127.0.0.1", port)
    assert not _reachable("127.0.0.2", port)


def test_store_listens_on_the_pod_ip_without_host(serve, monkeypatch):
    monkeypatch.setenv("POD_IP", "127.0.0.1")
    host = store_address(None)
    assert host == "127.0.0.1"
    port = serve(host)
    assert not _reachable("127.0.0.2", port)


def test_store_serves_every_interface_when_asked(serve):
    port = serve(store_address("0.0.0.0", allow_wildcard=True))
    assert _reachable("127.0.0.2", port)
