"""The reference client against an unlucky user and a hostile server: nothing outside its
folder is ever touched, and a file the user stops syncing is not deleted anywhere."""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

import syncd
from conftest import ROOT, Clients, free_port, make_config, sha, tree, write

def test_a_newly_ignored_file_is_not_deleted_anywhere(clients: Clients) -> None:
    a, b = clients.folder("A"), clients.folder("B")
    write(a, "build.log", b"log")
    write(a, "notes/old.log", b"old")
    write(a, "keep.txt", b"k")
    clients.once("A")
    clients.once("B")
    assert tree(b)["build.log"] == b"log"
    write(a, ".syncignore", b"*.log\n")
    output = clients.once("A")
    assert "delete-remote" not in output
    clients.once("B")
    assert tree(b)["build.log"] == b"log" and tree(b)["notes/old.log"] == b"old"
    assert (a / "build.log").read_bytes() == b"log"
    # no longer synced: a later edit on A stays on A
    write(a, "build.log", b"new log")
    clients.once("A")
    clients.once("B")
    assert tree(b)["build.log"] == b"log"


def test_an_ignored_file_removed_here_is_not_deleted_there(clients: Clients) -> None:
    a, b = clients.folder("A"), clients.folder("B")
    write(a, "build.log", b"log")
    write(a, "keep.txt", b"k")
    clients.once("A")
    clients.once("B")
    write(a, ".syncignore", b"*.log\n")
    (a / "build.log").unlink()                 # removed here, after it stopped being synced
    clients.once("A")
    clients.once("B")
    assert tree(b)["build.log"] == b"log"


class HostileServer:
    """A server that answers /sync (and /changes) with paths outside the client's folder."""

    def __init__(self, plan: dict[str, Any]) -> None:
        self.plan = plan
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        epoch = {"epoch": "e" * 32, "cursor": 5}

        def answer(body: Any, **headers: str) -> Any:
            async def handler(request: web.Request) -> web.StreamResponse:
                if isinstance(body, bytes):
                    return web.Response(body=body, headers=headers)
                return web.json_response(body)
            return handler
        app.router.add_get("/health", answer({"status": "ok", **epoch}))
        app.router.add_post("/register", answer({"success": True, "message": "hi", "cursor": 5}))
        app.router.add_post("/sync", answer({**self.plan, **epoch}))
        app.router.add_get("/download/{path:.*}", answer(b"pwned", ETag=f'"{sha(b"pwned")}"'))
        app.router.add_get("/files", answer({"files": [], "cursor": 5}))
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


def empty_plan(**parts: Any) -> dict[str, Any]:
    return {"upload": [], "download": [], "delete": [], "conflicts": [], **parts}


def download_entry(path: str) -> dict[str, Any]:
    return {"path": path, "checksum": sha(b"pwned"), "size": 5, "modified_time": 1.0,
            "revision": 3}


async def run_once(folder: Path, plan: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    """client --once in folder against a server that answers /sync with plan."""
    server = HostileServer(plan)
    await server.start()
    command = [sys.executable, str(ROOT / "syncd.py"), "client", str(folder), "--server",
               server.url, "--client-id", "victim", "--once"]
    try:
        return await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True,
                                       timeout=60)
    finally:
        await server.stop()


@pytest.mark.parametrize("bad", ["../outside/pwned.txt", "/tmp/syncd-absolute-pwned",
                                 "ok/../../outside/pwned.txt", ".syncd-client/state.db"],
                         ids=["dotdot", "absolute", "nested-dotdot", "client-state"])
async def test_client_refuses_a_download_outside_its_folder(tmp_path: Path, bad: str) -> None:
    folder = tmp_path / "mine"
    (tmp_path / "outside").mkdir()
    result = await run_once(folder, empty_plan(download=[download_entry(bad),
                                                         download_entry("fine.txt")]))
    assert result.returncode == syncd.EXIT_CLIENT_FAILED
    assert "invalid path from the server" in result.stderr
    assert list((tmp_path / "outside").iterdir()) == []
    assert not Path("/tmp/syncd-absolute-pwned").exists()
    assert (folder / "fine.txt").read_bytes() == b"pwned"     # the good entries still apply
    if bad.startswith(".syncd-client"):
        assert (folder / ".syncd-client" / "state.db").read_bytes()[:15] == b"SQLite format 3"


