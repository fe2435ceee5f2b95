"""What a tree may hold must never stop the server or be taken for a deletion:
unreadable folders and files, FIFOs and sockets, paths deeper than one walk."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import syncd
from conftest import ROOT, db_query, free_port, http_request, node_tmp, put, recovered, sha, sqlite_only, tmp_files


@pytest.fixture(autouse=True)
def remove_deep_trees(tmp_path: Path) -> Any:
    """rm -rf after each test: pytest's own clean-up recurses, and these trees are deep."""
    yield
    subprocess.run(["rm", "-rf", "--", str(tmp_path)], check=False, timeout=120)


def put_file(port: int, path: str, data: bytes) -> int:
    return http_request(port, "PUT", f"/files/{path}", data, {"X-Client-Id": "desk"})[0]


def deletes(port: int) -> list[str]:
    changes = json.loads(http_request(port, "GET", "/changes")[2])["changes"]
    return [change["path"] for change in changes if change["type"] == "delete"]


def seed_ten_files(daemon: Any, base: Path) -> None:
    """Ten files, two of them in secret/, stored by a daemon running as nobody."""
    server = daemon(base=base, as_nobody=True)
    for index in range(8):
        assert put_file(server.port, f"f{index}.txt", b"%d" % index) == 201
    for name in ("a", "b"):
        assert put_file(server.port, f"secret/{name}.txt", name.encode()) == 201
    assert server.stop() == 0


@pytest.mark.parametrize("mode", [0o000, 0o444], ids=["no-permission", "read-no-execute"])
def test_unreadable_folder_at_start_is_reported_never_tombstoned(daemon: Any, nobody_dir: Path,
                                                                  mode: int) -> None:
    seed_ten_files(daemon, nobody_dir)
    os.chmod(nobody_dir / "data" / "secret", mode)
    server = daemon(base=nobody_dir, as_nobody=True)
    syncd_log = lambda: server.log()          # noqa: E731
    assert http_request(server.port, "GET", "/health")[0] == 200
    assert deletes(server.port) == []
    listed = json.loads(http_request(server.port, "GET", "/files")[2])["files"]
    assert len(listed) == 10                  # still there: we could not look, not "gone"
    from conftest import wait_until
    wait_until(lambda: "cannot be read" in syncd_log(), "the unreadable report")
    assert "secret" in server.log() and "Traceback" not in server.log()
    assert "0 gone (tombstoned)" in server.log()


def test_unreadable_new_file_at_start_is_skipped_and_reported(daemon: Any,
                                                              nobody_dir: Path) -> None:
    seed_ten_files(daemon, nobody_dir)
    locked = nobody_dir / "data" / "locked.txt"
    locked.write_bytes(b"private")
    os.chown(locked, 0, 0)
    os.chmod(locked, 0o600)                   # root's: nobody cannot read it
    server = daemon(base=nobody_dir, as_nobody=True)
    from conftest import wait_until
    wait_until(lambda: "recovery: " in server.log() and "unreadable" in server.log(),
               "the recovery summary")
    assert "1 unreadable" in server.log() and "locked.txt" in server.log()
    assert server.process.poll() is None and http_request(server.port, "GET", "/health")[0] == 200
    assert deletes(server.port) == []
    assert "Traceback" not in server.log()


async def test_a_folder_in_tmp_does_not_stop_start_up(app_client: Any, data_dir: Path) -> None:
    client = await app_client()
    await put(client, "a.txt", b"a")
    await client.close()
    (node_tmp(data_dir) / "stray").mkdir()
    (node_tmp(data_dir) / "upload-7").write_bytes(b"half")
    client = await recovered(await app_client())
    assert (await client.get("/download/a.txt")).status == 200
    assert tmp_files(data_dir) == ["stray"]


@pytest.mark.parametrize("path", [
    "/".join(["a"] * 2048),                          # 4,095 bytes, 2,048 levels
    "/".join(["n" * 255] * 16),                      # 4,095 bytes; absolute: over PATH_MAX
], ids=["2048-levels", "16-long-names"])
async def test_deepest_and_longest_valid_path_survives_a_restart(app_client: Any,
                                                                data_dir: Path, path: str) -> None:
    client = await app_client()
    assert len(path.encode()) == 4095
    assert (await put(client, path, b"deep")).status == 201
    assert (await put(client, "top.txt", b"top")).status == 201
    await client.close()
    client = await recovered(await app_client())
    response = await client.get(f"/download/{path}")
    assert response.status == 200 and await response.read() == b"deep"
    changes = (await (await client.get("/changes")).json())["changes"]
    assert [c["type"] for c in changes] == ["upsert", "upsert"]
    assert (await client.delete(f"/files/{path}", params={"client_id": "x"})).status == 200
    assert sorted(os.listdir(data_dir)) == [".syncd", "top.txt"]   # every empty folder pruned


