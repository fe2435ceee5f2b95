"""Faults injected at each step of a write; stalled and abusive clients."""

from __future__ import annotations

import asyncio
import errno
import os
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import syncd
from conftest import database_error, db_query, error_of, put, sha, sqlite_error, sqlite_only, tmp_files, upload


def db_rows(data_dir: Path, sql: str) -> list[tuple[Any, ...]]:
    return db_query(data_dir, sql)


class Fault:
    """Make one step of a write raise, once armed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, step: str, exc: BaseException) -> None:
        self.exc, self.armed = exc, False
        target, name = {
            "write": (syncd, "write_all"),
            "fsync": (syncd.os, "fsync"),
            "link": (syncd.os, "link"),
            "rename": (syncd.os, "rename"),
            "journal": (syncd.SQLTransaction, "record_upsert"),
            "commit": (syncd.SQLTransaction, "flush"),
        }[step]
        real = getattr(target, name)
        fault = self

        if step == "commit":     # at the commit, after every row was written
            async def failing_commit(tx: Any) -> None:
                await real(tx)
                if fault.armed:
                    raise fault.exc
            monkeypatch.setattr(target, name, failing_commit)
        elif step == "journal":
            async def failing_async(*args: Any) -> Any:
                if fault.armed:
                    raise fault.exc
                return await real(*args)
            monkeypatch.setattr(target, name, failing_async)
        else:
            def failing(*args: Any, **kwargs: Any) -> Any:
                if fault.armed:
                    raise fault.exc
                return real(*args, **kwargs)
            monkeypatch.setattr(target, name, failing)


STEPS = ["write", "fsync", "link", "rename", "journal", "commit"]
FAULTS = [
    (OSError(errno.ENOSPC, "No space left on device"), 507, "insufficient_storage"),
    (OSError(errno.EIO, "Input/output error"), 503, "storage_unavailable"),
]


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("exc,status,code", FAULTS, ids=["ENOSPC", "EIO"])
async def test_a_fault_at_any_step_leaves_the_old_file(client: Any, data_dir: Path,
                                                       monkeypatch: pytest.MonkeyPatch, step: str,
                                                       exc: OSError, status: int, code: str) -> None:
    await put(client, "doc.txt", b"old version")
    fault = Fault(monkeypatch, step, exc if step not in ("journal", "commit")
                  else database_error(full=exc.errno == errno.ENOSPC))
    async with client.ws_connect("/ws/watcher") as ws:
        await ws.receive_json(timeout=5)
        fault.armed = True
        body = await error_of(await upload(client, "doc.txt", b"new version"), status)
        assert body["error"] == code
        fault.armed = False
        assert (data_dir / "doc.txt").read_bytes() == b"old version"
        assert tmp_files(data_dir) == []
        assert db_rows(data_dir, "SELECT checksum FROM files") == [(sha(b"old version"),)]
        assert db_rows(data_dir, "SELECT COUNT(*) FROM changes") == [(1,)]
        assert (await put(client, "doc.txt", b"later")).status == 200       # and then it works
        event = await ws.receive_json(timeout=5)
        assert (event["revision"], event["checksum"]) == (2, sha(b"later"))  # nothing in between


async def test_a_fault_on_the_folder_fsync_removes_the_new_file(client: Any, data_dir: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import stat as stat_module
    real = os.fsync

    def fail_on_folders(fd: int) -> None:
        if stat_module.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EIO, "Input/output error")
        real(fd)
    monkeypatch.setattr(syncd.os, "fsync", fail_on_folders)
    await error_of(await put(client, "d/new.txt", b"x"), 503)
    monkeypatch.undo()
    assert not (data_dir / "d" / "new.txt").exists()
    assert db_rows(data_dir, "SELECT COUNT(*) FROM files") == [(0,)] and tmp_files(data_dir) == []


async def test_a_fault_during_delete_keeps_the_file(client: Any, data_dir: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    await put(client, "a.txt", b"keep me")

    async def failing(*args: Any) -> Any:
        raise database_error(full=True)
    monkeypatch.setattr(syncd.SQLTransaction, "record_delete", failing)
    body = await error_of(await client.delete("/files/a.txt", params={"client_id": "x"}), 507)
    assert body["error"] == "insufficient_storage"
    assert (data_dir / "a.txt").read_bytes() == b"keep me" and tmp_files(data_dir) == []


@sqlite_only
async def test_read_only_storage_refuses_writes_and_serves_reads(client: Any, data_dir: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    await put(client, "a.txt", b"readable")
    real_open = os.open

    def read_only(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, "Read-only file system")
        return real_open(path, flags, *args, **kwargs)

    def no_rename(*args: Any, **kwargs: Any) -> None:    # a temp file made ahead is open already
        raise OSError(errno.EROFS, "Read-only file system")

    async def read_only_db(*args: Any) -> Any:
        raise sqlite_error(sqlite3.SQLITE_READONLY, "attempt to write a readonly database")
    monkeypatch.setattr(syncd.os, "open", read_only)
    monkeypatch.setattr(syncd.os, "rename", no_rename)
    monkeypatch.setattr(syncd.SQLStore, "touch_client", read_only_db)
    body = await error_of(await put(client, "b.txt", b"x"), 503)
    assert body["error"] == "storage_unavailable" and "read-only" in body["message"]
    assert (await error_of(await upload(client, "b.txt", b"x"), 503))["error"] == "storage_unavailable"
    download = await client.get("/download/a.txt")
    assert download.status == 200 and await download.read() == b"readable"
    assert (await client.get("/files")).status == 200
    sync = await client.post("/sync", json={"client_id": "x", "files": []})
    assert sync.status == 200 and len((await sync.json())["download"]) == 1


# -- stalled clients ------------------------------------------------------------------

async def test_stalled_upload_body_is_cut_off_and_leaves_nothing(app_client: Any, data_dir: Path) -> None:
    client = await app_client(upload_idle_timeout=0.3)
    stalled = asyncio.Event()

    async def body() -> Any:
        yield b"x" * 100_000
        stalled.set()
        await asyncio.sleep(30)
        yield b"never"

    async with client.ws_connect("/ws/watcher") as ws:
        await ws.receive_json(timeout=5)
        response = await asyncio.wait_for(
            client.put("/files/slow.bin", data=body(), headers={"X-Client-Id": "slow"}), 10)
        assert (await error_of(response, 408))["error"] == "request_timeout"
        assert stalled.is_set()
        assert tmp_files(data_dir) == [] and not (data_dir / "slow.bin").exists()
        assert db_rows(data_dir, "SELECT COUNT(*) FROM changes") == [(0,)]
        await put(client, "fine.txt", b"ok", client_id="other")
        assert (await ws.receive_json(timeout=5))["path"] == "fine.txt"   # nothing for slow.bin


async def test_stalled_multipart_is_cut_off(app_client: Any, data_dir: Path) -> None:
    client = await app_client(upload_idle_timeout=0.3)
    boundary = "b0undary"

    async def body() -> Any:
        yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"relative_path\"\r\n\r\n"
               f"slow.bin\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
               f"filename=\"f\"\r\n\r\n").encode() + b"x" * 1000
        await asyncio.sleep(30)

    response = await asyncio.wait_for(client.post(
        "/upload", data=body(),
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}), 10)
    assert (await error_of(response, 408))["error"] == "request_timeout"
    assert tmp_files(data_dir) == []


async def test_stalled_json_body_is_cut_off(app_client: Any) -> None:
    client = await app_client(upload_idle_timeout=0.3)

    async def body() -> Any:
        yield b'{"client_id": "x", "fi'
        await asyncio.sleep(30)

    response = await asyncio.wait_for(client.post(
        "/sync", data=body(), headers={"Content-Type": "application/json"}), 10)
    assert (await error_of(response, 408))["error"] == "request_timeout"


# -- WebSocket limits -----------------------------------------------------------------

async def test_websocket_connections_are_capped(app_client: Any) -> None:
    client = await app_client(max_websocket_clients=2)
    first = await client.ws_connect("/ws/one")
    second = await client.ws_connect("/ws/two")
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await client.ws_connect("/ws/three")
    assert info.value.status == 503
    response = await client.get("/ws/three")
    assert (await response.json())["error"] == "too_many_clients"
    again = await client.ws_connect("/ws/two")          # a replacement is not one more
    assert (await again.receive_json(timeout=5))["type"] == "hello"
    for ws in (first, second, again):
        await ws.close()


async def test_a_client_flooding_messages_is_closed_1008(client: Any) -> None:
    async with client.ws_connect("/ws/calm") as calm, client.ws_connect("/ws/flood") as flood:
        await calm.receive_json(timeout=5)
        await flood.receive_json(timeout=5)
        for _ in range(int(syncd.WS_MESSAGE_BURST) + 50):
            await flood.send_json({"type": "heartbeat"})
        closed = None
        for _ in range(500):
            message = await flood.receive(timeout=5)
            if message.type == aiohttp.WSMsgType.CLOSE:
                closed = message.data
                break
        assert closed == syncd.WS_CLOSE_POLICY
        await calm.send_json({"type": "heartbeat"})
        replies = [await calm.receive_json(timeout=5) for _ in range(2)]
        assert {"type": "client_left", "client_id": "flood"} in replies
        assert any(reply["type"] == "heartbeat_ack" for reply in replies)


async def test_a_client_within_the_rate_is_not_closed(client: Any) -> None:
    async with client.ws_connect("/ws/chatty") as ws:
        await ws.receive_json(timeout=5)
        for _ in range(int(syncd.WS_MESSAGE_BURST) - 10):
            await ws.send_json({"type": "heartbeat"})
        for _ in range(int(syncd.WS_MESSAGE_BURST) - 10):
            assert (await ws.receive_json(timeout=5))["type"] == "heartbeat_ack"
