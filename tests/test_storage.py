"""Storage: a failure at any step of a write leaves the old file and a consistent database."""

from __future__ import annotations

import asyncio
import errno
import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest

import syncd
from conftest import ON_POSTGRES, db_query, error_of, node_tmp, put, sha, sqlite_error, sqlite_only, tmp_files, upload


def db_rows(data_dir: Path, sql: str) -> list[tuple[Any, ...]]:
    return db_query(data_dir, sql)


async def test_upload_is_durable_in_the_database(client: Any, data_dir: Path) -> None:
    await put(client, "a.txt", b"hello")
    assert db_rows(data_dir, "SELECT path, checksum, size, deleted FROM files") == [
        ("a.txt", sha(b"hello"), 5, 0)]
    assert db_rows(data_dir, "SELECT seq, type, path FROM changes") == [(1, "upsert", "a.txt")]
    if not ON_POSTGRES:
        assert db_rows(data_dir, "PRAGMA journal_mode") == [("wal",)]


async def test_epoch_survives_a_restart(app_client: Any) -> None:
    first = await app_client()
    epoch = (await (await first.get("/health")).json())["epoch"]
    await put(first, "a", b"1")
    await first.close()
    second = await app_client()
    body = await (await second.get("/health")).json()
    assert (body["epoch"], body["cursor"], body["files"]) == (epoch, 1, 1)


async def test_leftover_temp_files_are_removed_at_start(app_client: Any, data_dir: Path) -> None:
    first = await app_client()
    await first.close()
    (node_tmp(data_dir) / "upload-crashed").write_bytes(b"partial")
    await app_client()
    assert tmp_files(data_dir) == []


def failing(exc: OSError) -> Any:
    def fail(*args: Any, **kwargs: Any) -> None:
        raise exc
    return fail


