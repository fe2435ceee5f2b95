"""TLS without a proxy (SPEC Part 2, "TLS"), with a throw-away CA made by the openssl
command: HTTPS and WSS for the reference client, a renewed certificate taken on SIGHUP for
new connections while open ones stay, and what stops start-up or a reload."""

from __future__ import annotations

import asyncio
import shutil
import signal
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from conftest import (PKI, ROOT, Clients, Daemon, free_port, http_request, tree, wait_until,
                      write)


@pytest.fixture
def pki(tmp_path: Path) -> PKI:
    return PKI(tmp_path / "pki")


def tls_daemon(daemon: Any, cert: Path, key: Path, *args: str) -> Daemon:
    server = daemon("--tls-cert-file", str(cert), "--tls-key-file", str(key), *args)
    server.url = server.url.replace("http://", "https://")
    return server


def served_certificate(port: int) -> bytes:
    """The certificate a new connection to 127.0.0.1:port is shown (not verified)."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    import socket
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def pem_to_der(path: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(path.read_text())


def test_the_client_syncs_over_https_and_wss(tmp_path: Path, daemon: Any, pki: PKI) -> None:
    cert, key = pki.server("server")
    server = tls_daemon(daemon, cert, key)
    assert f"listening on https://127.0.0.1:{server.port}" in server.log()
    clients = Clients(tmp_path, server)
    try:
        for name in ("A", "B"):
            clients.start(name, "--ca-file", str(pki.ca))
            assert f"live server={server.url}" in clients.log(name)
        write(clients.folder("A"), "docs/secret.txt", b"over TLS")
        wait_until(lambda: tree(clients.folder("B")).get("docs/secret.txt") == b"over TLS",
                   "the change to reach B through WSS")
    finally:
        clients.stop()
    plain = subprocess.run([sys.executable, "-c", (
        "import http.client; c = http.client.HTTPConnection('127.0.0.1', %d, timeout=5); "
        "c.request('GET', '/health'); print(c.getresponse().status)") % server.port],
        capture_output=True, text=True, timeout=30)
    assert plain.returncode != 0                        # no plain HTTP on a TLS port


def test_without_the_ca_the_client_refuses_the_server(tmp_path: Path, daemon: Any,
                                                      pki: PKI) -> None:
    cert, key = pki.server("server")
    server = tls_daemon(daemon, cert, key)
    result = subprocess.run(
        [sys.executable, str(ROOT / "syncd.py"), "client", str(tmp_path / "A"), "--server",
         server.url, "--once"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "certificate verify failed" in result.stderr


def test_a_renewed_certificate_is_taken_on_sighup(daemon: Any, pki: PKI) -> None:
    old_cert, old_key = pki.server("old", expired=True)
    new_cert, new_key = pki.server("new")
    live_cert, live_key = pki.folder / "live.pem", pki.folder / "live.key"
    shutil.copy(old_cert, live_cert)
    shutil.copy(old_key, live_key)
    server = tls_daemon(daemon, live_cert, live_key)
    trusting = ssl.create_default_context(cafile=pki.ca)

    async def scenario() -> None:
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.ClientConnectorCertificateError, match="expired"):
                await session.get(f"{server.url}/health", ssl=trusting)
            # a WebSocket opened under the old certificate (a client that did not check)
            async with session.ws_connect(f"{server.url}/ws/desk", ssl=False) as ws:
                assert (await ws.receive_json(timeout=5))["type"] == "hello"
                shutil.copy(new_cert, live_cert)
                shutil.copy(new_key, live_key)
                server.process.send_signal(signal.SIGHUP)
                await asyncio.to_thread(wait_until, lambda: "TLS certificate loaded from"
                                        in server.log(), "the reload")
                async with session.get(f"{server.url}/health", ssl=trusting) as response:
                    assert response.status == 200           # new connections: the new one
                await ws.send_json({"type": "heartbeat"})
                assert (await ws.receive_json(timeout=5))["type"] == "heartbeat_ack"   # still up
    asyncio.run(scenario())
    assert served_certificate(server.port) == pem_to_der(new_cert)


def test_a_key_that_does_not_match_stops_start_up(tmp_path: Path, pki: PKI) -> None:
    cert, _ = pki.server("one")
    _, other_key = pki.server("two")
    result = subprocess.run(
        [sys.executable, str(ROOT / "syncd.py"), "--port", str(free_port()),
         "--sync-directory", str(tmp_path / "data"), "--tls-cert-file", str(cert),
         "--tls-key-file", str(other_key)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "tls_key_file" in lines[0] and "is not the key" in lines[0]


def test_a_reload_with_a_bad_key_keeps_the_old_certificate(daemon: Any, pki: PKI) -> None:
    cert, key = pki.server("good")
    _, wrong_key = pki.server("other")
    live_cert, live_key = pki.folder / "live.pem", pki.folder / "live.key"
    shutil.copy(cert, live_cert)
    shutil.copy(key, live_key)
    server = tls_daemon(daemon, live_cert, live_key)
    shutil.copy(wrong_key, live_key)
    server.process.send_signal(signal.SIGHUP)
    wait_until(lambda: "configuration not reloaded" in server.log(), "the failed reload")
    assert "tls_key_file" in server.log()
    assert served_certificate(server.port) == pem_to_der(cert)
    assert server.process.poll() is None


def test_a_certificate_that_is_not_pem_stops_start_up(tmp_path: Path, pki: PKI) -> None:
    _, key = pki.server("one")
    garbage = tmp_path / "cert.pem"
    garbage.write_text("not a certificate\n")
    result = subprocess.run(
        [sys.executable, str(ROOT / "syncd.py"), "--port", str(free_port()),
         "--sync-directory", str(tmp_path / "data"), "--tls-cert-file", str(garbage),
         "--tls-key-file", str(key)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("syncd: tls_cert_file: cannot load")


def test_a_ca_file_that_cannot_be_read_is_exit_2(tmp_path: Path) -> None:
    for command in (["client", str(tmp_path / "A"), "--server", "https://127.0.0.1:1"],
                    ["devices", "list", "--server", "https://127.0.0.1:1"]):
        result = subprocess.run([sys.executable, str(ROOT / "syncd.py"), *command,
                                 "--ca-file", str(tmp_path / "missing.pem")],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and "No such file" in result.stderr


def test_turning_tls_on_or_off_takes_a_restart(daemon: Any, pki: PKI, tmp_path: Path) -> None:
    """A reload cannot turn TLS on or off (the listening socket is made at start): it
    says so, and the server goes on as it started."""
    cert, key = pki.server("server")
    tls = {"tls_cert_file": str(cert), "tls_key_file": str(key)}
    for before, after, base in (({}, tls, tmp_path / "on"), (tls, {}, tmp_path / "off")):
        base.mkdir()
        config = base / "syncd.toml"
        config.write_text("".join(f'{key} = "{value}"\n' for key, value in before.items()))
        server = daemon("--config", str(config), base=base)
        config.write_text("".join(f'{key} = "{value}"\n' for key, value in after.items()))
        server.process.send_signal(signal.SIGHUP)
        wait_until(lambda server=server: "configuration reloaded" in server.log(), "reload")
        assert ("tls_cert_file changed in the configuration: it takes effect after a restart"
                in server.log())
        if before:
            assert served_certificate(server.port) == pem_to_der(cert)
        else:
            assert http_request(server.port, "GET", "/health", None, {})[0] == 200
