"""A token per device (SPEC Part 2, "Devices and tokens"): enrolment, scopes route by route,
a device acting only as itself, revocation (HTTP and WebSocket), the failed-authentication
limit, and that no token is ever kept or logged."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import syncd
from conftest import ON_POSTGRES, db_query, error_of, put

ADMIN = "the-admin-key"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
async def server(app_client: Any) -> Any:
    return await app_client(api_key=ADMIN)


async def enrol(client: Any, name: str, scope: str = "write") -> str:
    response = await client.post("/devices", json={"name": name, "scope": scope},
                                 headers=bearer(ADMIN))
    assert response.status == 201, await response.text()
    body = await response.json()
    assert (body["device"], body["scope"]) == (name, scope)
    assert response.headers["Cache-Control"] == "no-store"
    return str(body["token"])


async def test_a_device_is_enrolled_listed_and_revoked(server: Any, data_dir: Path) -> None:
    token = await enrol(server, "laptop")
    assert token.startswith("syncd_") and len(base64.urlsafe_b64decode(token[6:] + "=")) == 32
    assert (await put(server, "a.txt", b"x", client_id="laptop", **bearer(token))).status == 201
    listing = await (await server.get("/devices", headers=bearer(ADMIN))).json()
    (entry,) = listing["devices"]
    assert entry["device"] == "laptop" and entry["scope"] == "write"
    assert entry["revoked"] is False and entry["last_seen"] >= entry["created"]
    assert token not in json.dumps(listing)
    kept = json.dumps(db_query(data_dir, "SELECT * FROM devices"))
    assert token not in kept                                      # only its hash is kept
    assert hashlib.sha256(token.encode()).hexdigest() in kept
    if not ON_POSTGRES:                                           # nor anywhere in the file
        database = (data_dir / ".syncd" / "syncd.db").read_bytes() + b"".join(
            path.read_bytes() for path in (data_dir / ".syncd").glob("syncd.db-*"))
        assert token.encode() not in database

    revoked = await server.delete("/devices/laptop", headers=bearer(ADMIN))
    assert revoked.status == 200 and (await revoked.json())["revoked"] is True
    refused = await put(server, "a.txt", b"y", client_id="laptop", **bearer(token))
    assert "revoked" in (await error_of(refused, 401))["message"]
    listing = await (await server.get("/devices", headers=bearer(ADMIN))).json()
    assert listing["devices"][0]["revoked"] is True

    again = await enrol(server, "laptop", "read")         # re-enrolled: a new token
    assert (await server.get("/files", headers=bearer(again))).status == 200
    assert (await server.get("/files", headers=bearer(token))).status == 401


@pytest.mark.parametrize("body, status, code", [
    ({"name": "laptop"}, 409, "conflict"),                 # enrolled already
    ({"name": "x", "scope": "root"}, 400, "invalid_request"),
    ({"name": "../x"}, 400, "invalid_request"),
    ({}, 400, "invalid_request"),
])
async def test_a_bad_enrolment_is_refused(server: Any, body: dict[str, str], status: int,
                                          code: str) -> None:
    await enrol(server, "laptop")
    response = await server.post("/devices", json=body, headers=bearer(ADMIN))
    assert (await error_of(response, status))["error"] == code


async def test_revoking_an_unknown_device_is_404(server: Any) -> None:
    response = await server.delete("/devices/nobody", headers=bearer(ADMIN))
    assert (await error_of(response, 404))["error"] == "not_found"


def multipart(**fields: Any) -> aiohttp.FormData:
    form = aiohttp.FormData()
    for name, value in fields.items():
        if name == "file":
            form.add_field("file", value, filename="f.txt")
        else:
            form.add_field(name, value)
    return form


def bulk_body(client_id: str) -> aiohttp.FormData:
    form = aiohttp.FormData()
    form.add_field("client_id", client_id)
    form.add_field("meta", json.dumps({"relative_path": "bulk.txt"}),
                   content_type="application/json")
    form.add_field("file", b"bulk", filename="bulk.txt")
    return form


def tus_metadata(client_id: str) -> str:
    return ",".join(f"{key} {base64.b64encode(value.encode()).decode()}" for key, value in
                    {"relative_path": "big.bin", "client_id": client_id}.items())


# Every route, what scope it needs, and a request to it as client id ID.
ROUTES: list[tuple[str, str, str, Any]] = [
    ("read", "GET", "/clients", {}),
    ("read", "POST", "/register", {"json": {"client_id": "ID"}}),
    ("read", "POST", "/sync", {"json": {"client_id": "ID", "files": []}}),
    ("read", "GET", "/files", {}),
    ("read", "GET", "/files/a.txt", {}),
    ("read", "HEAD", "/files/a.txt", {}),
    ("read", "GET", "/download/a.txt", {}),
    ("read", "GET", "/changes", {}),
    ("read", "GET", "/metrics", {}),
    ("read", "GET", "/versions/a.txt", {}),
    ("read", "GET", "/trash", {}),
    ("read", "OPTIONS", "/uploads/", {}),
    ("write", "POST", "/upload", {"form": {"relative_path": "u.txt", "client_id": "ID",
                                           "file": b"u"}}),
    ("write", "POST", "/bulk", {"bulk": "ID"}),
    ("write", "PUT", "/files/b.txt", {"data": b"b", "headers": {"X-Client-Id": "ID"}}),
    ("write", "DELETE", "/files/a.txt?client_id=ID", {}),
    ("write", "POST", "/move", {"json": {"client_id": "ID", "from": "a.txt", "to": "c.txt"}}),
    ("write", "POST", "/uploads/", {"headers": {"Tus-Resumable": "1.0.0", "Upload-Length": "3",
                                                "Upload-Metadata": "TUS:ID"}}),
    ("write", "POST", "/restore", {"json": {"client_id": "ID", "path": "a.txt"}}),
    ("admin", "POST", "/devices", {"json": {"name": "other"}}),
    ("admin", "GET", "/devices", {}),
    ("admin", "DELETE", "/devices/other", {}),
    ("admin", "DELETE", "/versions/a.txt?client_id=ID", {}),
]
TAKES_CLIENT_ID = [route for route in ROUTES if "ID" in json.dumps(route[3], default=str)
                   or "ID" in route[2]]


async def call(client: Any, token: str, method: str, url: str, spec: Any,
               client_id: str) -> Any:
    """One request of ROUTES, with the token, as client_id."""
    url = url.replace("=ID", "=" + client_id)
    kwargs: dict[str, Any] = {"headers": bearer(token)}
    for key, value in spec.items():
        if key == "json":
            kwargs["json"] = {k: client_id if v == "ID" else v for k, v in value.items()}
        elif key == "form":
            kwargs["data"] = multipart(**{k: client_id if v == "ID" else v
                                          for k, v in value.items()})
        elif key == "bulk":
            kwargs["data"] = bulk_body(client_id)
        elif key == "headers":
            kwargs["headers"].update({k: tus_metadata(client_id) if v == "TUS:ID" else
                                      client_id if v == "ID" else v for k, v in value.items()})
        else:
            kwargs[key] = value
    return await client.request(method, url, **kwargs)


@pytest.mark.parametrize("scope", syncd.DEVICE_SCOPES)
@pytest.mark.parametrize("needs, method, url, spec", ROUTES,
                         ids=[f"{method} {url}" for _, method, url, _ in ROUTES])
async def test_every_route_under_every_scope(server: Any, scope: str, needs: str, method: str,
                                             url: str, spec: Any) -> None:
    await put(server, "a.txt", b"a", client_id="dev", **bearer(ADMIN))
    await put(server, "a.txt", b"a2", client_id="dev", **bearer(ADMIN))   # a version
    token = await enrol(server, "dev", scope)
    response = await call(server, token, method, url, spec, "dev")
    allowed = syncd.DEVICE_SCOPES.index(scope) >= syncd.DEVICE_SCOPES.index(needs)
    if allowed:
        assert response.status not in (401, 403), await response.text()
    else:
        error = await error_of(response, 403)
        assert error["error"] == "forbidden" and needs in error["message"]


@pytest.mark.parametrize("needs, method, url, spec", TAKES_CLIENT_ID,
                         ids=[f"{method} {url}" for _, method, url, _ in TAKES_CLIENT_ID])
async def test_a_device_acts_only_as_itself(server: Any, data_dir: Path, needs: str,
                                            method: str, url: str, spec: Any) -> None:
    await put(server, "a.txt", b"a", client_id="dev", **bearer(ADMIN))
    await put(server, "a.txt", b"a2", client_id="dev", **bearer(ADMIN))
    token = await enrol(server, "dev", "admin")
    response = await call(server, token, method, url, spec, "someone-else")
    error = await error_of(response, 403)
    assert "acts only as the client id dev" in error["message"]
    assert (data_dir / "a.txt").read_bytes() == b"a2"              # nothing done
    assert (await call(server, token, method, url, spec, "dev")).status not in (401, 403)


async def test_a_device_cannot_touch_another_devices_resumable_upload(server: Any) -> None:
    mine = await enrol(server, "mine")
    theirs = await enrol(server, "theirs")
    created = await server.post("/uploads/", headers={
        **bearer(theirs), "Tus-Resumable": "1.0.0", "Upload-Length": "3",
        "Upload-Metadata": tus_metadata("theirs")})
    location = created.headers["Location"]
    for method in ("HEAD", "PATCH", "DELETE"):
        response = await server.request(method, location, data=b"abc", headers={
            **bearer(mine), "Tus-Resumable": "1.0.0", "Upload-Offset": "0",
            "Content-Type": "application/offset+octet-stream"})
        assert response.status == 403
    head = await server.head(location, headers={**bearer(theirs), "Tus-Resumable": "1.0.0"})
    assert head.headers["Upload-Offset"] == "0"


async def test_a_device_websocket_only_as_itself(server: Any) -> None:
    token = await enrol(server, "phone", "read")
    async with server.ws_connect("/ws/phone", params={"token": token}) as ws:
        assert (await ws.receive_json(timeout=5))["type"] == "hello"
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await server.ws_connect("/ws/laptop", params={"token": token})
    assert info.value.status == 403


async def test_revocation_closes_the_devices_websocket_at_once(server: Any) -> None:
    token = await enrol(server, "phone")
    async with server.ws_connect("/ws/phone", params={"token": token}) as ws, \
            server.ws_connect("/ws/desk", params={"token": ADMIN}) as other:
        assert (await ws.receive_json(timeout=5))["type"] == "hello"
        assert (await other.receive_json(timeout=5))["type"] == "hello"
        revoked = await server.delete("/devices/phone", headers=bearer(ADMIN))
        assert revoked.status == 200
        message = await ws.receive(timeout=1)            # within a second
        assert message.type == aiohttp.WSMsgType.CLOSE and message.data == 4003
        await put(server, "after.txt", b"x", client_id="someone", **bearer(ADMIN))
        events = [await other.receive_json(timeout=5) for _ in range(2)]
        assert [event["type"] for event in events] == ["client_left", "file_changed"]
        assert events[1]["path"] == "after.txt"                          # untouched
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await server.ws_connect("/ws/phone", params={"token": token})
    assert info.value.status == 401


async def test_without_api_key_a_device_token_still_confines(app_client: Any) -> None:
    client = await app_client()                       # an open server
    token = await enrol(client, "phone", "read")
    assert (await put(client, "a.txt", b"x", client_id="phone")).status == 201   # no token
    refused = await put(client, "a.txt", b"y", client_id="phone", **bearer(token))
    assert (await error_of(refused, 403))["error"] == "forbidden"
    assert (await client.get("/files", headers=bearer("any old key"))).status == 200
    await client.delete("/devices/phone")
    assert (await client.get("/files", headers=bearer(token))).status == 401


async def test_no_token_is_ever_logged(server: Any, caplog: Any) -> None:
    caplog.set_level(logging.DEBUG)
    token = await enrol(server, "laptop")
    await put(server, "a.txt", b"x", client_id="laptop", **bearer(token))
    async with server.ws_connect("/ws/laptop", params={"token": token}) as ws:
        await ws.receive_json(timeout=5)
    await server.delete("/devices/laptop", headers=bearer(ADMIN))
    await server.get("/files", headers=bearer(token))
    # (aiohttp.access is the test server's own access log: the daemon logs with syncd's,
    # which leaves the query out; tests/test_devices_daemon.py reads the daemon's output)
    text = "\n".join(record.getMessage() for record in caplog.records
                     if record.name != "aiohttp.access")
    assert "laptop" in text and "revoked" in text
    assert token not in text and token[6:20] not in text
    metrics = await (await server.get("/metrics", headers=bearer(ADMIN))).text()
    assert token not in metrics


# -- guessing a token ---------------------------------------------------------------------

async def test_many_wrong_tokens_from_one_address_are_429(app_client: Any, caplog: Any) -> None:
    client = await app_client(api_key=ADMIN, trusted_proxies=("127.0.0.1",))
    token = await enrol(client, "laptop")
    caplog.set_level(logging.WARNING)
    attacker = {"X-Forwarded-For": "203.0.113.5"}
    statuses = []
    for attempt in range(100):
        response = await client.get("/files", headers={
            **attacker, **bearer(f"syncd_guess{attempt}")})
        statuses.append(response.status)
    assert statuses[:syncd.AUTH_FAILURE_BURST] == [401] * syncd.AUTH_FAILURE_BURST
    assert set(statuses[syncd.AUTH_FAILURE_BURST:]) == {429}
    limited = await client.get("/files", headers={**attacker, **bearer(token)})
    assert (await error_of(limited, 429))["error"] == "too_many_attempts"
    assert int(limited.headers["Retry-After"]) >= 1
    other = await client.get("/files", headers={"X-Forwarded-For": "203.0.113.6",
                                                 **bearer(token)})
    assert other.status == 200                           # another address is served
    warnings = [r for r in caplog.records if "authentication failed" in r.getMessage()]
    assert len(warnings) == 1 and "203.0.113.5" in warnings[0].getMessage()


async def test_x_forwarded_for_counts_only_from_a_trusted_proxy(app_client: Any) -> None:
    client = await app_client(api_key=ADMIN)             # no trusted proxy
    for attempt in range(syncd.AUTH_FAILURE_BURST):
        await client.get("/files", headers={"X-Forwarded-For": f"198.51.100.{attempt}",
                                            **bearer("wrong")})
    spoofed = await client.get("/files", headers={"X-Forwarded-For": "198.51.100.99",
                                                  **bearer(ADMIN)})
    assert spoofed.status == 429                         # it was 127.0.0.1 all along


def test_the_limit_lets_an_address_try_again_in_time(caplog: Any) -> None:
    now = [1000.0]
    limit = syncd.FailedLogins(rate=2.0, burst=3, clock=lambda: now[0])
    for _ in range(3):
        assert limit.retry_after("a") is None
        limit.failed("a")
    assert limit.retry_after("a") == 1 and limit.retry_after("b") is None
    now[0] += 0.5                                        # one attempt earned back
    assert limit.retry_after("a") is None
    limit.failed("a")
    assert limit.retry_after("a") == 1
    now[0] += 10                                         # recovered: forgotten
    assert limit.retry_after("a") is None and "a" not in limit.buckets
    for _ in range(3):
        limit.failed("a")                                # a new burst: a new warning
    assert sum("authentication failed" in r.getMessage() for r in caplog.records) == 2


def test_settings_trusted_proxies_and_tls_are_checked(tmp_path: Path) -> None:
    with pytest.raises(syncd.ConfigError, match="trusted_proxies"):
        syncd.load_config(None, {}, {"trusted_proxies": "127.0.0.1,not-an-ip"})
    with pytest.raises(syncd.ConfigError, match="tls_key_file: tls_cert_file and tls_key_file"):
        syncd.load_config(None, {}, {"tls_cert_file": str(tmp_path / "cert.pem")})
    with pytest.raises(syncd.ConfigError, match="tls_cert_file: cannot read"):
        syncd.load_config(None, {}, {"tls_cert_file": str(tmp_path / "cert.pem"),
                                     "tls_key_file": str(tmp_path / "key.pem")})
    assert syncd.load_config(None, {}, {"trusted_proxies": "::1, 127.0.0.1"}).trusted_proxies \
        == ("::1", "127.0.0.1")


async def test_whoami_says_whose_credentials_these_are(server: Any, app_client: Any,
                                                       tmp_path: Path) -> None:
    token = await enrol(server, "phone", "read")
    assert await (await server.get("/whoami", headers=bearer(ADMIN))).json() == {
        "admin": True, "device": None, "scope": "admin"}
    assert await (await server.get("/whoami", headers=bearer(token))).json() == {
        "admin": False, "device": "phone", "scope": "read"}
    assert (await server.get("/whoami")).status == 401
    open_server = await app_client(sync_directory=str(tmp_path / "open"))
    assert (await (await open_server.get("/whoami")).json())["admin"] is True


async def test_a_browser_websocket_sends_the_key_as_a_subprotocol(server: Any) -> None:
    encoded = base64.urlsafe_b64encode(ADMIN.encode()).decode().rstrip("=")
    async with server.ws_connect("/ws/web-1", protocols=("syncd", f"syncd.auth.{encoded}")) as ws:
        assert ws.protocol == "syncd"                # never the one holding the key
        assert (await ws.receive_json(timeout=5))["type"] == "hello"
    wrong = base64.urlsafe_b64encode(b"wrong").decode().rstrip("=")
    for offered in (("syncd", f"syncd.auth.{wrong}"), ("syncd", "syncd.auth.%%%")):
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await server.ws_connect("/ws/web-2", protocols=offered)
        assert info.value.status == 401
