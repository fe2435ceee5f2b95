"""POST /bulk (SPEC Part 2, "Bulk upload"): many files in one request, each on its own."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import syncd
from conftest import error_of, put, sha, tmp_files


def bulk_form(files: list[tuple[dict[str, Any] | str | None, bytes | None]],
              client_id: str | None = "laptop") -> aiohttp.FormData:
    """client_id, then for each file its meta part (a dict, raw text, or None: left out)
    and its file part (None: left out)."""
    form = aiohttp.FormData()
    if client_id is not None:
        form.add_field("client_id", client_id)
    for meta, data in files:
        if meta is not None:
            form.add_field("meta", meta if isinstance(meta, str) else json.dumps(meta),
                           content_type="application/json")
        if data is not None:
            form.add_field("file", data, filename="blob")
    return form


async def bulk(client: Any, files: list[tuple[Any, bytes | None]], **kwargs: Any) -> Any:
    return await client.post("/bulk", data=bulk_form(files, **kwargs))


async def test_bulk_stores_every_file_with_its_own_seq_and_event(client: Any, data_dir: Path) -> None:
    files = {f"small/{index}.txt": b"file %d" % index for index in range(5)}
    async with client.ws_connect("/ws/phone") as ws:
        await ws.receive_json(timeout=5)
        response = await bulk(client, [({"relative_path": path, "checksum": sha(data),
                                         "modified_time": 1_700_000_000 + index}, data)
                                       for index, (path, data) in enumerate(files.items())])
        assert response.status == 200
        body = await response.json()
        events = [await ws.receive_json(timeout=5) for _ in files]
    results = body["results"]
    assert [r["path"] for r in results] == list(files)
    assert all(r["status"] == 200 and r["success"] for r in results)
    assert [r["revision"] for r in results] == [1, 2, 3, 4, 5] and body["cursor"] == 5
    assert results[2]["modified_time"] == 1_700_000_002
    assert [(e["path"], e["seq"]) for e in events] == [(p, i + 1) for i, p in enumerate(files)]
    for path, data in files.items():
        assert (data_dir / path).read_bytes() == data
    assert tmp_files(data_dir) == []


async def test_one_refused_file_does_not_stop_the_others(app_client: Any, data_dir: Path) -> None:
    client = await app_client(allowed_extensions=[".txt"])
    await put(client, "taken.txt", b"on the server")
    response = await bulk(client, [
        ({"relative_path": "ok1.txt"}, b"one"),
        ({"relative_path": "taken.txt", "base_checksum": sha(b"stale")}, b"mine"),
        ({"relative_path": "bad.txt", "checksum": sha(b"something else")}, b"bytes"),
        ({"relative_path": "photo.jpg"}, b"jpeg"),
        ({"relative_path": "../escape.txt"}, b"x"),
        ({"relative_path": "ok2.txt"}, b"two"),
    ])
    results = (await response.json())["results"]
    assert [(r["path"], r["status"], r.get("error")) for r in results] == [
        ("ok1.txt", 200, None), ("taken.txt", 409, "conflict"), ("bad.txt", 400, "checksum_mismatch"),
        ("photo.jpg", 415, "extension_not_allowed"), ("../escape.txt", 400, "invalid_path"),
        ("ok2.txt", 200, None)]
    assert results[1]["server"]["checksum"] == sha(b"on the server")
    assert (data_dir / "taken.txt").read_bytes() == b"on the server"
    assert not (data_dir / "bad.txt").exists() and not (data_dir / "photo.jpg").exists()
    assert (data_dir / "ok2.txt").read_bytes() == b"two" and tmp_files(data_dir) == []


async def test_a_file_over_max_file_size_is_refused_alone(app_client: Any, data_dir: Path) -> None:
    client = await app_client(max_file_size=1000)
    response = await bulk(client, [({"relative_path": "big.bin"}, b"x" * 5000),
                                   ({"relative_path": "small.bin"}, b"y" * 10)])
    results = (await response.json())["results"]
    assert [(r["status"], r.get("error")) for r in results] == [(413, "too_large"), (200, None)]
    assert (data_dir / "small.bin").exists() and not (data_dir / "big.bin").exists()


@pytest.mark.parametrize("files,client_id", [
    ([(None, b"no meta")], "laptop"),
    ([("{not json", b"x")], "laptop"),
    ([('["a list"]', b"x")], "laptop"),
    ([({"relative_path": "a.txt"}, None), ({"relative_path": "b.txt"}, b"b")], "laptop"),
    ([({"relative_path": "a.txt"}, b"a")], None),
    ([({"relative_path": "a.txt"}, b"a")], "bad id!"),
], ids=["file-without-meta", "bad-json", "meta-not-object", "meta-without-file",
        "no-client-id", "bad-client-id"])
async def test_a_malformed_bulk_stores_nothing(client: Any, data_dir: Path, files: Any,
                                               client_id: str | None) -> None:
    good = [({"relative_path": "first.txt"}, b"first")]
    response = await bulk(client, good + files, client_id=client_id)
    assert (await error_of(response, 400))["error"] == "invalid_request"
    assert not (data_dir / "first.txt").exists() and tmp_files(data_dir) == []
    assert (await (await client.get("/changes")).json())["changes"] == []


async def test_client_id_must_come_first(client: Any, data_dir: Path) -> None:
    form = aiohttp.FormData()
    form.add_field("meta", json.dumps({"relative_path": "a.txt"}), content_type="application/json")
    form.add_field("file", b"a", filename="blob")
    form.add_field("client_id", "laptop")
    response = await client.post("/bulk", data=form)
    assert (await error_of(response, 400))["error"] == "invalid_request"


async def test_more_than_max_bulk_files_is_413_and_stores_nothing(app_client: Any,
                                                                  data_dir: Path) -> None:
    client = await app_client(max_bulk_files=3)
    response = await bulk(client, [({"relative_path": f"{i}.txt"}, b"x") for i in range(4)])
    assert (await error_of(response, 413))["error"] == "too_large"
    assert not (data_dir / "0.txt").exists() and tmp_files(data_dir) == []


async def test_more_than_max_bulk_size_is_413_and_stores_nothing(app_client: Any,
                                                                 data_dir: Path) -> None:
    client = await app_client(max_bulk_size=10_000)
    files = [({"relative_path": f"{i}.bin"}, os.urandom(4000)) for i in range(3)]
    response = await bulk(client, files)
    assert (await error_of(response, 413))["error"] == "too_large"
    assert not (data_dir / "0.bin").exists() and tmp_files(data_dir) == []


async def test_refused_files_count_towards_max_bulk_size(app_client: Any, data_dir: Path) -> None:
    client = await app_client(max_bulk_size=10_000, allowed_extensions=[".txt"])
    files = [({"relative_path": f"{i}.bin"}, os.urandom(4000)) for i in range(3)]
    response = await bulk(client, [({"relative_path": "ok.txt"}, b"ok"), *files])
    assert (await error_of(response, 413))["error"] == "too_large"
    assert not (data_dir / "ok.txt").exists()


async def test_bulk_keeps_versions_of_what_it_overwrites(client: Any) -> None:
    await put(client, "doc.txt", b"before")
    await bulk(client, [({"relative_path": "doc.txt"}, b"after")])
    kept = (await (await client.get("/versions/doc.txt")).json())["versions"]
    assert [v["checksum"] for v in kept] == [sha(b"before")]


async def test_a_rename_that_fails_in_a_group_fails_that_file_alone(
        client: Any, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The group's renames are made together; when one fails they are undone and made
    one by one, so that the others are stored and only that one is refused."""
    (data_dir / "in-the-way").mkdir()                # a folder the server does not know
    real_swap = syncd.FileStore.swap_in
    calls = []

    def failing_swap(self: Any, staged: Any, path: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(path)
        if path == "eio.txt":
            raise OSError(errno.EIO, "Input/output error")
        return real_swap(self, staged, path, *args, **kwargs)
    monkeypatch.setattr(syncd.FileStore, "swap_in", failing_swap)
    response = await bulk(client, [({"relative_path": "a.txt"}, b"a"),
                                   ({"relative_path": "in-the-way"}, b"b"),
                                   ({"relative_path": "c.txt"}, b"c"),
                                   ({"relative_path": "eio.txt"}, b"d"),
                                   ({"relative_path": "e.txt"}, b"e")])
    results = (await response.json())["results"]
    assert [(r["path"], r["status"]) for r in results] == [
        ("a.txt", 200), ("in-the-way", 409), ("c.txt", 200), ("eio.txt", 503), ("e.txt", 200)]
    assert [r["revision"] for r in results if r["status"] == 200] == [1, 2, 3]
    assert calls[:2] == ["a.txt", "in-the-way"] and len(calls) == 2 + 5    # together, then alone
    for name in ("a", "c", "e"):
        assert (data_dir / f"{name}.txt").read_bytes() == name.encode()
    assert not (data_dir / "eio.txt").exists() and (data_dir / "in-the-way").is_dir()
    assert tmp_files(data_dir) == []
    listed = await (await client.get("/files")).json()
    assert [f["path"] for f in listed["files"]] == ["a.txt", "c.txt", "e.txt"]
