"""Versions, trash and restore (SPEC Part 2, "Versions and trash"): nothing is ever lost."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import pytest

import syncd
from conftest import database_error, db_query, error_of, put, sha, tmp_files, upload


def blob(data_dir: Path, data: bytes) -> Path:
    checksum = sha(data)
    return data_dir / ".syncd" / "blobs" / checksum[:2] / checksum


def blobs(data_dir: Path) -> list[str]:
    return sorted(name for folder in (data_dir / ".syncd" / "blobs").iterdir()
                  for name in os.listdir(folder))


def rows(data_dir: Path, sql: str) -> list[tuple[Any, ...]]:
    return db_query(data_dir, sql)


async def versions(client: Any, path: str) -> dict[str, Any]:
    response = await client.get(f"/versions/{path}")
    assert response.status == 200, await response.text()
    return await response.json()


async def restore(client: Any, **body: Any) -> Any:
    return await client.post("/restore", json={"client_id": "admin", **body})


# -- what is kept ------------------------------------------------------------------

async def test_an_overwrite_keeps_the_old_content_as_a_version(client: Any, data_dir: Path) -> None:
    await put(client, "doc.txt", b"first")
    inode = os.stat(data_dir / "doc.txt").st_ino
    await put(client, "doc.txt", b"second", client_id="desk")
    body = await versions(client, "doc.txt")
    assert body["current"]["checksum"] == sha(b"second") and body["current"]["revision"] == 2
    [version] = body["versions"]
    assert version == {"revision": 1, "checksum": sha(b"first"), "size": 5,
                       "modified_time": version["modified_time"], "replaced_at": 2,
                       "replaced_by": "desk", "time": version["time"], "reason": "overwrite"}
    assert blob(data_dir, b"first").read_bytes() == b"first"
    assert os.stat(blob(data_dir, b"first")).st_ino == inode        # linked, not copied
    assert tmp_files(data_dir) == []


async def test_identical_content_is_kept_once(client: Any, data_dir: Path) -> None:
    for path in ("a.txt", "b.txt"):
        await put(client, path, b"same bytes")
        await put(client, path, b"changed " + path.encode())
    assert len((await versions(client, "a.txt"))["versions"]) == 1
    assert len((await versions(client, "b.txt"))["versions"]) == 1
    assert blobs(data_dir) == [sha(b"same bytes")]
    assert rows(data_dir, "SELECT refs, size FROM blobs") == [(2, 10)]
    text = await (await client.get("/metrics")).text()
    assert "syncd_versions 2.0" in text and "syncd_version_bytes 10.0" in text


async def test_a_delete_keeps_the_content_and_the_trash_lists_it(client: Any, data_dir: Path) -> None:
    await put(client, "notes/a.txt", b"keep me")
    await put(client, "notes/b.txt", b"and me")
    await put(client, "other.txt", b"not deleted")
    assert (await client.delete("/files/notes/a.txt", params={"client_id": "laptop"})).status == 200
    trash = (await (await client.get("/trash")).json())["files"]
    assert trash == [{"path": "notes/a.txt", "checksum": sha(b"keep me"), "size": 7,
                      "modified_time": trash[0]["modified_time"], "revision": 1,
                      "deleted_at": 4, "deleted_by": "laptop", "time": trash[0]["time"]}]
    body = await versions(client, "notes/a.txt")
    assert body["current"] is None and body["versions"][0]["reason"] == "delete"
    assert blob(data_dir, b"keep me").read_bytes() == b"keep me"


async def test_a_folder_delete_keeps_every_file(client: Any, data_dir: Path) -> None:
    files = {f"photos/{index % 3}/{index}.jpg": b"photo %d" % index for index in range(12)}
    for path, data in files.items():
        await put(client, path, data)
    await client.delete("/files/photos", params={"client_id": "laptop"})
    trash = (await (await client.get("/trash", params={"prefix": "photos/1"})).json())["files"]
    assert [f["path"] for f in trash] == sorted(p for p in files if p.startswith("photos/1"))
    assert all(blob(data_dir, data).read_bytes() == data for data in files.values())


async def test_an_identical_reupload_keeps_no_version(client: Any, data_dir: Path) -> None:
    await put(client, "a.txt", b"same")
    await put(client, "a.txt", b"same")
    assert (await versions(client, "a.txt"))["versions"] == []
    assert blobs(data_dir) == []


async def test_with_versions_off_nothing_is_kept(app_client: Any, data_dir: Path) -> None:
    client = await app_client(versions_max_age_days=0)
    await put(client, "a.txt", b"one")
    await put(client, "a.txt", b"two")
    await client.delete("/files/a.txt", params={"client_id": "x"})
    assert await error_of(await client.get("/versions/a.txt"), 404)
    assert blobs(data_dir) == [] and (await (await client.get("/trash")).json())["files"] == []


async def test_versions_never_show_as_live_files(client: Any) -> None:
    await put(client, "a.txt", b"one")
    await put(client, "a.txt", b"two")
    await client.delete("/files/a.txt", params={"client_id": "x"})
    assert (await (await client.get("/files")).json())["files"] == []
    sync = await (await client.post("/sync", json={"client_id": "x", "files": []})).json()
    assert sync["download"] == []
    assert (await error_of(await client.get("/download/.syncd/blobs"), 400))["error"] == "invalid_path"


async def test_versions_of_a_path_never_seen_is_404(client: Any) -> None:
    assert (await error_of(await client.get("/versions/nothing.txt"), 404))["error"] == "not_found"


# -- downloading a version -----------------------------------------------------------

async def test_an_old_revision_downloads_byte_exact_with_its_etag(client: Any) -> None:
    old = os.urandom(300_000)                          # sendfile, not the small-file path
    await put(client, "big.bin", old)
    await put(client, "big.bin", b"new")
    for route in ("/download/big.bin", "/files/big.bin"):
        response = await client.get(route, params={"revision": "1"})
        assert response.status == 200 and await response.read() == old
        assert response.headers["ETag"] == f'"{sha(old)}"' and response.headers["X-Revision"] == "1"
        assert response.headers["X-Content-Type-Options"] == "nosniff"
    current = await client.get("/download/big.bin", params={"revision": "2"})
    assert await current.read() == b"new"
    ranged = await client.get("/download/big.bin", params={"revision": "1"},
                              headers={"Range": "bytes=10-19"})
    assert ranged.status == 206 and await ranged.read() == old[10:20]


async def test_a_file_changed_behind_the_servers_back_is_kept_under_its_own_checksum(
        client: Any, data_dir: Path) -> None:
    """A file edited in the tree while the server runs (or, in a cluster, renamed into
    place by a node that died before its commit) is not what its record says: kept under
    the record's checksum, the version would hold other bytes than it names. Overwritten
    or deleted, it is kept under its own."""
    await put(client, "doc.txt", b"one")
    await put(client, "a/gone.txt", b"two")
    (data_dir / "doc.txt").write_bytes(b"edited in the tree")
    (data_dir / "a" / "gone.txt").write_bytes(b"edited too")
    assert (await put(client, "doc.txt", b"three")).status == 200
    assert (await client.delete("/files/a", params={"client_id": "laptop"})).status == 200
    kept = (await versions(client, "doc.txt"))["versions"]
    # "one" was written over in the tree itself: no bytes of it were left to keep
    assert [version["checksum"] for version in kept] == [sha(b"edited in the tree")]
    trash = (await (await client.get("/trash")).json())["files"]
    assert [(entry["path"], entry["checksum"]) for entry in trash] == [
        ("a/gone.txt", sha(b"edited too"))]
    for path, entry in [("doc.txt", kept[0]), ("a/gone.txt", trash[0])]:
        answer = await client.get(f"/download/{path}", params={"revision": str(entry["revision"])})
        data = await answer.read()
        assert sha(data) == entry["checksum"] and answer.headers["ETag"] == f'"{sha(data)}"'
        assert entry["size"] == len(data)


async def test_a_file_changed_behind_the_servers_back_is_journalled_not_served_as_recorded(
        client: Any, data_dir: Path) -> None:
    """A download finds bytes that are not its record's (size and mtime), with nothing
    newer in the journal: it answers 503 rather than send them under the record's
    checksum; the bytes are hashed and journalled as a change, announced, and served as
    theirs from then on."""
    assert (await put(client, "doc.txt", b"one")).status == 201
    ws = await client.ws_connect("/ws/watcher")
    await ws.receive_json()
    (data_dir / "doc.txt").write_bytes(b"edited in the tree")
    answer = await client.get("/download/doc.txt")
    assert answer.status == 503 and answer.headers["Retry-After"] == "5"
    assert "changed on disk behind the server's back" in (await answer.json())["message"]
    event = await ws.receive_json(timeout=5)
    assert (event["type"], event["path"], event["checksum"]) == (
        "file_changed", "doc.txt", sha(b"edited in the tree"))
    answer = await client.get("/download/doc.txt")
    assert await answer.read() == b"edited in the tree"
    assert answer.headers["ETag"] == f'"{sha(b"edited in the tree")}"'
    # "one" was written over in the tree itself: no bytes of it were left to keep
    assert (await versions(client, "doc.txt"))["versions"] == []
    changes = (await (await client.get("/changes", params={"since": "0"})).json())["changes"]
    assert [(change["path"], change["checksum"]) for change in changes] == [
        ("doc.txt", sha(b"one")), ("doc.txt", sha(b"edited in the tree"))]
    await ws.close()


async def test_bytes_that_cannot_be_journalled_yet_are_tried_again_at_the_next_download(
        client: Any, data_dir: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """The database fails while the found bytes are journalled: an error in the log, the
    path 503 as long as its bytes are not the record's, and the next download tries again."""
    assert (await put(client, "doc.txt", b"one")).status == 201
    (data_dir / "doc.txt").write_bytes(b"edited in the tree")
    journal = syncd.journal_rehashed

    async def failing(*args: Any) -> None:
        raise database_error(full=False)
    monkeypatch.setattr(syncd, "journal_rehashed", failing)
    assert (await client.get("/download/doc.txt")).status == 503
    for _ in range(100):
        if "could not journal the bytes found at doc.txt" in caplog.text:
            break
        await asyncio.sleep(0.02)
    assert "could not journal the bytes found at doc.txt" in caplog.text
    monkeypatch.setattr(syncd, "journal_rehashed", journal)
    assert (await client.get("/download/doc.txt")).status == 503   # found again, journalled
    for _ in range(100):
        answer = await client.get("/download/doc.txt")
        if answer.status == 200:
            break
        await asyncio.sleep(0.02)
    assert await answer.read() == b"edited in the tree"


