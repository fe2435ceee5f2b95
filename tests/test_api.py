"""The HTTP endpoints of the contract, with their error codes."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import socket
import threading
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import syncd
from conftest import error_of, put, sha, tmp_files, upload


# -- /health, /register, /clients ------------------------------------------------

async def test_health_reports_figures(client: Any) -> None:
    await put(client, "a.txt", b"a")
    body = await (await client.get("/health")).json()
    assert body["status"] == "ok" and body["version"] == syncd.__version__
    assert (body["files"], body["cursor"], body["clients_connected"]) == (1, 1, 0)
    assert body["timestamp"].endswith("Z") and len(body["epoch"]) == 32
    assert body["uptime_s"] >= 0
    assert body["bytes"] == 1 and body["node"] == socket.gethostname()


async def test_health_names_the_node(app_client: Any) -> None:
    client = await app_client(node_name="node-2")
    assert (await (await client.get("/health")).json())["node"] == "node-2"
    with pytest.raises(syncd.ConfigError, match="node_name"):
        syncd.load_config(None, {"SYNCD_NODE_NAME": "two words"}, {})


async def test_health_is_503_when_sync_directory_is_gone(client: Any, data_dir: Path) -> None:
    data_dir.rename(data_dir.with_name("moved"))
    response = await client.get("/health")
    assert response.status == 503
    assert (await response.json())["status"] == "error"


async def test_register_is_idempotent_and_listed(client: Any) -> None:
    first = await client.post("/register", json={"client_id": "laptop", "name": "My laptop",
                                                 "platform": "linux", "version": "1"})
    assert (await first.json()) == {"success": True, "message": "registered", "cursor": 0}
    again = await client.post("/register", json={"client_id": "laptop", "name": "Renamed"})
    assert (await again.json())["success"] is True
    clients = (await (await client.get("/clients")).json())["clients"]
    assert len(clients) == 1
    assert clients[0]["client_id"] == "laptop" and clients[0]["name"] == "Renamed"
    assert clients[0]["connected"] is False
    assert clients[0]["registered_at"] <= clients[0]["last_seen"]


@pytest.mark.parametrize("body", [
    b"{", b"[]", b'"x"', b'{"client_id": NaN}', b'{"client_id": "a", "x": Infinity}',
    b"[" * 100000 + b"]" * 100000, b'{"client_id": ""}', b'{"client_id": "-bad"}',
    b'{"client_id": "a b"}', b'{"client_id": "' + b"a" * 129 + b'"}', b'{"name": "x"}',
    b'{"client_id": "ok", "name": 3}', b"\xff\xfe",
])
async def test_register_rejects_bad_bodies(client: Any, body: bytes) -> None:
    response = await client.post("/register", data=body,
                                  headers={"Content-Type": "application/json"})
    assert (await error_of(response, 400))["error"] == "invalid_request"


async def test_register_announces_client_joined(client: Any) -> None:
    async with client.ws_connect("/ws/desk") as ws:
        assert (await ws.receive_json(timeout=5))["type"] == "hello"
        await client.post("/register", json={"client_id": "laptop", "name": "L"})
        assert await ws.receive_json(timeout=5) == {
            "type": "client_joined", "client_id": "laptop", "name": "L"}


# -- /sync -----------------------------------------------------------------------

def listing(*files: dict[str, Any], client_id: str = "laptop") -> dict[str, Any]:
    return {"client_id": client_id, "files": list(files)}


async def test_sync_plans_against_the_server(client: Any) -> None:
    await put(client, "same.txt", b"same")
    await put(client, "server-only.txt", b"s")
    await put(client, "changed-here.txt", b"old")
    await put(client, "gone.txt", b"gone")
    await client.delete("/files/gone.txt", params={"client_id": "laptop"})
    response = await client.post("/sync", json=listing(
        {"path": "same.txt", "checksum": sha(b"same"), "size": 4, "modified_time": 1},
        {"path": "new.txt", "checksum": sha(b"n"), "size": 1, "modified_time": 1},
        {"path": "changed-here.txt", "checksum": sha(b"new"), "size": 3, "modified_time": 1,
         "base_checksum": sha(b"old")},
        {"path": "gone.txt", "checksum": sha(b"gone"), "size": 4, "modified_time": 1,
         "base_checksum": sha(b"gone")},
    ))
    assert response.status == 200
    plan = await response.json()
    assert sorted(plan["upload"]) == ["changed-here.txt", "new.txt"]
    assert [d["path"] for d in plan["download"]] == ["server-only.txt"]
    assert plan["download"][0]["checksum"] == sha(b"s")
    assert plan["delete"] == [{"path": "gone.txt", "revision": 5}]
    assert plan["conflicts"] == []
    assert plan["cursor"] == 5
    assert plan["epoch"] == (await (await client.get("/health")).json())["epoch"]


async def test_sync_accepts_nfd_path_as_its_nfc_twin(client: Any) -> None:
    await put(client, "caf\u00e9.txt", b"x")
    plan = await (await client.post("/sync", json=listing(
        {"path": "cafe\u0301.txt", "checksum": sha(b"x"), "size": 1, "modified_time": 1}))).json()
    assert plan["upload"] == [] and plan["download"] == []


@pytest.mark.parametrize("files", [
    "nope",
    [{"path": "a", "checksum": "0" * 64, "size": 1, "modified_time": 1}] * 2,
    [{"path": "a", "checksum": "0" * 64, "size": -1, "modified_time": 1}],
    [{"path": "a", "checksum": "0" * 64, "size": 1.5, "modified_time": 1}],
    [{"path": "a", "checksum": "0" * 64, "size": True, "modified_time": 1}],
    [{"path": "a", "checksum": "xyz", "size": 1, "modified_time": 1}],
    [{"path": "a", "checksum": "", "size": 1, "modified_time": 1}],
    [{"path": "a", "checksum": "0" * 64, "size": 1}],
    [{"path": "a", "checksum": "0" * 64, "size": 1, "modified_time": "soon"}],
    [{"path": "a", "checksum": "0" * 64, "size": 1, "modified_time": -5}],
    [{"path": "a", "checksum": "0" * 64, "size": 1, "modified_time": 1, "base_checksum": 7}],
    [{"checksum": "0" * 64, "size": 1, "modified_time": 1}],
    ["a"],
])
async def test_sync_rejects_bad_listings(client: Any, files: Any) -> None:
    response = await client.post("/sync", json={"client_id": "laptop", "files": files})
    assert (await error_of(response, 400))["error"] == "invalid_request"


async def test_sync_rejects_bad_client_id(client: Any) -> None:
    response = await client.post("/sync", json={"client_id": "../x", "files": []})
    assert (await error_of(response, 400))["error"] == "invalid_request"


async def test_sync_of_100k_entries_answers(client: Any) -> None:
    files = [{"path": f"d{i % 100}/f{i}.txt", "checksum": "%064x" % i, "size": i,
              "modified_time": 1} for i in range(100_000)]
    response = await client.post("/sync", json={"client_id": "laptop", "files": files})
    assert response.status == 200
    assert len((await response.json())["upload"]) == 100_000


# -- /upload ---------------------------------------------------------------------

async def test_upload_stores_file_and_metadata(client: Any, data_dir: Path) -> None:
    response = await upload(client, "docs/a.txt", b"hello", checksum=sha(b"hello"),
                            modified_time="1700000000.5")
    assert response.status == 200
    body = await response.json()
    assert body == {"success": True, "path": "docs/a.txt", "checksum": sha(b"hello"),
                    "size": 5, "modified_time": 1700000000.5, "revision": 1}
    assert (data_dir / "docs" / "a.txt").read_bytes() == b"hello"
    assert os.stat(data_dir / "docs" / "a.txt").st_mtime == 1700000000.5
    assert tmp_files(data_dir) == []


async def test_upload_fields_may_follow_the_file(client: Any, data_dir: Path) -> None:
    response = await upload(client, "late.txt", b"x", file_first=True, checksum=sha(b"x"))
    assert response.status == 200
    assert (data_dir / "late.txt").read_bytes() == b"x"


async def test_upload_checksum_mismatch_stores_nothing(client: Any, data_dir: Path) -> None:
    await put(client, "a.txt", b"old")
    response = await upload(client, "a.txt", b"new", checksum=sha(b"other"))
    assert (await error_of(response, 400))["error"] == "checksum_mismatch"
    assert (data_dir / "a.txt").read_bytes() == b"old"
    assert tmp_files(data_dir) == []
    assert (await (await client.get("/health")).json())["cursor"] == 1


async def test_upload_base_checksum_conflict(client: Any, data_dir: Path) -> None:
    await put(client, "a.txt", b"v1")
    response = await upload(client, "a.txt", b"v2", base_checksum=sha(b"stale"))
    body = await error_of(response, 409)
    assert body["error"] == "conflict"
    assert body["server"]["checksum"] == sha(b"v1") and body["server"]["revision"] == 1
    assert (data_dir / "a.txt").read_bytes() == b"v1"
    assert tmp_files(data_dir) == []


async def test_upload_base_checksum_match_replaces(client: Any, data_dir: Path) -> None:
    await put(client, "a.txt", b"v1")
    assert (await upload(client, "a.txt", b"v2", base_checksum=sha(b"v1"))).status == 200
    assert (data_dir / "a.txt").read_bytes() == b"v2"


async def test_upload_empty_base_means_must_not_exist(client: Any) -> None:
    assert (await upload(client, "a.txt", b"v1", base_checksum="")).status == 200
    body = await error_of(await upload(client, "a.txt", b"v2", base_checksum=""), 409)
    assert body["server"]["checksum"] == sha(b"v1")


async def test_upload_of_deleted_file_with_its_old_checksum_recreates(client: Any) -> None:
    await put(client, "a.txt", b"v1")
    await client.delete("/files/a.txt", params={"client_id": "desk"})
    response = await upload(client, "a.txt", b"edited", base_checksum=sha(b"v1"))
    assert response.status == 200
    assert await (await client.get("/files/a.txt")).read() == b"edited"


async def test_upload_of_identical_bytes_is_not_a_new_revision(client: Any) -> None:
    first = await (await upload(client, "a.txt", b"same")).json()
    second = await (await upload(client, "a.txt", b"same")).json()
    assert second["revision"] == first["revision"] == 1
    assert (await (await client.get("/changes")).json())["cursor"] == 1


async def test_upload_empty_file(client: Any, data_dir: Path) -> None:
    body = await (await upload(client, "empty", b"")).json()
    assert body["size"] == 0 and body["checksum"] == sha(b"")
    assert (data_dir / "empty").read_bytes() == b""
    response = await client.get("/download/empty")
    assert response.status == 200 and await response.read() == b""


@pytest.mark.parametrize("fields,error", [
    ({"relative_path": "a"}, "the file part is missing"),
    ({"client_id": "laptop", "file": b"x"}, "relative_path"),
    ({"relative_path": "a", "file": b"x"}, "client_id"),
    ({"relative_path": "a", "client_id": "bad id", "file": b"x"}, "client_id"),
    ({"relative_path": "a", "client_id": "ok", "modified_time": "NaN", "file": b"x"},
     "modified_time"),
    ({"relative_path": "a", "client_id": "ok", "checksum": "abc", "file": b"x"}, "checksum"),
    ({"relative_path": "a", "client_id": "ok", "base_checksum": "abc", "file": b"x"},
     "base_checksum"),
])
async def test_upload_rejects_bad_fields(client: Any, data_dir: Path, fields: dict[str, Any],
                                         error: str) -> None:
    form = aiohttp.FormData(default_to_multipart=True)
    for key, value in fields.items():
        if key == "file":
            form.add_field(key, value, filename="f")
        else:
            form.add_field(key, value)
    body = await error_of(await client.post("/upload", data=form), 400)
    assert body["error"] == "invalid_request" and error in body["message"]
    assert tmp_files(data_dir) == [] and sorted(os.listdir(data_dir)) == [".syncd"]


async def test_upload_rejects_two_file_parts(client: Any, data_dir: Path) -> None:
    form = aiohttp.FormData(default_to_multipart=True)
    form.add_field("relative_path", "a")
    form.add_field("client_id", "laptop")
    form.add_field("file", b"1", filename="f")
    form.add_field("file", b"2", filename="f")
    assert (await error_of(await client.post("/upload", data=form), 400))["error"] == "invalid_request"
    assert tmp_files(data_dir) == []


async def test_upload_rejects_too_many_parts(client: Any) -> None:
    form = aiohttp.FormData(default_to_multipart=True)
    for index in range(40):
        form.add_field(f"junk{index}", "x")
    body = await error_of(await client.post("/upload", data=form), 400)
    assert "parts" in body["message"]


async def test_upload_rejects_huge_text_field(client: Any) -> None:
    form = aiohttp.FormData(default_to_multipart=True)
    form.add_field("relative_path", "a" * 100_000)
    assert (await error_of(await client.post("/upload", data=form), 400))["error"] == "invalid_request"


async def test_upload_rejects_non_multipart(client: Any) -> None:
    response = await client.post("/upload", data=b"raw", headers={"Content-Type": "text/plain"})
    assert (await error_of(response, 400))["error"] == "invalid_request"


async def test_upload_over_limit_stores_nothing(app_client: Any, data_dir: Path) -> None:
    client = await app_client(max_file_size=1000)
    await put(client, "a.txt", b"old")
    body = await error_of(await upload(client, "a.txt", b"x" * 1001), 413)
    assert body["error"] == "too_large"
    assert (data_dir / "a.txt").read_bytes() == b"old"
    assert tmp_files(data_dir) == []
    assert (await upload(client, "a.txt", b"x" * 1000)).status == 200


# -- PUT /files/{path} ----------------------------------------------------------

async def test_put_creates_then_replaces(client: Any, data_dir: Path) -> None:
    first = await put(client, "a/b.txt", b"one", **{"X-Modified-Time": "1600000000"})
    assert first.status == 201
    assert (await first.json())["modified_time"] == 1600000000
    second = await put(client, "a/b.txt", b"two", **{"X-Checksum-Sha256": sha(b"two")})
    assert second.status == 200 and (await second.json())["revision"] == 2
    assert (data_dir / "a" / "b.txt").read_bytes() == b"two"


async def test_put_if_match(client: Any, data_dir: Path) -> None:
    await put(client, "a.txt", b"v1")
    body = await error_of(await put(client, "a.txt", b"v2", **{"If-Match": '"' + "0" * 64 + '"'}), 412)
    assert body["error"] == "precondition_failed" and body["server"]["checksum"] == sha(b"v1")
    assert (data_dir / "a.txt").read_bytes() == b"v1"
    ok = await put(client, "a.txt", b"v2", **{"If-Match": f'"{sha(b"v1")}"'})
    assert ok.status == 200
    body = await error_of(await put(client, "new.txt", b"x", **{"If-Match": "*"}), 412)
    assert body["server"] is None


async def test_put_if_none_match_star(client: Any, data_dir: Path) -> None:
    assert (await put(client, "a.txt", b"v1", **{"If-None-Match": "*"})).status == 201
    body = await error_of(await put(client, "a.txt", b"v2", **{"If-None-Match": "*"}), 412)
    assert body["server"]["checksum"] == sha(b"v1")
    assert (data_dir / "a.txt").read_bytes() == b"v1"


@pytest.mark.parametrize("headers", [
    {}, {"X-Client-Id": "bad id"},
    {"X-Client-Id": "ok", "X-Checksum-Sha256": "nothex"},
    {"X-Client-Id": "ok", "X-Modified-Time": "tomorrow"},
    {"X-Client-Id": "ok", "X-Modified-Time": "inf"},
    {"X-Client-Id": "ok", "If-Match": ","},
])
async def test_put_rejects_bad_headers(client: Any, data_dir: Path, headers: dict[str, str]) -> None:
    response = await client.put("/files/a.txt", data=b"x", headers=headers)
    assert (await error_of(response, 400))["error"] == "invalid_request"
    assert sorted(os.listdir(data_dir)) == [".syncd"]


async def test_put_checksum_mismatch_stores_nothing(client: Any, data_dir: Path) -> None:
    response = await put(client, "a.txt", b"x", **{"X-Checksum-Sha256": sha(b"y")})
    assert (await error_of(response, 400))["error"] == "checksum_mismatch"
    assert sorted(os.listdir(data_dir)) == [".syncd"] and tmp_files(data_dir) == []


async def test_put_over_limit_by_content_length(app_client: Any, data_dir: Path) -> None:
    client = await app_client(max_file_size=10)
    body = await error_of(await put(client, "a.txt", b"x" * 11), 413)
    assert body["error"] == "too_large"
    assert sorted(os.listdir(data_dir)) == [".syncd"] and tmp_files(data_dir) == []


async def test_put_over_limit_while_streaming(app_client: Any, data_dir: Path) -> None:
    client = await app_client(max_file_size=100_000)

    async def body() -> Any:      # chunked: no Content-Length to refuse early
        for _ in range(20):
            yield b"x" * 10_000

    response = await client.put("/files/big.bin", data=body(), headers={"X-Client-Id": "a"})
    assert (await error_of(response, 413))["error"] == "too_large"
    assert sorted(os.listdir(data_dir)) == [".syncd"] and tmp_files(data_dir) == []


async def test_concurrent_uploads_to_one_path_stay_whole(client: Any, data_dir: Path) -> None:
    bodies = [bytes([index]) * 300_000 for index in range(10)]
    responses = await asyncio.gather(*(put(client, "race.bin", body) for body in bodies))
    assert sorted(r.status for r in responses) == [200] * 9 + [201]
    revisions = sorted([(await r.json())["revision"] for r in responses])
    assert revisions == list(range(1, 11))
    on_disk = (data_dir / "race.bin").read_bytes()
    assert on_disk in bodies
    listed = (await (await client.get("/files")).json())["files"]
    assert listed[0]["checksum"] == sha(on_disk) and listed[0]["revision"] == 10
    assert tmp_files(data_dir) == []


# -- downloads -------------------------------------------------------------------

async def test_download_headers(client: Any) -> None:
    await put(client, "notes/a.txt", b"0123456789", **{"X-Modified-Time": "1600000000"})
    for url in ("/download/notes/a.txt", "/files/notes/a.txt"):
        response = await client.get(url)
        assert response.status == 200 and await response.read() == b"0123456789"
        assert response.headers["ETag"] == f'"{sha(b"0123456789")}"'
        assert response.headers["X-Revision"] == "1"
        assert response.headers["Accept-Ranges"] == "bytes"
        assert response.headers["Content-Type"].startswith("text/plain")
        assert response.headers["Last-Modified"] == "Sun, 13 Sep 2020 12:26:40 GMT"


@pytest.mark.parametrize("header,status,body,content_range", [
    ("bytes=2-4", 206, b"234", "bytes 2-4/10"),
    ("bytes=7-", 206, b"789", "bytes 7-9/10"),
    ("bytes=-3", 206, b"789", "bytes 7-9/10"),
    ("bytes=5-100", 206, b"56789", "bytes 5-9/10"),
    ("bytes=0-1,4-5", 200, b"0123456789", None),
    ("lines=1-2", 200, b"0123456789", None),
])
async def test_download_range(client: Any, header: str, status: int, body: bytes,
                              content_range: str | None) -> None:
    await put(client, "a.bin", b"0123456789")
    response = await client.get("/download/a.bin", headers={"Range": header})
    assert response.status == status and await response.read() == body
    assert response.headers.get("Content-Range") == content_range


@pytest.mark.parametrize("header", ["bytes=10-", "bytes=20-30", "bytes=-0", "bytes=5-2"])
async def test_download_range_outside_is_416(client: Any, header: str) -> None:
    await put(client, "a.bin", b"0123456789")
    response = await client.get("/download/a.bin", headers={"Range": header})
    assert (await error_of(response, 416))["error"] == "range_not_satisfiable"
    assert response.headers["Content-Range"] == "bytes */10"


async def test_download_if_none_match_is_304(client: Any) -> None:
    await put(client, "a.txt", b"x")
    response = await client.get("/download/a.txt", headers={"If-None-Match": f'"{sha(b"x")}"'})
    assert response.status == 304 and await response.read() == b""
    other = await client.get("/download/a.txt", headers={"If-None-Match": '"' + "0" * 64 + '"'})
    assert other.status == 200


async def test_download_stale_if_range_sends_everything(client: Any) -> None:
    await put(client, "a.bin", b"0123456789")
    response = await client.get("/download/a.bin",
                                headers={"Range": "bytes=0-1", "If-Range": '"stale"'})
    assert response.status == 200 and await response.read() == b"0123456789"


async def test_head_has_headers_and_no_body(client: Any) -> None:
    await put(client, "a.txt", b"hello")
    for url in ("/download/a.txt", "/files/a.txt"):
        response = await client.head(url)
        assert response.status == 200
        assert response.headers["Content-Length"] == "5"
        assert response.headers["ETag"] == f'"{sha(b"hello")}"'
        assert await response.read() == b""


async def test_download_missing_and_deleted_are_404(client: Any) -> None:
    assert (await error_of(await client.get("/download/nope"), 404))["error"] == "not_found"
    await put(client, "a.txt", b"x")
    await client.delete("/files/a.txt", params={"client_id": "laptop"})
    assert (await error_of(await client.get("/download/a.txt"), 404))["error"] == "not_found"
    assert (await client.head("/download/a.txt")).status == 404


async def test_download_keeps_its_version_while_replaced(client: Any) -> None:
    old, new = b"o" * 2_000_000, b"n" * 2_000_000
    await put(client, "big.bin", old)
    response = await client.get("/download/big.bin")
    first = await response.content.read(1000)
    assert (await put(client, "big.bin", new)).status == 200
    rest = await response.read()
    assert first + rest == old


# -- DELETE ----------------------------------------------------------------------

async def test_delete_file_leaves_tombstone(client: Any, data_dir: Path) -> None:
    await put(client, "d/a.txt", b"x")
    response = await client.delete("/files/d/a.txt", params={"client_id": "desk"})
    assert await response.json() == {"success": True, "path": "d/a.txt", "deleted": 1,
                                     "revision": 2}
    assert sorted(os.listdir(data_dir)) == [".syncd"]       # the empty folder went too
    changes = (await (await client.get("/changes")).json())["changes"]
    assert changes[-1]["type"] == "delete" and changes[-1]["checksum"] == ""
    assert changes[-1]["size"] == 0 and changes[-1]["client_id"] == "desk"
    assert tmp_files(data_dir) == []


async def test_delete_folder_one_seq_per_file(client: Any, data_dir: Path) -> None:
    for name in ("d/a", "d/b", "d/e/c", "dx"):
        await put(client, name, name.encode())
    body = await (await client.delete("/files/d", params={"client_id": "desk"})).json()
    assert (body["deleted"], body["revision"]) == (3, 7)
    changes = (await (await client.get("/changes?since=4")).json())["changes"]
    assert [(c["seq"], c["path"]) for c in changes] == [(5, "d/a"), (6, "d/b"), (7, "d/e/c")]
    assert sorted(os.listdir(data_dir)) == [".syncd", "dx"]


async def test_delete_nothing_is_404(client: Any) -> None:
    response = await client.delete("/files/nope", params={"client_id": "desk"})
    assert (await error_of(response, 404))["error"] == "not_found"


@pytest.mark.parametrize("query", [{}, {"client_id": "bad id"},
                                   {"client_id": "ok", "base_checksum": "zz"}])
async def test_delete_rejects_bad_query(client: Any, data_dir: Path, query: dict[str, str]) -> None:
    await put(client, "a.txt", b"x")
    response = await client.delete("/files/a.txt", params=query)
    assert (await error_of(response, 400))["error"] == "invalid_request"
    assert (data_dir / "a.txt").exists()


async def test_delete_base_checksum_conflict(client: Any, data_dir: Path) -> None:
    await put(client, "a.txt", b"v2")
    response = await client.delete("/files/a.txt", params={"client_id": "desk",
                                                           "base_checksum": sha(b"v1")})
    body = await error_of(response, 409)
    assert body["error"] == "conflict" and body["server"]["checksum"] == sha(b"v2")
    assert (data_dir / "a.txt").read_bytes() == b"v2"
    ok = await client.delete("/files/a.txt", params={"client_id": "desk",
                                                     "base_checksum": sha(b"v2")})
    assert ok.status == 200


async def test_delete_if_match(client: Any, data_dir: Path) -> None:
    await put(client, "a.txt", b"v2")
    response = await client.delete("/files/a.txt", params={"client_id": "desk"},
                                   headers={"If-Match": f'"{sha(b"v1")}"'})
    assert (await error_of(response, 412))["error"] == "precondition_failed"
    assert (data_dir / "a.txt").exists()


async def test_delete_folder_with_precondition_is_409(client: Any, data_dir: Path) -> None:
    await put(client, "d/a", b"x")
    response = await client.delete("/files/d", params={"client_id": "desk", "base_checksum": ""})
    assert (await error_of(response, 409))["error"] == "conflict"
    assert (data_dir / "d" / "a").exists()


async def test_delete_of_file_missing_on_disk_still_tombstones(client: Any, data_dir: Path) -> None:
    await put(client, "a.txt", b"x")
    (data_dir / "a.txt").unlink()
    response = await client.delete("/files/a.txt", params={"client_id": "desk"})
    assert response.status == 200
    assert (await (await client.get("/files")).json())["files"] == []


# -- GET /files, GET /changes ---------------------------------------------------

async def test_list_files_by_prefix(client: Any) -> None:
    for name in ("b/2", "a/1", "a/0", "ab", "c"):
        await put(client, name, name.encode())
    await client.delete("/files/c", params={"client_id": "x"})
    everything = await (await client.get("/files")).json()
    assert [f["path"] for f in everything["files"]] == ["a/0", "a/1", "ab", "b/2"]
    assert everything["cursor"] == 6
    under_a = await (await client.get("/files", params={"prefix": "a"})).json()
    assert [f["path"] for f in under_a["files"]] == ["a/0", "a/1", "ab"]
    folder = await (await client.get("/files", params={"prefix": "a/"})).json()
    assert [f["path"] for f in folder["files"]] == ["a/0", "a/1"]
    assert set(folder["files"][0]) == {"path", "checksum", "size", "modified_time", "revision"}
    assert (await (await client.get("/files", params={"prefix": "zz"})).json())["files"] == []


async def test_changes_pages_with_has_more(client: Any) -> None:
    for index in range(5):
        await put(client, f"f{index}", b"x%d" % index, client_id="laptop")
    page = await (await client.get("/changes", params={"since": "1", "limit": "2"})).json()
    assert [c["seq"] for c in page["changes"]] == [2, 3]
    assert (page["cursor"], page["has_more"]) == (3, True)
    rest = await (await client.get("/changes", params={"since": "3", "limit": "2"})).json()
    assert [c["seq"] for c in rest["changes"]] == [4, 5] and rest["has_more"] is False
    empty = await (await client.get("/changes", params={"since": "5"})).json()
    assert (empty["changes"], empty["cursor"], empty["has_more"]) == ([], 5, False)
    entry = page["changes"][0]
    assert entry["type"] == "upsert" and entry["revision"] == entry["seq"] == 2
    assert entry["client_id"] == "laptop" and entry["checksum"] == sha(b"x1")
    assert entry["size"] == 2 and entry["time"] > 0 and empty["epoch"]


async def test_changes_limit_is_capped(client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(syncd, "CHANGES_MAX_LIMIT", 3)
    for index in range(5):
        await put(client, f"f{index}", b"x")
    body = await (await client.get("/changes", params={"limit": "999999"})).json()
    assert [change["seq"] for change in body["changes"]] == [1, 2, 3]
    assert body["has_more"] is True and body["cursor"] == 3


async def test_sync_notes_when_the_client_was_last_seen(client: Any) -> None:
    await client.post("/register", json={"client_id": "laptop"})
    before = (await (await client.get("/clients")).json())["clients"][0]["last_seen"]
    await asyncio.sleep(0.05)
    assert (await client.post("/sync", json={"client_id": "laptop", "files": []})).status == 200
    after = (await (await client.get("/clients")).json())["clients"][0]["last_seen"]
    assert after >= before + 0.05


@pytest.mark.parametrize("query", [{"since": "-1"}, {"since": "x"}, {"limit": "0"},
                                   {"limit": "1.5"}, {"since": "9" * 40}])
async def test_changes_rejects_bad_query(client: Any, query: dict[str, str]) -> None:
    response = await client.get("/changes", params=query)
    assert (await error_of(response, 400))["error"] == "invalid_request"


# -- errors in general ------------------------------------------------------------

async def test_unknown_route_is_json_404(client: Any) -> None:
    assert (await error_of(await client.get("/nope"), 404))["error"] == "not_found"


async def test_wrong_method_is_json_405(client: Any) -> None:
    assert (await error_of(await client.post("/files"), 405))["error"] == "method_not_allowed"


async def test_json_body_over_limit_is_413(client: Any) -> None:
    response = await client.post("/sync", data=b" " * (syncd.JSON_BODY_LIMIT + 1),
                                 headers={"Content-Type": "application/json"})
    assert (await error_of(response, 413))["error"] == "too_large"


async def test_internal_error_hides_details(client: Any, monkeypatch: pytest.MonkeyPatch,
                                            data_dir: Path) -> None:
    async def broken(self: Any) -> Any:
        raise RuntimeError(f"boom at {data_dir}/secret")
    monkeypatch.setattr(syncd.SQLStore, "list_clients", broken)
    response = await client.get("/clients")
    body = await error_of(response, 500)
    assert body == {"error": "internal", "message": "internal server error"}
    assert str(data_dir) not in json.dumps(body)


async def test_download_racing_an_upload_never_pairs_old_bytes_with_new_metadata(
        client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A large file opens in a worker thread: an upload lands between the record and the open."""
    big = syncd.INLINE_LIMIT + 1
    await put(client, "race.txt", b"o" * big)
    real_open = syncd.FileStore.open_read
    loop = asyncio.get_running_loop()
    raced = []

    def open_after_an_upload(self: Any, path: str) -> Any:
        if not raced:        # in the worker thread: the record is read, the file not yet open
            raced.append(True)
            uploaded = asyncio.run_coroutine_threadsafe(
                put(client, "race.txt", b"n" * (big + 5)), loop).result(timeout=30)
            assert uploaded.status == 200
        return real_open(self, path)
    monkeypatch.setattr(syncd.FileStore, "open_read", open_after_an_upload)
    response = await client.get("/download/race.txt")
    body = await response.read()
    assert raced and response.headers["ETag"] == f'"{sha(body)}"'
    assert response.headers["Content-Length"] == str(len(body))