async def test_client_refuses_a_delete_outside_its_folder(tmp_path: Path) -> None:
    folder = tmp_path / "mine"
    (tmp_path / "outside").mkdir()
    canary = tmp_path / "outside" / "canary"
    canary.write_bytes(b"pwned")              # the checksum the server says it had
    result = await run_once(folder, empty_plan(delete=[{"path": "../outside/canary",
                                                        "revision": 4}]))
    assert result.returncode == syncd.EXIT_CLIENT_FAILED
    assert "invalid path from the server" in result.stderr
    assert canary.read_bytes() == b"pwned"


async def test_client_refuses_bad_paths_in_upload_and_conflict_lists(tmp_path: Path) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    result = await run_once(folder, empty_plan(
        upload=["../../etc/passwd"],
        conflicts=[{"path": "../outside/x", "reason": "both_modified", "client": {},
                    "server": None}]))
    assert result.returncode == syncd.EXIT_CLIENT_FAILED
    assert result.stderr.count("invalid path from the server") == 2
    assert not (tmp_path / "outside").exists()


def test_remote_change_with_a_bad_path_is_refused(tmp_path: Path) -> None:
    for bad in ("../x", "/abs", "a//b", ".syncd-client/state.db"):
        with pytest.raises(syncd.ClientError, match="invalid path from the server"):
            syncd.RemoteChange.from_json({"type": "upsert", "seq": 1, "path": bad,
                                          "checksum": sha(b"x")})
    change = syncd.RemoteChange.from_json({"type": "file_deleted", "seq": 2, "path": "ok/a"})
    assert (change.type, change.path) == ("delete", "ok/a")


def client_args(folder: str, server: Any, client_id: str, *extra: str) -> argparse.Namespace:
    """`python syncd.py client` flags, parsed as the command line parses them."""
    return syncd.main_parser().parse_args(["client", folder, "--server", str(server.make_url("")),
                                           "--client-id", client_id, *extra])


