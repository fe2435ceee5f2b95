"""Several nodes on one PostgreSQL database and one shared directory (SPEC Part 2, Cluster),
all started for real: a PostgreSQL server, syncd nodes as subprocesses on one sync
directory, and nginx in front where the README puts it. Each test names the trap it
guards: journal order is commit order, one writer per path, per-node temp files, the push
across nodes, a database that goes away, nodes killed and restarted."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import syncd
from conftest import (ROOT, Clients, Daemon, Nginx, PKI, Postgres, db_query_url, error_of,
                      free_port, http_request, kill_mid_put, put, recovered, sha, tree, upload,
                      wait_until, write)

SITE = ROOT / "systemd" / "nginx-syncd-cluster.conf"
ADMIN = {"Authorization": "Bearer admin"}


@dataclass
class Cluster:
    """Nodes on one database and one sync directory."""

    url: str
    start_node: Callable[..., Daemon]

    def node(self, name: str, *args: str, port: int | None = None) -> Daemon:
        """Start the node name (again, on port)."""
        return self.start_node("--database-url", self.url, "--node-name", name, *args,
                               port=port)


@pytest.fixture
def cluster(daemon: Any, postgres: Postgres) -> Cluster:
    return Cluster(postgres.new_database(), daemon)


def b64(text: bytes) -> str:
    return base64.b64encode(text).decode()


def session(node: Daemon) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(base_url=node.url)


async def next_event(ws: Any, timeout: float = 5.0) -> dict[str, Any]:
    """The next file event on ws (pings and client events skipped)."""
    deadline = time.monotonic() + timeout
    while True:
        message = await ws.receive_json(timeout=max(0.01, deadline - time.monotonic()))
        if message["type"] in ("file_changed", "file_deleted"):
            return message


async def close_code(ws: Any, timeout: float = 5.0) -> int:
    """The code of the close frame the server sends ws next (other messages skipped).

    The frame's own code, not ws.close_code: a server closing from outside the handler
    shuts the connection right after its close frame (aiohttp does), and when the
    client's echo then meets a closed socket, aiohttp's client sets close_code to 1006.
    """
    deadline = time.monotonic() + timeout
    while True:
        message = await ws.receive(timeout=max(0.01, deadline - time.monotonic()))
        assert message.type != aiohttp.WSMsgType.CLOSED, "closed without a close frame"
        if message.type == aiohttp.WSMsgType.CLOSE:
            return int(message.data)


async def device_on(to_a: Any, to_b: Any) -> tuple[Any, dict[str, str]]:
    """Enrol the device "phone" through a; once b takes its token, its WebSocket on b and
    its Authorization header."""
    added = await to_a.post("/devices", json={"name": "phone"}, headers=ADMIN)
    bearer = {"Authorization": f"Bearer {(await added.json())['token']}"}
    for _ in range(100):                                    # b heard of the enrolment
        if (await to_b.get("/files", headers=bearer)).status == 200:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("b never took the device's token")
    ws = await to_b.ws_connect("/ws/phone", headers=bearer)
    await ws.receive_json()
    return ws, bearer


def http(node: Daemon, method: str, path: str, body: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request to one node (in a thread of the test: no event loop)."""
    return http_request(node.port, method, path, body, headers or {})


async def connected(node: Any, expected: list[bool]) -> None:
    """Until /clients on node says expected (each node notes its WebSockets in the
    background), for 5 s at most."""
    deadline = time.monotonic() + 5
    while True:
        clients = (await (await node.get("/clients")).json())["clients"]
        if [c["connected"] for c in clients] == expected or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert [c["connected"] for c in clients] == expected


def restart(cluster: Cluster, node: Daemon, name: str) -> Daemon:
    """SIGTERM, then the same node on the same port."""
    assert node.stop() == 0, node.log()
    return cluster.node(name, port=node.port)


# -- the push across nodes ---------------------------------------------------------------

async def test_an_upload_through_one_node_is_pushed_from_the_other(cluster: Cluster) -> None:
    a, b = cluster.node("a"), cluster.node("b")
    async with session(a) as to_a, session(b) as to_b:
        ws = await to_b.ws_connect("/ws/watcher")
        assert (await ws.receive_json())["type"] == "hello"
        delays = []
        for number in range(7):
            started = time.perf_counter()
            assert (await put(to_a, f"n{number}.txt", b"%d" % number)).status == 201
            event = await next_event(ws)
            delays.append(time.perf_counter() - started)
            assert (event["path"], event["seq"], event["client_id"]) == (
                f"n{number}.txt", number + 1, "laptop")
        # the median of seven: one slow moment of a shared 2-core machine is not the push
        assert statistics.median(delays) < 0.1, delays
        deleted = await to_a.delete("/files/n0.txt", params={"client_id": "laptop"})
        assert deleted.status == 200
        assert (await next_event(ws))["type"] == "file_deleted"
        assert await (await to_b.get("/download/n3.txt")).read() == b"3"
        await ws.close()