async def test_a_revision_not_kept_is_404(client: Any) -> None:
    await put(client, "a.txt", b"one")
    await put(client, "a.txt", b"two")
    for revision in ("3", "7"):
        response = await client.get("/download/a.txt", params={"revision": revision})
        assert (await error_of(response, 404))["error"] == "not_found"
    assert (await client.delete("/versions/a.txt", params={"client_id": "x", "revision": "1"})).status == 200
    assert (await error_of(await client.get("/download/a.txt", params={"revision": "1"}), 404))
    bad = await client.get("/download/a.txt", params={"revision": "-1"})
    assert (await error_of(bad, 400))["error"] == "invalid_request"


# -- restoring one file --------------------------------------------------------------

async def test_restore_makes_a_version_live_again_as_a_new_change(client: Any, data_dir: Path) -> None:
    await put(client, "doc.txt", b"good")
    await put(client, "doc.txt", b"garbage from an editor")
    async with client.ws_connect("/ws/phone") as ws:
        await ws.receive_json(timeout=5)                      # hello
        response = await restore(client, path="doc.txt", revision=1)
        assert response.status == 200
        body = await response.json()
        assert body["success"] and body["checksum"] == sha(b"good") and body["revision"] == 3
        event = await ws.receive_json(timeout=5)
        assert (event["type"], event["path"], event["seq"]) == ("file_changed", "doc.txt", 3)
    assert (data_dir / "doc.txt").read_bytes() == b"good"
    kept = (await versions(client, "doc.txt"))["versions"]
    assert [(v["revision"], v["checksum"]) for v in kept] == [(2, sha(b"garbage from an editor")),
                                                               (1, sha(b"good"))]


