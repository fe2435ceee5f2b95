"""Versions with the real daemon: kill -9 mid-change, a real full disk, the command line,
and a folder deleted on one device coming back on every device."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


from conftest import Clients, Daemon, ROOT, db_query, kill_mid_put, sha, tmpfs_daemon, tree, write
from conftest import http_request as request


def kept_checksums(server: Daemon, path: str) -> list[str]:
    status, _, body = request(server.port, "GET", f"/versions/{path}")
    return [v["checksum"] for v in json.loads(body)["versions"]] if status == 200 else []


def blob_store_agrees(server: Daemon) -> None:
    """Every blob on disk is one the database refers to, and the other way round."""
    on_disk = {name for folder in (server.data / ".syncd" / "blobs").iterdir()
               for name in os.listdir(folder)}
    known = {row[0] for row in db_query(server.data, "SELECT checksum FROM blobs")}
    used = {row[0] for row in db_query(server.data, "SELECT DISTINCT checksum FROM versions")}
    assert on_disk == known == used


def test_kill_9_mid_overwrite_leaves_old_without_version_or_new_with_version(daemon: Any) -> None:
    rng = random.Random(20261207)
    size = 4 * 1024 * 1024
    server = daemon()
    current = os.urandom(size)
    assert request(server.port, "PUT", "/files/big.bin", current, {"X-Client-Id": "a"})[0] == 201
    outcomes = []
    for round_ in range(10):
        new = os.urandom(size)
        kill_mid_put(server, "big.bin", new, rng.randrange(size) if round_ % 2 == 0 else size,
                     rng.uniform(0, 0.05))
        server = daemon()
        server.recovered()
        status, headers, body = request(server.port, "GET", "/download/big.bin")
        assert status == 200 and body in (current, new) and headers["ETag"] == f'"{sha(body)}"'
        kept = kept_checksums(server, "big.bin")
        if body == new:
            assert sha(current) in kept, "new content live, but the old one is not kept"
            outcomes.append("new")
        else:
            assert sha(current) not in kept, "the old content is live and kept as a version too"
            outcomes.append("old")
        blob_store_agrees(server)
        current = body
    assert "old" in outcomes and "new" in outcomes


def test_kill_9_mid_folder_delete_loses_no_file(daemon: Any) -> None:
    rng = random.Random(7)
    server = daemon()
    for round_ in range(10):
        files = {f"r{round_}/{index:03d}.bin": os.urandom(2048) for index in range(300)}
        for path, data in files.items():
            assert request(server.port, "PUT", f"/files/{path}", data, {"X-Client-Id": "a"})[0] == 201
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(b"DELETE /files/r%d?client_id=a HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
                         % round_)
            time.sleep(rng.uniform(0, 0.06))
            server.process.kill()
            server.process.wait(timeout=10)
        server = daemon("--accept-deletions")
        server.recovered()
        live = {f["path"]: f["checksum"] for f in json.loads(
            request(server.port, "GET", f"/files?prefix=r{round_}/")[2])["files"]}
        trash = {f["path"]: f["checksum"] for f in json.loads(
            request(server.port, "GET", f"/trash?prefix=r{round_}/")[2])["files"]}
        for path, data in files.items():
            assert (path in live) != (path in trash), f"{path}: live and trash, or neither"
            assert (live.get(path) or trash.get(path)) == sha(data)
            if path in live:
                assert (server.data / path).read_bytes() == data
        blob_store_agrees(server)


def test_a_real_full_disk_prunes_the_oldest_versions_and_retries(tmp_path: Path) -> None:
    """A 5 MiB tmpfs (1 MiB of it the reserve): the third 1.5 MB version only fits once
    the first is pruned."""
    with tmpfs_daemon(tmp_path, "5m") as (port, _, log_path, _):
        contents = [os.urandom(1_500_000) for _ in range(3)]
        for data in contents:
            status, _, body = request(port, "PUT", "/files/a.bin", data, {"X-Client-Id": "a"})
            assert status in (200, 201), body
        assert request(port, "GET", "/download/a.bin")[2] == contents[2]
        kept = [v["checksum"] for v in
                json.loads(request(port, "GET", "/versions/a.bin")[2])["versions"]]
        assert kept == [sha(contents[1])]                     # the oldest went to make room
        assert "oldest version(s) pruned" in log_path.read_text()


def test_a_disk_full_to_the_last_byte_can_still_be_pruned(tmp_path: Path) -> None:
    """With not one byte free the database cannot record a prune: the reserve is given
    back first."""
    with tmpfs_daemon(tmp_path, "5m") as (port, data, _, pid):
        for content in (os.urandom(1_500_000), os.urandom(1_500_000)):
            assert request(port, "PUT", "/files/a.bin", content, {"X-Client-Id": "a"})[0] in (200, 201)
        filled = subprocess.run(["nsenter", "-t", str(pid), "-m", "sh", "-c",
                                 f"dd if=/dev/zero of={data}/.syncd/filler bs=4096; df -B1 {data}"],
                                capture_output=True, text=True)
        assert " 100% " in filled.stdout, filled.stdout + filled.stderr
        last = os.urandom(1_000_000)
        status, _, body = request(port, "PUT", "/files/a.bin", last, {"X-Client-Id": "a"})
        assert status == 200, body
        assert request(port, "GET", "/download/a.bin")[2] == last


def admin(server: Daemon, *args: str, key_file: Path | None = None,
          expect: int = 0) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, str(ROOT / "syncd.py"), *args, "--server", server.url]
    if key_file is not None:
        command += ["--api-key-file", str(key_file)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == expect, result.stdout + result.stderr
    return result


def test_the_command_line_lists_versions_and_trash_and_restores(daemon: Any, tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("s3cret\n")
    key_file.chmod(0o600)
    server = daemon("--api-key-file", str(key_file))
    auth = {"X-Client-Id": "laptop", "Authorization": "Bearer s3cret"}
    for data in (b"draft", b"final"):
        request(server.port, "PUT", "/files/doc.txt", data, auth)
    for index in range(3):
        request(server.port, "PUT", f"/files/album/{index}.jpg", b"photo %d" % index, auth)
    time.sleep(1.1)
    moment = time.time()
    time.sleep(1.1)
    assert request(server.port, "DELETE", "/files/album?client_id=laptop",
                   headers=auth)[0] == 200
    listing = admin(server, "versions", "doc.txt", key_file=key_file).stdout
    assert "REVISION" in listing and "overwrite" in listing and "laptop" in listing
    as_json = json.loads(admin(server, "versions", "doc.txt", "--json", key_file=key_file).stdout)
    assert [v["checksum"] for v in as_json["versions"]] == [sha(b"draft")]
    trash = admin(server, "trash", "album/", key_file=key_file).stdout
    assert all(f"album/{index}.jpg" in trash for index in range(3))
    admin(server, "restore", "doc.txt", "--revision", "1", key_file=key_file)
    assert (server.data / "doc.txt").read_bytes() == b"draft"
    at_time = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(moment))
    said = admin(server, "restore", "--prefix", "album", "--at-time", at_time,
                 key_file=key_file).stdout
    assert "3 restored" in said
    assert sorted(os.listdir(server.data / "album")) == ["0.jpg", "1.jpg", "2.jpg"]
    refused = admin(server, "restore", "nothing.txt", "--revision", "9", key_file=key_file,
                    expect=1)
    assert "404 not_found" in refused.stderr
    assert "401" in admin(server, "trash", expect=1).stderr                 # no key
    admin(server, "restore", expect=2)                                       # neither PATH nor --prefix
    admin(server, "restore", "--prefix", "album", key_file=key_file, expect=2)   # no moment


def test_a_folder_deleted_on_one_device_comes_back_on_both(clients: Clients) -> None:
    a, b = clients.folder("A"), clients.folder("B")
    for name in ("1.jpg", "2.jpg"):
        write(a, f"album/{name}", name.encode() * 100)
    for name in ("x.txt", "y.txt", "z.txt"):
        write(a, name, name.encode())
    clients.once("A")
    clients.once("B")
    assert tree(b) == tree(a)
    before = json.loads(request(clients.server.port, "GET", "/health")[2])["cursor"]
    shutil.rmtree(a / "album")
    clients.once("A")                                  # A pushes the folder's deletion
    clients.once("B")                                  # B applies it
    assert not (b / "album").exists()
    admin(clients.server, "restore", "--prefix", "album", "--at", str(before))
    clients.once("A")
    clients.once("B")
    assert tree(a)["album/1.jpg"] == tree(b)["album/1.jpg"] == b"1.jpg" * 100
    assert tree(a) == tree(b)
