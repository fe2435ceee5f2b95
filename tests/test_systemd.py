"""systemd integration: sd_notify, SIGHUP reload, SIGTERM with work in flight,
--check-config, the unit file, and the service booted in a real systemd."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import syncd
from conftest import ROOT, Daemon

UNIT = ROOT / "systemd" / "syncd.service"


# -- sd_notify ---------------------------------------------------------------------

@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.settimeout(10)
    yield sock
    sock.close()


def test_notifier_is_silent_without_notify_socket() -> None:
    notifier = syncd.Notifier({})
    assert notifier.address is None and notifier.watchdog_interval is None
    notifier.send("READY=1")      # does nothing, raises nothing


def test_notifier_sends_datagrams(notify_socket: socket.socket) -> None:
    notifier = syncd.Notifier({"NOTIFY_SOCKET": notify_socket.getsockname()})
    notifier.send("READY=1", "STATUS=hi")
    assert notify_socket.recv(4096) == b"READY=1\nSTATUS=hi"
    notifier.close()


def test_notifier_reaches_abstract_sockets() -> None:
    name = f"syncd-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        notifier = syncd.Notifier({"NOTIFY_SOCKET": "@" + name})
        try:
            notifier.send("WATCHDOG=1")
        finally:
            notifier.close()
        assert sock.recv(100) == b"WATCHDOG=1"


@pytest.mark.parametrize("environ,interval", [
    ({"WATCHDOG_USEC": "2000000"}, 1.0),
    ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}, 1.0),
    ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}, None),
    ({"WATCHDOG_USEC": "0"}, None), ({"WATCHDOG_USEC": "x"}, None), ({}, None),
])
def test_watchdog_interval(environ: dict[str, str], interval: float | None) -> None:
    assert syncd.watchdog_interval(environ) == interval


def messages_until(sock: socket.socket, wanted: str, limit: int = 200) -> list[str]:
    """Datagrams up to and including the first that contains wanted."""
    seen = []
    for _ in range(limit):
        message = sock.recv(4096).decode()
        seen.append(message)
        if wanted in message.split("\n"):
            return seen
    raise AssertionError(f"{wanted} never came: {seen}")


def test_daemon_notifies_ready_watchdog_reload_stopping(daemon: Any,
                                                        notify_socket: socket.socket) -> None:
    server = daemon(env={"NOTIFY_SOCKET": notify_socket.getsockname(),
                         "WATCHDOG_USEC": "200000"})
    ready = messages_until(notify_socket, "READY=1")[-1].split("\n")
    assert ready[1].startswith("STATUS=serving 0 files, 0 clients connected")
    assert "WATCHDOG=1" in messages_until(notify_socket, "WATCHDOG=1")[-1]
    assert "WATCHDOG=1" in messages_until(notify_socket, "WATCHDOG=1")[-1]   # again, 0.1 s later
    server.process.send_signal(signal.SIGHUP)
    reloading = [m for m in messages_until(notify_socket, "RELOADING=1")][-1].split("\n")
    assert reloading[0] == "RELOADING=1" and reloading[1].startswith("MONOTONIC_USEC=")
    usec = int(reloading[1].split("=")[1])
    assert abs(usec - time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000) < 10_000_000
    assert messages_until(notify_socket, "READY=1")
    server.process.send_signal(signal.SIGTERM)
    assert "STOPPING=1" in messages_until(notify_socket, "STOPPING=1")[-1]
    assert server.process.wait(timeout=20) == 0


# -- SIGHUP reload -----------------------------------------------------------------

def write_config(path: Path, **settings: Any) -> None:
    lines = [f"{key} = {json.dumps(value)}" for key, value in settings.items()]
    path.write_text("\n".join(lines) + "\n")


def wait_for_log(server: Daemon, text: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in server.log():
            return
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not logged: {server.log()}")


async def test_sighup_reloads_without_dropping_connections(daemon: Any, tmp_path: Path) -> None:
    config = tmp_path / "syncd.toml"
    write_config(config, api_key="old-key", max_file_size=10, heartbeat_interval=30)
    server = daemon("--config", str(config))
    old, new = {"X-API-Key": "old-key"}, {"X-API-Key": "new-key"}
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"{server.url}/ws/desk?token=old-key") as ws:
            assert (await ws.receive_json(timeout=5))["type"] == "hello"
            async with session.put(f"{server.url}/files/a.txt", data=b"x" * 50,
                                   headers={**old, "X-Client-Id": "laptop"}) as response:
                assert response.status == 413
            write_config(config, api_key="new-key", max_file_size=100, heartbeat_interval=30,
                         shutdown_timeout=5, log_level="warning", allowed_extensions=[".txt"])
            server.process.send_signal(signal.SIGHUP)
            await asyncio.to_thread(wait_for_log, server, "configuration reloaded")
            assert ("shutdown_timeout changed in the configuration: it takes effect after a restart"
                    in server.log())
            async with session.get(f"{server.url}/files", headers=old) as response:
                assert response.status == 401
            async with session.put(f"{server.url}/files/a.txt", data=b"x" * 50,
                                   headers={**new, "X-Client-Id": "laptop"}) as response:
                assert response.status == 201
            async with session.put(f"{server.url}/files/a.bin", data=b"x",
                                   headers={**new, "X-Client-Id": "laptop"}) as response:
                assert response.status == 415
            event = await ws.receive_json(timeout=5)          # the old socket still works
            assert (event["type"], event["path"]) == ("file_changed", "a.txt")
            assert "PUT /files/a.txt 201" not in server.log()   # log_level warning took effect

            config.write_text("max_file_size = 'enormous'\n")
            server.process.send_signal(signal.SIGHUP)
            await asyncio.to_thread(wait_for_log, server, "configuration not reloaded")
            assert "max_file_size" in server.log().split("configuration not reloaded")[1]
            async with session.get(f"{server.url}/files", headers=new) as response:
                assert response.status == 200                 # the last good config stays
    assert server.stop() == 0


# -- SIGTERM with work in flight ------------------------------------------------

async def test_sigterm_finishes_an_upload_and_closes_websockets_1001(daemon: Any) -> None:
    server = daemon()
    body = os.urandom(1_000_000)
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"{server.url}/ws/desk") as ws:
            assert (await ws.receive_json(timeout=5))["type"] == "hello"
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"PUT /files/inflight.bin HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Client-Id: up\r\n"
                         b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body))
            writer.write(body[:500_000])
            await writer.drain()
            await asyncio.sleep(0.3)
            server.process.send_signal(signal.SIGTERM)
            message = await ws.receive(timeout=10)
            assert message.type == aiohttp.WSMsgType.CLOSE and message.data == 1001
            writer.write(body[500_000:])
            await writer.drain()
            answer = await asyncio.wait_for(reader.read(), 20)
            writer.close()
    assert answer.startswith(b"HTTP/1.1 201"), answer[:200]
    assert await asyncio.to_thread(server.process.wait, 20) == 0
    assert (server.data / "inflight.bin").read_bytes() == body
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=1).close()


# -- --check-config ----------------------------------------------------------------

def check_config(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "syncd.py"), "--check-config", *args],
                          cwd=tmp_path, capture_output=True, text=True, timeout=30)


def test_check_config_prints_effective_settings_with_secrets_masked(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    write_config(config, port=9999, api_key="hunter2", allowed_extensions=[".md"])
    result = check_config(tmp_path, "--config", str(config), "--log-level", "debug")
    assert result.returncode == 0, result.stderr
    assert "port = 9999" in result.stdout and 'log_level = "debug"' in result.stdout
    assert 'allowed_extensions = [".md"]' in result.stdout
    assert 'api_key = "********"' in result.stdout and "hunter2" not in result.stdout
    assert not (tmp_path / "sync_data").exists()      # it checks, it does not start


def test_check_config_of_a_bad_file_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("port = 'x'\n")
    result = check_config(tmp_path, "--config", str(config))
    assert result.returncode == 2 and result.stderr.startswith("syncd: port:")


# -- the unit file ---------------------------------------------------------------

needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="systemd-analyze is not installed")


def unit_for_this_checkout(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this checkout, so that verify checks it all."""
    text = UNIT.read_text().replace("/opt/syncd/.venv/bin/python", sys.executable)
    text = text.replace("/opt/syncd/syncd.py", str(ROOT / "syncd.py"))
    path = tmp_path / "syncd.service"
    path.write_text(text)
    return path