async def test_a_client_is_not_told_of_its_own_change_made_through_another_node(
        cluster: Cluster) -> None:
    a, b = cluster.node("a"), cluster.node("b")
    async with session(a) as to_a, session(b) as to_b:
        ws = await to_b.ws_connect("/ws/laptop")
        await ws.receive_json()
        other = await to_b.ws_connect("/ws/phone")
        await other.receive_json()
        assert (await put(to_a, "mine.txt", b"x", client_id="laptop")).status == 201
        assert (await next_event(other))["path"] == "mine.txt"
        with pytest.raises(asyncio.TimeoutError):
            await next_event(ws, timeout=0.5)
        await ws.close()
        await other.close()


async def two_apps(app_client: Any, postgres: Postgres) -> tuple[Any, Any, Any]:
    """Nodes a and b in this process (on one database and one directory); and b's store."""
    url = postgres.new_database()
    to_a = await app_client(database_url=url, node_name="a")
    to_b = await app_client(database_url=url, node_name="b")
    return to_a, to_b, to_b.server.app[syncd.STATE].tree.store


async def deaf(store: Any, client: Any) -> None:
    """Stop a node hearing the others (as if their notices were still on their way), and
    stop its own background writes (each of which would catch up)."""
    await store._node.remove_listener(syncd.PG_CHANNEL, store._heard)
    await store._tasks.cancel()
    tree = client.server.app[syncd.STATE].tree
    await recovered(client)
    tree._pruner.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await tree._pruner


async def test_a_node_asks_the_database_before_it_answers_404(app_client: Any,
                                                              postgres: Postgres) -> None:
    """A client told of a new file by node a may ask node b for it before a's notice reached
    b: b must not answer 404 from an index that has not seen the commit."""
    to_a, to_b, store = await two_apps(app_client, postgres)
    await deaf(store, to_b)
    assert (await put(to_a, "new.txt", b"just now")).status == 201
    assert await (await to_b.get("/download/new.txt")).read() == b"just now"
    assert (await to_b.get("/download/never.txt")).status == 404


async def test_a_node_that_heard_of_a_commit_reads_it_before_serving(app_client: Any,
                                                                     postgres: Postgres) -> None:
    """Heard of, not yet read (the catch-up is queued behind the download): the download
    waits for it rather than pair the old record with the new bytes (of the same size and
    mtime here, so that only the notice can tell)."""
    to_a, to_b, store = await two_apps(app_client, postgres)
    same_time = {"X-Modified-Time": "1000000000"}
    await put(to_a, "doc.txt", b"old", **same_time)
    assert await (await to_b.get("/download/doc.txt")).read() == b"old"
    await deaf(store, to_b)
    assert (await put(to_a, "doc.txt", b"new", **same_time)).status == 200
    store._heard(None, 0, syncd.PG_CHANNEL, '{"kind": "commit", "node": "a", "seq": 2}')
    answer = await to_b.get("/download/doc.txt")
    assert (await answer.read(), answer.headers["ETag"]) == (b"new", f'"{sha(b"new")}"')


async def test_bytes_newer_than_the_record_send_a_node_to_the_database(
        app_client: Any, postgres: Postgres) -> None:
    """Not even heard of yet: the file on disk is not what b's record says (another node
    renamed a new one into place), so b reads the journal before it answers: the bytes go
    out with their own checksum, never another version's."""
    to_a, to_b, store = await two_apps(app_client, postgres)
    await put(to_a, "doc.txt", b"old")
    assert await (await to_b.get("/download/doc.txt")).read() == b"old"
    await deaf(store, to_b)
    assert (await put(to_a, "doc.txt", b"newer")).status == 200
    answer = await to_b.get("/download/doc.txt")
    assert (await answer.read(), answer.headers["ETag"]) == (b"newer", f'"{sha(b"newer")}"')


