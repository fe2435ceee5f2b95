"""Start-up recovery: the database is reconciled with the tree it serves."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import syncd
from conftest import ROOT, free_port, make_config, node_tmp, put, recovered, sha, sqlite_only, tmp_files


async def restart(app_client: Any, current: Any, **overrides: Any) -> Any:
    await current.close()
    return await recovered(await app_client(**overrides))


async def changes(client: Any) -> list[dict[str, Any]]:
    return (await (await client.get("/changes")).json())["changes"]


@pytest.fixture
def count_hashes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    hashed: list[str] = []
    real = syncd.hash_on_disk

    def counting(files: Any, path: str) -> Any:
        hashed.append(path)
        return real(files, path)
    monkeypatch.setattr(syncd, "hash_on_disk", counting)
    return hashed


async def test_unchanged_files_are_not_reread(app_client: Any, count_hashes: list[str]) -> None:
    client = await app_client()
    for index in range(50):
        await put(client, f"d{index % 5}/f{index}", b"%d" % index)
    client = await restart(app_client, client)
    assert count_hashes == []
    assert len(await changes(client)) == 50


async def test_file_added_behind_our_back_is_journalled(app_client: Any, data_dir: Path) -> None:
    client = await app_client()
    await put(client, "a.txt", b"a")
    (data_dir / "new" / "deep").mkdir(parents=True)
    (data_dir / "new" / "deep" / "b.txt").write_bytes(b"bee")
    client = await restart(app_client, client)
    last = (await changes(client))[-1]
    assert (last["type"], last["path"], last["client_id"]) == ("upsert", "new/deep/b.txt", "server")
    assert last["checksum"] == sha(b"bee") and last["size"] == 3
    response = await client.get("/download/new/deep/b.txt")
    assert await response.read() == b"bee"


async def test_file_changed_behind_our_back_is_journalled(app_client: Any, data_dir: Path) -> None:
    client = await app_client()
    await put(client, "a.txt", b"old")
    (data_dir / "a.txt").write_bytes(b"edited by the admin")
    client = await restart(app_client, client)
    last = (await changes(client))[-1]
    assert (last["seq"], last["client_id"], last["checksum"]) == (
        2, "server", sha(b"edited by the admin"))
    response = await client.get("/download/a.txt")
    assert response.headers["ETag"] == f'"{sha(b"edited by the admin")}"'


async def test_touched_file_is_not_a_change_and_is_read_once(app_client: Any, data_dir: Path,
                                                            count_hashes: list[str]) -> None:
    client = await app_client()
    await put(client, "a.txt", b"same")
    os.utime(data_dir / "a.txt", (1_000_000_000, 1_000_000_000))
    client = await restart(app_client, client)
    assert count_hashes == ["a.txt"] and len(await changes(client)) == 1
    client = await restart(app_client, client)
    assert count_hashes == ["a.txt"]          # its new mtime was noted: not read again


async def test_file_gone_behind_our_back_gets_a_tombstone(app_client: Any, data_dir: Path) -> None:
    client = await app_client()
    for name in ("a", "b", "c", "d"):
        await put(client, name, name.encode())
    (data_dir / "b").unlink()
    client = await restart(app_client, client)
    last = (await changes(client))[-1]
    assert (last["type"], last["path"], last["client_id"]) == ("delete", "b", "server")
    plan = await (await client.post("/sync", json={"client_id": "x", "files": [
        {"path": "b", "checksum": sha(b"b"), "size": 1, "modified_time": 1,
         "base_checksum": sha(b"b")}]})).json()
    assert plan["delete"] == [{"path": "b", "revision": 5}]


async def test_most_files_gone_refuses_to_start_and_changes_nothing(
        tmp_path: Path, aiohttp_client: Any, aiohttp_server: Any) -> None:
    config = make_config(tmp_path)
    client = await aiohttp_client(syncd.make_app(config))
    for name in ("a", "b", "c", "d"):
        await put(client, name, name.encode())
    await client.close()
    for name in ("a", "b", "c"):
        (tmp_path / "data" / name).unlink()
    with pytest.raises(syncd.MassVanish) as info:     # a server only: no client to leak
        await aiohttp_server(syncd.make_app(config))
    assert "3 of the 4 files" in str(info.value) and "--accept-deletions" in str(info.value)
    with sqlite3.connect(tmp_path / "data" / ".syncd" / "syncd.db") as db:
        assert db.execute("SELECT COUNT(*) FROM files WHERE deleted = 0").fetchone() == (4,)
    client = await aiohttp_client(syncd.make_app(config, accept_deletions=True))
    assert [c["path"] for c in await changes(client) if c["type"] == "delete"] == ["a", "b", "c"]


def test_mass_vanish_exits_3_with_one_clear_line(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / ".syncd").mkdir(parents=True)
    db = sqlite3.connect(data / ".syncd" / "syncd.db")
    db.executescript(syncd.SCHEMA)
    db.executemany("INSERT INTO files (path, fold, checksum, size, modified_time, revision,"
                   " deleted, time, client_id) VALUES (?, ?, ?, 1, 1, 1, 0, 1, 'x')",
                   [(f"f{i}", f"f{i}", "0" * 64) for i in range(10)])
    db.commit()
    db.close()
    command = [sys.executable, str(ROOT / "syncd.py"), "--port", str(free_port()),
               "--sync-directory", str(data)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert result.returncode == syncd.EXIT_MASS_VANISH
    errors = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "10 of the 10 files" in errors[0] and "unmounted" in errors[0]
    assert "Traceback" not in result.stderr


def test_is_mass_vanish_thresholds() -> None:
    assert not syncd.is_mass_vanish(1, 1)       # one file deleted by hand is a deletion
    assert not syncd.is_mass_vanish(2, 4)
    assert syncd.is_mass_vanish(3, 4)
    assert syncd.is_mass_vanish(2, 2)
    assert not syncd.is_mass_vanish(0, 0)


async def test_unservable_names_are_skipped_not_journalled(app_client: Any, data_dir: Path,
                                                           tmp_path: Path) -> None:
    client = await app_client()
    await put(client, "ok.txt", b"x")
    (data_dir / "back\\slash").write_bytes(b"1")
    (data_dir / "cafe\u0301.txt").write_bytes(b"2")             # NFD on disk
    (data_dir / "link").symlink_to(tmp_path)
    (data_dir / "filelink").symlink_to(data_dir / "ok.txt")
    client = await restart(app_client, client)
    assert [c["path"] for c in await changes(client)] == ["ok.txt"]


async def test_leftover_backup_and_parked_files_are_removed(app_client: Any, data_dir: Path) -> None:
    client = await app_client()
    await client.close()
    for name in ("upload-1", "old-2", "del-3"):
        (node_tmp(data_dir) / name).write_bytes(b"x")
    await app_client()
    assert tmp_files(data_dir) == []


@sqlite_only
async def test_database_of_an_older_syncd_is_migrated(app_client: Any, data_dir: Path) -> None:
    (data_dir / ".syncd").mkdir(parents=True)
    old_schema = syncd.SCHEMA.replace(",\n    mtime_ns      INTEGER NOT NULL DEFAULT -1", "")
    assert "mtime_ns" not in old_schema
    with sqlite3.connect(data_dir / ".syncd" / "syncd.db") as db:
        db.executescript(old_schema)
    client = await app_client()
    assert (await put(client, "a", b"x")).status == 201
    with sqlite3.connect(data_dir / ".syncd" / "syncd.db") as db:
        assert db.execute("SELECT mtime_ns > 0 FROM files").fetchone() == (1,)
