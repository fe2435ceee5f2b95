"""Resumable uploads across failures, with a real daemon: a connection cut mid-chunk, kill -9
of the daemon between and inside chunks, the memory a 1 GiB upload takes; the reference
client resuming after a restart of itself or of the server and over a link cut three
times; and tus-js-client from npm."""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import (ROOT, Clients, CountingProxy, Daemon, http_request, sha, tree,
                      wait_until, write)

TUS = {"Tus-Resumable": "1.0.0"}
OCTETS = {**TUS, "Content-Type": "application/offset+octet-stream"}
MiB = 1024 * 1024


def metadata(**fields: str) -> str:
    return ",".join(f"{key} {base64.b64encode(value.encode()).decode()}"
                    for key, value in fields.items())


def create(server: Daemon, length: int, path: str, **fields: str) -> str:
    status, headers, body = http_request(server.port, "POST", "/uploads/", headers={
        **TUS, "Upload-Length": str(length),
        "Upload-Metadata": metadata(relative_path=path, client_id="laptop", **fields)})
    assert status == 201, body
    return headers["Location"]


def offset_of(server: Daemon, location: str) -> int:
    status, headers, _ = http_request(server.port, "HEAD", location, headers=TUS)
    assert status == 200
    return int(headers["Upload-Offset"])


def patch(server: Daemon, location: str, offset: int, data: Any,
          **headers: str) -> tuple[int, dict[str, str], bytes]:
    return http_request(server.port, "PATCH", location, body=data, headers={
        **OCTETS, "Upload-Offset": str(offset), **headers})


def cut_patch(server: Daemon, location: str, offset: int, length: int, sent: bytes,
              then: Any = None, **headers: str) -> None:
    """A PATCH that announces length bytes and sends only `sent`; then (after the server
    has had time to read them) the connection is closed, or then() is called."""
    extra = "".join(f"{key}: {value}\r\n" for key, value in headers.items())
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall((f"PATCH {location} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                      f"Tus-Resumable: 1.0.0\r\nUpload-Offset: {offset}\r\n"
                      f"Content-Type: application/offset+octet-stream\r\n"
                      f"Content-Length: {length}\r\n{extra}\r\n").encode() + sent)
        time.sleep(0.5)
        if then is not None:
            then()


def send_the_rest(server: Daemon, location: str, data: bytes) -> None:
    """PATCH the rest of data from where the upload stands, once a PATCH cut short (whose
    end the server may not have seen yet: 409 until then) is over."""
    deadline = time.monotonic() + 15
    while True:
        offset = offset_of(server, location)
        status = patch(server, location, offset, data[offset:])[0]
        if status != 409:
            assert status == 204
            return
        assert time.monotonic() < deadline, "the cut PATCH never ended"
        time.sleep(0.1)


