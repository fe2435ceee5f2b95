"""syncd behind nginx as the README configures it (systemd/nginx-syncd.conf, run as it is
but for ports and certificate paths): the client syncs through it, WebSocket events
arrive, a 1 GiB upload streams through without nginx keeping it on disk, and the limit on
failed logins counts the clients' own addresses."""

from __future__ import annotations

import http.client
import os
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import Clients, Daemon, Nginx, PKI, ROOT, node_tmp, tree, wait_until, write

MiB = 1024 * 1024
SITE = ROOT / "systemd" / "nginx-syncd.conf"


@pytest.fixture
def behind_nginx(tmp_path: Path, daemon: Any) -> Iterator[tuple[Daemon, Nginx, PKI]]:
    pki = PKI(tmp_path / "pki")
    server = daemon("--trusted-proxies", "127.0.0.1", "--max-file-size", "2GiB")
    proxy = Nginx(tmp_path / "nginx", SITE, [server], pki)
    yield server, proxy, pki
    proxy.stop()


def test_the_client_syncs_through_nginx(tmp_path: Path,
                                        behind_nginx: tuple[Daemon, Nginx, PKI]) -> None:
    server, proxy, pki = behind_nginx
    clients = Clients(tmp_path, server.seen_at(proxy.url))
    try:
        clients.start("A", "--ca-file", str(pki.ca))
        clients.start("B", "--ca-file", str(pki.ca))
        write(clients.folder("A"), "docs/via-nginx.txt", b"proxied")
        wait_until(lambda: tree(clients.folder("B")).get("docs/via-nginx.txt") == b"proxied",
                   "the WebSocket event through nginx")
        write(clients.folder("B"), "big.bin", os.urandom(20 * MiB))   # resumable, via nginx
        wait_until(lambda: (clients.folder("A") / "big.bin").exists(), "the large file at A",
                   timeout=60)
        assert (clients.folder("A") / "big.bin").read_bytes() == \
            (clients.folder("B") / "big.bin").read_bytes()
    finally:
        clients.stop()


def test_a_1_gib_upload_streams_through_nginx(behind_nginx: tuple[Daemon, Nginx, PKI]) -> None:
    """Half-way through the upload, syncd has most of that half already: nginx passes the
    body on as it comes (with request buffering it would first keep all of it, in a temp
    file it unlinks at once, so that only this timing can tell)."""
    server, proxy, pki = behind_nginx
    block = os.urandom(MiB)
    staged = node_tmp(server.data)
    at_half: list[int] = []

    def body() -> Iterator[bytes]:
        for index in range(1024):
            if index == 512:
                deadline = time.monotonic() + 30
                while received() < 256 * MiB and time.monotonic() < deadline:
                    time.sleep(0.05)
                at_half.append(received())
            yield block

    def received() -> int:
        return sum(entry.stat().st_size for entry in staged.iterdir())
    connection = http.client.HTTPSConnection(
        "127.0.0.1", proxy.port, timeout=120, context=ssl.create_default_context(cafile=pki.ca))
    try:
        connection.request("PUT", "/files/big.bin", body=body(), headers={
            "X-Client-Id": "laptop", "Content-Length": str(1024 * MiB)})
        response = connection.getresponse()
        assert response.status == 201, response.read()
    finally:
        connection.close()
    try:
        assert at_half[0] >= 256 * MiB, f"syncd had {at_half[0] / MiB:.0f} MiB half-way"
        assert (server.data / "big.bin").stat().st_size == 1024 * MiB
    finally:
        (server.data / "big.bin").unlink()


def test_failed_logins_count_per_client_behind_nginx(tmp_path: Path, daemon: Any) -> None:
    """Clients on 127.0.0.2 and 127.0.0.3 (loopback has the whole 127/8): nginx appends the
    address it saw to X-Forwarded-For, and syncd believes only that last entry."""
    pki = PKI(tmp_path / "pki")
    server = daemon("--trusted-proxies", "127.0.0.1", "--api-key", "right")
    proxy = Nginx(tmp_path / "nginx", SITE, [server], pki)
    try:
        context = ssl.create_default_context(cafile=pki.ca)

        def get(key: str, source: str) -> int:
            connection = http.client.HTTPSConnection(
                "127.0.0.1", proxy.port, timeout=30, context=context,
                source_address=(source, 0))
            connection.request("GET", "/files", headers={
                "Authorization": f"Bearer {key}", "X-Forwarded-For": "203.0.113.99"})
            status = connection.getresponse().status
            connection.close()
            return status
        statuses = [get("wrong", "127.0.0.2") for _ in range(30)]
        assert statuses[0] == 401 and set(statuses[-10:]) == {429}
        assert get("right", "127.0.0.3") == 200            # another client is served
        assert get("right", "127.0.0.2") == 429
        assert "from 127.0.0.2" in server.log() and "203.0.113.99" not in server.log()
    finally:
        proxy.stop()