@sqlite_only
async def test_failed_commit_puts_the_old_file_back(client: Any, data_dir: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    await put(client, "a.txt", b"old")

    async def broken_upsert(self: Any, *args: Any) -> Any:
        raise sqlite_error(sqlite3.SQLITE_IOERR, "disk I/O error")
    monkeypatch.setattr(syncd.SQLTransaction, "record_upsert", broken_upsert)
    async with client.ws_connect("/ws/desk") as ws:
        await ws.receive_json(timeout=5)
        body = await error_of(await put(client, "a.txt", b"new"), 503)
        assert body["error"] == "storage_unavailable"
        monkeypatch.undo()
        await put(client, "b.txt", b"next")
        assert (await ws.receive_json(timeout=5))["path"] == "b.txt"   # nothing for a.txt
    assert (data_dir / "a.txt").read_bytes() == b"old"
    assert db_rows(data_dir, "SELECT checksum FROM files WHERE path = 'a.txt'") == [(sha(b"old"),)]
    assert tmp_files(data_dir) == []


@sqlite_only
async def test_failed_commit_of_a_new_file_removes_it(client: Any, data_dir: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    async def broken_upsert(self: Any, *args: Any) -> Any:
        raise sqlite_error(sqlite3.SQLITE_BUSY, "database is locked")
    monkeypatch.setattr(syncd.SQLTransaction, "record_upsert", broken_upsert)
    assert (await error_of(await put(client, "new/a.txt", b"x"), 503))["error"] == "storage_unavailable"
    assert not (data_dir / "new" / "a.txt").exists()
    assert tmp_files(data_dir) == []


@sqlite_only
async def test_failed_delete_commit_puts_the_file_back(client: Any, data_dir: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    await put(client, "d/a", b"1")
    await put(client, "d/b", b"2")
    calls = []

    original = syncd.SQLTransaction.record_delete

    async def second_fails(self: Any, live: Any, client_id: str) -> Any:
        calls.append(live.path)
        if len(calls) == 2:
            raise sqlite_error(sqlite3.SQLITE_IOERR, "disk I/O error")
        return await original(self, live, client_id)
    monkeypatch.setattr(syncd.SQLTransaction, "record_delete", second_fails)
    await error_of(await client.delete("/files/d", params={"client_id": "x"}), 503)
    assert (data_dir / "d" / "a").read_bytes() == b"1"
    assert (data_dir / "d" / "b").read_bytes() == b"2"
    assert db_rows(data_dir, "SELECT COUNT(*) FROM files WHERE deleted = 0") == [(2,)]
    assert tmp_files(data_dir) == []


@pytest.mark.parametrize("step", ["write_and_hash", "fsync"])
async def test_disk_full_is_507_and_keeps_the_old_file(client: Any, data_dir: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       step: str) -> None:
    await put(client, "a.txt", b"old")
    full = OSError(errno.ENOSPC, "No space left on device")
    if step == "fsync":
        monkeypatch.setattr(syncd.os, "fsync", failing(full))
    else:
        monkeypatch.setattr(syncd, "write_and_hash", failing(full))
    body = await error_of(await upload(client, "a.txt", b"new"), 507)
    assert body["error"] == "insufficient_storage"
    monkeypatch.undo()
    assert (data_dir / "a.txt").read_bytes() == b"old"
    assert tmp_files(data_dir) == []
    assert (await put(client, "a.txt", b"later")).status == 200


async def test_failed_rename_is_503_and_keeps_the_old_file(client: Any, data_dir: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    await put(client, "a.txt", b"old")
    monkeypatch.setattr(syncd.os, "rename", failing(OSError(errno.EIO, "I/O error")))
    await error_of(await put(client, "a.txt", b"new"), 503)
    monkeypatch.undo()
    assert (data_dir / "a.txt").read_bytes() == b"old"
    assert tmp_files(data_dir) == []
    assert db_rows(data_dir, "SELECT COUNT(*) FROM changes") == [(1,)]


async def test_client_disconnect_mid_upload_leaves_nothing(client: Any, data_dir: Path) -> None:
    import asyncio

    async def body() -> Any:
        yield b"x" * 100_000
        await asyncio.sleep(0.2)
        raise ConnectionResetError("client went away")

    async with client.ws_connect("/ws/watcher") as ws:
        await ws.receive_json(timeout=5)
        with pytest.raises(Exception):
            await client.put("/files/partial.bin", data=body(), headers={"X-Client-Id": "a"})
        for _ in range(100):
            if not tmp_files(data_dir):
                break
            await asyncio.sleep(0.05)
        assert tmp_files(data_dir) == []
        assert not (data_dir / "partial.bin").exists()
        assert db_rows(data_dir, "SELECT COUNT(*) FROM changes") == [(0,)]
        await put(client, "next.txt", b"n", client_id="b")
        assert (await ws.receive_json(timeout=5))["path"] == "next.txt"   # nothing before it


async def test_files_are_plain_files_an_admin_can_read(client: Any, data_dir: Path) -> None:
    await upload(client, "photos/2024/cat.jpg", b"\xff\xd8meow")
    assert (data_dir / "photos" / "2024" / "cat.jpg").read_bytes() == b"\xff\xd8meow"
    assert oct(os.stat(data_dir / "photos" / "2024" / "cat.jpg").st_mode & 0o004) != "0o0"


@sqlite_only
async def test_write_order_is_fsync_new_folders_rename_fsync_folder_then_commit(
        client: Any, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import stat as stat_module
    events: list[str] = []
    real_fsync, real_rename = os.fsync, os.rename
    real_upsert = syncd.SQLTransaction.record_upsert

    def fsync(fd: int) -> None:
        kind = "folder" if stat_module.S_ISDIR(os.fstat(fd).st_mode) else "file"
        events.append(f"fsync {kind}")
        real_fsync(fd)

    def rename(*args: Any, **kwargs: Any) -> None:
        events.append("rename")
        real_rename(*args, **kwargs)

    async def upsert(self: Any, *args: Any) -> Any:
        real_execute = self.sql.db.execute

        async def execute(sql: str, *rest: Any) -> Any:   # the COMMIT statement itself
            if sql == "COMMIT":
                events.append("commit")
                self.sql.db.execute = real_execute
            return await real_execute(sql, *rest)
        self.sql.db.execute = execute
        return await real_upsert(self, *args)
    monkeypatch.setattr(syncd.os, "fsync", fsync)
    monkeypatch.setattr(syncd.os, "rename", rename)
    monkeypatch.setattr(syncd.SQLTransaction, "record_upsert", upsert)
    assert (await put(client, "new/folder/a.txt", b"x")).status == 201
    # new/ and new/folder/ are fsynced as they are made (their entries must be
    # durable before the file is), the file's own folder after the rename
    assert events == ["fsync file", "fsync folder", "fsync folder", "rename", "fsync folder",
                      "commit"]


async def test_a_bug_after_a_group_commit_answers_500_and_the_next_upload_works(
        client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    await put(client, "a.txt", b"old")

    class Broken:
        def inc(self, *args: Any) -> None:
            raise RuntimeError("a bug after the commit")
    monkeypatch.setattr(client.server.app[syncd.STATE].tree.metrics, "uploads", Broken())
    response = await asyncio.wait_for(put(client, "a.txt", b"new"), 20)   # not left waiting
    assert (await error_of(response, 500))["error"] == "internal"
    monkeypatch.undo()
    assert (await put(client, "b.txt", b"next")).status == 201


async def test_temp_files_made_ahead_are_removed_at_close_and_a_failure_to_make_them_is_not_fatal(
        app_client: Any, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    client = await app_client()
    store = client.server.app[syncd.STATE].tree.files
    await put(client, "first.txt", b"x")
    await asyncio.to_thread(lambda: store.writers.submit(lambda: None).result(10))
    spares = [name for name in os.listdir(node_tmp(data_dir)) if name.startswith("spare-")]
    assert len(spares) == syncd.SPARE_TEMP_FILES          # made ahead, by a writer thread
    real_make = syncd.FileStore._make_temp

    def no_spares(self: Any, kind: str = "upload") -> Any:
        if kind == "spare":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_make(self, kind)
    monkeypatch.setattr(syncd.FileStore, "_make_temp", no_spares)
    for index in range(syncd.SPARE_TEMP_FILES + 3):       # the spares run out: made one by one
        assert (await put(client, f"f{index}.txt", b"%d" % index)).status == 201
    monkeypatch.undo()
    await client.close()
    assert os.listdir(node_tmp(data_dir)) == []
