"""Resumable uploads: tus 1.0.0 at /uploads/ (SPEC Part 2), header by header and error by
error, and with a stock client (tuspy)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
from pathlib import Path
from typing import Any

import pytest

from conftest import error_of, put, sha, tmp_files

TUS = {"Tus-Resumable": "1.0.0"}


def metadata(**fields: str) -> str:
    return ",".join(f"{key} {base64.b64encode(value.encode()).decode()}"
                    for key, value in fields.items())


async def create(client: Any, length: int | None, path: str = "video.mp4",
                 headers: dict[str, str] | None = None, **fields: str) -> Any:
    sizes = {"Upload-Length": str(length)} if length is not None else {"Upload-Defer-Length": "1"}
    return await client.post("/uploads/", headers={
        **TUS, **sizes, "Upload-Metadata": metadata(relative_path=path, client_id="laptop",
                                                    **fields), **(headers or {})})


async def patch(client: Any, location: str, offset: int, data: bytes,
                **headers: str) -> Any:
    return await client.patch(location, data=data, headers={
        **TUS, "Upload-Offset": str(offset), "Content-Type": "application/offset+octet-stream",
        **{key.replace("_", "-"): value for key, value in headers.items()}})


def partials(data_dir: Path) -> list[str]:
    return sorted(os.listdir(data_dir / ".syncd" / "uploads"))


async def test_options_says_what_is_spoken(client: Any) -> None:
    response = await client.options("/uploads/")
    assert response.status == 204
    assert response.headers["Tus-Resumable"] == "1.0.0"
    assert response.headers["Tus-Version"] == "1.0.0"
    assert set(response.headers["Tus-Extension"].split(",")) == {
        "creation", "creation-with-upload", "creation-defer-length", "expiration",
        "termination", "checksum"}
    assert response.headers["Tus-Max-Size"] == str(100_000_000)
    assert response.headers["Tus-Checksum-Algorithm"] == "sha1,sha256"


async def test_an_upload_in_three_chunks_is_stored_as_any_upload(client: Any,
                                                                 data_dir: Path) -> None:
    data = os.urandom(300_000)
    created = await create(client, len(data), checksum=sha(data), modified_time="1700000000")
    assert created.status == 201 and created.headers["Tus-Resumable"] == "1.0.0"
    location = created.headers["Location"]
    assert location.startswith("/uploads/") and "Upload-Expires" in created.headers
    head = await client.head(location, headers=TUS)
    assert head.status == 200 and head.headers["Upload-Offset"] == "0"
    assert head.headers["Upload-Length"] == str(len(data))
    assert head.headers["Cache-Control"] == "no-store"
    async with client.ws_connect("/ws/phone") as ws:
        await ws.receive_json(timeout=5)
        for start in (0, 100_000, 200_000):
            response = await patch(client, location, start, data[start:start + 100_000])
            assert response.status == 204
            assert response.headers["Upload-Offset"] == str(start + 100_000)
        assert response.headers["X-Revision"] == "1"
        event = await ws.receive_json(timeout=5)
    assert event["path"] == "video.mp4" and event["checksum"] == sha(data)
    assert (data_dir / "video.mp4").read_bytes() == data
    assert os.stat(data_dir / "video.mp4").st_mtime == 1_700_000_000
    assert (await client.head(location, headers=TUS)).status == 404      # done: gone
    assert partials(data_dir) == [] and tmp_files(data_dir) == []


async def test_creation_with_upload_and_deferred_length(client: Any, data_dir: Path) -> None:
    whole = await client.post("/uploads/", data=b"all at once", headers={
        **TUS, "Upload-Length": "11", "Content-Type": "application/offset+octet-stream",
        "Upload-Metadata": metadata(relative_path="one.txt", client_id="laptop")})
    assert whole.status == 201 and whole.headers["Upload-Offset"] == "11"
    assert (data_dir / "one.txt").read_bytes() == b"all at once"
    deferred = await create(client, None, "later.txt")
    location = deferred.headers["Location"]
    head = await client.head(location, headers=TUS)
    assert head.headers["Upload-Defer-Length"] == "1" and "Upload-Length" not in head.headers
    assert (await patch(client, location, 0, b"abc")).status == 204
    assert (await patch(client, location, 3, b"def", Upload_Length="6")).status == 204
    assert (data_dir / "later.txt").read_bytes() == b"abcdef"


async def test_x_http_method_override_and_termination(client: Any, data_dir: Path) -> None:
    location = (await create(client, 10)).headers["Location"]
    response = await client.post(location, data=b"12345", headers={
        **TUS, "X-HTTP-Method-Override": "PATCH", "Upload-Offset": "0",
        "Content-Type": "application/offset+octet-stream"})
    assert response.status == 204 and response.headers["Upload-Offset"] == "5"
    head = await client.post(location, headers={**TUS, "X-HTTP-Method-Override": "HEAD"})
    assert head.headers["Upload-Offset"] == "5"
    assert (await client.delete(location, headers=TUS)).status == 204
    assert (await client.head(location, headers=TUS)).status == 404
    assert partials(data_dir) == [] and not (data_dir / "video.mp4").exists()


@pytest.mark.parametrize("case, status, code", [
    ("no tus header", 412, "precondition_failed"),
    ("wrong offset", 409, "conflict"),
    ("wrong content type", 415, "unsupported_media_type"),
    ("bad chunk checksum", 460, "checksum_mismatch"),
    ("unknown upload", 404, "not_found"),
    ("past the length", 413, "too_large"),
    ("no offset", 400, "invalid_request"),
    ("unknown checksum algorithm", 400, "invalid_request"),
])
async def test_a_bad_patch_is_refused_and_keeps_nothing_of_it(
        client: Any, data_dir: Path, case: str, status: int, code: str) -> None:
    location = (await create(client, 10)).headers["Location"]
    assert (await patch(client, location, 0, b"12345")).status == 204
    headers: dict[str, str] = {**TUS, "Upload-Offset": "5",
                               "Content-Type": "application/offset+octet-stream"}
    body, target = b"67890", location
    if case == "no tus header":
        del headers["Tus-Resumable"]
    elif case == "wrong offset":
        headers["Upload-Offset"] = "3"
    elif case == "wrong content type":
        headers["Content-Type"] = "application/octet-stream"
    elif case == "bad chunk checksum":
        headers["Upload-Checksum"] = "sha256 " + base64.b64encode(
            hashlib.sha256(b"other").digest()).decode()
    elif case == "unknown upload":
        target = "/uploads/" + "0" * 32
    elif case == "past the length":
        body = b"6789012345"
    elif case == "no offset":
        del headers["Upload-Offset"]
    elif case == "unknown checksum algorithm":
        headers["Upload-Checksum"] = "md5 " + base64.b64encode(b"x" * 16).decode()
    response = await client.patch(target, data=body, headers=headers)
    error = await error_of(response, status)
    assert error["error"] == code and response.headers["Tus-Resumable"] == "1.0.0"
    if case == "no tus header":
        assert response.headers["Tus-Version"] == "1.0.0"
    head = await client.head(location, headers=TUS)
    assert head.headers["Upload-Offset"] == "5"                  # nothing of it was kept
    good = base64.b64encode(hashlib.sha1(b"67890").digest()).decode()
    assert (await patch(client, location, 5, b"67890",
                        Upload_Checksum=f"sha1 {good}")).status == 204
    assert (data_dir / "video.mp4").read_bytes() == b"1234567890"


@pytest.mark.parametrize("headers, fields, status, code", [
    ({"Upload-Length": "100000001"}, {}, 413, "too_large"),
    ({"Upload-Length": None}, {}, 400, "invalid_request"),
    ({"Upload-Defer-Length": "2"}, {}, 400, "invalid_request"),
    ({}, {"relative_path": None}, 400, "invalid_request"),
    ({}, {"client_id": None}, 400, "invalid_request"),
    ({}, {"relative_path": "../escape"}, 400, "invalid_path"),
    ({}, {"relative_path": "a.exe"}, 415, "extension_not_allowed"),
    ({}, {"base_checksum": "0" * 64}, 409, "conflict"),
    ({"Upload-Metadata": "relative_path %%%"}, {}, 400, "invalid_request"),
])
async def test_a_bad_creation_is_refused_before_any_byte(
        app_client: Any, data_dir: Path, headers: dict[str, str | None],
        fields: dict[str, str | None], status: int, code: str) -> None:
    client = await app_client(allowed_extensions=[".mp4", ".txt"])
    await put(client, "video.mp4", b"already here")
    values = {"relative_path": "video.mp4", "client_id": "laptop", **fields}
    request = {**TUS, "Upload-Length": "10",
               "Upload-Metadata": metadata(**{k: v for k, v in values.items() if v is not None}),
               **headers}
    response = await client.post("/uploads/", headers={k: v for k, v in request.items()
                                                       if v is not None})
    assert (await error_of(response, status))["error"] == code
    assert partials(data_dir) == []


async def test_a_base_changed_during_the_upload_is_409_at_the_last_byte(
        client: Any, data_dir: Path) -> None:
    await put(client, "doc.txt", b"v1")
    location = (await create(client, 4, "doc.txt", base_checksum=sha(b"v1"))).headers["Location"]
    assert (await patch(client, location, 0, b"v2")).status == 204
    await put(client, "doc.txt", b"edited meanwhile")
    body = await error_of(await patch(client, location, 2, b"!!"), 409)
    assert body["server"]["checksum"] == sha(b"edited meanwhile")
    assert (data_dir / "doc.txt").read_bytes() == b"edited meanwhile"
    assert partials(data_dir) == [] and tmp_files(data_dir) == []


async def test_a_wrong_whole_checksum_is_refused_at_the_last_byte(client: Any,
                                                                  data_dir: Path) -> None:
    location = (await create(client, 3, checksum=sha(b"abc"))).headers["Location"]
    body = await error_of(await patch(client, location, 0, b"abd"), 400)
    assert body["error"] == "checksum_mismatch" and not (data_dir / "video.mp4").exists()


async def test_an_upload_survives_a_restart(app_client: Any, data_dir: Path) -> None:
    data = os.urandom(200_000)
    client = await app_client()
    location = (await create(client, len(data), checksum=sha(data))).headers["Location"]
    assert (await patch(client, location, 0, data[:120_000])).status == 204
    await client.close()
    client = await app_client()                       # the hash is computed again from disk
    head = await client.head(location, headers=TUS)
    assert head.status == 200 and head.headers["Upload-Offset"] == "120000"
    assert (await patch(client, location, 120_000, data[120_000:])).status == 204
    assert (data_dir / "video.mp4").read_bytes() == data


async def test_expired_uploads_are_410_and_their_bytes_gone(app_client: Any,
                                                            data_dir: Path) -> None:
    client = await app_client(upload_expiry=0.2)
    location = (await create(client, 10)).headers["Location"]
    assert (await patch(client, location, 0, b"12345")).status == 204
    await asyncio.sleep(0.4)
    response = await client.head(location, headers=TUS)
    assert response.status == 410 and partials(data_dir) == []
    assert (await error_of(await patch(client, location, 5, b"67890"), 410))["error"] == "gone"


async def test_a_client_over_its_open_uploads_gets_429(app_client: Any) -> None:
    client = await app_client(max_partial_uploads=2, max_partial_bytes=1000)
    for index in range(2):
        assert (await create(client, 10, f"{index}.txt")).status == 201
    assert (await error_of(await create(client, 10, "2.txt"), 429))["error"] == "too_many_uploads"
    other = await client.post("/uploads/", headers={
        **TUS, "Upload-Length": "10",
        "Upload-Metadata": metadata(relative_path="x.txt", client_id="phone")})
    assert other.status == 201                      # a limit per client
    big = await client.post("/uploads/", headers={
        **TUS, "Upload-Length": "991",
        "Upload-Metadata": metadata(relative_path="y.txt", client_id="phone")})
    assert (await error_of(big, 429))["error"] == "too_many_uploads"


async def test_tuspy_uploads_into_syncd_unchanged(client: Any, data_dir: Path,
                                                  tmp_path: Path) -> None:
    from tusclient import client as tus_client
    data = os.urandom(3 * 1024 * 1024 + 17)
    source = tmp_path / "source.bin"
    source.write_bytes(data)
    url = str(client.make_url("/uploads/"))

    def upload() -> None:
        # our own stream: tuspy opens a file path anew per chunk and never closes it
        with open(source, "rb") as stream:
            uploader = tus_client.TusClient(url).uploader(
                file_stream=stream, chunk_size=1024 * 1024,
                metadata={"relative_path": "from-tuspy.bin", "client_id": "tuspy",
                          "checksum": sha(data)})
            uploader.upload()
    await asyncio.to_thread(upload)
    assert (data_dir / "from-tuspy.bin").read_bytes() == data
    assert partials(data_dir) == []


async def test_a_stalled_chunk_is_408_and_keeps_what_arrived(app_client: Any,
                                                            data_dir: Path) -> None:
    client = await app_client(upload_idle_timeout=0.3)
    data = os.urandom(100_000)
    location = (await create(client, len(data))).headers["Location"]

    async def stalling() -> Any:
        yield data[:40_000]
        await asyncio.sleep(3)
        yield data[40_000:]
    response = await client.patch(location, data=stalling(), headers={
        **TUS, "Upload-Offset": "0", "Content-Type": "application/offset+octet-stream",
        "Content-Length": str(len(data))})
    assert (await error_of(response, 408))["error"] == "request_timeout"
    assert response.headers["Tus-Resumable"] == "1.0.0"
    head = await client.head(location, headers=TUS)
    assert head.headers["Upload-Offset"] == "40000"
    assert (await patch(client, location, 40_000, data[40_000:])).status == 204
    assert (data_dir / "video.mp4").read_bytes() == data
