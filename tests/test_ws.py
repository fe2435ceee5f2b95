"""The WebSocket hub: hello, events, heartbeats, errors, replacement, slow clients."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import os
import socket
import time
from typing import Any

import aiohttp
import pytest

import syncd
from conftest import put, sha


async def hello(ws: Any) -> dict[str, Any]:
    message = await ws.receive_json(timeout=5)
    assert message["type"] == "hello"
    return message


async def next_json(ws: Any, timeout: float = 5.0) -> dict[str, Any]:
    """The next text frame as JSON (pings are answered by aiohttp's client)."""
    return await ws.receive_json(timeout=timeout)


async def test_hello_carries_cursor_and_epoch(client: Any) -> None:
    await put(client, "a", b"1")
    async with client.ws_connect("/ws/desk") as ws:
        message = await hello(ws)
        epoch = (await (await client.get("/health")).json())["epoch"]
        assert (message["client_id"], message["cursor"], message["epoch"]) == ("desk", 1, epoch)
        assert abs(message["server_time"] - time.time()) < 60


async def test_changes_reach_others_not_the_author(client: Any) -> None:
    async with client.ws_connect("/ws/desk") as desk, client.ws_connect("/ws/laptop") as laptop:
        await hello(desk)
        await hello(laptop)
        assert (await put(client, "a.txt", b"v1", client_id="laptop")).status == 201
        assert await next_json(desk) == {
            "type": "file_changed", "path": "a.txt", "checksum": sha(b"v1"), "size": 2,
            "modified_time": pytest.approx(time.time(), abs=60), "revision": 1, "seq": 1,
            "client_id": "laptop"}
        await client.delete("/files/a.txt", params={"client_id": "laptop"})
        assert await next_json(desk) == {"type": "file_deleted", "path": "a.txt",
                                         "revision": 2, "seq": 2, "client_id": "laptop"}
        await laptop.send_json({"type": "heartbeat"})
        assert (await next_json(laptop))["type"] == "heartbeat_ack"   # nothing of its own before it


async def test_seq_rises_across_many_concurrent_changes(client: Any) -> None:
    async with client.ws_connect("/ws/desk") as desk:
        await hello(desk)
        await asyncio.gather(*(put(client, f"f{i}", b"%d" % i) for i in range(30)))
        seqs = [(await next_json(desk))["seq"] for _ in range(30)]
        assert seqs == list(range(1, 31))


async def test_folder_delete_sends_one_event_per_file(client: Any) -> None:
    await put(client, "d/a", b"1")
    await put(client, "d/b", b"2")
    async with client.ws_connect("/ws/desk") as desk:
        await hello(desk)
        await client.delete("/files/d", params={"client_id": "laptop"})
        events = [await next_json(desk), await next_json(desk)]
        assert [(e["type"], e["path"], e["seq"]) for e in events] == [
            ("file_deleted", "d/a", 3), ("file_deleted", "d/b", 4)]


async def test_heartbeat_ack(client: Any) -> None:
    async with client.ws_connect("/ws/desk") as ws:
        await hello(ws)
        await ws.send_json({"type": "heartbeat"})
        ack = await next_json(ws)
        assert ack["type"] == "heartbeat_ack" and abs(ack["timestamp"] - time.time()) < 60


@pytest.mark.parametrize("frame,error", [
    ("not json", "invalid_request"), ('{"type": NaN}', "invalid_request"),
    ("[1, 2]", "unknown_type"), ('{"type": "dance"}', "unknown_type"),
])
async def test_bad_messages_get_an_error_and_the_socket_stays(client: Any, frame: str,
                                                              error: str) -> None:
    async with client.ws_connect("/ws/desk") as ws:
        await hello(ws)
        await ws.send_str(frame)
        reply = await next_json(ws)
        assert reply["type"] == "error" and reply["error"] == error and reply["message"]
        await ws.send_json({"type": "heartbeat"})
        assert (await next_json(ws))["type"] == "heartbeat_ack"


async def test_binary_frame_gets_an_error(client: Any) -> None:
    async with client.ws_connect("/ws/desk") as ws:
        await hello(ws)
        await ws.send_bytes(b"\x00\x01")
        assert (await next_json(ws))["error"] == "invalid_request"
        assert not ws.closed


async def test_oversized_frame_closes_1009(client: Any) -> None:
    async with client.ws_connect("/ws/desk", max_msg_size=0) as ws:
        await hello(ws)
        await ws.send_str("x" * (syncd.MAX_WS_MESSAGE + 1))
        message = await ws.receive(timeout=5)
        assert message.type == aiohttp.WSMsgType.CLOSE and message.data == 1009


async def test_second_connection_replaces_first_with_4001(client: Any) -> None:
    async with client.ws_connect("/ws/desk") as old, client.ws_connect("/ws/other") as other:
        await hello(old)
        await hello(other)
        async with client.ws_connect("/ws/desk") as new:
            await hello(new)
            message = await old.receive(timeout=5)
            assert message.type == aiohttp.WSMsgType.CLOSE and message.data == 4001
            await put(client, "a", b"1", client_id="laptop")
            assert (await next_json(new))["path"] == "a"
            # the replaced socket's close did not announce the client as gone
            assert (await next_json(other))["type"] == "file_changed"


async def test_client_left_on_close(client: Any) -> None:
    async with client.ws_connect("/ws/desk") as desk:
        await hello(desk)
        laptop = await client.ws_connect("/ws/laptop")
        await hello(laptop)
        await laptop.close()
        assert await next_json(desk) == {"type": "client_left", "client_id": "laptop"}


async def test_clients_shows_connected(client: Any) -> None:
    await client.post("/register", json={"client_id": "desk"})
    async with client.ws_connect("/ws/desk") as ws:
        await hello(ws)
        clients = (await (await client.get("/clients")).json())["clients"]
        assert clients[0]["connected"] is True
        assert (await (await client.get("/health")).json())["clients_connected"] == 1


async def test_bad_client_id_is_refused_before_upgrade(client: Any) -> None:
    response = await client.get("/ws/bad%20id")
    assert response.status == 400
    assert (await response.json())["error"] == "invalid_request"


async def test_silent_client_is_closed(app_client: Any) -> None:
    client = await app_client(heartbeat_interval=0.1, heartbeat_timeout=0.3)
    async with client.ws_connect("/ws/quiet", autoping=False) as ws:
        await hello(ws)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            message = await ws.receive(timeout=5)
            if message.type != aiohttp.WSMsgType.PING:     # never answered
                break
        assert message.type == aiohttp.WSMsgType.CLOSE and message.data == syncd.WS_CLOSE_SILENT


async def test_client_answering_pings_stays_connected(app_client: Any) -> None:
    client = await app_client(heartbeat_interval=0.1, heartbeat_timeout=0.3)
    async with client.ws_connect("/ws/alive") as ws:
        await hello(ws)
        # aiohttp's client answers pings while it is inside receive(); stay there 1 s
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(ws.receive(), 1.0)
        assert not ws.closed
        await ws.send_json({"type": "heartbeat"})
        assert (await next_json(ws))["type"] == "heartbeat_ack"


async def test_shutdown_closes_with_1001(aiohttp_server: Any, tmp_path: Any) -> None:
    from conftest import make_config
    server = await aiohttp_server(syncd.make_app(make_config(tmp_path)))
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(server.make_url("/ws/desk")) as ws:
            await hello(ws)
            closing = asyncio.ensure_future(server.close())
            message = await ws.receive(timeout=10)
            assert message.type == aiohttp.WSMsgType.CLOSE and message.data == 1001
            await closing


# -- slow clients ----------------------------------------------------------------

class FakeSocket:
    """A WebSocketResponse whose sends never finish: a client that reads nothing."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.closed_with: int | None = None

    async def send_str(self, data: str) -> None:
        self.sent.append(data)
        await asyncio.Event().wait()

    async def close(self, code: int, message: bytes) -> bool:
        self.closed_with = code
        return True


async def test_hub_closes_a_stuck_client_with_4002_and_serves_the_rest() -> None:
    hub = syncd.Hub(queue_size=8, heartbeat_interval=30, heartbeat_timeout=90)
    stuck, fine = FakeSocket(), []
    stuck_conn = hub.connect("stuck", stuck, None, {"type": "hello"})  # type: ignore[arg-type]

    class Collector(FakeSocket):
        async def send_str(self, data: str) -> None:
            fine.append(data)
    hub.connect("fine", Collector(), None, {"type": "hello"})  # type: ignore[arg-type]
    for seq in range(1, 101):
        hub.publish({"type": "file_changed", "seq": seq})    # never awaits
        await asyncio.sleep(0)       # the healthy writer keeps up; the stuck one cannot
    assert stuck.closed_with == syncd.WS_CLOSE_OVERFLOW and stuck_conn.closing
    assert [json.loads(m).get("seq") for m in fine[1:]] == list(range(1, 101))
    await hub.close_all()


def raw_ws_connect(port: int, path: str) -> socket.socket:
    """A WebSocket handshake over a socket with a tiny receive buffer, then never read."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                  "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert b" 101 " in head.split(b"\r\n")[0]
    return sock


async def slow_link(client: Any, client_id: str) -> tuple[socket.socket, Any]:
    """A raw WebSocket that is never read, and its hub connection, over a slow link: a
    small server-side send buffer (no autotuning) fills up at once."""
    sock = await asyncio.to_thread(raw_ws_connect, client.port, f"/ws/{client_id}")
    hub = client.app[syncd.STATE].tree.hub
    for _ in range(100):
        if client_id in hub.connections:
            break
        await asyncio.sleep(0.02)
    conn = hub.connections[client_id]
    conn.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    return sock, conn


async def test_a_client_that_never_reads_does_not_delay_others(app_client: Any) -> None:
    # heartbeat_timeout: how long a client closed for overflow gets to read its close frame
    client = await app_client(ws_queue_size=50, heartbeat_interval=1.0, heartbeat_timeout=3.0)
    stuck, _ = await slow_link(client, "stuck")
    hub = client.app[syncd.STATE].tree.hub
    try:
        async with client.ws_connect("/ws/desk") as desk:
            await hello(desk)
            # desk reads as the events come (and so answers the server's pings: it is not
            # the silent one), stuck never does
            async def read_all() -> list[dict[str, Any]]:
                return [await next_json(desk, 30) for _ in range(301)]
            reading = asyncio.ensure_future(read_all())
            long_name = "/".join(c * 250 for c in "abcdefgh")   # ~2 KB an event
            for index in range(300):
                started = time.monotonic()
                response = await put(client, f"{long_name}{index}", b"x", client_id="laptop")
                assert response.status == 201
                assert time.monotonic() - started < 5      # an upload never waits on a reader
            received = await reading
            assert [m["seq"] for m in received if m["type"] == "file_changed"] == list(range(1, 301))
            assert {"type": "client_left", "client_id": "stuck"} in received
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and "stuck" in hub.connections:
                await asyncio.sleep(0.05)
            assert "stuck" not in hub.connections
    finally:
        stuck.close()


async def test_a_frame_of_exactly_64_kib_is_allowed(client: Any) -> None:
    async with client.ws_connect("/ws/desk") as ws:
        await hello(ws)
        frame = json.dumps({"type": "heartbeat", "pad": ""})
        frame = frame[:-2] + "x" * (syncd.MAX_WS_MESSAGE - len(frame)) + '"}'
        assert len(frame.encode()) == syncd.MAX_WS_MESSAGE
        await ws.send_str(frame)
        assert (await next_json(ws))["type"] == "heartbeat_ack"


async def test_a_burst_of_notices_is_answered_once_and_keeps_the_socket(client: Any) -> None:
    """An independent client sends a notice per local change: 150 of them at once."""
    async with client.ws_connect("/ws/chatty") as ws, client.ws_connect("/ws/other") as other:
        await hello(ws)
        await hello(other)
        for index in range(300):
            await ws.send_json({"type": "local_change", "path": f"f{index}"})
        await ws.send_json({"type": "heartbeat"})
        first = await next_json(ws)
        assert (first["type"], first["error"]) == ("error", "unknown_type")
        assert (await next_json(ws))["type"] == "heartbeat_ack"      # no second error
        await put(client, "after.txt", b"x", client_id="laptop")
        assert (await next_json(ws))["path"] == "after.txt"
        assert (await next_json(other))["path"] == "after.txt"


def read_frames(sock: socket.socket, deadline: float) -> list[tuple[int, bytes]]:
    """Every frame the server sends until it closes (opcode, payload); unmasked frames."""
    data = b""
    sock.settimeout(1)
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            continue
        except ConnectionError:
            break
        if not chunk:
            break
        data += chunk
    frames, at = [], 0
    while at + 2 <= len(data):
        opcode, length = data[at] & 0x0F, data[at + 1] & 0x7F
        at += 2
        if length == 126:
            length, at = int.from_bytes(data[at:at + 2], "big"), at + 2
        elif length == 127:
            length, at = int.from_bytes(data[at:at + 8], "big"), at + 8
        frames.append((opcode, data[at:at + length]))
        at += length
    return frames


async def test_a_slow_client_gets_its_4002_behind_what_was_buffered(app_client: Any) -> None:
    client = await app_client(ws_queue_size=5)
    slow, conn = await slow_link(client, "slow")
    hub = client.app[syncd.STATE].tree.hub
    for seq in range(1, 200):
        hub.publish({"type": "file_changed", "seq": seq, "pad": "p" * 8000})
        await asyncio.sleep(0)
        if conn.closing:
            break
    assert conn.closing
    await asyncio.sleep(syncd.WS_CLOSE_TIMEOUT + 1)     # alive but slow: reads only now
    frames = await asyncio.to_thread(read_frames, slow, time.monotonic() + 15)
    slow.close()
    assert frames and frames[-1][0] == 0x8, [opcode for opcode, _ in frames][-5:]
    assert int.from_bytes(frames[-1][1][:2], "big") == syncd.WS_CLOSE_OVERFLOW
    assert all(opcode == 0x1 for opcode, _ in frames[:-1])     # whole events, then the close


# -- a reload ----------------------------------------------------------------------

async def test_a_reload_applies_a_new_heartbeat_interval_at_once(client: Any) -> None:
    state = client.app[syncd.STATE]                     # heartbeat_interval: 30 s
    async with client.ws_connect("/ws/desk", autoping=False) as ws:
        await hello(ws)
        syncd.apply_config(state, dataclasses.replace(state.config, heartbeat_interval=0.2))
        message = await ws.receive(timeout=3)           # not after the old 30 s ran out
        assert message.type == aiohttp.WSMsgType.PING


async def test_a_reload_applies_a_new_queue_size_to_new_connections(client: Any) -> None:
    state = client.app[syncd.STATE]                     # ws_queue_size: 1000
    syncd.apply_config(state, dataclasses.replace(state.config, ws_queue_size=5))
    slow, conn = await slow_link(client, "slow")
    try:
        for seq in range(1, 200):
            state.tree.hub.publish({"type": "file_changed", "seq": seq, "pad": "p" * 8000})
            await asyncio.sleep(0)
            if conn.closing:
                break
        assert conn.closing                             # 5 events behind, not 1,000
    finally:
        slow.close()
