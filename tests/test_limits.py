"""What one client (or many) can make the server spend: connections, /sync memory,
/health, and how long a big delete holds others up."""

from __future__ import annotations

import asyncio
import errno
import json
import resource
import socket
from pathlib import Path
from typing import Any

import pytest

import syncd
from conftest import db_query, http_request, put, sqlite_only, wait_until


def db_totals(data_dir: Path) -> tuple[int, int]:
    (row,) = db_query(data_dir, "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM files"
                                " WHERE deleted = 0")
    return int(row[0]), int(row[1])


@sqlite_only       # counts the statements on SQLite's reader connection
async def test_health_keeps_its_counters_in_memory(client: Any) -> None:
    await put(client, "a", b"a")
    store = client.server.app[syncd.STATE].tree.store
    statements: list[str] = []
    await store.reader.set_trace_callback(statements.append)
    try:
        for _ in range(50):
            response = await client.get("/health")
            assert (await response.json())["files"] == 1
        await client.get("/metrics")
    finally:
        await store.reader.set_trace_callback(None)
    assert not any("COUNT" in statement.upper() for statement in statements), statements
    assert len(statements) <= 3              # the liveness query, at most once a second


async def test_live_counters_follow_every_kind_of_change(app_client: Any, data_dir: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    client = await app_client()
    await put(client, "a", b"aaaa")
    await put(client, "a", b"aa")                      # overwrite: one file, fewer bytes
    await put(client, "a", b"aa")                      # the same bytes again
    for index in range(5):
        await put(client, f"dir/{index}", b"x" * index)
    await client.delete("/files/dir/1", params={"client_id": "x"})
    await put(client, "dir/1", b"back")                # re-created after its tombstone
    await client.delete("/files/dir", params={"client_id": "x"})
    await put(client, "b", b"bbb")
    real = syncd.SQLTransaction.record_upsert

    async def failing(*args: Any) -> Any:              # the row is written, the commit fails
        await real(*args)
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(syncd.SQLTransaction, "record_upsert", failing)
    assert (await put(client, "c", b"never")).status == 503
    monkeypatch.undo()

    async def reported() -> tuple[int, int]:
        health = await (await client.get("/health")).json()
        metrics = await (await client.get("/metrics")).text()
        stored = next(line for line in metrics.splitlines()
                      if line.startswith("syncd_stored_bytes "))
        return health["files"], int(float(stored.split()[1]))
    assert await reported() == db_totals(data_dir) == (2, 5)
    await client.close()
    (data_dir / "added-by-admin").write_bytes(b"12345")
    client = await app_client()
    await client.server.app[syncd.STATE].tree.recovery
    assert await reported() == db_totals(data_dir) == (3, 10)


async def test_a_big_folder_delete_lets_downloads_through_between_batches(client: Any) -> None:
    store = client.server.app[syncd.STATE].tree.store
    await put(client, "other.txt", b"read me")
    for index in range(3 * syncd.DELETE_BATCH + 17):
        await put(client, f"big/{index % 7}/{index}", b"%d" % index)
    first, final = store.cursor, store.cursor + 3 * syncd.DELETE_BATCH + 17
    seen: list[int] = []
    deleting = asyncio.ensure_future(client.delete("/files/big", params={"client_id": "x"}))

    async def keep_downloading() -> None:
        while not deleting.done():
            response = await client.get("/download/other.txt")
            assert response.status == 200 and await response.read() == b"read me"
            seen.append(store.cursor)
    await asyncio.gather(*(keep_downloading() for _ in range(4)))
    response = await deleting
    body = await response.json()
    assert (body["deleted"], body["revision"]) == (3 * syncd.DELETE_BATCH + 17, final)
    assert any(first < cursor < final for cursor in seen), "no download between two batches"
    listed = (await (await client.get("/files")).json())["files"]
    assert [f["path"] for f in listed] == ["other.txt"]


async def test_a_file_written_into_the_folder_during_its_delete_stays(
        client: Any, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for index in range(syncd.DELETE_BATCH + 5):
        await put(client, f"big/{index}", b"old")
    late = sorted(f"big/{index}" for index in range(syncd.DELETE_BATCH + 5))[-1]   # last batch
    real = syncd.Tree.finish_delete_batch
    calls = 0

    async def write_after_first_batch(*args: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:          # between two batches, with the lock free: a client writes
            assert (await put(client, late, b"new")).status == 200
        await real(*args)
    monkeypatch.setattr(syncd.Tree, "finish_delete_batch", write_after_first_batch)
    body = await (await client.delete("/files/big", params={"client_id": "x"})).json()
    assert body["deleted"] == syncd.DELETE_BATCH + 4
    listed = (await (await client.get("/files")).json())["files"]
    assert [f["path"] for f in listed] == [late]
    assert (data_dir / late).read_bytes() == b"new"


async def test_a_slow_but_steady_json_body_gets_through(app_client: Any) -> None:
    client = await app_client(upload_idle_timeout=1.0)
    text = json.dumps({"client_id": "slow-link", "files": [
        {"path": "a.txt", "checksum": "0" * 64, "size": 1, "modified_time": 1}]}).encode()

    async def trickle() -> Any:               # 30 pieces 0.1 s apart: 3 s in all, never silent
        step = len(text) // 30 + 1
        for start in range(0, len(text), step):
            yield text[start:start + step]
            await asyncio.sleep(0.1)
    response = await client.post("/sync", data=trickle(),
                                 headers={"Content-Type": "application/json"})
    assert response.status == 200, await response.text()
    assert (await response.json())["upload"] == ["a.txt"]


async def test_a_silent_json_body_still_gets_408(app_client: Any) -> None:
    client = await app_client(upload_idle_timeout=0.5)

    async def stall() -> Any:
        yield b'{"client_id": '
        await asyncio.sleep(3)
        yield b'"x", "files": []}'
    response = await client.post("/sync", data=stall(), headers={"Content-Type": "application/json"})
    assert response.status == 408


async def test_a_json_body_over_the_limit_is_413(app_client: Any,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(syncd, "JSON_BODY_LIMIT", 1000)
    monkeypatch.setattr(syncd.read_body, "__defaults__", (1000,))
    client = await app_client()

    async def chunked() -> Any:                 # no Content-Length: counted as it arrives
        for _ in range(20):
            yield b" " * 100
    response = await client.post("/sync", data=chunked())
    assert response.status == 413 and (await response.json())["error"] == "too_large"


def limit_open_files() -> None:
    """In the daemon's child process: 1,024 open files, soft and hard (a quick start by hand
    outside systemd, where the soft limit cannot be raised)."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))


def test_connections_past_the_descriptor_limit_get_503_and_one_warning(daemon: Any) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1300:                       # the test itself holds 1,100 sockets
        if hard != resource.RLIM_INFINITY and hard < 1300:
            pytest.skip(f"this process may open only {hard} files")
        resource.setrlimit(resource.RLIMIT_NOFILE, (1300, hard))
    server = daemon(preexec_fn=limit_open_files)
    cap = syncd.connection_cap(16384, 1024)
    assert 100 < cap < 1024 and f"serving at most {cap} connections" in server.log()
    idle = []
    try:
        for _ in range(1100):
            idle.append(socket.create_connection(("127.0.0.1", server.port), timeout=10))
        status, headers, body = http_request(server.port, "GET", "/health", timeout=10)
        assert status == 503 and json.loads(body)["error"] == "too_many_connections"
        for _ in range(50):
            assert http_request(server.port, "GET", "/health", timeout=10)[0] == 503
    finally:
        for sock in idle:
            sock.close()
    wait_until(lambda: http_request(server.port, "GET", "/health", timeout=10)[0] == 200,
               "the server to accept again")
    log = server.log()
    assert "Traceback" not in log and "Too many open files" not in log
    assert log.count("refusing new ones") == 1
    assert server.stop() == 0