async def test_restore_brings_back_a_deleted_file(client: Any, data_dir: Path) -> None:
    await put(client, "gone.txt", b"precious")
    await client.delete("/files/gone.txt", params={"client_id": "x"})
    assert (await restore(client, path="gone.txt", revision=1)).status == 200
    assert (data_dir / "gone.txt").read_bytes() == b"precious"
    assert (await (await client.get("/trash")).json())["files"] == []


async def test_restore_with_a_stale_base_is_409(client: Any, data_dir: Path) -> None:
    await put(client, "doc.txt", b"one")
    await put(client, "doc.txt", b"two")
    response = await restore(client, path="doc.txt", revision=1, base_checksum=sha(b"one"))
    body = await error_of(response, 409)
    assert body["error"] == "conflict" and body["server"]["checksum"] == sha(b"two")
    assert (data_dir / "doc.txt").read_bytes() == b"two"
    ok = await restore(client, path="doc.txt", revision=1, base_checksum=sha(b"two"))
    assert ok.status == 200


async def test_restore_onto_a_path_that_is_now_a_folder_is_409(client: Any) -> None:
    await put(client, "thing", b"a file")
    await client.delete("/files/thing", params={"client_id": "x"})
    await put(client, "thing/inside.txt", b"now a folder")
    body = await error_of(await restore(client, path="thing", revision=1), 409)
    assert body["error"] == "conflict" and body["server"] is None