async def test_a_small_download_during_a_rename_waits_for_its_commit(
        client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A small file opens on the loop, but a rename runs in a worker thread before its
    commit: a download that starts then must not pair the new bytes with the old record."""
    await put(client, "race.txt", b"old bytes")
    real_swap = syncd.FileStore.swap_in
    renamed, release = threading.Event(), threading.Event()

    def swap_then_hold(*args: Any, **kwargs: Any) -> Any:
        swap = real_swap(*args, **kwargs)    # the new bytes are at the name, not yet committed
        renamed.set()
        release.wait(timeout=30)
        return swap
    monkeypatch.setattr(syncd.FileStore, "swap_in", swap_then_hold)
    upload = asyncio.ensure_future(put(client, "race.txt", b"new bytes, longer"))
    assert await asyncio.to_thread(renamed.wait, 30)
    download = asyncio.ensure_future(client.get("/download/race.txt"))
    await asyncio.sleep(0.2)
    release.set()
    response = await download
    body = await response.read()
    assert (await upload).status == 200 and body == b"new bytes, longer"
    assert response.headers["ETag"] == f'"{sha(body)}"'
    assert response.headers["Content-Length"] == str(len(body))


@pytest.mark.parametrize("code", [errno.EAGAIN, errno.EOPNOTSUPP])
async def test_a_small_file_not_in_the_page_cache_is_read_in_a_thread(
        client: Any, monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    await put(client, "cold.txt", b"on disk only")
    threads = []
    real_pread = os.pread

    def refuse(*args: Any) -> int:
        raise OSError(code, os.strerror(code))

    def pread(*args: Any) -> bytes:
        threads.append(threading.current_thread())
        return real_pread(*args)
    monkeypatch.setattr(syncd.os, "preadv", refuse)
    monkeypatch.setattr(syncd.os, "pread", pread)
    response = await client.get("/download/cold.txt", headers={"Range": "bytes=3-6"})
    assert response.status == 206 and await response.read() == b"disk"
    assert threads and threads[0] is not threading.main_thread()
    monkeypatch.setattr(syncd.os, "preadv", lambda *args: (_ for _ in ()).throw(
        OSError(errno.EIO, "Input/output error")))
    assert (await client.get("/download/cold.txt")).status == 503     # not taken as "cold"


@pytest.mark.parametrize("seconds", [0, 1_700_000_000.5, 1_796_622_698.81, 4_102_444_800])
def test_last_modified_is_the_rfc_date(seconds: float) -> None:
    import email.utils
    assert syncd.http_date(seconds) == email.utils.formatdate(seconds, usegmt=True)


@pytest.mark.parametrize("path", ["a/b.txt", "x.TAR.GZ", "a.HTML", "noext", ".bashrc", "a/b.svg",
                                  "dir.d/file", "my.photo.2023.JPG", "a..b", ".x.txt", "a#b.txt"])
def test_content_type_is_guessed_from_the_name(path: str) -> None:
    import mimetypes
    assert syncd.content_type(path) == (mimetypes.guess_type(path)[0] or "application/octet-stream")
