"""The real daemon killed (kill -9) mid-write, a real full disk, slow clients."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from conftest import Daemon, kill_mid_put, sha, tmp_files, tmpfs_daemon, wait_until
from conftest import http_request as request


def check_consistent(server: Daemon, path: str, allowed: list[bytes]) -> bytes:
    """The file is one whole version, the database agrees with the disk, no temp is left
    (once start-up recovery is done: until then a file it must rehash is 503)."""
    server.recovered()
    status, headers, body = request(server.port, "GET", f"/download/{path}")
    assert status == 200
    assert body in allowed, f"a torn or unknown version of {len(body)} bytes"
    assert headers["ETag"] == f'"{sha(body)}"'
    listed = json.loads(request(server.port, "GET", "/files")[2])["files"]
    assert [f["checksum"] for f in listed if f["path"] == path] == [sha(body)]
    assert tmp_files(server.data) == []
    return body


def test_kill_9_mid_upload_never_tears_a_file(daemon: Any) -> None:
    rng = random.Random(20261127)
    size = 4 * 1024 * 1024
    server = daemon()
    current = os.urandom(size)
    assert request(server.port, "PUT", "/files/big.bin", current, {"X-Client-Id": "a"})[0] == 201
    outcomes = []
    for round_ in range(10):
        new = os.urandom(size)
        # half the rounds die mid-body, half after the last byte (fsync, rename, commit)
        kill_mid_put(server, "big.bin", new, rng.randrange(size) if round_ % 2 == 0 else size,
                     rng.uniform(0, 0.05))
        server = daemon()
        body = check_consistent(server, "big.bin", [current, new])
        outcomes.append("new" if body == new else "old")
        current = body
    assert "old" in outcomes          # the kills did land mid-write


def test_kill_9_after_acknowledged_uploads_loses_none(daemon: Any) -> None:
    server = daemon()
    files = {f"burst/{index:03d}.bin": os.urandom(4096 + index) for index in range(60)}

    def send(item: tuple[str, bytes]) -> str | None:
        path, body = item
        status, _, _ = request(server.port, "PUT", f"/files/{path}", body, {"X-Client-Id": "b"})
        return path if status == 201 else None
    with ThreadPoolExecutor(8) as pool:
        acknowledged = [path for path in pool.map(send, files.items()) if path]
    server.process.kill()                      # right after the last acknowledgement
    server.process.wait(timeout=10)
    assert len(acknowledged) == len(files)
    server = daemon()
    listed = {f["path"]: f["checksum"] for f in
              json.loads(request(server.port, "GET", "/files?prefix=burst/")[2])["files"]}
    for path in acknowledged:
        assert listed[path] == sha(files[path])
        assert request(server.port, "GET", f"/download/{path}")[2] == files[path]
    assert "0 added, 0 modified" in server.log()   # the database had every one of them


def test_real_full_disk_is_507_then_works_again(tmp_path: Path) -> None:
    """A 4 MiB tmpfs in a private mount namespace (unshare -m); skips where refused."""
    with tmpfs_daemon(tmp_path) as (port, data, _, pid):
        first, big = os.urandom(2_000_000), os.urandom(3_000_000)
        assert request(port, "PUT", "/files/first.bin", first, {"X-Client-Id": "a"})[0] == 201
        status, _, body = request(port, "PUT", "/files/first.bin", big, {"X-Client-Id": "a"})
        assert status == 507 and json.loads(body)["error"] == "insufficient_storage"
        assert request(port, "GET", "/download/first.bin")[2] == first       # the old one intact
        leftovers = subprocess.run(   # what tmp_files() shows: no empty spare-* made ahead
            ["nsenter", "-t", str(pid), "-m", "find", str(data / ".syncd" / "tmp"), "-mindepth",
             "1", "!", "(", "-name", "spare-*", "-empty", ")"], capture_output=True, text=True)
        assert leftovers.returncode == 0 and leftovers.stdout == ""
        assert request(port, "DELETE", "/files/first.bin?client_id=a")[0] == 200
        assert request(port, "PUT", "/files/first.bin", big, {"X-Client-Id": "a"})[0] == 201
        assert request(port, "GET", "/download/first.bin")[2] == big


def test_slow_headers_are_cut_off_while_others_are_served(daemon: Any) -> None:
    server = daemon("--header-timeout", "1")
    with socket.create_connection(("127.0.0.1", server.port)) as slow:
        slow.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        slow.settimeout(0.2)
        started = time.monotonic()
        closed = False
        while time.monotonic() - started < 10:
            try:
                slow.sendall(b"X")                       # one byte of a header, now and then
                if slow.recv(1024) == b"":
                    closed = True
                    break
            except socket.timeout:
                pass
            except OSError:
                closed = True
                break
            status, _, _ = request(server.port, "GET", "/health")
            assert status == 200                        # everyone else is served meanwhile
        assert closed and time.monotonic() - started < 5


def test_kill_9_mid_group_commit_keeps_every_acknowledged_upload(daemon: Any) -> None:
    """64 uploads at once (so that they share group commits), the daemon killed while they
    are in flight: every acknowledged file is there and whole, no other is half there."""
    rng = random.Random(64)
    outcomes = []
    for round_ in range(5):
        server = daemon()
        files = {f"g{round_}/{index:02d}.bin": os.urandom(rng.randrange(1, 600_000))
                 for index in range(64)}
        acknowledged: list[str] = []

        def send(item: tuple[str, bytes]) -> None:
            path, body = item
            try:
                status, _, _ = request(server.port, "PUT", f"/files/{path}", body,
                                       {"X-Client-Id": "g"}, timeout=10)
            except OSError:
                return
            if status == 201:
                acknowledged.append(path)
        with ThreadPoolExecutor(64) as pool:
            pending = [pool.submit(send, item) for item in files.items()]
            wait_until(lambda: len(acknowledged) >= 1, "the first answer")   # then kill
            server.process.kill()
            for future in pending:
                future.result()
        server.process.wait(timeout=10)
        server = daemon()
        server.recovered()
        listed = {f["path"]: f["checksum"] for f in json.loads(
            request(server.port, "GET", f"/files?prefix=g{round_}/")[2])["files"]}
        for path in acknowledged:
            assert listed.get(path) == sha(files[path]), f"{path} was acknowledged"
        for path, checksum in listed.items():
            assert checksum == sha(files[path]), f"{path} is there, but not whole"
            assert (server.data / path).read_bytes() == files[path]
        outcomes.append(len(acknowledged))
        server.process.kill()
        server.process.wait(timeout=10)
    assert any(count < 64 for count in outcomes), outcomes     # a kill landed mid-way


def test_kill_9_mid_move_of_a_folder_leaves_each_file_at_one_of_its_paths(daemon: Any) -> None:
    """A folder of 1,000 files moved back and forth, the daemon killed at a random moment:
    after the restart every file is whole at exactly one of its two paths, and the
    database lists exactly what is on disk."""
    rng = random.Random(20261207)
    server = daemon()
    files = {f"{index:04d}.bin": b"file %d " % index * 8 for index in range(1000)}
    for start in range(0, 1000, 250):
        boundary = "b0undary"
        parts = [f"--{boundary}\r\nContent-Disposition: form-data; name=\"client_id\"\r\n\r\na\r\n"
                 .encode()]
        for name in list(files)[start:start + 250]:
            parts.append(f"--{boundary}\r\nContent-Disposition: form-data; name=\"meta\"\r\n"
                         f"Content-Type: application/json\r\n\r\n"
                         f"{json.dumps({'relative_path': f'here/{name}'})}\r\n".encode())
            parts.append(f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
                         f"filename=\"f\"\r\n\r\n".encode() + files[name] + b"\r\n")
        parts.append(f"--{boundary}--\r\n".encode())
        status, _, _ = request(server.port, "POST", "/bulk", b"".join(parts),
                               {"Content-Type": f"multipart/form-data; boundary={boundary}"})
        assert status == 200
    where = "here"
    for round_ in range(4):
        def mover() -> None:
            nonlocal where
            for _ in range(50):       # bounded: the kill comes first
                target = "there" if where == "here" else "here"
                status, _, _ = request(server.port, "POST", "/move", json.dumps(
                    {"client_id": "a", "from": where, "to": target}).encode(),
                    {"Content-Type": "application/json"})
                if status != 200:
                    return
                where = target
        with ThreadPoolExecutor(1) as pool:
            moving = pool.submit(mover)
            time.sleep(rng.uniform(0.01, 0.3))
            server.process.kill()
            server.process.wait(timeout=10)
            moving.exception(timeout=30)    # the connection dropped: it stops
        server = daemon()
        server.recovered()
        listed = {f["path"]: f["checksum"] for f in
                  json.loads(request(server.port, "GET", "/files")[2])["files"]}
        on_disk = {}
        for folder in ("here", "there"):
            if (server.data / folder).is_dir():
                for name in os.listdir(server.data / folder):
                    on_disk[f"{folder}/{name}"] = (server.data / folder / name).read_bytes()
        assert sorted(listed) == sorted(on_disk), f"round {round_}: database and disk differ"
        assert sorted(path.split("/", 1)[1] for path in on_disk) == sorted(files)
        assert all(on_disk[path] == files[path.split("/", 1)[1]] and
                   listed[path] == sha(on_disk[path]) for path in on_disk)
        where = next(iter(on_disk)).split("/")[0]
        assert "refusing to start" not in server.log()