async def test_restore_of_a_version_not_kept_is_404(client: Any) -> None:
    await put(client, "a.txt", b"one")
    assert (await error_of(await restore(client, path="a.txt", revision=1), 404))
    assert (await error_of(await restore(client, path="b.txt", revision=9), 404))


@pytest.mark.parametrize("body", [{}, {"path": "a.txt"}, {"path": "a.txt", "revision": "1"},
                                  {"path": "../x", "revision": 1}, {"prefix": 3, "at": 1},
                                  {"prefix": "", "at": -1}, {"prefix": "", "at": 99},
                                  {"prefix": "", "at": 1, "delete_newer": "yes"},
                                  {"prefix": "", "at": 1, "dry_run": 1}],
                         ids=["empty", "no-revision", "text-revision", "bad-path", "bad-prefix",
                              "negative-at", "future-at", "bad-delete-newer", "bad-dry-run"])
async def test_restore_refuses_bad_bodies(client: Any, body: dict[str, Any]) -> None:
    await put(client, "a.txt", b"one")
    response = await restore(client, **body)
    assert (await error_of(response, 400))["error"] in ("invalid_request", "invalid_path")


async def test_restore_needs_a_client_id(client: Any) -> None:
    response = await client.post("/restore", json={"path": "a.txt", "revision": 1})
    assert (await error_of(response, 400))["error"] == "invalid_request"


# -- point-in-time restore ----------------------------------------------------------

async def snapshot(client: Any, prefix: str = "") -> dict[str, str]:
    listed = (await (await client.get("/files", params={"prefix": prefix})).json())["files"]
    return {f["path"]: f["checksum"] for f in listed}


async def burst(client: Any) -> None:
    """Edits, deletes, creations and a folder delete after the moment to go back to."""
    await put(client, "docs/a.txt", b"a edited")
    await put(client, "docs/b.txt", b"b edited")
    await client.delete("/files/docs/c.txt", params={"client_id": "mallory"})
    await put(client, "docs/new.txt", b"created after")
    await client.delete("/files/pics", params={"client_id": "mallory"})
    await put(client, "pics/0.jpg", b"re-created after")
    await put(client, "top.txt", b"top edited")


async def before_burst(client: Any) -> int:
    for name in ("a", "b", "c"):
        await put(client, f"docs/{name}.txt", b"%s v1" % name.encode())
    await put(client, "docs/a.txt", b"a v2")
    for index in range(4):
        await put(client, f"pics/{index}.jpg", b"pic %d" % index)
    await put(client, "top.txt", b"top v1")
    return (await (await client.get("/health")).json())["cursor"]