@needs_analyze
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    result = subprocess.run(["systemd-analyze", "verify", "--man=no",
                             str(unit_for_this_checkout(tmp_path))],
                            capture_output=True, text=True, timeout=60)
    # verify exits 0 even on unknown keys: any output at all is a failure
    assert result.returncode == 0 and result.stdout + result.stderr == ""


@needs_analyze
def test_unit_security_rating_is_ok_or_better() -> None:
    result = subprocess.run(["systemd-analyze", "security", "--offline=true", str(UNIT)],
                            capture_output=True, text=True, timeout=60)
    verdict = result.stdout.strip().splitlines()[-1]
    assert "Overall exposure level" in verdict
    assert verdict.split()[-2] in ("OK", "SAFE"), verdict
    assert float(verdict.split()[-3]) <= 2.0


def test_unit_has_what_a_sysadmin_relies_on() -> None:
    text = UNIT.read_text()
    for line in ("Type=notify", "ExecReload=/bin/kill -HUP $MAINPID", "Restart=on-failure",
                 "RestartPreventExitStatus=2 3 4", "DynamicUser=yes", "StateDirectory=syncd",
                 "ConfigurationDirectory=syncd", "LoadCredential=api_key:/etc/syncd/api_key",
                 "Environment=SYNCD_API_KEY_FILE=%d/api_key"):
        assert line in text.splitlines(), line
    assert any(line.startswith("WatchdogSec=") for line in text.splitlines())