async def test_deep_tree_added_behind_our_back_is_journalled(app_client: Any,
                                                            data_dir: Path) -> None:
    client = await app_client()
    await client.close()
    # a comb: every level has a file and a deeper folder, so the walk must come back up
    # to folders whose descriptors it closed
    folder = data_dir
    for depth in range(300):
        folder = folder / "d"
        folder.mkdir()
        (folder.parent / f"f{depth}").write_bytes(b"%d" % depth)
    client = await recovered(await app_client())
    listed = (await (await client.get("/files")).json())["files"]
    assert len(listed) == 300


def make_deep(base: Path, names: list[str], leaf: str) -> None:
    """Folders names[0]/names[1]/... under base, with a file leaf at the bottom, made
    with descriptors (the path may be longer than the OS takes in one piece)."""
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
    for name in names:
        os.mkdir(name, dir_fd=fd)
        child = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = child
    os.close(os.open(leaf, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    os.close(fd)


def test_scan_keeps_few_descriptors_open_however_deep(tmp_path: Path) -> None:
    make_deep(tmp_path, ["x"] * 1000, "leaf")
    before = len(os.listdir("/proc/self/fd"))
    opened: list[int] = []
    real_open = os.open

    def counting_open(*args: Any, **kwargs: Any) -> int:
        fd = real_open(*args, **kwargs)
        opened.append(len(os.listdir("/proc/self/fd")))
        return fd
    syncd_os_open = syncd.os.open
    try:
        syncd.os.open = counting_open
        scan = syncd.scan_tree(tmp_path)
    finally:
        syncd.os.open = syncd_os_open
    assert list(scan.found) == ["/".join(["x"] * 1000) + "/leaf"]
    assert max(opened) - before <= syncd.WALK_OPEN_FOLDERS + 8
    assert len(os.listdir("/proc/self/fd")) == before


async def test_fifo_in_the_tree_is_skipped_and_never_opened(app_client: Any,
                                                           data_dir: Path) -> None:
    client = await app_client()
    await put(client, "a.txt", b"a")
    await put(client, "pipe", b"was a file")
    await client.close()
    os.unlink(data_dir / "pipe")
    os.mkfifo(data_dir / "pipe")              # where a recorded file was
    os.mkfifo(data_dir / "pipe2")             # with no record at all
    client = await recovered(await app_client())
    changes = (await (await client.get("/changes")).json())["changes"]
    assert [c["type"] for c in changes] == ["upsert", "upsert"]   # not tombstoned, not added
    for name in ("pipe", "pipe2"):
        response = await asyncio.wait_for(client.get(f"/download/{name}"), 5)
        assert response.status == 404
    assert (await asyncio.wait_for(client.get("/health"), 5)).status == 200


async def test_fifo_swapped_in_while_serving_does_not_freeze_the_loop(client: Any,
                                                                     data_dir: Path) -> None:
    await put(client, "pipe", b"was a file")
    os.unlink(data_dir / "pipe")
    os.mkfifo(data_dir / "pipe")
    response = await asyncio.wait_for(client.get("/download/pipe"), 5)
    assert response.status == 404
    assert (await asyncio.wait_for(client.get("/health"), 5)).status == 200


async def test_unix_socket_in_the_tree_is_a_404_not_a_500(client: Any, data_dir: Path) -> None:
    await put(client, "sock", b"was a file")
    os.unlink(data_dir / "sock")
    listener = socket.socket(socket.AF_UNIX)
    try:
        listener.bind(str(data_dir / "sock"))
        response = await client.get("/download/sock")
        assert response.status == 404
        assert (await response.json())["error"] == "not_found"
    finally:
        listener.close()


def test_unusable_database_exits_4_with_one_clear_line(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / ".syncd").mkdir(parents=True)
    (data / ".syncd" / "syncd.db").write_bytes(b"this is not a database" * 100)
    result = subprocess.run([sys.executable, str(ROOT / "syncd.py"), "--port", str(free_port()),
                             "--sync-directory", str(data)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == syncd.EXIT_STORAGE
    errors = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "database" in errors[0]
    assert "Traceback" not in result.stderr


@sqlite_only
async def test_state_folder_and_database_are_private(app_client: Any, data_dir: Path) -> None:
    old = os.umask(0o022)
    try:
        client = await app_client()
        await put(client, "shared/a.txt", b"a")
    finally:
        os.umask(old)
    state = data_dir / ".syncd"
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(state / "tmp").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(state / "syncd.db").st_mode) == 0o600
    # the tree itself follows the umask, as any other program's files would
    assert stat.S_IMODE(os.stat(data_dir / "shared").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(data_dir / "shared" / "a.txt").st_mode) == 0o644


async def test_an_old_world_readable_state_folder_is_made_private(app_client: Any,
                                                                 data_dir: Path) -> None:
    (data_dir / ".syncd").mkdir(parents=True, mode=0o755)
    os.chmod(data_dir / ".syncd", 0o755)
    await app_client()
    assert stat.S_IMODE(os.stat(data_dir / ".syncd").st_mode) == 0o700


def hold_rehash(monkeypatch: pytest.MonkeyPatch, before: bool) -> asyncio.Event:
    """Make the background rehash wait, before or after hashing each file, until the
    returned event is set (from the test's loop)."""
    release = asyncio.Event()
    real = syncd.hash_for_recovery
    loop = asyncio.get_running_loop()

    def held(files: Any, path: str) -> Any:
        if before:
            asyncio.run_coroutine_threadsafe(release.wait(), loop).result(timeout=30)
        result = real(files, path)
        if not before:
            asyncio.run_coroutine_threadsafe(release.wait(), loop).result(timeout=30)
        return result
    monkeypatch.setattr(syncd, "hash_for_recovery", held)
    return release


async def test_big_changed_file_is_hashed_after_the_server_listens(app_client: Any,
                                                                  data_dir: Path,
                                                                  monkeypatch: Any) -> None:
    client = await app_client()
    await put(client, "small.txt", b"s")
    await client.close()
    (data_dir / "big.bin").write_bytes(b"b" * 1000)
    release = hold_rehash(monkeypatch, before=True)
    client = await app_client()                # serves while big.bin is still being hashed
    assert (await client.get("/health")).status == 200
    assert (await client.get("/download/small.txt")).status == 200
    assert (await client.get("/download/big.bin")).status == 404
    ws = await client.ws_connect("/ws/watcher")
    await ws.receive_json()                    # hello
    release.set()
    await recovered(client)
    event = await ws.receive_json(timeout=5)
    assert (event["type"], event["path"], event["client_id"]) == ("file_changed", "big.bin", "server")
    assert event["checksum"] == sha(b"b" * 1000)
    await ws.close()


async def test_a_client_write_during_the_rehash_wins(app_client: Any, data_dir: Path,
                                                     monkeypatch: Any) -> None:
    client = await app_client()
    await put(client, "doc.txt", b"v1")
    await client.close()
    (data_dir / "doc.txt").write_bytes(b"edited by the admin")
    release = hold_rehash(monkeypatch, before=False)   # hashes the admin's edit, waits
    client = await app_client()
    assert (await put(client, "doc.txt", b"v2 from a client")).status == 200   # ...then this
    release.set()
    await recovered(client)
    response = await client.get("/download/doc.txt")
    assert await response.read() == b"v2 from a client"
    assert response.headers["ETag"] == f'"{sha(b"v2 from a client")}"'
    assert db_query(data_dir, "SELECT checksum FROM files WHERE path = 'doc.txt'") == [
        (sha(b"v2 from a client"),)]


async def test_a_file_changed_behind_our_back_is_503_until_rehashed(app_client: Any,
                                                                   data_dir: Path,
                                                                   monkeypatch: Any) -> None:
    client = await app_client()
    await put(client, "doc.txt", b"as recorded")
    await put(client, "other.txt", b"untouched")
    await client.close()
    (data_dir / "doc.txt").write_bytes(b"edited while syncd was stopped")
    release = hold_rehash(monkeypatch, before=True)
    client = await app_client()
    response = await client.get("/download/doc.txt")     # never new bytes with the old ETag
    assert response.status == 503 and response.headers["Retry-After"] == "5"
    assert (await response.json())["error"] == "storage_unavailable"
    assert (await client.get("/download/other.txt")).status == 200
    release.set()
    await recovered(client)
    response = await client.get("/download/doc.txt")
    assert response.status == 200 and await response.read() == b"edited while syncd was stopped"
    assert response.headers["ETag"] == f'"{sha(b"edited while syncd was stopped")}"'
    assert client.server.app[syncd.STATE].tree.rehashing == set()


async def test_a_client_write_ends_the_503_of_its_path_at_once(app_client: Any, data_dir: Path,
                                                              monkeypatch: Any) -> None:
    client = await app_client()
    await put(client, "doc.txt", b"as recorded")
    await client.close()
    (data_dir / "doc.txt").write_bytes(b"edited while syncd was stopped")
    release = hold_rehash(monkeypatch, before=True)
    client = await app_client()
    assert (await client.get("/download/doc.txt")).status == 503
    assert (await put(client, "doc.txt", b"v2 from a client")).status == 200
    response = await client.get("/download/doc.txt")    # the rehash is still held
    assert response.status == 200 and await response.read() == b"v2 from a client"
    release.set()
    await recovered(client)