@pytest.mark.parametrize("delete_newer", [False, True])
async def test_a_folder_goes_back_to_a_moment(client: Any, delete_newer: bool) -> None:
    at = await before_burst(client)
    then = await snapshot(client)
    await burst(client)
    async with client.ws_connect("/ws/phone") as ws:
        await ws.receive_json(timeout=5)
        response = await restore(client, prefix="docs", at=at, delete_newer=delete_newer)
        assert response.status == 200
        body = await response.json()
        assert (body["restored"], body["deleted"], body["unavailable"]) == (
            3, 1 if delete_newer else 0, [])
        events = [await ws.receive_json(timeout=5) for _ in range(body["restored"] + body["deleted"])]
    now = await snapshot(client)
    docs_then = {p: c for p, c in then.items() if p.startswith("docs/")}
    expected = dict(docs_then) if delete_newer else {**docs_then, "docs/new.txt": sha(b"created after")}
    assert {p: c for p, c in now.items() if p.startswith("docs/")} == expected
    assert now["top.txt"] == sha(b"top edited")                  # outside the prefix: untouched
    seqs = [event["seq"] for event in events]
    assert seqs == sorted(seqs) and seqs[-1] == body["cursor"]


@pytest.mark.parametrize("delete_newer", [False, True])
async def test_the_whole_tree_goes_back_to_a_moment(client: Any, data_dir: Path,
                                                    delete_newer: bool) -> None:
    at = await before_burst(client)
    then = await snapshot(client)
    await burst(client)
    body = await (await restore(client, prefix="", at=at, delete_newer=delete_newer)).json()
    now = await snapshot(client)
    if delete_newer:
        assert now == then
    else:
        assert now == {**then, "docs/new.txt": sha(b"created after")}
    assert all((data_dir / path).exists() for path in now)
    assert body["unavailable"] == [] and body["blocked"] == []


async def test_a_point_in_time_restore_reports_content_no_longer_kept(client: Any) -> None:
    await put(client, "a.txt", b"old")
    at = 1
    await put(client, "a.txt", b"new")
    await client.delete("/versions/a.txt", params={"client_id": "x"})
    body = await (await restore(client, prefix="", at=at)).json()
    assert body["unavailable"] == ["a.txt"] and body["restored"] == 0


async def test_a_point_in_time_restore_to_before_a_move_takes_the_content_where_it_lives(
        client: Any) -> None:
    """A folder moved away after the moment: its files' content then is live at their new
    paths (a move keeps no version of them), and a restore copies it from there; the
    moved files stay where they are. Content that lives nowhere any more is unavailable."""
    await put(client, "docs/a.txt", b"alpha")
    await put(client, "docs/b.txt", b"beta")
    at = (await (await client.get("/health")).json())["cursor"]
    moved = await client.post("/move", json={"from": "docs", "to": "papers",
                                             "client_id": "laptop"})
    assert moved.status == 200, await moved.text()
    await put(client, "papers/b.txt", b"beta, edited in place")   # b's content then: a version
    removed = await client.delete("/versions/papers/b.txt", params={"client_id": "x"})
    assert removed.status == 200                                 # ... and that one removed
    preview = await (await restore(client, prefix="docs", at=at, dry_run=True)).json()
    assert (preview["restore"], preview["unavailable"]) == (["docs/a.txt"], ["docs/b.txt"])
    body = await (await restore(client, prefix="docs", at=at)).json()
    assert (body["restored"], body["unavailable"], body["blocked"]) == (1, ["docs/b.txt"], [])
    assert await (await client.get("/download/docs/a.txt")).read() == b"alpha"
    assert await (await client.get("/download/papers/a.txt")).read() == b"alpha"