async def test_a_node_back_on_the_database_notes_its_websockets_again(
        app_client: Any, own_postgres: Postgres, caplog: pytest.LogCaptureFixture) -> None:
    """PostgreSQL away for several of the watcher's looks: the nodes answer 503 meanwhile
    and try again; once it is back, a node's own connection is re-made (which forgets
    the node's WebSockets of before), then it notes the ones still open, so /clients on
    another node still shows them; and it catches up with what was committed meanwhile."""
    caplog.set_level(logging.DEBUG, logger="syncd")
    to_a, to_b, store_b = await two_apps(app_client, own_postgres)
    store_a = to_a.server.app[syncd.STATE].tree.store
    assert (await to_a.post("/register", json={"client_id": "phone"})).status == 200
    ws = await to_a.ws_connect("/ws/phone")
    await ws.receive_json()
    await connected(to_b, [True])
    lost = store_a._node
    own_postgres.stop()
    assert (await to_b.get("/health")).status == 503
    assert (await put(to_b, "meanwhile.txt", b"no")).status == 503
    for _ in range(150):                            # two failed tries to connect again
        if caplog.text.count("database still unreachable") >= 4:
            break
        await asyncio.sleep(0.1)
    assert caplog.text.count("database still unreachable") >= 4
    own_postgres.start()
    for _ in range(100):            # the watcher looks every PG_WATCH_INTERVAL seconds
        if store_a._node is not None and store_a._node is not lost \
                and store_b._node is not None and (await to_b.get("/health")).status == 200:
            break
        await asyncio.sleep(0.1)
    await connected(to_b, [True])
    assert (await put(to_b, "after.txt", b"after")).status == 201
    assert (await next_event(ws))["path"] == "after.txt"
    await ws.close()


