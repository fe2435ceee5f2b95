"""A web page in the user's browser must not be able to use the server (SPEC Part 2,
"Browsers and hostile trees"): Origin and Host checks, and file responses that never
run script in the server's origin."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest

import syncd
from conftest import error_of, put, sha

EVIL = "http://evil.example"


def own_origin(client: Any) -> str:
    return f"http://127.0.0.1:{client.port}"


async def test_cross_site_form_upload_is_refused_and_stores_nothing(client: Any,
                                                                   data_dir: Path) -> None:
    await put(client, "notes.txt", b"mine")
    form = aiohttp.FormData()
    form.add_field("relative_path", "notes.txt")
    form.add_field("client_id", "web")
    form.add_field("file", b"overwritten by a web page", filename="x")
    body = await error_of(await client.post("/upload", data=form, headers={"Origin": EVIL}), 403)
    assert body["error"] == "forbidden"
    assert (data_dir / "notes.txt").read_bytes() == b"mine"


@pytest.mark.parametrize("method,path", [
    ("GET", "/files"), ("GET", "/download/notes.txt"), ("DELETE", "/files/notes.txt?client_id=w"),
    ("GET", "/changes"), ("GET", "/clients"), ("POST", "/register"), ("GET", "/metrics"),
])
async def test_every_route_refuses_a_foreign_origin(client: Any, data_dir: Path,
                                                    method: str, path: str) -> None:
    await put(client, "notes.txt", b"mine")
    for origin in (EVIL, "null", f"https://127.0.0.1:{client.port}", "garbage"):
        response = await client.request(method, path, headers={"Origin": origin})
        assert (await error_of(response, 403))["error"] == "forbidden", origin
    assert (data_dir / "notes.txt").read_bytes() == b"mine"


async def test_own_origin_and_allowed_origins_are_served(app_client: Any) -> None:
    client = await app_client(allowed_origins=("https://sync.example.com:443",))
    assert (await client.get("/files", headers={"Origin": own_origin(client)})).status == 200
    assert (await client.get("/files", headers={"Origin": "https://SYNC.example.com"})).status == 200
    assert (await client.get("/files", headers={"Origin": "http://sync.example.com"})).status == 403


async def test_health_answers_any_origin(client: Any) -> None:
    assert (await client.get("/health", headers={"Origin": EVIL})).status == 200


async def test_cross_site_websocket_is_refused(client: Any) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await client.ws_connect("/ws/spy", headers={"Origin": EVIL})
    assert info.value.status == 403
    ws = await client.ws_connect("/ws/mine", headers={"Origin": own_origin(client)})
    assert (await ws.receive_json())["type"] == "hello"
    await ws.close()


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "127.0.0.1.evil.example"])
async def test_dns_rebinding_host_is_refused_without_a_key(client: Any, host: str) -> None:
    body = await error_of(await client.get("/files", headers={"Host": host}), 403)
    assert body["error"] == "forbidden" and "allowed_hosts" in body["message"]


@pytest.mark.parametrize("host", ["localhost:8000", "LOCALHOST", "127.0.0.1", "[::1]:8000",
                                  "192.0.2.7:8000"])
async def test_ip_and_localhost_hosts_are_served(client: Any, host: str) -> None:
    assert (await client.get("/files", headers={"Host": host})).status == 200


async def test_allowed_hosts_and_any_host_with_a_key(app_client: Any, tmp_path: Any) -> None:
    client = await app_client(allowed_hosts=("sync.lan",))
    assert (await client.get("/files", headers={"Host": "sync.lan:8000"})).status == 200
    assert (await client.get("/files", headers={"Host": "other.lan"})).status == 403
    keyed = await app_client(api_key="k", sync_directory=str(tmp_path / "keyed"))
    response = await keyed.get("/files", headers={"Host": "sync.example.com",
                                                  "Authorization": "Bearer k"})
    assert response.status == 200


@pytest.mark.parametrize("name", ["x.html", "pic.svg", "page.htm"])
async def test_file_responses_never_run_script(client: Any, name: str) -> None:
    data = b"<script>fetch('/files').then(r => r.text()).then(alert)</script>"
    await put(client, name, data)
    for route in (f"/download/{name}", f"/files/{name}"):
        for extra in ({}, {"Range": "bytes=0-3"}, {"If-None-Match": f'"{sha(data)}"'}):
            for method in ("GET", "HEAD"):
                response = await client.request(method, route, headers=extra)
                assert response.status in (200, 206, 304)
                assert response.headers["X-Content-Type-Options"] == "nosniff"
                assert response.headers["Content-Security-Policy"] == "sandbox"


def test_allowed_origins_and_hosts_are_validated(tmp_path: Path) -> None:
    config = syncd.load_config(None, {"SYNCD_ALLOWED_ORIGINS": "https://a.example, http://b:81",
                                      "SYNCD_ALLOWED_HOSTS": "Sync.LAN"}, {})
    assert config.allowed_origins == ("https://a.example:443", "http://b:81")
    assert config.allowed_hosts == ("sync.lan",)
    for key, bad in (("allowed_origins", '["a.example"]'), ("allowed_origins", '["ftp://x"]'),
                     ("allowed_hosts", '["a b"]'), ("allowed_hosts", '"x/y"')):
        path = tmp_path / "bad.toml"
        path.write_text(f"{key} = {bad}\n")
        with pytest.raises(syncd.ConfigError, match=key):
            syncd.load_config(str(path), {}, {})