async def test_a_damaged_kept_content_is_not_restored(client: Any, data_dir: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """A blob whose bytes no longer hash to its name (the disk damaged it) is never put
    back in the tree: 404, and an error in the log."""
    await put(client, "a.txt", b"v1")
    await put(client, "a.txt", b"v2")
    blob(data_dir, b"v1").chmod(0o600)
    blob(data_dir, b"v1").write_bytes(b"v?")
    answer = await restore(client, path="a.txt", revision=1)
    assert (await error_of(answer, 404))["error"] == "not_found"
    assert f"the kept content {sha(b'v1')} is damaged" in caplog.text
    assert await (await client.get("/download/a.txt")).read() == b"v2"


# -- removing versions ---------------------------------------------------------------

async def test_delete_versions_removes_one_or_all_and_their_blobs(client: Any, data_dir: Path) -> None:
    for data in (b"v1", b"v2", b"v3", b"v4"):
        await put(client, "a.txt", data)
    response = await client.delete("/versions/a.txt", params={"client_id": "x", "revision": "2"})
    assert await response.json() == {"success": True, "removed": 1}
    assert not blob(data_dir, b"v2").exists() and blob(data_dir, b"v1").exists()
    response = await client.delete("/versions/a.txt", params={"client_id": "x"})
    assert await response.json() == {"success": True, "removed": 2}
    assert blobs(data_dir) == []
    assert (data_dir / "a.txt").read_bytes() == b"v4"                # the live file stays
    again = await client.delete("/versions/a.txt", params={"client_id": "x"})
    assert (await error_of(again, 404))["error"] == "not_found"
    no_id = await client.delete("/versions/a.txt")
    assert (await error_of(no_id, 400))["error"] == "invalid_request"


async def test_a_blob_shared_by_two_versions_stays_until_both_go(client: Any, data_dir: Path) -> None:
    for path in ("a.txt", "b.txt"):
        await put(client, path, b"shared")
        await put(client, path, b"other " + path.encode())
    await client.delete("/versions/a.txt", params={"client_id": "x"})
    assert blob(data_dir, b"shared").exists()
    await client.delete("/versions/b.txt", params={"client_id": "x"})
    assert not blob(data_dir, b"shared").exists()


# -- retention -----------------------------------------------------------------------

def tree_of(client: Any) -> syncd.Tree:
    return client.server.app[syncd.STATE].tree


def age(data_dir: Path, path: str, times: list[float]) -> None:
    """Set when the versions of path were made, newest first."""
    revisions = [row[0] for row in rows(data_dir, "SELECT revision FROM versions WHERE path = "
                                        f"'{path}' ORDER BY revision DESC")]
    for revision, moment in zip(revisions, times, strict=True):
        db_query(data_dir, "UPDATE versions SET time = ? WHERE path = ? AND revision = ?",
                 (moment, path, revision))


async def test_thinning_keeps_one_per_hour_then_one_per_day(client: Any, data_dir: Path) -> None:
    for index in range(9):
        await put(client, "a.txt", b"v%d" % index)           # 8 versions
    hour, day, now = 3600, 86400, time.time()
    old_hour = (now // hour - 2) * hour + 100                # inside one hour, 2 hours ago
    old_day = (now // day - 3) * day + 1000                  # inside one day, 3 days ago
    age(data_dir, "a.txt", [now - 60, now - 120, old_hour + 20, old_hour + 10, old_day + 30,
                            old_day + 20, old_day + 10, now - 40 * day])
    pruned = await tree_of(client).prune_versions(now=now)
    kept = sorted(now - v["time"] for v in (await versions(client, "a.txt"))["versions"])
    assert pruned == 4                                   # 1 of the hour, 2 of the day, 1 aged out
    assert kept == [60, 120, now - old_hour - 20, now - old_day - 30]
    text = await (await client.get("/metrics")).text()
    assert "syncd_version_prunes_total 4.0" in text


async def test_the_trash_is_never_thinned_only_aged_out(client: Any, data_dir: Path) -> None:
    await put(client, "a.txt", b"one")
    await put(client, "a.txt", b"two")
    await client.delete("/files/a.txt", params={"client_id": "x"})    # two versions, same old hour
    old_hour = (time.time() // 3600 - 2) * 3600 + 100
    # the delete's version is not the newest of its hour (a clock that stepped back): the
    # hour's newest is kept, and so is the deleted file's last content
    age(data_dir, "a.txt", [old_hour + 10, old_hour + 20])
    assert await tree_of(client).prune_versions(now=time.time()) == 0
    assert [f["path"] for f in (await (await client.get("/trash")).json())["files"]] == ["a.txt"]
    await tree_of(client).prune_versions(now=time.time() + 31 * 86400)
    assert (await (await client.get("/trash")).json())["files"] == []
    assert blobs(data_dir) == []


async def test_the_size_cap_prunes_the_oldest_first(app_client: Any, data_dir: Path) -> None:
    client = await app_client(versions_max_size=2500)
    for index in range(5):
        await put(client, "a.txt", bytes([65 + index]) * 1000)     # 4 versions of 1,000 bytes
    await tree_of(client).prune_versions()
    kept = [v["checksum"] for v in (await versions(client, "a.txt"))["versions"]]
    assert kept == [sha(b"D" * 1000), sha(b"C" * 1000)]
    assert tree_of(client).store.blob_bytes == 2000


async def test_a_reload_applies_new_retention(client: Any) -> None:
    await put(client, "a.txt", b"one")
    await put(client, "a.txt", b"two")
    state = client.server.app[syncd.STATE]
    syncd.apply_config(state, dataclasses.replace(state.config, versions_max_size=1))
    assert await tree_of(client).prune_versions() == 1


async def test_the_pruner_runs_in_the_background(app_client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(syncd, "PRUNE_INTERVAL", 0.05)
    client = await app_client(versions_max_size=1)
    await put(client, "a.txt", b"one")
    await put(client, "a.txt", b"two")
    for _ in range(100):
        if tree_of(client).store.version_count == 0:
            break
        await asyncio.sleep(0.05)
    assert tree_of(client).store.version_count == 0


# -- recovery -------------------------------------------------------------------------

async def test_recovery_drops_versions_whose_blob_is_gone_and_removes_orphans(
        app_client: Any, data_dir: Path) -> None:
    client = await app_client()
    await put(client, "a.txt", b"one")
    await put(client, "a.txt", b"two")
    await client.close()
    blob(data_dir, b"one").unlink()                           # lost behind our back
    orphan = blob(data_dir, b"nobody's")
    orphan.write_bytes(b"nobody's")
    client = await app_client()
    await client.server.app[syncd.STATE].tree.recovery
    assert (await versions(client, "a.txt"))["versions"] == []
    assert not orphan.exists()
    assert rows(data_dir, "SELECT COUNT(*) FROM blobs") == [(0,)]


async def test_recovery_adopts_the_blob_of_a_delete_that_crashed_before_its_commit(
        app_client: Any, data_dir: Path) -> None:
    client = await app_client()
    await put(client, "a.txt", b"content")
    await put(client, "keep1", b"1")
    await put(client, "keep2", b"2")
    await client.close()
    # what a delete leaves when killed between its blob link and its commit
    os.link(data_dir / "a.txt", blob(data_dir, b"content"))
    (data_dir / "a.txt").unlink()
    client = await app_client()
    trash = (await (await client.get("/trash")).json())["files"]
    assert [(f["path"], f["deleted_by"]) for f in trash] == [("a.txt", "server")]


async def test_recovery_adopts_the_blob_of_an_overwrite_that_crashed_before_its_commit(
        app_client: Any, data_dir: Path) -> None:
    client = await app_client()
    await put(client, "a.txt", b"old content")
    await client.close()
    os.link(data_dir / "a.txt", blob(data_dir, b"old content"))
    (data_dir / "new").write_bytes(b"new content, longer")
    os.replace(data_dir / "new", data_dir / "a.txt")
    client = await app_client()
    await client.server.app[syncd.STATE].tree.recovery
    body = await versions(client, "a.txt")
    assert body["current"]["checksum"] == sha(b"new content, longer")
    assert [v["checksum"] for v in body["versions"]] == [sha(b"old content")]


async def test_upload_then_multipart_keep_versions_too(client: Any) -> None:
    await upload(client, "m.txt", b"one")
    await upload(client, "m.txt", b"two")
    assert [v["checksum"] for v in (await versions(client, "m.txt"))["versions"]] == [sha(b"one")]


@pytest.mark.parametrize("delete_newer", [False, True])
async def test_a_dry_run_says_what_a_restore_would_do_and_does_nothing(
        client: Any, delete_newer: bool) -> None:
    at = await before_burst(client)
    await burst(client)
    before = await snapshot(client)
    cursor = (await (await client.get("/health")).json())["cursor"]
    preview = await (await restore(client, prefix="docs", at=at, delete_newer=delete_newer,
                                   dry_run=True)).json()
    assert preview == {"success": True, "dry_run": True,
                       "restore": ["docs/a.txt", "docs/b.txt", "docs/c.txt"],
                       "delete": ["docs/new.txt"] if delete_newer else [],
                       "unavailable": [], "cursor": cursor}
    assert await snapshot(client) == before                       # nothing was done
    done = await (await restore(client, prefix="docs", at=at, delete_newer=delete_newer)).json()
    assert (done["restored"], done["deleted"]) == (len(preview["restore"]), len(preview["delete"]))