def rss(pid: int) -> int:
    """A process's resident set, in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def restart(server: Daemon, daemon: Any) -> Daemon:
    """kill -9, then the daemon again on the same port and tree."""
    server.process.kill()
    server.process.wait(timeout=10)
    return daemon("--max-file-size", "2GiB", port=server.port)


# -- the server ---------------------------------------------------------------------------

def test_a_chunk_cut_short_keeps_what_arrived(daemon: Any) -> None:
    server = daemon()
    data = os.urandom(3 * MiB)
    location = create(server, len(data), "video.mp4", checksum=sha(data))
    cut_patch(server, location, 0, 2 * MiB, data[:3 * MiB // 2])
    wait_until(lambda: offset_of(server, location) > 0, "the bytes that arrived to be kept")
    kept = offset_of(server, location)
    assert kept <= 3 * MiB // 2
    assert patch(server, location, kept, data[kept:])[0] == 204
    assert (server.data / "video.mp4").read_bytes() == data
    wait_until(lambda: f"connection was lost; {kept} bytes kept" in server.log(),
               "the cut to be logged")
    assert "Traceback" not in server.log() and " ERROR " not in server.log()


def test_a_chunk_with_a_checksum_cut_short_is_dropped(daemon: Any) -> None:
    server = daemon()
    data = os.urandom(3 * MiB)
    location = create(server, len(data), "video.mp4")
    assert patch(server, location, 0, data[:MiB])[0] == 204
    digest = base64.b64encode(hashlib.sha256(data[MiB:2 * MiB]).digest()).decode()
    cut_patch(server, location, MiB, MiB, data[MiB:3 * MiB // 2],
              **{"Upload-Checksum": f"sha256 {digest}"})
    # Until the cut PATCH is over, another is refused (409); after it, one at MiB is taken
    # only if the cut one was dropped.
    deadline = time.monotonic() + 15
    while (status := patch(server, location, MiB, data[MiB:])[0]) == 409:
        assert time.monotonic() < deadline, "the cut chunk was kept, or never ended"
        time.sleep(0.1)
    assert status == 204
    assert (server.data / "video.mp4").read_bytes() == data


def test_an_acknowledged_offset_survives_kill_9(daemon: Any) -> None:
    server = daemon()
    data = os.urandom(4 * MiB)
    location = create(server, len(data), "video.mp4", checksum=sha(data))
    assert patch(server, location, 0, data[:MiB])[2] == b""
    server = restart(server, daemon)                     # between two chunks
    assert offset_of(server, location) == MiB

    def kill() -> None:
        server.process.kill()
        server.process.wait(timeout=10)
    cut_patch(server, location, MiB, 2 * MiB, data[MiB:3 * MiB // 2], then=kill)
    server = daemon(port=server.port)                    # inside a chunk: never acknowledged
    assert offset_of(server, location) == MiB
    assert patch(server, location, MiB, data[MiB:])[0] == 204
    assert (server.data / "video.mp4").read_bytes() == data   # the whole SHA-256 checked


def test_a_1_gib_upload_keeps_the_daemon_small(daemon: Any) -> None:
    server = daemon("--max-file-size", "2GiB")
    http_request(server.port, "GET", "/health")
    time.sleep(1)
    idle = rss(server.process.pid)
    block = os.urandom(MiB)
    location = create(server, 1024 * MiB, "big.bin")
    peak, done = idle, threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.02):
            peak = max(peak, rss(server.process.pid))
    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        offset = 0
        for _ in range(4):                                  # 4 PATCHes of 256 MiB
            status, headers, _ = patch(server, location, offset, iter([block] * 256),
                                       **{"Content-Length": str(256 * MiB)})
            assert status == 204
            offset = int(headers["Upload-Offset"])
    finally:
        done.set()
        sampler.join()
    try:
        assert offset == 1024 * MiB and (server.data / "big.bin").stat().st_size == 1024 * MiB
        assert peak - idle < 16 * MiB, f"RSS grew by {(peak - idle) / MiB:.1f} MiB"
    finally:
        (server.data / "big.bin").unlink()


# -- the reference client -----------------------------------------------------------------

@pytest.fixture
def clients(tmp_path: Path, daemon: Any) -> Iterator[Clients]:
    group = Clients(tmp_path, daemon("--max-file-size", "2GiB"))
    yield group
    group.stop()


def run_client(clients: Clients, server_url: str, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "syncd.py"), "client", str(clients.folder("A")),
         "--server", server_url, "--client-id", "device-a", "--once", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen[str], expect: int = 0) -> str:
    output, _ = process.communicate(timeout=300)
    assert process.returncode == expect, output
    return output


def kill_client_after(clients: Clients, sent: int) -> int:
    """Run A's client through a counting proxy and kill -9 it once it sent this many bytes
    (one chunk stored, the next one under way); the bytes it sent."""
    proxy = CountingProxy(clients.server.port)
    try:
        process = run_client(clients, proxy.url)
        wait_until(lambda: proxy.sent > sent, "part of the file to be sent", timeout=60)
        process.kill()
        process.communicate(timeout=10)
    finally:
        proxy.close()
    return proxy.sent


def test_the_client_continues_an_upload_after_it_was_killed(clients: Clients) -> None:
    data = os.urandom(96 * MiB)
    write(clients.folder("A"), "video.mp4", data)
    first = kill_client_after(clients, 48 * MiB)
    proxy = CountingProxy(clients.server.port)
    try:
        output = finish(run_client(clients, proxy.url))
    finally:
        proxy.close()
    assert "upload-resume path=video.mp4 offset=" in output
    assert (clients.server.data / "video.mp4").read_bytes() == data
    # what the first run got stored is not sent again
    assert proxy.sent < len(data) - first + 40 * MiB, (first, proxy.sent)
    assert not os.listdir(clients.server.data / ".syncd" / "uploads")


def test_the_client_rides_out_a_server_restart(clients: Clients, daemon: Any) -> None:
    data = os.urandom(160 * MiB)
    write(clients.folder("A"), "video.mp4", data)
    process = run_client(clients, clients.server.url)
    uploads = clients.server.data / ".syncd" / "uploads"
    wait_until(lambda: any(entry.stat().st_size > 40 * MiB for entry in uploads.iterdir()),
               "part of the file to be stored", timeout=60)
    clients.server = restart(clients.server, daemon)
    output = finish(process)
    assert "upload-interrupted path=video.mp4" in output
    assert "upload-resume path=video.mp4 offset=" in output
    assert (clients.server.data / "video.mp4").read_bytes() == data


def test_a_1_gib_file_over_a_link_cut_three_times(clients: Clients) -> None:
    """The issue's "done when": it arrives whole, with under 1.2 GiB sent."""
    size = 1024 * MiB
    source = clients.folder("A") / "disk.img"
    block = os.urandom(MiB)
    with open(source, "wb") as out:
        for index in range(1024):
            out.write(index.to_bytes(8, "big") + block[8:])   # no two MiB alike
    proxy = CountingProxy(clients.server.port, cuts=[300 * MiB, 600 * MiB, 900 * MiB])
    try:
        output = finish(run_client(clients, proxy.url))
    finally:
        proxy.close()
    try:
        assert output.count("upload-interrupted path=disk.img") == 3, output
        stored = clients.server.data / "disk.img"
        assert stored.stat().st_size == size
        assert syncd_hash(stored) == syncd_hash(source)
        assert proxy.sent < 1.2 * 1024 * MiB, proxy.sent / MiB
    finally:
        source.unlink()
        (clients.server.data / "disk.img").unlink(missing_ok=True)