async def test_a_bug_stops_the_live_client_instead_of_retrying_for_ever(
        aiohttp_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    server = await aiohttp_server(syncd.make_app(make_config(tmp_path)))

    async def buggy(self: Any) -> Any:
        raise KeyError("a bug")
    monkeypatch.setattr(syncd.SyncClient, "full_pass", buggy)
    args = client_args(str(tmp_path / "mine"), server, "dev")
    code = await asyncio.wait_for(syncd.run_client(args, None), timeout=20)
    assert code == syncd.EXIT_CLIENT_FAILED
    assert "internal error" in caplog.text and "KeyError: 'a bug'" in caplog.text


async def test_a_malformed_event_is_retried_not_fatal(tmp_path: Path) -> None:
    with pytest.raises(syncd.ClientError, match="malformed change"):
        syncd.RemoteChange.from_json({"type": "upsert", "path": "ok", "seq": "not a number"})


async def test_against_a_server_without_bulk_the_client_uploads_one_by_one(
        aiohttp_server: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    app = syncd.make_app(make_config(tmp_path))

    @web.middleware
    async def no_bulk(request: web.Request, handler: Any) -> Any:
        if request.path == "/bulk":
            return web.json_response({"error": "not_found", "message": "no"}, status=404)
        return await handler(request)
    app.middlewares.append(no_bulk)
    server = await aiohttp_server(app)
    folder = tmp_path / "mine"
    for index in range(3):
        write(folder, f"{index}.txt", b"%d" % index)
    args = client_args(str(folder), server, "old", "--once")
    caplog.set_level("INFO", "syncd.client")
    assert await asyncio.wait_for(syncd.run_client(args, None), timeout=30) == 0
    assert (tmp_path / "data" / "2.txt").read_bytes() == b"2"
    assert "bulk-refused status=404" in caplog.text


@pytest.mark.parametrize("status, error, logged", [
    (404, "not_found", "tus-unavailable status=404"),            # an older server
    (429, "too_many_uploads", "tus-refused path=big"),           # too many open there
])
async def test_against_a_server_without_tus_the_client_uploads_in_one_request(
        aiohttp_server: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        status: int, error: str, logged: str) -> None:
    app = syncd.make_app(make_config(tmp_path))

    @web.middleware
    async def no_tus(request: web.Request, handler: Any) -> Any:
        if request.path.startswith("/uploads/"):
            return web.json_response({"error": error, "message": "no"}, status=status)
        return await handler(request)
    app.middlewares.append(no_tus)
    server = await aiohttp_server(app)
    folder = tmp_path / "mine"
    data = os.urandom(9 * 1024 * 1024)
    write(folder, "big.bin", data)
    write(folder, "big2.bin", data[::-1])
    args = client_args(str(folder), server, "old", "--once")
    caplog.set_level("INFO", "syncd.client")
    assert await asyncio.wait_for(syncd.run_client(args, None), timeout=30) == 0
    assert (tmp_path / "data" / "big.bin").read_bytes() == data
    assert (tmp_path / "data" / "big2.bin").read_bytes() == data[::-1]
    assert logged in caplog.text


async def test_a_resumable_upload_refused_at_creation_is_a_failure(
        aiohttp_server: Any, tmp_path: Path) -> None:
    server = await aiohttp_server(syncd.make_app(make_config(tmp_path,
                                                             allowed_extensions=(".txt",))))
    folder = tmp_path / "mine"
    write(folder, "big.bin", os.urandom(9 * 1024 * 1024))
    args = client_args(str(folder), server, "old", "--once")
    assert await asyncio.wait_for(syncd.run_client(args, None), timeout=30) == \
        syncd.EXIT_CLIENT_FAILED
    assert not (tmp_path / "data" / "big.bin").exists()
    assert os.listdir(tmp_path / "data" / ".syncd" / "uploads") == []


def test_an_upload_url_on_another_server_is_refused(tmp_path: Path) -> None:
    state = syncd.ClientState(tmp_path)
    try:
        client = syncd.SyncClient(tmp_path, "http://127.0.0.1:8000", "a", "key", state)
        assert str(client.same_server("/uploads/1")) == "http://127.0.0.1:8000/uploads/1"
        for elsewhere in ("http://evil.example/uploads/1", "https://127.0.0.1:8000/uploads/1",
                          "//evil.example/uploads/1"):
            with pytest.raises(syncd.ClientError, match="another server"):
                client.same_server(elsewhere)
    finally:
        state.close()


async def test_a_bug_in_the_watcher_stops_the_live_client(
        aiohttp_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Not a live client that silently stops pushing: it stops, exit 1, with the bug logged."""
    server = await aiohttp_server(syncd.make_app(make_config(tmp_path)))

    async def buggy(self: Any, paths: Any, report: Any) -> None:
        raise KeyError("a bug in the watcher")
    monkeypatch.setattr(syncd.SyncClient, "push_paths", buggy)
    folder = tmp_path / "mine"
    args = client_args(str(folder), server, "dev")
    running = asyncio.ensure_future(syncd.run_client(args, None))
    try:
        for index in range(100):       # until the watcher is up and sees one (20 s at most)
            if running.done():
                break
            if folder.exists():
                write(folder, f"poke-{index}.txt", b"x")
            await asyncio.sleep(0.2)
        assert running.done(), "the client kept running without its watcher"
    finally:
        if not running.done():
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)
    assert running.result() == syncd.EXIT_CLIENT_FAILED
    assert "internal error" in caplog.text and "a bug in the watcher" in caplog.text


async def test_a_file_changed_during_the_first_pass_is_pushed_after_it(
        aiohttp_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first pass of a live client may take long (a first sync of many files): a file
    edited while it runs, after the pass read it, is pushed once the pass is over, not
    left until the next reconnection."""
    server = await aiohttp_server(syncd.make_app(make_config(tmp_path)))
    folder = tmp_path / "mine"
    write(folder, "doc.txt", b"before")
    carry_out = syncd.SyncClient.carry_out

    async def then_edited(self: Any, *args: Any) -> None:
        await carry_out(self, *args)
        if (folder / "doc.txt").read_bytes() == b"before":     # the first pass only
            write(folder, "doc.txt", b"edited while the first pass ran")
            await asyncio.sleep(1.0)        # the pass goes on (a watcher debounces 300 ms)
    monkeypatch.setattr(syncd.SyncClient, "carry_out", then_edited)
    running = asyncio.ensure_future(syncd.run_client(client_args(str(folder), server, "dev"),
                                                     None))
    try:
        for _ in range(100):                                    # 10 s at most
            answer = await server_get(server, "/download/doc.txt")
            if answer == b"edited while the first pass ran" or running.done():
                break
            await asyncio.sleep(0.1)
        assert answer == b"edited while the first pass ran"
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)


async def server_get(server: Any, path: str) -> bytes | None:
    """The body of a GET on server, or None unless 200."""
    import aiohttp
    async with aiohttp.ClientSession() as session:
        async with session.get(server.make_url(path)) as answer:
            return await answer.read() if answer.status == 200 else None
