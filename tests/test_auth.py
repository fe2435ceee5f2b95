"""The optional API key: every endpoint but /health, the WebSocket included."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from conftest import error_of

KEY = "s3cr\u00e9t key"

ROUTES = [
    ("GET", "/clients"), ("POST", "/register"), ("POST", "/sync"), ("POST", "/upload"),
    ("GET", "/files"), ("PUT", "/files/a.txt"), ("GET", "/files/a.txt"),
    ("HEAD", "/files/a.txt"), ("DELETE", "/files/a.txt?client_id=x"),
    ("GET", "/download/a.txt"), ("HEAD", "/download/a.txt"), ("GET", "/changes"),
    ("GET", "/ws/desk"), ("GET", "/metrics"), ("GET", "/no-such-route"),
]


@pytest.fixture
async def locked(app_client: Any) -> Any:
    return await app_client(api_key=KEY)


@pytest.mark.parametrize("method,url", ROUTES)
@pytest.mark.parametrize("headers", [
    {}, {"Authorization": "Bearer wrong"}, {"X-API-Key": "wrong"},
    {"Authorization": "Basic " + KEY}, {"X-API-Key": KEY.upper()},
])
async def test_every_route_needs_the_key(locked: Any, method: str, url: str,
                                         headers: dict[str, str]) -> None:
    response = await locked.request(method, url, headers=headers)
    assert response.status == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"
    if method != "HEAD":
        assert (await error_of(response, 401))["error"] == "unauthorized"


async def test_health_needs_no_key(locked: Any) -> None:
    assert (await locked.get("/health")).status == 200


@pytest.mark.parametrize("headers", [{"Authorization": f"Bearer {KEY}"},
                                     {"authorization": f"bearer {KEY}"}, {"X-API-Key": KEY}])
async def test_right_key_is_accepted(locked: Any, headers: dict[str, str]) -> None:
    response = await locked.put("/files/a.txt", data=b"x",
                                headers={**headers, "X-Client-Id": "desk"})
    assert response.status == 201
    assert (await locked.get("/files", headers=headers)).status == 200


async def test_websocket_token_in_query(locked: Any) -> None:
    async with locked.ws_connect("/ws/desk", params={"token": KEY}) as ws:
        assert (await ws.receive_json(timeout=5))["type"] == "hello"
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await locked.ws_connect("/ws/desk", params={"token": "wrong"})
    assert info.value.status == 401


async def test_token_in_query_only_counts_for_the_websocket(locked: Any) -> None:
    assert (await locked.get("/files", params={"token": KEY})).status == 401


async def test_open_server_needs_no_key(client: Any) -> None:
    assert (await client.get("/files")).status == 200