def syncd_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(8 * MiB):
            digest.update(chunk)
    return digest.hexdigest()


def test_a_file_changed_since_its_upload_began_starts_anew(clients: Clients) -> None:
    first = os.urandom(96 * MiB)
    write(clients.folder("A"), "video.mp4", first)
    kill_client_after(clients, 20 * MiB)
    uploads = clients.server.data / ".syncd" / "uploads"
    assert len(os.listdir(uploads)) == 1
    second = os.urandom(30 * MiB)
    write(clients.folder("A"), "video.mp4", second)
    output = finish(run_client(clients, clients.server.url))
    assert "upload-resume" not in output
    assert (clients.server.data / "video.mp4").read_bytes() == second
    assert os.listdir(uploads) == []                    # the old one was terminated


def test_small_files_and_off_use_one_request(clients: Clients) -> None:
    write(clients.folder("A"), "big.bin", os.urandom(9 * MiB))
    write(clients.folder("A"), "small.bin", os.urandom(MiB))
    finish(run_client(clients, clients.server.url, "--resumable-min-size", "off"))
    write(clients.folder("A"), "big2.bin", os.urandom(2 * MiB))
    finish(run_client(clients, clients.server.url, "--resumable-min-size", "2MiB"))
    log = clients.server.log()
    assert log.count("resumable upload ") == 1 and "of big2.bin" in log
    assert tree(clients.folder("A")).keys() == {"big.bin", "small.bin", "big2.bin"}
    bad = subprocess.run(
        [sys.executable, str(ROOT / "syncd.py"), "client", str(clients.folder("A")),
         "--server", clients.server.url, "--once", "--resumable-min-size", "lots"],
        capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "expected a size like" in bad.stderr


# -- a stock JavaScript client --------------------------------------------------------------

JS_DIR = ROOT / "tests" / "js"


def tus_js_missing() -> str | None:
    if shutil.which("node") is None:
        return "Node.js is not installed"
    if not (JS_DIR / "node_modules" / "tus-js-client").is_dir():
        return "tus-js-client is not installed: npm ci --prefix tests/js (.ci/run does it)"
    return None


def test_tus_js_client_uploads_into_syncd_unchanged(daemon: Any, tmp_path: Path) -> None:
    if (why := tus_js_missing()) is not None:
        pytest.skip(why)
    server = daemon()
    data = os.urandom(5 * MiB + 3)
    source = tmp_path / "from-js.bin"
    source.write_bytes(data)
    result = subprocess.run(["node", str(JS_DIR / "upload.js"), f"{server.url}/uploads/",
                             str(source), "from-js.bin", sha(data)],
                            capture_output=True, text=True, timeout=120, cwd=JS_DIR)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (server.data / "from-js.bin").read_bytes() == data
    assert not os.listdir(server.data / ".syncd" / "uploads")


def test_the_progress_bar_starts_at_the_resumed_position(tmp_path: Path, capsys: Any) -> None:
    import asyncio

    import syncd
    folder = tmp_path / "A"
    write(folder, "big.bin", b"x" * (16 * MiB))
    state = syncd.ClientState(folder)
    client = syncd.SyncClient(folder, "http://127.0.0.1:1", "a", None, state)
    client.progress = True
    local = syncd.LocalFile("big.bin", "0" * 64, 16 * MiB, 0)

    async def read_all() -> int:
        with open(folder / "big.bin", "rb") as handle:
            handle.seek(12 * MiB)
            return sum([len(chunk) async for chunk in
                        client.chunk_reader(handle, 12 * MiB, 4 * MiB, local)])
    assert asyncio.run(read_all()) == 4 * MiB
    drawn = [int(bar.split()[-1].rstrip("%")) for bar in capsys.readouterr().out.split("\r")[1:]]
    assert 75 < drawn[0] <= 85 and drawn[-1] == 100         # from 12 MiB of 16, not 0
    state.close()


def test_an_upload_whose_last_answer_was_lost_is_no_conflict(clients: Clients) -> None:
    """The server stored the file, but its answer never came: the client finds its upload
    gone and the file already there, and keeps no conflict copy of itself."""
    data = os.urandom(40 * MiB)
    write(clients.folder("A"), "video.mp4", data)
    proxy = CountingProxy(clients.server.port, cut_answer=b"X-Revision")
    try:
        output = finish(run_client(clients, proxy.url))
    finally:
        proxy.close()
    assert "upload-interrupted path=video.mp4" in output
    assert "upload path=video.mp4 already-there" in output
    assert tree(clients.folder("A")) == {"video.mp4": data}
    assert sorted(os.listdir(clients.server.data)) == [".syncd", "video.mp4"]


def test_an_upload_no_longer_wanted_is_terminated(clients: Clients) -> None:
    import sqlite3
    data = os.urandom(96 * MiB)
    write(clients.folder("A"), "video.mp4", data)
    kill_client_after(clients, 40 * MiB)
    state = clients.folder("A") / ".syncd-client" / "state.db"
    with sqlite3.connect(state) as db:
        (location,) = db.execute("SELECT url FROM resumable").fetchone()
    (clients.folder("A") / "video.mp4").unlink()             # not wanted any more
    finish(run_client(clients, clients.server.url))
    status, _, _ = http_request(clients.server.port, "HEAD", location, headers=TUS)
    assert status == 404 and not os.listdir(clients.server.data / ".syncd" / "uploads")
    with sqlite3.connect(state) as db:
        assert db.execute("SELECT COUNT(*) FROM resumable").fetchone() == (0,)
