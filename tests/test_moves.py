"""POST /move (SPEC Part 2, "Moves"): a file or a folder renamed on the server, no bytes sent."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

import syncd
from conftest import db_query, error_of, put, sha, tmp_files


async def move(client: Any, source: str, target: str, **extra: Any) -> Any:
    return await client.post("/move", json={"client_id": "laptop", "from": source, "to": target,
                                            **extra})


async def listing(client: Any) -> dict[str, str]:
    body = await (await client.get("/files")).json()
    return {entry["path"]: entry["checksum"] for entry in body["files"]}


def on_disk(data_dir: Path) -> dict[str, bytes]:
    found = {}
    for folder, dirs, names in os.walk(data_dir):
        dirs[:] = [name for name in dirs if name != ".syncd"]
        for name in names:
            path = Path(folder, name)
            found[path.relative_to(data_dir).as_posix()] = path.read_bytes()
    return found


async def test_a_file_moves_without_its_bytes_and_keeps_its_versions(
        client: Any, data_dir: Path) -> None:
    await put(client, "notes/todo.txt", b"first")
    await put(client, "notes/todo.txt", b"second")
    inode = os.stat(data_dir / "notes" / "todo.txt").st_ino
    async with client.ws_connect("/ws/phone") as ws:
        await ws.receive_json(timeout=5)
        response = await move(client, "notes/todo.txt", "archive/2026/todo.txt")
        assert response.status == 200
        assert await response.json() == {"success": True, "moved": 1, "cursor": 4}
        events = [await ws.receive_json(timeout=5) for _ in range(2)]
    assert [(e["type"], e["path"], e["seq"]) for e in events] == [
        ("file_changed", "archive/2026/todo.txt", 3), ("file_deleted", "notes/todo.txt", 4)]
    assert events[0]["checksum"] == sha(b"second")
    assert on_disk(data_dir) == {"archive/2026/todo.txt": b"second"}      # notes/ pruned
    assert os.stat(data_dir / "archive" / "2026" / "todo.txt").st_ino == inode   # renamed
    changes = (await (await client.get("/changes", params={"since": "2"})).json())["changes"]
    assert [(c["type"], c["path"]) for c in changes] == [
        ("upsert", "archive/2026/todo.txt"), ("delete", "notes/todo.txt")]
    versions = await (await client.get("/versions/archive/2026/todo.txt")).json()
    assert [v["checksum"] for v in versions["versions"]] == [sha(b"first")]
    assert (await client.get("/versions/notes/todo.txt")).status == 404
    trash = await (await client.get("/trash")).json()
    assert trash["files"] == []                  # a move is not a deletion
    download = await client.get("/files/archive/2026/todo.txt")
    assert await download.read() == b"second"


async def test_a_folder_moves_with_every_file_in_it(client: Any, data_dir: Path) -> None:
    for index in range(5):
        await put(client, f"photos/2023/{index}.jpg", b"photo %d" % index)
    await put(client, "photos/2023/raw/big.cr2", b"raw")
    await put(client, "photos/2024.jpg", b"not in the folder")
    response = await move(client, "photos/2023", "photos/archive-2023")
    assert (await response.json())["moved"] == 6
    assert await listing(client) == {
        **{f"photos/archive-2023/{index}.jpg": sha(b"photo %d" % index) for index in range(5)},
        "photos/archive-2023/raw/big.cr2": sha(b"raw"), "photos/2024.jpg": sha(b"not in the folder")}
    assert sorted(on_disk(data_dir)) == sorted(await listing(client))
    changes = (await (await client.get("/changes", params={"since": "7"})).json())["changes"]
    assert len(changes) == 12 and [c["type"] for c in changes[:2]] == ["upsert", "delete"]
    assert all(c["client_id"] == "laptop" for c in changes)


async def test_a_case_only_rename_is_allowed(client: Any, data_dir: Path) -> None:
    await put(client, "photos/a.jpg", b"a")
    assert (await move(client, "photos", "Photos")).status == 200
    assert await listing(client) == {"Photos/a.jpg": sha(b"a")}
    assert on_disk(data_dir) == {"Photos/a.jpg": b"a"}


@pytest.mark.parametrize("source, target, status, code", [
    ("missing.txt", "elsewhere.txt", 404, "not_found"),
    ("a.txt", "b.txt", 409, "conflict"),                   # onto a live file
    ("a.txt", "dir", 409, "conflict"),                     # a file onto a folder
    ("dir", "a.txt", 409, "conflict"),                     # a folder onto a file
    ("a.txt", "A.TXT", 200, None),                         # its own case twin: a rename
    ("a.txt", "DIR/a.txt", 409, "case_conflict"),          # into a case twin of a folder
    ("a.txt", "b.txt/inside.txt", 409, "conflict"),        # under a file
    ("dir", "dir/sub", 400, "invalid_request"),            # into itself
    ("a.txt", "a.txt", 400, "invalid_request"),
    ("a.txt", ".syncd/x", 400, "invalid_path"),
    ("a.txt", "../escape.txt", 400, "invalid_path"),
    (".syncd/syncd.db", "x", 400, "invalid_path"),
])
async def test_a_move_is_refused_as_the_contract_says(
        client: Any, data_dir: Path, source: str, target: str, status: int,
        code: str | None) -> None:
    await put(client, "a.txt", b"a")
    await put(client, "b.txt", b"b")
    await put(client, "dir/x.txt", b"x")
    before = await listing(client)
    response = await move(client, source, target)
    if code is None:
        assert response.status == status
        return
    body = await error_of(response, status)
    assert body["error"] == code
    if (source, target) == ("a.txt", "b.txt"):
        assert body["server"]["checksum"] == sha(b"b")          # the state of "to"
    assert await listing(client) == before and on_disk(data_dir) == {
        "a.txt": b"a", "b.txt": b"b", "dir/x.txt": b"x"}
    assert tmp_files(data_dir) == []


async def test_a_stale_base_is_409_and_a_fresh_one_moves(client: Any) -> None:
    await put(client, "a.txt", b"new")
    body = await error_of(await move(client, "a.txt", "b.txt", base_checksum=sha(b"old")), 409)
    assert body["error"] == "conflict" and body["server"]["checksum"] == sha(b"new")
    assert (await move(client, "a.txt", "b.txt", base_checksum=sha(b"new"))).status == 200
    await put(client, "dir/x", b"x")
    body = await error_of(await move(client, "dir", "other", base_checksum=sha(b"x")), 409)
    assert "single file" in body["message"]


@pytest.mark.parametrize("body, message", [
    ({"client_id": "laptop", "to": "b"}, "from must be a path"),
    ({"client_id": "laptop", "from": "a", "to": 7}, "to must be a path"),
    ({"client_id": "laptop", "from": "a", "to": "b", "base_checksum": "xyz"}, "base_checksum"),
    ({"from": "a", "to": "b"}, "client_id"),
])
async def test_a_bad_move_request_is_400(client: Any, body: dict[str, Any], message: str) -> None:
    await put(client, "a", b"a")
    error = await error_of(await client.post("/move", json=body), 400)
    assert message in error["message"]


async def test_something_unknown_in_the_way_on_disk_refuses_the_move(
        client: Any, data_dir: Path) -> None:
    await put(client, "a.txt", b"a")
    (data_dir / "stray").mkdir()
    (data_dir / "stray" / "file").write_bytes(b"not the server's")     # unknown to it
    body = await error_of(await move(client, "a.txt", "stray"), 409)
    assert "on disk" in body["message"]
    assert await listing(client) == {"a.txt": sha(b"a")}
    assert db_query(data_dir, "SELECT COUNT(*) FROM moves") == [(0,)]


async def test_a_failed_commit_puts_the_folder_back(
        client: Any, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    await put(client, "dir/a", b"a")

    async def failing(*args: Any) -> None:
        raise RuntimeError("a bug between the rename and the commit")
    monkeypatch.setattr(syncd.SQLTransaction, "move_versions", failing)
    assert (await move(client, "dir", "moved")).status == 500
    monkeypatch.undo()
    assert on_disk(data_dir) == {"dir/a": b"a"} and await listing(client) == {"dir/a": sha(b"a")}
    assert db_query(data_dir, "SELECT COUNT(*) FROM moves") == [(0,)]
    assert (await move(client, "dir", "moved")).status == 200


@pytest.mark.parametrize("renamed", [True, False])
async def test_start_up_finishes_a_move_cut_short_or_forgets_it(
        app_client: Any, data_dir: Path, renamed: bool) -> None:
    """A crash after the note: the rename on disk decides (no mass-vanish refusal)."""
    client = await app_client()
    for index in range(10):
        await put(client, f"big/{index}", b"%d" % index)
    await client.close()
    db_query(data_dir, "INSERT INTO moves (source, target, client_id, time) VALUES"
                       " ('big', 'new/place', 'laptop', 0)")
    if renamed:
        (data_dir / "new").mkdir()
        (data_dir / "big").rename(data_dir / "new" / "place")
    client = await app_client()
    prefix = "new/place" if renamed else "big"
    assert await listing(client) == {f"{prefix}/{index}": sha(b"%d" % index) for index in range(10)}
    if renamed:
        changes = (await (await client.get("/changes", params={"since": "10"})).json())["changes"]
        assert [(c["type"], c["path"]) for c in changes[:2]] == [
            ("upsert", "new/place/0"), ("delete", "big/0")]
    assert db_query(data_dir, "SELECT COUNT(*) FROM moves") == [(0,)]


async def move_that_cannot_be_undone(client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """dir -> moved, whose commit fails and whose rename back fails too: 500."""
    real_rename = syncd.FileStore.rename

    def rename_once(self: Any, source: str, target: str) -> None:
        if source == "moved":
            raise OSError(5, "Input/output error")        # the undo fails
        real_rename(self, source, target)

    async def failing(*args: Any) -> None:
        raise RuntimeError("a bug between the rename and the commit")
    with monkeypatch.context() as broken:
        broken.setattr(syncd.FileStore, "rename", rename_once)
        broken.setattr(syncd.SQLTransaction, "move_versions", failing)
        assert (await move(client, "dir", "moved")).status == 500


async def test_a_move_that_cannot_be_undone_is_finished_at_the_next_start(
        app_client: Any, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    client = await app_client()
    await put(client, "dir/a", b"a")
    await move_that_cannot_be_undone(client, monkeypatch)
    await client.close()
    assert on_disk(data_dir) == {"moved/a": b"a"}
    client = await app_client()
    assert await listing(client) == {"moved/a": sha(b"a")}


async def test_a_move_that_cannot_be_undone_is_finished_while_the_server_runs(
        app_client: Any, data_dir: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """The same failure, the server left running: its look for moves cut short (every
    MOVES_INTERVAL) journals the move once the database answers again."""
    monkeypatch.setattr(syncd, "MOVES_INTERVAL", 0.1)
    client = await app_client()
    await put(client, "dir/a", b"a")
    await move_that_cannot_be_undone(client, monkeypatch)
    assert "could not be undone on disk: it is finished once the database answers" in caplog.text
    for _ in range(100):
        if await listing(client) == {"moved/a": sha(b"a")}:
            break
        await asyncio.sleep(0.05)
    assert await listing(client) == {"moved/a": sha(b"a")}
    assert db_query(data_dir, "SELECT COUNT(*) FROM moves") == [(0,)]
    assert await (await client.get("/download/moved/a")).read() == b"a"
