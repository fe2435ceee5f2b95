"""Bad input answered as the contract says: 400 invalid_request, nothing stored, one INFO
line and no traceback, for every malformed multipart body and number we were shown."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytest

import syncd
from conftest import error_of, put, sha, tmp_files, upload

B = "xyzzy"


def part(name: str, value: bytes, *headers: str, filename: str | None = None) -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    lines = [f"Content-Disposition: {disposition}", *headers]
    return (f"--{B}\r\n" + "".join(line + "\r\n" for line in lines) + "\r\n").encode() + value + b"\r\n"


def fields(path: str = "a.txt") -> bytes:
    return part("relative_path", path.encode()) + part("client_id", b"laptop")


def valid(path: str = "a.txt", data: bytes = b"data") -> bytes:
    return fields(path) + part("file", data, filename="a") + f"--{B}--\r\n".encode()


MALFORMED = {
    "no-starting-boundary": b"garbage before anything\r\n\r\n",
    "wrong-boundary": valid().replace(B.encode(), b"other"),
    "truncated-no-closing-boundary": fields() + part("file", b"data", filename="a")[:-2],
    "nested-multipart-mixed": fields() + part(
        "file", b"--inner\r\n\r\nx\r\n--inner--", "Content-Type: multipart/mixed; boundary=inner",
        filename="a") + f"--{B}--\r\n".encode(),
    "charset-part-too-long": part("_charset_", b"x" * 40) + valid()[len(f"--{B}\r\n") - len(f"--{B}\r\n"):],
    "charset-part-not-utf8": part("_charset_", b"\xff\xfe") + valid(),
    "too-many-part-headers": fields() + part("file", b"d", *[f"X-H{i}: v" for i in range(130)],
                                             filename="a") + f"--{B}--\r\n".encode(),
    "one-huge-part-header": fields() + part("file", b"d", "X-Big: " + "v" * 9000,
                                            filename="a") + f"--{B}--\r\n".encode(),
    "content-length-abc": fields() + part("file", b"d", "Content-Length: abc",
                                          filename="a") + f"--{B}--\r\n".encode(),
    "nul-in-filename": fields() + part("file", b"d", filename="a\x00b") + f"--{B}--\r\n".encode(),
    "huge-preamble-line": b"p" * (3 * 1024 * 1024) + b"\r\n" + valid(),
    "huge-epilogue": valid() + b"e" * (5 * 1000 * 1000),
}


@pytest.mark.parametrize("name", list(MALFORMED))
async def test_malformed_multipart_is_400_and_stores_nothing(client: Any, data_dir: Path,
                                                             caplog: pytest.LogCaptureFixture,
                                                             name: str) -> None:
    caplog.set_level(logging.DEBUG)
    response = await client.post("/upload", data=MALFORMED[name], headers={
        "Content-Type": f"multipart/form-data; boundary={B}"})
    body = await error_of(response, 400)
    assert body["error"] == "invalid_request"
    assert not (data_dir / "a.txt").exists() and tmp_files(data_dir) == []
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.WARNING], \
        [r.getMessage() for r in caplog.records]


async def test_a_valid_upload_with_a_short_epilogue_is_stored(client: Any, data_dir: Path) -> None:
    response = await client.post("/upload", data=valid() + b"a short epilogue\r\n", headers={
        "Content-Type": f"multipart/form-data; boundary={B}"})
    assert response.status == 200 and (data_dir / "a.txt").read_bytes() == b"data"


@pytest.mark.parametrize("header,status", [
    ("bytes=" + "9" * 5000 + "-", 416),          # past any file (int() refuses 4,300 digits)
    ("bytes=0-" + "9" * 5000, 206),              # to the end
    ("bytes=-" + "9" * 5000, 206),               # the whole file as a suffix
    ("bytes=\u0661-\u0662", 200),                # Arabic-Indic digits: not a range at all
])
async def test_range_numbers_are_ascii_and_any_length(client: Any, header: str,
                                                      status: int) -> None:
    await put(client, "r.txt", b"0123456789")
    response = await client.get("/download/r.txt", headers={"Range": header})
    assert response.status == status
    if status in (200, 206):
        assert await response.read() == b"0123456789"


@pytest.mark.parametrize("query", ["limit=\uff15", "since=\u0661", "limit=1\u00b2"])
async def test_query_numbers_must_be_ascii_digits(client: Any, query: str) -> None:
    body = await error_of(await client.get(f"/changes?{query}"), 400)
    assert body["error"] == "invalid_request"


async def test_register_refuses_a_lone_surrogate(client: Any) -> None:
    body = await error_of(await client.post("/register", data='{"client_id": "a", '
                                            '"name": "\\ud800"}'), 400)
    assert body["error"] == "invalid_request" and "name" in body["message"]


async def test_weak_if_match_never_matches_on_put(client: Any, data_dir: Path) -> None:
    await put(client, "doc.txt", b"v1")
    response = await put(client, "doc.txt", b"v2", **{"If-Match": f'W/"{sha(b"v1")}"'})
    assert (await error_of(response, 412))["error"] == "precondition_failed"
    assert (data_dir / "doc.txt").read_bytes() == b"v1"
    assert (await put(client, "doc.txt", b"v2", **{"If-Match": f'"{sha(b"v1")}"'})).status == 200


async def test_weak_if_none_match_still_matches_on_get(client: Any) -> None:
    await put(client, "doc.txt", b"v1")
    response = await client.get("/download/doc.txt", headers={"If-None-Match": f'W/"{sha(b"v1")}"'})
    assert response.status == 304


@pytest.mark.parametrize("value", ['""', "", "garbage, ,"])
async def test_odd_if_none_match_on_get_is_not_an_error(client: Any, value: str) -> None:
    await put(client, "doc.txt", b"v1")
    response = await client.get("/download/doc.txt", headers={"If-None-Match": value})
    assert response.status == 200 and await response.read() == b"v1"


async def test_empty_etag_on_put_matches_nothing(client: Any) -> None:
    response = await put(client, "new.txt", b"x", **{"If-None-Match": '""'})
    assert response.status == 201


ISO = "2026-12-01T21:48:55"          # no zone: UTC
ISO_SECONDS = 1796161735.0


@pytest.mark.parametrize("text,seconds", [
    (ISO, ISO_SECONDS), (ISO + "Z", ISO_SECONDS), ("2026-12-01T22:48:55+01:00", ISO_SECONDS),
    (ISO + ".5", ISO_SECONDS + 0.5), ("1796161735", ISO_SECONDS), ("1796161735.25", ISO_SECONDS + 0.25),
])
def test_times_may_be_iso_8601(text: str, seconds: float) -> None:
    assert syncd.validate_modified_time(text) == seconds


@pytest.mark.parametrize("text", ["\u0661\u0662", "1_000", "nan", "inf", "1e400", "yesterday",
                                  "2026-13-01T00:00:00", "1969-12-31T23:59:59Z"])
def test_times_that_are_not_times_are_400(text: str) -> None:
    with pytest.raises(syncd.InvalidRequest) as info:
        syncd.validate_modified_time(text)
    assert syncd.refusal_error(info.value).status == 400


async def test_iso_8601_times_are_accepted_everywhere_and_answered_as_numbers(
        client: Any, data_dir: Path) -> None:
    plan = await (await client.post("/sync", json={"client_id": "other-design", "files": [
        {"path": "a.txt", "checksum": sha(b"a"), "size": 1, "modified_time": ISO}]})).json()
    assert plan["upload"] == ["a.txt"]
    body = await (await upload(client, "a.txt", b"a", modified_time=ISO + "Z")).json()
    assert body["modified_time"] == ISO_SECONDS
    assert os.stat(data_dir / "a.txt").st_mtime == ISO_SECONDS
    response = await put(client, "b.txt", b"b", **{"X-Modified-Time": ISO})
    assert (await response.json())["modified_time"] == ISO_SECONDS
    listed = (await (await client.get("/files")).json())["files"]
    assert all(isinstance(entry["modified_time"], float) for entry in listed)
