"""The in-memory index of file records: always the committed state, and what every read
and every write check uses instead of the database."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest

import syncd
from conftest import db_query, error_of, put, sha
from test_bulk import bulk


def record(path: str, deleted: bool = False) -> syncd.FileRecord:
    return syncd.FileRecord(path, "0" * 64, 1, 0.0, 1, deleted, 0.0, "x")


def db_records(data_dir: Path) -> dict[str, syncd.FileRecord]:
    rows = db_query(data_dir, f"SELECT {syncd.FILE_COLUMNS} FROM files")
    return {row[0]: syncd.FileRecord(*row[:5], bool(row[5]), *row[6:]) for row in rows}


def test_folder_counts_and_case_twins_follow_puts_and_deletes() -> None:
    index = syncd.LiveIndex()
    for path in ("Photos/a.jpg", "Photos/2023/b.jpg", "photos/c.jpg"):
        index.put(record(path))
    assert index.files_in("Photos") == 2 and index.files_in("Photos/2023") == 1
    assert index.folder_spellings("photos") == ("Photos", "photos")
    assert index.file_spellings("photos/a.jpg") == ("Photos/a.jpg",)
    index.put(record("Photos/2023/b.jpg", deleted=True))        # a tombstone: not live
    assert index.files_in("Photos/2023") == 0 and index.folder_spellings("photos/2023") == ()
    assert index.get("Photos/2023/b.jpg").deleted
    index.forget("photos/c.jpg")
    assert index.folder_spellings("photos") == ("Photos",) and len(index) == 2


def test_a_transaction_sees_its_own_changes_over_the_committed_index() -> None:
    index = syncd.LiveIndex()
    index.put(record("docs/a.txt"))
    pending = syncd.PendingIndex(index)
    pending.put(record("docs/a.txt", deleted=True))
    pending.put(record("Docs/b.txt"))
    assert pending.files_in("docs") == 0 and pending.files_in("Docs") == 1
    assert pending.folder_spellings("docs") == ("Docs",)
    assert [r.path for r in pending.live_under("Docs")] == ["Docs/b.txt"]
    assert index.files_in("docs") == 1 and index.get("Docs/b.txt") is None   # not committed
    syncd.check_writable(pending, "docs.txt", allow_case_clash=False)
    with pytest.raises(syncd.CaseConflict):
        syncd.check_writable(pending, "docs/c.txt", allow_case_clash=False)
    syncd.check_writable(pending, "docs/c.txt", allow_case_clash=True)
    with pytest.raises(syncd.PathBlocked):
        syncd.check_writable(pending, "Docs", allow_case_clash=True)
    pending.put(record("docs/a.txt"))                 # back again in the same transaction
    assert pending.files_in("docs") == 1


def test_an_exact_folder_is_found_among_case_twins() -> None:
    """With allow_case_clash, a file "a" beside "A" still blocks the folder "a/"."""
    index = syncd.LiveIndex()
    index.put(record("A"))
    index.put(record("a"))
    with pytest.raises(syncd.PathBlocked):
        syncd.check_writable(index, "a/b.txt", allow_case_clash=True)


async def test_case_twins_in_one_bulk_clash_with_each_other(client: Any) -> None:
    """One request, one group commit: the second file is checked against the first."""
    response = await bulk(client, [({"relative_path": "Music/a.mp3"}, b"a"),
                                   ({"relative_path": "music/b.mp3"}, b"b"),
                                   ({"relative_path": "Music/a.mp3/c"}, b"c"),
                                   ({"relative_path": "Music"}, b"d")])
    results = (await response.json())["results"]
    assert [(r["status"], r.get("error")) for r in results] == [
        (200, None), (409, "case_conflict"), (409, "conflict"), (409, "conflict")]
    listed = await (await client.get("/files")).json()
    assert [f["path"] for f in listed["files"]] == ["Music/a.mp3"]


async def test_a_failed_commit_leaves_the_index_as_it_was(
        client: Any, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    await put(client, "kept.txt", b"kept")
    store = client.server.app[syncd.STATE].tree.store
    real = syncd.SQLStore._committed

    def commit_then_fail(*args: Any) -> Any:     # never reached: the COMMIT fails first
        raise AssertionError("the index was brought up to a failed transaction")
    real_flush = syncd.SQLTransaction.flush

    async def failing_commit(tx: Any) -> None:      # every row written, then the commit fails
        await real_flush(tx)
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(syncd.SQLTransaction, "flush", failing_commit)
    monkeypatch.setattr(syncd.SQLStore, "_committed", commit_then_fail)
    await error_of(await put(client, "new.txt", b"new"), 503)
    await error_of(await client.delete("/files/kept.txt", params={"client_id": "x"}), 503)
    monkeypatch.setattr(syncd.SQLStore, "_committed", real)
    monkeypatch.setattr(syncd.SQLTransaction, "flush", real_flush)
    assert (await client.get("/download/new.txt")).status == 404
    assert await (await client.get("/download/kept.txt")).read() == b"kept"
    assert store.index.records == db_records(data_dir)
    assert (await put(client, "New.txt", b"no case twin is left behind")).status == 201


async def test_the_index_agrees_with_the_database_after_every_kind_of_change(
        app_client: Any, data_dir: Path) -> None:
    client = await app_client()
    await put(client, "a", b"aaaa")
    await put(client, "a", b"aa")
    for index in range(5):
        await put(client, f"dir/{index}", b"x" * index)
    await client.delete("/files/dir/1", params={"client_id": "x"})
    await put(client, "dir/1", b"back")
    await client.delete("/files/dir", params={"client_id": "y"})            # seq 10-14
    assert (await client.post("/restore", json={"client_id": "z", "prefix": "dir",
                                                "at": 9})).status == 200
    await client.delete("/files/dir/4", params={"client_id": "y"})
    await put(client, "b", b"bbb")
    assert (await client.post("/restore", json={"client_id": "z", "path": "a",
                                                "revision": 1})).status == 200
    store = client.server.app[syncd.STATE].tree.store
    assert store.index.records == db_records(data_dir)
    listed = (await (await client.get("/files")).json())["files"]
    assert {f["path"]: f["checksum"] for f in listed} == {
        "a": sha(b"aaaa"), "b": sha(b"bbb"), "dir/0": sha(b""), "dir/1": sha(b"back"),
        "dir/2": sha(b"xx"), "dir/3": sha(b"xxx")}
    await client.close()
    reopened = await app_client()                     # loaded from the database at start
    store = reopened.server.app[syncd.STATE].tree.store
    assert store.index.records == db_records(data_dir)
    assert (store.live_files, store.live_bytes) == (6, 16)
