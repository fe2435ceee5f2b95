"""Path validation, and path attacks on every route that takes a path."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from yarl import URL

import syncd
from conftest import error_of, put, tmp_files, upload


@pytest.mark.parametrize("raw", [
    "", "/etc/passwd", "a\\b", "a\x00b", "a\x1fb", "a\x7fb", "a\u0085b", "a//b", "a/",
    "./a", "a/./b", "..", "../x", "a/../../x", "x" * 256, "d/" * 2048 + "x",
    ".syncd", ".syncd/syncd.db", ".SyncD/tmp/x", "\udcff",
    ".syncd-client", ".syncd-client/state.db", ".SYNCD-Client/tmp/x",
])
def test_validate_path_rejects(raw: str) -> None:
    with pytest.raises(syncd.InvalidPath) as info:
        syncd.validate_path(raw)
    error = syncd.refusal_error(info.value)
    assert (error.status, error.code) == (400, "invalid_path")


@pytest.mark.parametrize("raw", [
    "a.txt", "docs/notes/a.txt", "%2e%2e", "...", ".hidden", "x" * 255, "été/ÉTÉ.txt",
    ".syncd-client-not-reserved/x", "a b/c d.txt",
])
def test_validate_path_accepts(raw: str) -> None:
    assert syncd.validate_path(raw) == raw


def test_validate_path_stores_nfc_not_nfkc() -> None:
    assert syncd.validate_path("e\u0301.txt") == "\u00e9.txt"
    assert syncd.validate_path("\ufb01le.txt") == "\ufb01le.txt"   # the ligature stays


def test_segment_limit_counts_bytes() -> None:
    with pytest.raises(syncd.InvalidPath):
        syncd.validate_path("é" * 128)   # 256 bytes in UTF-8


ATTACKS = [
    "%2e%2e/%2e%2e/etc/passwd", "..%2f..%2fetc%2fpasswd", "a/%2e%2e/%2e%2e/x", "%2e%2e",
    "a%5c..%5cb", "a%00b", "a%0ab", ".syncd/syncd.db", "%2esyncd/syncd.db", "a%2f%2fb",
    "x" * 300,
]


async def routes_for(client: Any, encoded: str) -> list[Any]:
    """One request per route that takes a path in the URL."""
    def url(prefix: str) -> URL:
        return URL(prefix + encoded, encoded=True)
    return [
        await client.put(url("/files/"), data=b"x", headers={"X-Client-Id": "laptop"}),
        await client.get(url("/files/")),
        await client.head(url("/files/")),
        await client.delete(url("/files/").with_query(client_id="laptop")),
        await client.get(url("/download/")),
        await client.head(url("/download/")),
    ]


@pytest.mark.parametrize("encoded", ATTACKS)
async def test_path_attacks_are_refused_on_every_route(client: Any, data_dir: Path,
                                                       encoded: str) -> None:
    for response in await routes_for(client, encoded):
        assert response.status in (400, 404), (response.method, encoded, response.status)
        if response.method != "HEAD":
            body = await response.json()
            assert body["error"] in ("invalid_path", "not_found")
    assert sorted(os.listdir(data_dir)) == [".syncd"]


async def test_client_state_database_cannot_be_replaced(client: Any, data_dir: Path) -> None:
    body = await error_of(await put(client, ".syncd-client/state.db", b"garbage"), 400)
    assert body["error"] == "invalid_path" and ".syncd-client" in body["message"]
    body = await error_of(await upload(client, ".syncd-client/state.db", b"garbage"), 400)
    assert body["error"] == "invalid_path"
    assert sorted(os.listdir(data_dir)) == [".syncd"]


@pytest.mark.parametrize("raw", ["../escape.txt", "/abs.txt", ".syncd/x", "a\\b", "a\x00b"])
async def test_upload_refuses_bad_relative_path(client: Any, data_dir: Path, raw: str) -> None:
    body = await error_of(await upload(client, raw, b"data"), 400)
    assert body["error"] == "invalid_path"
    assert sorted(os.listdir(data_dir)) == [".syncd"]
    assert tmp_files(data_dir) == []


async def test_sync_refuses_bad_path(client: Any) -> None:
    response = await client.post("/sync", json={"client_id": "laptop", "files": [
        {"path": "../x", "checksum": "0" * 64, "size": 1, "modified_time": 1}]})
    assert (await error_of(response, 400))["error"] == "invalid_path"


async def test_double_slash_is_refused(client: Any, data_dir: Path) -> None:
    response = await client.put(URL("/files/a//b.txt", encoded=True), data=b"x",
                                headers={"X-Client-Id": "laptop"})
    assert (await error_of(response, 400))["error"] == "invalid_path"


async def test_nfd_upload_is_stored_as_nfc(client: Any, data_dir: Path) -> None:
    assert (await put(client, "cafe\u0301.txt", b"x")).status == 201
    assert os.listdir(data_dir / ".") == [".syncd", "caf\u00e9.txt"] or sorted(
        os.listdir(data_dir)) == [".syncd", "caf\u00e9.txt"]
    response = await client.get("/files/caf\u00e9.txt")
    assert await response.read() == b"x"


async def test_symlink_in_tree_is_not_followed_for_reads(client: Any, data_dir: Path,
                                                         tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"top secret")
    assert (await put(client, "link.txt", b"harmless")).status == 201
    (data_dir / "link.txt").unlink()
    (data_dir / "link.txt").symlink_to(secret)
    response = await client.get("/download/link.txt")
    assert response.status == 404
    assert b"top secret" not in await response.read()


async def test_symlinked_folder_is_not_followed(client: Any, data_dir: Path,
                                                tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "f.txt").write_bytes(b"outside")
    assert (await put(client, "dir/f.txt", b"inside")).status == 201
    (data_dir / "dir" / "f.txt").unlink()
    (data_dir / "dir").rmdir()
    (data_dir / "dir").symlink_to(outside)
    assert (await client.get("/download/dir/f.txt")).status == 404
    response = await put(client, "dir/new.txt", b"x")
    assert (await error_of(response, 409))["error"] == "conflict"
    assert sorted(os.listdir(outside)) == ["f.txt"]
    response = await client.delete("/files/dir/f.txt", params={"client_id": "laptop"})
    assert response.status == 200        # the record goes; the file outside stays
    assert (outside / "f.txt").read_bytes() == b"outside"


async def test_extension_filter(app_client: Any, data_dir: Path) -> None:
    client = await app_client(allowed_extensions=(".txt", ".tar.gz"))
    assert (await put(client, "a.TXT", b"x")).status == 201
    assert (await put(client, "b.tar.gz", b"x")).status == 201
    body = await error_of(await put(client, "c.exe", b"x"), 415)
    assert body["error"] == "extension_not_allowed"
    body = await error_of(await upload(client, "d.exe", b"x"), 415)
    assert body["error"] == "extension_not_allowed"
    assert sorted(os.listdir(data_dir)) == [".syncd", "a.TXT", "b.tar.gz"]


async def test_case_twin_file_is_refused(client: Any, data_dir: Path) -> None:
    assert (await put(client, "\u00e9t\u00e9.txt", b"1")).status == 201
    body = await error_of(await put(client, "\u00c9T\u00c9.txt", b"2"), 409)
    assert body["error"] == "case_conflict"
    assert sorted(os.listdir(data_dir)) == [".syncd", "\u00e9t\u00e9.txt"]


async def test_case_twin_folder_is_refused(client: Any) -> None:
    assert (await put(client, "docs/a", b"1")).status == 201
    body = await error_of(await put(client, "Docs/b", b"2"), 409)
    assert body["error"] == "case_conflict"
    body = await error_of(await upload(client, "DOCS/c", b"3"), 409)
    assert body["error"] == "case_conflict"


async def test_case_twin_of_a_folder_name_is_refused(client: Any) -> None:
    assert (await put(client, "docs/a", b"1")).status == 201
    assert (await error_of(await put(client, "Docs", b"2"), 409))["error"] == "case_conflict"


async def test_case_twin_allowed_when_configured(app_client: Any, data_dir: Path) -> None:
    client = await app_client(allow_case_clash=True)
    assert (await put(client, "docs/a", b"1")).status == 201
    assert (await put(client, "Docs/a", b"2")).status == 201
    assert (data_dir / "Docs" / "a").read_bytes() == b"2"


async def test_case_twin_of_a_deleted_file_is_allowed(client: Any) -> None:
    assert (await put(client, "A.txt", b"1")).status == 201
    assert (await client.delete("/files/A.txt", params={"client_id": "laptop"})).status == 200
    assert (await put(client, "a.txt", b"2")).status == 201


async def test_file_where_a_folder_is_needed_is_a_conflict(client: Any, data_dir: Path) -> None:
    assert (await put(client, "a", b"file")).status == 201
    body = await error_of(await put(client, "a/b", b"x"), 409)
    assert body["error"] == "conflict" and body["server"] is None
    assert (data_dir / "a").read_bytes() == b"file"


async def test_folder_where_a_file_is_needed_is_a_conflict(client: Any, data_dir: Path) -> None:
    assert (await put(client, "a/b", b"x")).status == 201
    body = await error_of(await put(client, "a", b"file"), 409)
    assert body["error"] == "conflict"
    assert (data_dir / "a" / "b").read_bytes() == b"x"


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
async def test_empty_path_in_url_is_invalid_path(client: Any, method: str) -> None:
    response = await client.request(method, "/files/", params={"client_id": "laptop"},
                                    headers={"X-Client-Id": "laptop"})
    assert (await error_of(response, 400))["error"] == "invalid_path"


RAW_ATTACKS = ["../x", "a/../../x", "/etc/passwd", "a\\..\\b", "a\x00b", "a\nb", ".syncd/syncd.db",
               ".SYNCD/tmp/x", "a//b", "./a", "x" * 256, "d/" * 2100 + "x"]


@pytest.mark.parametrize("raw", RAW_ATTACKS)
async def test_path_attacks_in_bodies_are_refused(client: Any, data_dir: Path, raw: str) -> None:
    assert (await error_of(await upload(client, raw, b"x"), 400))["error"] == "invalid_path"
    response = await client.post("/sync", json={"client_id": "laptop", "files": [
        {"path": raw, "checksum": "0" * 64, "size": 1, "modified_time": 1}]})
    assert (await error_of(response, 400))["error"] == "invalid_path"
    assert sorted(os.listdir(data_dir)) == [".syncd"]
    assert tmp_files(data_dir) == []


async def test_nfd_twin_of_a_file_is_the_same_file(client: Any, data_dir: Path) -> None:
    assert (await put(client, "caf\u00e9.txt", b"nfc")).status == 201
    response = await upload(client, "cafe\u0301.txt", b"nfd")
    assert response.status == 200 and (await response.json())["path"] == "caf\u00e9.txt"
    assert sorted(os.listdir(data_dir)) == [".syncd", "caf\u00e9.txt"]
    assert (data_dir / "caf\u00e9.txt").read_bytes() == b"nfd"
    listed = (await (await client.get("/files")).json())["files"]
    assert [f["path"] for f in listed] == ["caf\u00e9.txt"]