async def test_a_catch_up_that_failed_is_tried_again(
        app_client: Any, postgres: Postgres, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """b heard of a's commit, but its read of the journal failed (a pooled connection
    broke, say): b tries again a second later, and its WebSocket gets the change."""
    to_a, to_b, store_b = await two_apps(app_client, postgres)
    await recovered(to_b)                   # whose last step would catch up, too
    ws = await to_b.ws_connect("/ws/phone")
    await ws.receive_json()
    catch_up, failed = store_b.catch_up, []

    async def failing_once() -> bool:
        if not failed:
            failed.append(True)
            raise ConnectionError("connection reset")
        return await catch_up()
    monkeypatch.setattr(store_b, "catch_up", failing_once)
    assert (await put(to_a, "late.txt", b"x")).status == 201
    assert (await next_event(ws))["path"] == "late.txt"
    assert failed and "could not catch up with the other nodes" in caplog.text
    await ws.close()


async def test_a_node_that_missed_a_revocation_while_away_applies_it_when_back(
        app_client: Any, postgres: Postgres) -> None:
    """b's connection to the database broke just as a revoked a device, so b never heard
    of it: once b is back it reads the devices again, closes that device's WebSocket
    (4003) and refuses its token."""
    url = postgres.new_database()
    to_a = await app_client(database_url=url, node_name="a", api_key="admin")
    to_b = await app_client(database_url=url, node_name="b", api_key="admin")
    ws, bearer = await device_on(to_a, to_b)
    to_b.server.app[syncd.STATE].tree.store._node.terminate()   # b hears nothing until
    assert (await to_a.delete("/devices/phone", headers=ADMIN)).status == 200  # it is back
    assert await close_code(ws, timeout=4 * syncd.PG_WATCH_INTERVAL) == syncd.WS_CLOSE_REVOKED
    assert (await to_b.get("/files", headers=bearer)).status == 401


async def test_a_device_change_and_its_notice_are_one_commit(
        app_client: Any, postgres: Postgres, monkeypatch: pytest.MonkeyPatch) -> None:
    """The other nodes hear of an enrolment or a revocation from its own COMMIT, not from a
    NOTIFY after it that can fail alone (then b would take a revoked token until its next
    reconnection): with a's separate messages failing, b still hears of both."""
    url = postgres.new_database()
    to_a = await app_client(database_url=url, node_name="a", api_key="admin")
    to_b = await app_client(database_url=url, node_name="b", api_key="admin")

    async def unreachable(message: dict[str, Any]) -> None:
        raise ConnectionError("the database went away")
    monkeypatch.setattr(to_a.server.app[syncd.STATE].tree.store, "broadcast", unreachable)
    ws, _ = await device_on(to_a, to_b)
    assert (await to_a.delete("/devices/phone", headers=ADMIN)).status == 200
    assert await close_code(ws) == syncd.WS_CLOSE_REVOKED


async def test_a_message_to_the_other_nodes_that_fails_fails_no_request(
        app_client: Any, postgres: Postgres, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """The database went away just as a node noted a new WebSocket for the others: the
    WebSocket stays, the failure is a warning (the node notes its WebSockets again when
    its connection to the database comes back)."""
    to_a = await app_client(database_url=postgres.new_database(), node_name="a")

    async def unreachable(client_id: str, opened: float, connected: bool) -> None:
        raise ConnectionError("the database went away")
    monkeypatch.setattr(to_a.server.app[syncd.STATE].tree.store, "note_connection",
                        unreachable)
    ws = await to_a.ws_connect("/ws/laptop")
    await ws.receive_json()
    told = "could not tell the other nodes that laptop connected: the database went away"
    for _ in range(100):                                    # told in the background
        if told in caplog.text:
            break
        await asyncio.sleep(0.02)
    assert told in caplog.text
    await ws.send_json({"type": "heartbeat"})
    assert (await ws.receive_json(timeout=5))["type"] == "heartbeat_ack"
    await ws.close()


async def test_a_node_that_cannot_read_the_devices_again_says_so_and_keeps_serving(
        app_client: Any, postgres: Postgres, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Told that the devices changed, a node whose read of them fails (the database went
    away again) logs a warning and goes on with what it knew; its next reconnection
    reads them again."""
    to_a = await app_client(database_url=postgres.new_database(), node_name="a")
    state = to_a.server.app[syncd.STATE]

    async def unreachable() -> None:
        raise ConnectionError("the database went away")
    monkeypatch.setattr(state.devices, "load", unreachable)
    syncd.hear_node(state, {"kind": "devices", "node": "b"})
    for _ in range(100):
        if "could not read the devices again" in caplog.text:
            break
        await asyncio.sleep(0.02)
    assert "could not read the devices again" in caplog.text
    assert (await to_a.get("/health")).status == 200


async def test_a_late_note_of_an_older_connection_does_not_hide_the_newer_one(
        app_client: Any, postgres: Postgres) -> None:
    """Each node notes its WebSockets in the background: a's note of the phone's older
    connection may reach the database after b's of the newer one; b's row stays."""
    to_a, to_b, store_b = await two_apps(app_client, postgres)
    store_a = to_a.server.app[syncd.STATE].tree.store
    await store_b.note_connection("phone", 2000.0, True)
    await store_a.note_connection("phone", 1000.0, True)      # late, and older
    await store_a.note_connection("phone", 1000.0, False)
    assert db_query_url(store_a.url, "SELECT node, since FROM connections") == [("b", 2000.0)]
    assert await store_a.connected_elsewhere() == {"phone"}
    await store_b.note_connection("phone", 2000.0, False)
    assert await store_a.connected_elsewhere() == set()


# -- one writer per path; journal order is commit order -----------------------------------

async def test_concurrent_conditional_uploads_through_two_nodes_one_wins(cluster: Cluster) -> None:
    """Each round, both nodes get an upload based on the same version: exactly one is
    stored, the other is 409 (without the cluster's write lock, a node checks against an
    index that has not seen the other's commit, and both win)."""
    a, b = cluster.node("a"), cluster.node("b")
    async with session(a) as to_a, session(b) as to_b:
        current = sha(b"start")
        assert (await put(to_a, "shared.txt", b"start")).status == 201
        for round_ in range(20):
            answers = await asyncio.gather(*(
                upload(node, "shared.txt", b"%s %d" % (name, round_), client_id=name.decode(),
                       base_checksum=current)
                for node, name in ((to_a, b"a"), (to_b, b"b"))))
            statuses = sorted(answer.status for answer in answers)
            assert statuses == [200, 409], (round_, statuses)
            winner = next(answer for answer in answers if answer.status == 200)
            current = (await winner.json())["checksum"]
            loser = next(answer for answer in answers if answer.status == 409)
            assert (await error_of(loser, 409))["error"] == "conflict"
        for node in (to_a, to_b):
            assert sha(await (await node.get("/download/shared.txt")).read()) == current
        versions = await (await to_b.get("/versions/shared.txt")).json()
        assert len(versions["versions"]) == 20         # every replaced content kept once


async def test_1000_uploads_over_two_nodes_and_a_follower_sees_every_seq_in_order(
        cluster: Cluster) -> None:
    """A reader that follows /changes (from either node) never sees a seq before one that
    is still to come: it would skip that one for ever."""
    a, b = cluster.node("a"), cluster.node("b")
    total, done = 1000, asyncio.Event()
    seen: list[int] = []

    async def writer(node: Any, offset: int) -> None:
        for number in range(offset, total, 8):
            answer = await put(node, f"w/{number}.txt", b"%d" % number, client_id=f"w{offset}")
            assert answer.status == 201, await answer.text()

    async def follower(nodes: list[Any]) -> None:
        since, turn = 0, 0
        while len(seen) < total:
            page = await (await nodes[turn % 2].get(
                "/changes", params={"since": str(since), "limit": "50"})).json()
            for change in page["changes"]:
                assert change["seq"] == since + 1, (since, change["seq"])
                since = change["seq"]
                seen.append(since)
            turn += 1
            if not page["changes"]:
                if done.is_set() and len(seen) < total and turn > 100_000:
                    break
                await asyncio.sleep(0.002)

    async with session(a) as to_a, session(b) as to_b:
        following = asyncio.ensure_future(follower([to_a, to_b]))
        await asyncio.gather(*(writer(to_a if offset % 2 else to_b, offset)
                               for offset in range(8)))
        done.set()
        await asyncio.wait_for(following, 60)
        assert seen == list(range(1, total + 1))
        for node in (to_a, to_b):
            health = await (await node.get("/health")).json()
            assert (health["cursor"], health["files"]) == (total, total)


# -- per-node temp files; a node killed ----------------------------------------------------

def test_a_node_killed_mid_upload_leaves_the_other_serving(cluster: Cluster) -> None:
    """Node a dies (kill -9) half-way through an upload; b serves meanwhile, with an upload
    of its own in flight when a starts again: a empties its own temp folder only."""
    a, b = cluster.node("a"), cluster.node("b")
    data = os.urandom(4_000_000)
    kill_mid_put(a, "big.bin", data, 2_000_000, 0.5)
    assert [entry.name for entry in (a.data / ".syncd" / "tmp" / "a").iterdir()
            if entry.stat().st_size]                       # a's half upload is left there
    slow = socket.create_connection(("127.0.0.1", b.port))
    try:
        slow.sendall(b"PUT /files/slow.bin HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Client-Id: phone\r\n"
                     b"Content-Length: 2000000\r\n\r\n" + data[:1_000_000])
        status, _, _ = http(b, "PUT", "/files/other.txt", b"served", {"X-Client-Id": "phone"})
        assert status == 201
        a = cluster.node("a", port=a.port)
        wait_until(lambda: "temp file(s) removed" in a.log(), "a's start-up recovery")
        assert not [entry for entry in (a.data / ".syncd" / "tmp" / "a").iterdir()
                    if entry.stat().st_size]
        slow.sendall(data[1_000_000:2_000_000])
        answer = slow.recv(65536)
        assert answer.startswith(b"HTTP/1.1 201"), answer
    finally:
        slow.close()
    assert http(a, "GET", "/download/slow.bin")[2] == data[:2_000_000]
    assert http(a, "GET", "/download/other.txt")[2] == b"served"
    assert http(b, "GET", "/download/big.bin")[0] == 404     # never acknowledged, not there


def test_two_nodes_with_one_name_are_refused(cluster: Cluster, tmp_path: Path) -> None:
    """A node's name picks its temp folder: two nodes with one name would empty each
    other's. (The default name is the host's: two nodes on one host need names.)"""
    first = cluster.node("same")
    second = subprocess.run(
        [sys.executable, str(ROOT / "syncd.py"), "--port", str(free_port()), "--sync-directory",
         str(first.data), "--database-url", cluster.url, "--node-name", "same"],
        capture_output=True, text=True, timeout=60)
    assert second.returncode == syncd.EXIT_STORAGE, second.stderr
    assert "another syncd node named same uses this database" in second.stderr
    assert first.process.poll() is None
    other = cluster.node("other")
    assert http(other, "GET", "/health")[0] == 200


async def test_a_node_whose_name_was_taken_while_it_was_away_stops(cluster: Cluster) -> None:
    """The node's connections to the database broke and, meanwhile, another node took its
    name (and so its temp folder): when the first finds that at its reconnection, it stops
    (exit 4, no restart by systemd) and says why, rather than serve beside the other."""
    import asyncpg
    b = cluster.node("b")
    other = await asyncpg.connect(cluster.url)
    try:
        await other.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                            " WHERE datname = current_database() AND pid <> pg_backend_pid()")
        deadline = time.monotonic() + 5         # until b's old session has let the name go
        while not await other.fetchval("SELECT pg_try_advisory_lock($1, $2)",
                                       syncd.PG_NODE_LOCKS, syncd.lock_key("b")):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        deadline = time.monotonic() + 15        # b's watcher looks every PG_WATCH_INTERVAL
        while b.process.poll() is None:
            assert time.monotonic() < deadline, b.log()
            await asyncio.sleep(0.05)
    finally:
        await other.close()
    assert b.process.returncode == syncd.EXIT_STORAGE, b.log()
    assert "stopping: another syncd node named b uses this database" in b.log()


# -- clients, WebSockets and devices across nodes -------------------------------------------

async def test_a_second_connection_on_another_node_replaces_the_first(cluster: Cluster) -> None:
    a, b = cluster.node("a"), cluster.node("b")
    async with session(a) as to_a, session(b) as to_b:
        for node in (to_a, to_b):
            assert (await node.post("/register", json={"client_id": "phone"})).status == 200
        first = await to_a.ws_connect("/ws/phone")
        await first.receive_json()
        await connected(to_b, [True])                       # on a, seen from b
        second = await to_b.ws_connect("/ws/phone")
        await second.receive_json()
        assert await close_code(first) == syncd.WS_CLOSE_REPLACED
        await asyncio.sleep(0.3)             # a's close of the old one is noted too
        for node in (to_a, to_b):
            await connected(node, [True])
        await second.close()
        await connected(to_a, [False])


def test_a_node_killed_is_not_believed_to_hold_its_clients(cluster: Cluster) -> None:
    """/clients counts a connection only on a node that runs (a node killed -9 leaves its
    rows behind: PostgreSQL lets its name's lock go)."""
    a, b = cluster.node("a"), cluster.node("b")

    async def connect_and_kill() -> None:
        async with session(a) as to_a, session(b) as to_b:
            await to_a.post("/register", json={"client_id": "phone"})
            ws = await to_a.ws_connect("/ws/phone")
            await ws.receive_json()
            await connected(to_b, [True])
            a.process.kill()
            a.process.wait(timeout=10)
            await connected(to_b, [False])
            await ws.close()
    asyncio.run(connect_and_kill())


async def test_a_device_enrolled_or_revoked_on_one_node_counts_on_the_other(
        cluster: Cluster) -> None:
    a, b = cluster.node("a", "--api-key", "admin"), cluster.node("b", "--api-key", "admin")
    async with session(a) as to_a, session(b) as to_b:
        ws, bearer = await device_on(to_a, to_b)
        started = time.monotonic()
        assert (await to_a.delete("/devices/phone", headers=ADMIN)).status == 200
        assert await close_code(ws) == syncd.WS_CLOSE_REVOKED
        assert time.monotonic() - started < 1
        assert (await to_b.get("/files", headers=bearer)).status == 401


# -- moves, versions and resumable uploads across nodes -------------------------------------

async def test_a_move_through_one_node_keeps_its_versions_on_the_other(cluster: Cluster) -> None:
    a, b = cluster.node("a"), cluster.node("b")
    async with session(a) as to_a, session(b) as to_b:
        await put(to_b, "docs/a.txt", b"one")
        await put(to_b, "docs/a.txt", b"two")
        ws = await to_b.ws_connect("/ws/watcher")
        await ws.receive_json()
        moved = await to_a.post("/move", json={"from": "docs", "to": "papers",
                                               "client_id": "laptop"})
        assert moved.status == 200, await moved.text()
        events = [await next_event(ws), await next_event(ws)]
        assert [(e["type"], e["path"]) for e in events] == [
            ("file_changed", "papers/a.txt"), ("file_deleted", "docs/a.txt")]
        assert await (await to_b.get("/download/papers/a.txt")).read() == b"two"
        versions = await (await to_b.get("/versions/papers/a.txt")).json()
        assert [v["checksum"] for v in versions["versions"]] == [sha(b"one")]
        blocked = await put(to_b, "docs/a.txt/inside.txt", b"x")     # b's index saw the move
        assert blocked.status == 201
        await ws.close()


async def test_a_move_whose_node_died_half_way_is_finished_by_another(cluster: Cluster) -> None:
    """a died between a move's rename and its commit (what it leaves: the move's note and
    the folder at its new path): b finishes the move within seconds, not at a's restart."""
    a, b = cluster.node("a"), cluster.node("b")
    async with session(b) as to_b:
        for name in ("1.txt", "2.txt"):
            assert (await put(to_b, f"docs/{name}", name.encode())).status == 201, b.log()
        ws = await to_b.ws_connect("/ws/watcher")
        await ws.receive_json()
        a.process.kill()
        a.process.wait(timeout=10)
        db_query_url(cluster.url, "INSERT INTO moves (source, target, client_id, time)"
                     " VALUES (?, ?, ?, ?)", ("docs", "papers", "laptop", time.time()))
        (b.data / "docs").rename(b.data / "papers")
        events = [await next_event(ws, timeout=4 * syncd.MOVES_INTERVAL) for _ in range(4)]
        assert sorted((e["type"], e["path"]) for e in events) == [
            ("file_changed", "papers/1.txt"), ("file_changed", "papers/2.txt"),
            ("file_deleted", "docs/1.txt"), ("file_deleted", "docs/2.txt")]
        listed = (await (await to_b.get("/files")).json())["files"]
        assert sorted(entry["path"] for entry in listed) == ["papers/1.txt", "papers/2.txt"]
        assert await (await to_b.get("/download/papers/2.txt")).read() == b"2.txt"
        assert db_query_url(cluster.url, "SELECT source FROM moves") == []
        await ws.close()


async def test_a_resumable_upload_goes_on_through_another_node(cluster: Cluster) -> None:
    a, b = cluster.node("a"), cluster.node("b")
    data = os.urandom(3_000_000)
    tus = {"Tus-Resumable": "1.0.0"}
    async with session(a) as to_a, session(b) as to_b:
        created = await to_a.post("/uploads/", headers={
            **tus, "Upload-Length": str(len(data)), "X-Client-Id": "laptop",
            "Upload-Metadata": f"relative_path {b64(b'big.bin')},client_id {b64(b'laptop')}"})
        assert created.status == 201, await created.text()
        location = "/uploads/" + created.headers["Location"].rsplit("/", 1)[1]
        patch = {**tus, "Content-Type": "application/offset+octet-stream"}
        first = await to_a.patch(location, data=data[:1_000_000],
                                 headers={**patch, "Upload-Offset": "0"})
        assert first.status == 204
        head = await to_b.head(location, headers=tus)
        assert head.headers["Upload-Offset"] == "1000000"

        # b refuses a PATCH while a writes the same upload (a's PATCH is held open)
        release = asyncio.Event()

        async def slow_body() -> Any:
            yield data[1_000_000:1_500_000]
            await release.wait()
            yield data[1_500_000:2_000_000]
        held = asyncio.ensure_future(to_a.patch(location, data=slow_body(),
                                                headers={**patch, "Upload-Offset": "1000000"}))
        partial = a.data / ".syncd" / "uploads" / location.rsplit("/", 1)[1]
        deadline = time.monotonic() + 10
        while partial.stat().st_size <= 1_000_000:      # a writes: it holds the upload
            assert time.monotonic() < deadline and not held.done()
            await asyncio.sleep(0.01)
        clash = await to_b.patch(location, data=b"x" * 10,
                                 headers={**patch, "Upload-Offset": "1000000"})
        assert clash.status == 409, await clash.text()
        assert "another node" in (await clash.json())["message"]
        release.set()
        assert (await held).status == 204
        last = await to_b.patch(location, data=data[2_000_000:],
                                headers={**patch, "Upload-Offset": "2000000"})
        assert last.status == 204, await last.text()
        assert await (await to_a.get("/download/big.bin")).read() == data


async def test_a_patch_goes_on_when_its_claim_cannot_be_let_go(
        app_client: Any, postgres: Postgres, tmp_path: Path) -> None:
    """b's own connection, which holds the upload's claim, broke while a PATCH was being
    written: the bytes are kept and acknowledged all the same (the claim went with the
    connection, which b lets go and makes again), and the upload goes on through a."""
    to_a, to_b, store_b = await two_apps(app_client, postgres)
    data, tus = os.urandom(300_000), {"Tus-Resumable": "1.0.0"}
    created = await to_b.post("/uploads/", headers={
        **tus, "Upload-Length": str(len(data)), "X-Client-Id": "laptop",
        "Upload-Metadata": f"relative_path {b64(b'big.bin')},client_id {b64(b'laptop')}"})
    assert created.status == 201, await created.text()
    upload_id = created.headers["Location"].rsplit("/", 1)[1]
    patch = {**tus, "Content-Type": "application/offset+octet-stream"}
    release = asyncio.Event()

    async def slow_body() -> Any:
        yield data[:100_000]
        await release.wait()
        yield data[100_000:200_000]
    held = asyncio.ensure_future(to_b.patch(f"/uploads/{upload_id}", data=slow_body(),
                                            headers={**patch, "Upload-Offset": "0"}))
    partial = tmp_path / "data" / ".syncd" / "uploads" / upload_id
    for _ in range(200):
        if partial.exists() and partial.stat().st_size >= 100_000:
            break
        await asyncio.sleep(0.01)
    store_b._node.terminate()
    release.set()
    answer = await held
    assert (answer.status, answer.headers.get("Upload-Offset")) == (204, "200000"), \
        await answer.text()
    last = await to_a.patch(f"/uploads/{upload_id}", data=data[200_000:],
                            headers={**patch, "Upload-Offset": "200000"})
    assert last.status == 204, await last.text()
    assert await (await to_b.get("/download/big.bin")).read() == data


# -- the database goes away; nodes restart behind nginx -----------------------------------

def test_postgresql_restarted_under_load_loses_no_acknowledged_change(
        own_postgres: Postgres, daemon: Any) -> None:
    """Two nodes write through a PostgreSQL restart: meanwhile they answer 503; after, they
    recover on their own; every upload they acknowledged is there, on both; and the push
    across nodes works again (the nodes' listening connections came back and caught up)."""
    cluster = Cluster(own_postgres.new_database(), daemon)
    a, b = cluster.node("a"), cluster.node("b")
    acknowledged: dict[str, bytes] = {}
    statuses: list[int] = []
    answers: dict[str, int] = {}
    stop = threading.Event()

    def load(node: Daemon, name: str) -> None:
        number = 0
        while not stop.is_set() and number < 5000:
            data = os.urandom(64)
            path = f"{name}/{number}.bin"
            try:
                status = http(node, "PUT", f"/files/{path}", data, {"X-Client-Id": name})[0]
            except OSError:
                status = 0
            statuses.append(status)
            answers[path] = status
            if status == 201:
                acknowledged[path] = data
            number += 1
            time.sleep(0.005)
    loaders = [threading.Thread(target=load, args=(node, name))
               for node, name in ((a, "a"), (b, "b"))]
    for loader in loaders:
        loader.start()
    try:
        time.sleep(1.0)
        own_postgres.stop()
        time.sleep(1.5)
        own_postgres.start()
        wait_until(lambda: statuses[-6:].count(201) == 6, "uploads accepted again", timeout=30)
        time.sleep(0.5)
    finally:
        stop.set()
        for loader in loaders:
            loader.join(timeout=30)
    assert 503 in statuses and 201 in statuses
    assert set(statuses) <= {201, 503}, set(statuses)
    for node in (a, b):
        wait_until(lambda node=node: http(node, "GET", "/health")[0] == 200, "health")
    def listed(node: Daemon) -> set[str]:
        return {entry["path"] for entry in json.loads(http(node, "GET", "/files")[2])["files"]}
    try:
        wait_until(lambda: all(listed(node) == set(acknowledged) for node in (a, b)),
                   "both nodes to know every upload")
    except AssertionError:
        raise AssertionError([(sorted(listed(node) - set(acknowledged)),
                               sorted(set(acknowledged) - listed(node))) for node in (a, b)],
                             {path: answers.get(path) for node in (a, b)
                              for path in listed(node) ^ set(acknowledged)})
    for path, data in acknowledged.items():
        for node in (a, b):
            assert http(node, "GET", f"/download/{path}")[2] == data, (path, node.port)

    async def pushed() -> dict[str, Any]:
        async with session(a) as to_a, session(b) as to_b:
            ws = await to_b.ws_connect("/ws/watcher")
            await ws.receive_json()
            await put(to_a, "after.txt", b"after")
            event = await next_event(ws)
            await ws.close()
            return event
    assert asyncio.run(pushed())["path"] == "after.txt"
    assert "lost the node's connection to the database" in a.log()


def test_the_client_syncs_through_nginx_while_nodes_restart(tmp_path: Path,
                                                             cluster: Cluster) -> None:
    """The README's set-up: two nodes behind nginx; two reference clients stay in sync
    while first one node, then the other, is restarted."""
    pki = PKI(tmp_path / "pki")
    a = cluster.node("a", "--trusted-proxies", "127.0.0.1")
    b = cluster.node("b", "--trusted-proxies", "127.0.0.1")
    proxy = Nginx(tmp_path / "nginx", SITE, [a, b], pki)
    clients = Clients(tmp_path, a.seen_at(proxy.url))
    try:
        clients.start("A", "--ca-file", str(pki.ca))
        clients.start("B", "--ca-file", str(pki.ca))
        for step, (node, name) in enumerate(((a, "a"), (b, "b"))):
            write(clients.folder("A"), f"before-{name}.txt", b"A %d" % step)
            wait_until(lambda: f"before-{name}.txt" in tree(clients.folder("B")),
                       f"before-{name}.txt at B")
            restarted = restart(cluster, node, name)
            write(clients.folder("B"), f"during-{name}.txt", b"B %d" % step)
            wait_until(lambda: f"during-{name}.txt" in tree(clients.folder("A")),
                       f"during-{name}.txt at A", timeout=60)
            if name == "a":
                a = restarted
            else:
                b = restarted
        write(clients.folder("A"), "last.txt", b"last")
        wait_until(lambda: tree(clients.folder("A")) == tree(clients.folder("B")),
                   "the two folders alike", timeout=60)
        assert len(tree(clients.folder("A"))) == 5
    finally:
        clients.stop()
        proxy.stop()


def test_two_clients_one_on_each_node_stay_in_sync_while_either_restarts(
        tmp_path: Path, cluster: Cluster) -> None:
    """The issue's done-when: a client on node a, another on node b (each talks to its own
    node only); each node restarted in turn, with changes made on both sides meanwhile."""
    nodes = {"a": cluster.node("a"), "b": cluster.node("b")}
    groups = []
    for folder, name in (("A", "a"), ("B", "b")):
        (tmp_path / f"clients-{name}").mkdir()
        groups.append(Clients(tmp_path / f"clients-{name}", nodes[name]))
    on_a, on_b = groups
    try:
        on_a.start("A")
        on_b.start("B")
        folder_a, folder_b = on_a.folder("A"), on_b.folder("B")
        for name in ("a", "b"):
            write(folder_a, f"from-A-before-{name}.txt", b"A")
            wait_until(lambda: f"from-A-before-{name}.txt" in tree(folder_b), "A's file at B")
            nodes[name] = restart(cluster, nodes[name], name)
            write(folder_b, f"from-B-after-{name}.txt", b"B")
            write(folder_a, f"from-A-after-{name}.txt", b"A")
            wait_until(lambda: tree(folder_a) == tree(folder_b), f"A and B alike after {name}",
                       timeout=60)
        assert len(tree(folder_a)) == 6
    finally:
        on_a.stop()
        on_b.stop()
