"""The real daemon as a subprocess: start, serve, log, stop; memory during a big upload."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import threading
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import ROOT, Daemon, free_port, http_request, wait_until


def request(daemon: Daemon, method: str, path: str, body: Any = None,
            headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    status, _, data = http_request(daemon.port, method, path, body, headers, timeout=120)
    return status, data


def peak_rss_mb(pid: int) -> float:
    """VmHWM: the process's peak resident memory so far."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_serves_logs_requests_and_stops_cleanly_on_sigterm(daemon: Any) -> None:
    server = daemon()
    status, body = request(server, "PUT", "/files/a.txt", b"hello", {"X-Client-Id": "desk"})
    assert status == 201
    assert request(server, "GET", "/download/a.txt") == (200, b"hello")
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=20) == 0
    log = server.log()
    assert "PUT /files/a.txt 201" in log and "client=desk" in log
    assert "stored a.txt" in log and "stopped" in log
    assert "Traceback" not in log


def test_sigint_also_stops_cleanly(daemon: Any) -> None:
    server = daemon()
    server.process.send_signal(signal.SIGINT)
    assert server.process.wait(timeout=20) == 0


def test_port_in_use_exits_1_with_one_clear_line(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, str(ROOT / "syncd.py"), "--port", str(port),
             "--sync-directory", str(tmp_path / "data")],
            cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_runs_with_defaults_from_the_repo_config(tmp_path: Path) -> None:
    """`python syncd.py` in a fresh folder: ./sync_data is created and served."""
    port = free_port()
    process = subprocess.Popen([sys.executable, str(ROOT / "syncd.py"), "--port", str(port)],
                               cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                time.sleep(0.05)
        assert (tmp_path / "sync_data" / ".syncd" / "syncd.db").exists()
    finally:
        process.terminate()
        _, errors = process.communicate(timeout=20)
        assert process.returncode == 0, errors


def zeros(total: int, chunk: int = 1 << 20) -> Iterator[bytes]:
    block = b"\0" * chunk
    for _ in range(total // chunk):
        yield block


def test_large_upload_keeps_memory_small(daemon: Any) -> None:
    """256 MiB streamed through PUT and through multipart: peak RSS stays far under 100 MB."""
    server = daemon("--max-file-size", "1GiB")
    size = 256 * 1024 * 1024
    status, body = request(server, "PUT", "/files/big.bin", zeros(size),
                           {"X-Client-Id": "desk", "Content-Length": str(size)})
    assert status == 201, body
    assert json.loads(body)["size"] == size
    boundary = "syncdboundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"relative_path\"\r\n\r\n"
            f"big2.bin\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"client_id\""
            f"\r\n\r\ndesk\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"b\"\r\nContent-Type: application/octet-stream\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()

    def multipart() -> Iterator[bytes]:
        yield head
        yield from zeros(size)
        yield tail
    status, body = request(server, "POST", "/upload", multipart(), {
        "Content-Type": f"multipart/form-data; boundary={boundary}",
        "Content-Length": str(len(head) + size + len(tail))})
    assert status == 200, body
    assert peak_rss_mb(server.process.pid) < 100
    assert (server.data / "big2.bin").stat().st_size == size


def test_concurrent_sync_manifests_are_planned_one_at_a_time(daemon: Any) -> None:
    """Four 100,000-entry manifests at once cost one plan's memory and four bodies, not four
    plans (before: 4 x 90 MiB)."""
    server = daemon()
    entries = [{"path": f"dir{i % 100}/file-{i:08d}.txt", "checksum": f"{i:064x}", "size": i,
                "modified_time": 1_700_000_000.5 + i, "base_checksum": ""} for i in range(100_000)]
    body = json.dumps({"client_id": "big", "files": entries}).encode()
    del entries
    base = peak_rss_mb(server.process.pid)
    status, answer = request(server, "POST", "/sync", body)
    assert status == 200 and len(json.loads(answer)["upload"]) == 100_000
    one = peak_rss_mb(server.process.pid) - base
    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(
        request(server, "POST", "/sync", body)[0])) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert results == [200] * 4
    four = peak_rss_mb(server.process.pid) - base
    bodies = 4 * len(body) / 2**20
    # one plan at a time and four bodies, with a second plan's worth of slack for the
    # allocator (measured: 185 MiB here against 285 MiB when all four were planned at once)
    assert four < 2 * one + bodies, (one, four, bodies)


def test_malformed_requests_get_400_and_one_log_line_not_a_traceback(daemon: Any) -> None:
    server = daemon()
    for raw in (b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 10000 + b"\r\n\r\n",
                b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nBad Header\r\n\r\n",
                b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" * 10):
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(raw)
            answer = sock.recv(4096)
        assert answer.startswith(b"HTTP/1.") and b" 400 " in answer.split(b"\r\n")[0]
    assert request(server, "GET", "/health")[0] == 200
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=20) == 0
    log = server.log()
    assert "Traceback" not in log and "Error handling request" not in log
    assert log.count("malformed request from 127.0.0.1") == 2    # TLS noise is aiohttp's debug


FORGED = "/x%0A2026-12-01%2021:48:55,000%20WARNING%20syncd:%20FORGED%20line"


def test_a_request_cannot_forge_a_log_line(daemon: Any) -> None:
    server = daemon()
    request(server, "GET", FORGED)
    request(server, "PUT", "/files/evil%0D%0AFORGED2.txt", b"x", {"X-Client-Id": "desk"})
    wait_until(lambda: "FORGED2" in server.log(), "the access log line")   # written after the answer
    log = server.log()
    assert not [line for line in log.split("\n") if line.startswith(("2026-12-01 21:48:55",
                                                                       "FORGED"))]
    assert "\\n2026-12-01 21:48:55,000 WARNING syncd: FORGED" in log      # escaped, one line
    assert "evil\\r\\nFORGED2.txt" in log


def test_line_separators_cannot_split_a_journal_entry(daemon: Any, tmp_path: Path) -> None:
    port = free_port()
    log_path = tmp_path / f"daemon-{port}.log"
    log_path.write_bytes(b"")
    status = os.stat(log_path)
    server = daemon(port=port, env={"JOURNAL_STREAM": f"{status.st_dev}:{status.st_ino}"})
    request(server, "GET", "/x%E2%80%A8<3>syncd:%20FORGED%E2%80%A9<2>FORGED")
    wait_until(lambda: "FORGED" in server.log(), "the access log line")
    lines = server.log().splitlines()        # splits on U+2028 too, as a journal reader may
    assert lines and all(re.match(r"<[0-7]>syncd", line) for line in lines), lines
    assert any("\\u2028<3>syncd: FORGED\\u2029<2>FORGED" in line for line in lines)


def uvloop_installed() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("flag, loop", [
    ("--uvloop", "uvloop"), ("--no-uvloop", "asyncio")])
def test_the_event_loop_is_uvloop_when_installed_unless_turned_off(
        daemon: Any, flag: str, loop: str) -> None:
    if loop == "uvloop" and not uvloop_installed():
        pytest.skip("uvloop is not installed (requirements-optional.txt)")
    server = daemon(flag)
    wait_until(lambda: "listening on" in server.log(), "the start-up line")
    assert f"(event loop: {loop}" in server.log()
    data = os.urandom(3_000_000)               # past the inline limit: sent with sendfile
    assert request(server, "PUT", "/files/big.bin", data, {"X-Client-Id": "a"})[0] == 201
    assert request(server, "GET", "/files/big.bin") == (200, data)
    status, _, partial = http_request(server.port, "GET", "/files/big.bin",
                                      headers={"Range": "bytes=1000000-1999999"})
    assert status == 206 and partial == data[1_000_000:2_000_000]
