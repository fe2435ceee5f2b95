"""syncd benchmarks, side by side with nginx: `python tests/bench.py [--json FILE] [--quick]`.

Not collected by pytest. Starts syncd on a loopback port with a temp directory
(and, where Debian's nginx is installed, nginx with its WebDAV module on
another port) and measures, each as the median of several runs with min and max:

 1. upload one 1 GiB file with a raw PUT and with multipart POST /upload (MB/s),
    and the daemon's peak resident memory during it (curl);
 2. download it (MB/s, curl);
 3. uploads of distinct 4 KiB files at concurrency 8 for 5 s, some thousands
    (files/s, wrk: it runs for a duration, not a count);
 4. downloads of those files at concurrency 8 for 5 s (files/s, wrk);
 5. POST /sync with a 100,000-entry manifest against a server holding 100,000
    files (seconds, and the daemon's extra memory), and the start over them (until
    start-up recovery has hashed them all) and the restart;
 6. with 1,000 WebSocket clients connected, the time from an upload's response
    to the last client receiving its file_changed (median, p99; negative when
    every client had it before the uploader had its answer), and from the
    upload's start;
 7. the daemon's idle resident memory;
 8. the live client: a write in folder A to the same bytes in folder B;
 9. the cost of versions: 4 KiB overwrites (wrk, c=8, 100 paths over and over) and
    overwrites of the large file, against a second syncd with versions off
    (versions_max_age_days = 0) in the same run; and the disk versions take in an
    editing scenario (documents edited, some deleted, a folder deleted);
10. 4 KiB files through POST /bulk, 100 a request, 2 requests at a time (files/s);
11. the reference client beside Syncthing (two instances on loopback, Debian's
    syncthing) and rsync -a, on a tree of 2,000 x 4 KiB files in 20 folders and one
    256 MiB file: the initial sync from A to an empty B, one new 4 KiB file A -> B
    live (syncd: workload 8), and a --once (rsync: a run) after one change and with
    nothing changed;
12. (--only cluster) two nodes on one PostgreSQL database and one folder against one:
    4 KiB uploads and downloads through nginx (and to one node directly), fan-out to
    clients spread over the nodes, and the push from an upload on node a to a WebSocket
    on node b (against one on node a). PostgreSQL is started as the tests start it.

nginx runs workloads 1-4 in the same run; the table shows syncd/nginx (workload 10
against nginx's 4 KiB PUTs). Syncthing and rsync are optional like nginx: where they
are missing their columns stay empty (Debian: apt-get install -y syncthing rsync). Note
that nginx's PUT neither hashes nor fsyncs: syncd does both before it answers.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MB = 1_000_000
GIB = 1024 ** 3


# -- processes ------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.01)
    raise SystemExit(f"bench: timed out waiting for {what}")


def listening(port: int) -> Callable[[], bool]:
    def check() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return True
        except OSError:
            return False
    return check


class Server:
    """A process serving on a loopback port."""

    def __init__(self, name: str, process: subprocess.Popen[bytes], port: int,
                 upload_path: str, download_path: str) -> None:
        self.name, self.process, self.port = name, process, port
        self.url = f"http://127.0.0.1:{port}"
        self.upload_path, self.download_path = upload_path, download_path

    def rss_mb(self) -> float:
        return status_field(self.process.pid, "VmRSS") / 1024

    def reset_peak(self) -> None:
        """Writing 5 to clear_refs resets VmHWM (Linux 4.0+)."""
        Path(f"/proc/{self.process.pid}/clear_refs").write_text("5")

    def peak_mb(self) -> float:
        return status_field(self.process.pid, "VmHWM") / 1024

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def status_field(pid: int, name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    raise SystemExit(f"bench: no {name} for {pid}")


def start_syncd(work: Path, data: str = "syncd-data", timeout: float = 60,
                extra: tuple[str, ...] = ()) -> Server:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "syncd.py"), "--port", str(port), "--sync-directory",
         str(work / data), "--log-level", "warning", "--max-file-size", "2GiB",
         "--max-websocket-clients", "5000", *extra],
        stdout=subprocess.DEVNULL, stderr=open(work / f"{data}.log", "ab"))
    wait_for(listening(port), timeout, "syncd")
    return Server("syncd", process, port, "/files/", "/files/")


NGINX_CONF = """
user root;
worker_processes auto;
daemon off;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    client_max_body_size 0;
    client_body_temp_path {work}/nginx-body;
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port};
        root {work}/nginx-root;
        location /files/ {{
            dav_methods PUT DELETE;
            create_full_put_path on;
            dav_access user:rw group:r all:r;
        }}
    }}
}}
"""


def start_nginx(work: Path) -> Server | None:
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if nginx is None:
        return None
    port = free_port()
    (work / "nginx-root" / "files").mkdir(parents=True)
    (work / "nginx-body").mkdir()
    conf = work / "nginx.conf"
    conf.write_text(NGINX_CONF.format(work=work, port=port))
    process = subprocess.Popen([nginx, "-c", str(conf), "-p", str(work)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(listening(port), 20, "nginx")
    return Server("nginx", process, port, "/files/", "/files/")


# -- measuring ------------------------------------------------------------------------

def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"median": statistics.median(ordered), "min": ordered[0], "max": ordered[-1],
            "p99": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], "n": len(ordered)}


def make_big_file(work: Path, size: int) -> Path:
    path = work / "big.bin"
    block = os.urandom(1024 * 1024)
    with open(path, "wb") as out:
        for index in range(size // len(block)):
            out.write(hashlib.sha256(block + index.to_bytes(8, "big")).digest() + block[32:])
    return path


def curl(*args: str) -> dict[str, float]:
    """Run curl; its -w figures as a dict."""
    result = subprocess.run(["curl", "-s", "-o", "/dev/null", "-H", "Expect:", "-w",
                             '{"code": %{http_code}, "time": %{time_total}}', *args],
                            capture_output=True, text=True, timeout=600)
    figures = json.loads(result.stdout)
    if figures["code"] not in (200, 201, 204):
        raise SystemExit(f"bench: curl {' '.join(args)} answered {figures['code']}")
    return figures


def bench_large(server: Server, big: Path, rounds: int, multipart: bool) -> dict[str, Any]:
    """Workload 1: MB/s of a 1 GiB upload, with peak RSS over idle."""
    size = big.stat().st_size
    speeds, peaks = [], []
    for index in range(rounds):
        idle = server.rss_mb()
        server.reset_peak()
        if multipart:
            figures = curl("-F", f"relative_path=big-mp-{index}.bin", "-F", "client_id=bench",
                           "-F", f"file=@{big}", f"{server.url}/upload")
        else:
            figures = curl("-T", str(big), "-H", "X-Client-Id: bench",
                           f"{server.url}{server.upload_path}big-{index}.bin")
        speeds.append(size / figures["time"] / MB)
        peaks.append(server.peak_mb() - idle)
    return {"mb_per_s": summary(speeds), "peak_rss_over_idle_mb": summary(peaks)}


def bench_download(server: Server, size: int, rounds: int) -> dict[str, Any]:
    """Workload 2: MB/s of a 1 GiB download."""
    speeds = []
    for _ in range(rounds):
        figures = curl(f"{server.url}{server.download_path}big-0.bin")
        speeds.append(size / figures["time"] / MB)
    return {"mb_per_s": summary(speeds)}


WRK_SCRIPT = """
local counter = 0
local threads = {}
function setup(thread)
    thread:set("id", counter)
    counter = counter + 1
    table.insert(threads, thread)
end
function init(args)
    mode, prefix, limit = args[1], args[2], tonumber(args[3])
    sent, done, bad = 0, 0, 0
    filler = string.rep("x", 4096 - 16)
end
function request()
    sent = sent + 1
    local index = sent
    -- wrk calls request() once before the run: name 1 is never sent, so GET starts at 2
    if mode == "get" then index = ((sent - 1) % (limit - 1)) + 2 end
    local number = id * 10000000 + index
    if mode == "overwrite" then number = id * 10000000 + (sent % limit) end
    local path = prefix .. number .. ".bin"
    if mode == "overwrite" then
        local body = string.format("%016d", sent) .. filler
        return wrk.format("PUT", path, {["X-Client-Id"] = "bench"}, body)
    end
    if mode == "put" then
        local body = string.format("%016d", number) .. filler
        return wrk.format("PUT", path, {["X-Client-Id"] = "bench"}, body)
    end
    return wrk.format("GET", path)
end
function response(status, headers, body)
    done = done + 1
    if status >= 300 then bad = bad + 1 end
end
function done(summary, latency, requests)
    local bad_total, fewest = 0, nil
    for _, thread in ipairs(threads) do
        bad_total = bad_total + thread:get("bad")
        local finished = thread:get("done")
        if fewest == nil or finished < fewest then fewest = finished end
    end
    io.write(string.format('\\nRESULT {"requests": %d, "duration_us": %d, "bad": %d, ' ..
        '"fewest_per_thread": %d, "latency_p50_us": %d, "latency_p99_us": %d}\\n',
        summary.requests, summary.duration, bad_total, fewest, latency:percentile(50),
        latency:percentile(99)))
end
"""
SMALL_SECONDS = 5


def wrk(server: Server, work: Path, mode: str, prefix: str, limit: int) -> dict[str, float]:
    """SMALL_SECONDS of requests at concurrency 8 (2 threads x 4 connections).

    PUT creates a new file per request; GET cycles through the first `limit`
    files each thread created."""
    script = work / "bench.lua"
    script.write_text(WRK_SCRIPT)
    result = subprocess.run(
        ["wrk", "-t2", "-c8", f"-d{SMALL_SECONDS}s", "-s", str(script), server.url, "--", mode,
         f"{server.upload_path}{prefix}", str(limit)],
        capture_output=True, text=True, timeout=120)
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))
    figures = json.loads(line[len("RESULT "):])
    if figures["bad"]:
        raise SystemExit(f"bench: {figures['bad']} {mode} requests to {server.name} failed")
    return {"files_per_s": figures["requests"] / (figures["duration_us"] / 1e6),
            "files": figures["requests"], "fewest_per_thread": figures["fewest_per_thread"],
            "p50_ms": figures["latency_p50_us"] / 1000, "p99_ms": figures["latency_p99_us"] / 1000}


def bench_small(server: Server, work: Path, rounds: int, tag: str = "small") -> dict[str, Any]:
    """Workloads 3 and 4: small-file uploads (new files under tag), then downloads of the
    same files."""
    uploads, downloads = [], []
    for index in range(rounds):
        put = wrk(server, work, "put", f"{tag}{index}/f", 0)
        uploads.append(put)
        # the last request of each connection may not have finished: leave those out
        downloads.append(wrk(server, work, "get", f"{tag}{index}/f",
                             max(3, put["fewest_per_thread"] - 8)))
    return {"upload_files_per_s": summary([u["files_per_s"] for u in uploads]),
            "uploaded_files": summary([u["files"] for u in uploads]),
            "upload_p99_ms": summary([u["p99_ms"] for u in uploads]),
            "download_files_per_s": summary([d["files_per_s"] for d in downloads]),
            "download_p99_ms": summary([d["p99_ms"] for d in downloads])}


def bench_versions(work: Path, big: Path, rounds: int) -> dict[str, Any]:
    """Workload 9: overwrites with versions on and off, side by side."""
    figures: dict[str, Any] = {}
    for label, extra in (("on", ()), ("off", ("--versions-max-age-days", "0"))):
        server = start_syncd(work, f"versions-{label}", extra=extra)
        try:
            small = [wrk(server, work, "overwrite", f"over{index}/f", 50)
                     for index in range(rounds)]
            # two contents in turn: the same bytes again would be no change at all
            contents = [big, other_big(work, big)]
            curl("-T", str(contents[1]), "-H", "X-Client-Id: bench", f"{server.url}/files/big.bin")
            speeds = [big.stat().st_size / curl(
                "-T", str(contents[index % 2]), "-H", "X-Client-Id: bench",
                f"{server.url}/files/big.bin")["time"] / MB for index in range(rounds)]
            figures[label] = {"overwrite_files_per_s": summary([f["files_per_s"] for f in small]),
                              "big_overwrite_mb_per_s": summary(speeds)}
        finally:
            server.stop()
    figures["disk"] = versions_disk(work)
    return figures


def other_big(work: Path, big: Path) -> Path:
    """A copy of the big file with its first byte changed (made once)."""
    other = work / "big-other.bin"
    if not other.exists():
        shutil.copyfile(big, other)
        with open(other, "r+b") as handle:
            first = handle.read(1)
            handle.seek(0)
            handle.write(bytes([first[0] ^ 0xFF]))
    return other


def versions_disk(work: Path) -> dict[str, float]:
    """The editing scenario: 200 documents of 20-200 KB; 10 rounds of editing a fifth of
    them (a few bytes changed: a new content each time) and deleting 2; then a folder of
    50 photos (300 KB) is deleted. Versions' bytes against the live files' bytes."""
    import random
    import urllib.request
    rng = random.Random(11)
    server = start_syncd(work, "versions-disk")
    docs = {f"docs/{index:03d}.odt": bytearray(os.urandom(rng.randrange(20_000, 200_000)))
            for index in range(200)}

    def put(path: str, data: bytes) -> None:
        request = urllib.request.Request(f"{server.url}/files/{path}", data=bytes(data),
                                         method="PUT", headers={"X-Client-Id": "bench"})
        urllib.request.urlopen(request, timeout=60).close()

    def delete(path: str) -> None:
        request = urllib.request.Request(f"{server.url}/files/{path}?client_id=bench",
                                         method="DELETE")
        urllib.request.urlopen(request, timeout=60).close()
    try:
        for path, data in docs.items():
            put(path, data)
        for index in range(50):
            put(f"photos/{index:02d}.jpg", os.urandom(300_000))
        for _ in range(10):
            for path in rng.sample(sorted(docs), 40):
                docs[path][rng.randrange(len(docs[path]))] ^= 0xFF
                put(path, docs[path])
            for path in rng.sample(sorted(docs), 2):
                delete(path)
                del docs[path]
        delete("photos")
        with urllib.request.urlopen(f"{server.url}/metrics", timeout=60) as response:
            metrics = dict(line.split(" ", 1) for line in response.read().decode().splitlines()
                           if line and not line.startswith("#") and "{" not in line)
        blobs = work / "versions-disk" / ".syncd" / "blobs"
        on_disk = sum(entry.stat().st_size for folder in blobs.iterdir() for entry in folder.iterdir())
    finally:
        server.stop()
    return {"live_mb": float(metrics["syncd_stored_bytes"]) / MB,
            "versions": float(metrics["syncd_versions"]),
            "version_mb": float(metrics["syncd_version_bytes"]) / MB,
            "blob_dir_mb": on_disk / MB}


def bench_sync_manifest(work: Path, files: int, rounds: int) -> dict[str, Any]:
    """Workload 5: a server holding `files` files (put on disk, imported by start-up
    recovery), then POST /sync with a manifest of all of them."""
    import urllib.request
    data = work / "sync-data"
    entries = []
    for index in range(files):
        path = f"d{index % 1000:03d}/f{index:06d}.txt"
        content = b"file %d\n" % index
        target = data / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
        digest = hashlib.sha256(content).hexdigest()
        entries.append({"path": path, "checksum": digest, "size": len(content),
                        "modified_time": 1700000000.0, "base_checksum": digest})
    log = work / "sync-data.log"

    def recovered(runs: int) -> Callable[[], bool]:      # its background hashing done
        return lambda: log.read_text(errors="replace").count("temp file(s) removed") >= runs
    started = time.monotonic()
    server = start_syncd(work, "sync-data", timeout=600, extra=("--log-level", "info"))
    wait_for(recovered(1), 1800, "the first start's recovery")
    first_start = time.monotonic() - started
    server.stop()
    started = time.monotonic()
    server = start_syncd(work, "sync-data", timeout=600, extra=("--log-level", "info"))
    wait_for(recovered(2), 1800, "the restart's recovery")
    restart = time.monotonic() - started
    body = json.dumps({"client_id": "bench", "files": entries}).encode()
    seconds, extra = [], []
    try:
        for _ in range(rounds):
            idle = server.rss_mb()
            server.reset_peak()
            request = urllib.request.Request(f"{server.url}/sync", data=body, method="POST",
                                             headers={"Content-Type": "application/json"})
            started = time.monotonic()
            with urllib.request.urlopen(request, timeout=300) as response:
                plan = json.loads(response.read())
            seconds.append(time.monotonic() - started)
            extra.append(server.peak_mb() - idle)
            if plan["upload"] or plan["download"] or plan["conflicts"]:
                raise SystemExit(f"bench: the {files:,}-file plan was not empty: "
                                 f"{len(plan['upload'])} uploads, {len(plan['download'])} "
                                 f"downloads, {len(plan['conflicts'])} conflicts, e.g. "
                                 f"{str(plan)[:300]}")
    finally:
        server.stop()
    return {"seconds": summary(seconds), "extra_rss_mb": summary(extra),
            "first_start_s": first_start, "restart_s": restart, "manifest_mb": len(body) / MB}


async def fan_out(server: Server, clients: int, rounds: int,
                  listen_to: list[Server] | None = None, tag: str = "fan") -> dict[str, Any]:
    """Workload 6: time from an upload's response (through server) to the last of `clients`
    WebSocket clients receiving its file_changed; the clients connect to the servers of
    listen_to in turn (default: server alone). The receiving clients share this process,
    so the figure includes this process's own time to read 1,000 frames."""
    import aiohttp
    arrivals: dict[int, list[float]] = {}
    everyone = asyncio.Event()

    async def listen(ws: Any) -> None:
        async for message in ws:
            event = json.loads(message.data)
            if event.get("type") == "file_changed":
                stamps = arrivals.setdefault(event["seq"], [])
                stamps.append(time.monotonic())
                if len(stamps) == clients:
                    everyone.set()

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        sockets = []
        for index in range(clients):
            target = (listen_to or [server])[index % len(listen_to or [server])]
            ws = await session.ws_connect(f"{target.url}/ws/fan{index}", heartbeat=None)
            await ws.receive_json()
            sockets.append(ws)
        readers = [asyncio.ensure_future(listen(ws)) for ws in sockets]
        after_answer, after_start = [], []
        for index in range(rounds):
            everyone.clear()
            started = time.monotonic()
            async with session.put(f"{server.url}/files/{tag}/{index}.txt", data=b"%d" % index,
                                   headers={"X-Client-Id": "uploader"}) as response:
                answered = time.monotonic()
                seq = (await response.json())["revision"]
            await asyncio.wait_for(everyone.wait(), 30)
            after_answer.append(max(arrivals[seq]) - answered)
            after_start.append(max(arrivals[seq]) - started)
            await asyncio.sleep(0.05)
        for reader in readers:
            reader.cancel()
        for ws in sockets:
            await ws.close()
    return {"last_client_ms": summary([s * 1000 for s in after_answer]),
            "last_client_from_start_ms": summary([s * 1000 for s in after_start]),
            "clients": clients}


def bench_live(work: Path, url: str, rounds: int) -> dict[str, Any]:
    """Workload 8: seconds from a write in A to the same bytes in B (live clients)."""
    processes = []
    try:
        for name in ("A", "B"):       # inside the try: a client that fails to start is stopped too
            (work / name).mkdir()
            log = work / f"client-{name}.log"
            processes.append(subprocess.Popen(
                [sys.executable, str(ROOT / "syncd.py"), "client", str(work / name), "--server",
                 url, "--client-id", f"bench-{name}"], stdout=open(log, "wb"),
                stderr=subprocess.STDOUT))
            wait_for(lambda log=log: "live server=" in log.read_text(errors="replace"), 30,
                     f"client {name}")
        samples = []
        for index in range(rounds):
            data = os.urandom(4096)
            target = work / "B" / f"live-{index}.bin"
            started = time.monotonic()
            (work / "A" / f"live-{index}.bin").write_bytes(data)

            def arrived() -> bool:
                try:
                    return target.read_bytes() == data
                except FileNotFoundError:
                    return False
            wait_for(arrived, 30, f"live round {index}")
            samples.append(time.monotonic() - started)
            time.sleep(0.2)
        return {"ms": summary([s * 1000 for s in samples])}
    finally:
        for process in processes:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:     # seen once under load: say so, go on
                print(f"bench: a live client did not stop within 20 s of SIGINT: "
                      f"{' '.join(map(str, process.args))}", file=sys.stderr)
                process.kill()
                process.wait()


async def bulk_uploads(server: Server, seconds: float, batch: int, concurrency: int) -> dict[str, Any]:
    """Workload 10: 4 KiB files through POST /bulk, `batch` a request, `concurrency`
    requests at a time, for `seconds`; files/s (every file durable before its answer)."""
    import aiohttp
    filler = b"x" * (4096 - 16)
    stored = 0
    deadline = time.monotonic() + seconds

    async def sender(lane: int, session: aiohttp.ClientSession) -> None:
        nonlocal stored
        number = 0
        while time.monotonic() < deadline:
            form = aiohttp.FormData()
            form.add_field("client_id", "bench")
            for _ in range(batch):
                number += 1
                path = f"bulk/{lane}/{number // 1000}/{number}.bin"
                form.add_field("meta", json.dumps({"relative_path": path}),
                               content_type="application/json")
                form.add_field("file", b"%016d" % number + filler, filename="f")
            async with session.post(f"{server.url}/bulk", data=form) as response:
                body = await response.json()
            if response.status != 200 or any(r["status"] not in (200, 201) for r in body["results"]):
                raise SystemExit(f"bench: /bulk answered {response.status}: {str(body)[:200]}")
            stored += batch
    started = time.monotonic()
    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(sender(lane, session) for lane in range(concurrency)))
    return {"files_per_s": stored / (time.monotonic() - started), "files": stored}


def bench_bulk(server: Server, rounds: int) -> dict[str, Any]:
    runs = [asyncio.run(bulk_uploads(server, SMALL_SECONDS, 100, 2)) for _ in range(rounds)]
    return {"files_per_s": summary([run["files_per_s"] for run in runs])}


# -- the reference client beside Syncthing and rsync ------------------------------------

def make_tree(folder: Path, files: int, big: int) -> dict[str, int]:
    """`files` 4 KiB files in 20 folders and one file of `big` bytes; {path: size}."""
    sizes = {}
    for index in range(files):
        path = f"folder{index % 20:02d}/file{index:05d}.bin"
        target = folder / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(os.urandom(4096))
        sizes[path] = 4096
    with open(folder / "big.bin", "wb") as out:
        for _ in range(big // (1 << 20)):
            out.write(os.urandom(1 << 20))
    sizes["big.bin"] = big
    return sizes


def has_tree(folder: Path, sizes: dict[str, int]) -> Callable[[], bool]:
    def check() -> bool:
        for path, size in sizes.items():
            try:
                if (folder / path).stat().st_size != size:
                    return False
            except FileNotFoundError:
                return False
        return True
    return check


def run_client(folder: Path, url: str, name: str, *extra: str) -> float:
    """One `client --once` run; its seconds (process start included)."""
    started = time.monotonic()
    result = subprocess.run([sys.executable, str(ROOT / "syncd.py"), "client", str(folder),
                             "--server", url, "--client-id", name, "--once", *extra],
                            capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        raise SystemExit(f"bench: client {name} failed: {result.stdout[-500:]}{result.stderr[-500:]}")
    return time.monotonic() - started


def bench_client_passes(work: Path, files: int, big: int, rounds: int) -> dict[str, Any]:
    """Workload 11 for syncd: the initial sync of the tree from A to an empty B (A's
    --once uploading, then B's downloading, both processes' start included); then in
    the synced pair, A's --once after one 4 KiB file changed, and with nothing changed."""
    initial: list[float] = []
    one_change: list[float] = []
    nothing: list[float] = []
    for index in range(rounds):     # a new server each round: the tree's paths are the same
        server = start_syncd(work, f"client-data-{index}", extra=("--max-file-size", "2GiB"))
        try:
            a, b = work / f"syncd-A{index}", work / f"syncd-B{index}"
            sizes = make_tree(a, files, big)
            subprocess.run(["sync"], check=True)
            started = time.monotonic()
            run_client(a, server.url, f"a{index}")
            run_client(b, server.url, f"b{index}")
            initial.append(time.monotonic() - started)
            if not has_tree(b, sizes)():
                raise SystemExit("bench: B is not a copy of A after the initial sync")
            run_client(a, server.url, f"a{index}")      # the pass after the first is full
            (a / "folder03" / "file00003.bin").write_bytes(os.urandom(4096))
            one_change.append(run_client(a, server.url, f"a{index}"))
            nothing.append(run_client(a, server.url, f"a{index}"))
            shutil.rmtree(a)
            shutil.rmtree(b)
        finally:
            server.stop()
    return {"initial_s": summary(initial), "one_change_s": summary(one_change),
            "nothing_changed_s": summary(nothing)}


def bench_rsync(work: Path, files: int, big: int, rounds: int) -> dict[str, Any] | None:
    """rsync -a between two local folders: the initial copy, then after one change."""
    if shutil.which("rsync") is None:
        return None
    initial, one_change, nothing = [], [], []
    for index in range(rounds):
        a, b = work / f"rsync-A{index}", work / f"rsync-B{index}"
        make_tree(a, files, big)
        subprocess.run(["sync"], check=True)
        started = time.monotonic()
        subprocess.run(["rsync", "-a", f"{a}/", f"{b}/"], check=True)
        initial.append(time.monotonic() - started)
        (a / "folder03" / "file00003.bin").write_bytes(os.urandom(4096))
        started = time.monotonic()
        subprocess.run(["rsync", "-a", f"{a}/", f"{b}/"], check=True)
        one_change.append(time.monotonic() - started)
        started = time.monotonic()
        subprocess.run(["rsync", "-a", f"{a}/", f"{b}/"], check=True)
        nothing.append(time.monotonic() - started)
        shutil.rmtree(a)
        shutil.rmtree(b)
    return {"initial_s": summary(initial), "one_change_s": summary(one_change),
            "nothing_changed_s": summary(nothing)}


class Syncthing:
    """Two Syncthing instances on loopback sharing one folder, A and B (Debian's syncthing;
    no discovery, relays or NAT; fsWatcherDelayS 1, the smallest it allows)."""

    def __init__(self, work: Path, a: Path, b: Path) -> None:
        self.work, self.folders = work, {"A": a, "B": b}
        self.homes = {name: work / f"st-home-{name}" for name in self.folders}
        self.ports = {name: free_port() for name in self.folders}
        self.processes: list[subprocess.Popen[bytes]] = []
        self.ids = {name: self._generate(home) for name, home in self.homes.items()}
        for name in self.folders:
            self._configure(name)

    @staticmethod
    def _generate(home: Path) -> str:
        result = subprocess.run(["syncthing", "generate", f"--home={home}", "--no-default-folder",
                                 "--skip-port-probing"], capture_output=True, text=True, timeout=60)
        for line in (result.stdout + result.stderr).splitlines():
            if "Device ID:" in line:
                return line.split("Device ID:")[1].strip()
        raise SystemExit(f"bench: syncthing generate said {result.stdout}{result.stderr}")

    def _configure(self, name: str) -> None:
        import xml.etree.ElementTree as ET
        peer = "B" if name == "A" else "A"
        path = self.homes[name] / "config.xml"
        root = ET.parse(path).getroot()
        root.find("gui/address").text = f"127.0.0.1:{free_port()}"      # type: ignore[union-attr]
        options = root.find("options")
        assert options is not None
        for key, value in (("listenAddress", f"tcp://127.0.0.1:{self.ports[name]}"),
                           ("globalAnnounceEnabled", "false"), ("localAnnounceEnabled", "false"),
                           ("relaysEnabled", "false"), ("natEnabled", "false"),
                           ("urAccepted", "-1"), ("crashReportingEnabled", "false"),
                           ("startBrowser", "false"), ("autoUpgradeIntervalH", "0"),
                           ("reconnectionIntervalS", "1"), ("setLowPriority", "false")):
            element = options.find(key)
            if element is None:
                element = ET.SubElement(options, key)
            element.text = value
        device = ET.SubElement(root, "device", id=self.ids[peer], name=peer, compression="never")
        ET.SubElement(device, "address").text = f"tcp://127.0.0.1:{self.ports[peer]}"
        folder = ET.Element("folder", id="bench", label="bench", path=str(self.folders[name]),
                            type="sendreceive", rescanIntervalS="3600", fsWatcherEnabled="true",
                            fsWatcherDelayS="1")
        for member in (name, peer):
            ET.SubElement(folder, "device", id=self.ids[member])
        root.insert(0, folder)
        ET.ElementTree(root).write(path)

    def start(self) -> None:
        for name, home in self.homes.items():
            self.processes.append(subprocess.Popen(
                ["syncthing", "serve", f"--home={home}", "--no-browser", "--no-restart",
                 f"--logfile={self.work / f'syncthing-{name}.log'}"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                env={**os.environ, "STNOUPGRADE": "1", "STNORESTART": "1"}))

    def stop(self) -> None:
        for process in self.processes:
            process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def bench_syncthing(work: Path, files: int, big: int, rounds: int) -> dict[str, Any] | None:
    """Syncthing's initial sync of the tree from A to an empty B (both processes' start
    included), and one new 4 KiB file in A until it is whole in B, live."""
    if shutil.which("syncthing") is None:
        return None
    initial, live = [], []
    for index in range(rounds):
        a, b = work / f"st-A{index}", work / f"st-B{index}"
        sizes = make_tree(a, files, big)
        b.mkdir()
        for marker in (a, b):
            (marker / ".stfolder").mkdir(exist_ok=True)
        subprocess.run(["sync"], check=True)
        (work / f"st-{index}").mkdir()
        pair = Syncthing(work / f"st-{index}", a, b)
        started = time.monotonic()
        pair.start()
        try:
            wait_for(has_tree(b, sizes), 1800, "Syncthing's initial sync")
            initial.append(time.monotonic() - started)
            for round_ in range(5):
                data = os.urandom(4096)
                target = b / f"live-{round_}.bin"
                started = time.monotonic()
                (a / f"live-{round_}.bin").write_bytes(data)
                wait_for(lambda: target.exists() and target.read_bytes() == data, 60,
                         "Syncthing's live sync")
                live.append(time.monotonic() - started)
                time.sleep(0.5)
        finally:
            pair.stop()
        shutil.rmtree(a)
        shutil.rmtree(b)
    return {"initial_s": summary(initial), "live_ms": summary([s * 1000 for s in live])}


# -- the run --------------------------------------------------------------------------

# -- cluster mode: nodes on one PostgreSQL database and one folder, nginx in front ------

LB_CONF = """
user root;
worker_processes auto;
daemon off;
pid {work}/{name}.pid;
error_log {work}/{name}-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_max_body_size 0;
    client_body_temp_path {work}/{name}-body;
    proxy_temp_path {work}/{name}-proxy;
    map $http_upgrade $syncd_connection {{ default upgrade; '' ''; }}
    upstream syncd {{ {servers} keepalive 64; }}
    server {{
        listen 127.0.0.1:{port};
        proxy_request_buffering off;
        proxy_buffering off;
        proxy_http_version 1.1;
        location / {{
            proxy_pass http://syncd;
            proxy_set_header Host $host;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $syncd_connection;
        }}
    }}
}}
"""


def start_balancer(work: Path, name: str, nodes: list[Server]) -> Server:
    """nginx as the README's cluster site (systemd/nginx-syncd-cluster.conf) has it, without
    TLS: an upstream of the nodes, requests and answers streamed."""
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    port = free_port()
    conf = work / f"{name}.conf"
    conf.write_text(LB_CONF.format(work=work, name=name, port=port, servers=" ".join(
        f"server 127.0.0.1:{node.port};" for node in nodes)))
    process = subprocess.Popen([nginx, "-c", str(conf), "-p", str(work)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(listening(port), 20, "nginx")
    return Server(name, process, port, "/files/", "/files/")


def bench_cluster(work: Path, rounds: int, fan_clients: int) -> dict[str, Any]:
    """One node against two on one PostgreSQL database (started here, as the tests start
    it), in the same run: 4 KiB uploads and downloads through nginx to one node and to
    two (and to one node directly); fan-out to clients spread over one node or two; and
    the push from an upload on node a to a WebSocket on node b, against one on node a."""
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from conftest import Postgres
        database = Postgres()
    except BaseException as exc:        # pytest's skip, outside pytest
        raise SystemExit(f"bench: the cluster mode needs PostgreSQL and nginx ({exc})") from None
    started: list[Server] = []
    try:
        url = database.new_database()
        for name in ("a", "b"):
            started.append(start_syncd(work, "cluster-data", extra=(
                "--database-url", url, "--node-name", name)))
        a, b = started
        one, two = start_balancer(work, "lb-one", [a]), start_balancer(work, "lb-two", [a, b])
        started += [one, two]
        return {
            "direct": bench_small(a, work, rounds, "direct"),
            "one_node": bench_small(one, work, rounds, "one"),
            "two_nodes": bench_small(two, work, rounds, "two"),
            "fan_out_one_node": asyncio.run(fan_out(a, fan_clients, 30, [a], "fan1")),
            "fan_out_two_nodes": asyncio.run(fan_out(a, fan_clients, 30, [a, b], "fan2")),
            "push_same_node": asyncio.run(fan_out(a, 1, 50, [a], "push1")),
            "push_across_nodes": asyncio.run(fan_out(a, 1, 50, [b], "push2")),
            "nodes": 2}
    finally:
        for server in reversed(started):
            server.stop()
        database.close()


def print_cluster(results: dict[str, Any]) -> None:
    c = results["syncd"].get("cluster")
    if not c:
        return
    print("\ncluster (PostgreSQL, one folder; ratios: two nodes / one node, same run)")
    print(f"{'workload':46} {'median':>10} {'min':>10} {'max':>10} {'unit':8} "
          f"{'one node':>10} {'ratio':>7}")
    for key, label in (("upload_files_per_s", "4 KiB uploads via nginx, c=8"),
                       ("download_files_per_s", "4 KiB downloads via nginx, c=8")):
        print(row(f"{label}: two nodes", c["two_nodes"][key], "files/s", c["one_node"][key]))
        print(row("  one node without nginx", c["direct"][key], "files/s", c["one_node"][key]))
    # from the upload's start: after its answer, a push is often there first (negative)
    clients = c["fan_out_two_nodes"]["clients"]
    print(row(f"fan-out to {clients} over two nodes: last client",
              c["fan_out_two_nodes"]["last_client_from_start_ms"], "ms",
              c["fan_out_one_node"]["last_client_from_start_ms"]))
    print(row("push: upload on a -> WebSocket on b", c["push_across_nodes"]["last_client_from_start_ms"],
              "ms", c["push_same_node"]["last_client_from_start_ms"]))
    print(row("  ... after the upload's answer", c["push_across_nodes"]["last_client_ms"], "ms"))


def ratio(ours: float, theirs: float | None) -> str:
    return f"{ours / theirs:6.2f}x" if theirs else "      -"


def row(label: str, stats: dict[str, float], unit: str, nginx: dict[str, float] | None = None,
        scale: float = 1.0) -> str:
    theirs = nginx["median"] * scale if nginx else None
    return (f"{label:46} {stats['median'] * scale:10.1f} {stats['min'] * scale:10.1f} "
            f"{stats['max'] * scale:10.1f} {unit:8} "
            f"{(f'{theirs:10.1f}' if theirs else '         -')} {ratio(stats['median'] * scale, theirs)}")


def print_table(results: dict[str, Any]) -> None:
    s, n = results["syncd"], results.get("nginx") or {}
    big, entries = results["large_file"], results["manifest_entries"]
    print(f"\nsyncd {results['version']} on {results['machine']}, {results['date']}")
    print(f"{'workload':46} {'median':>10} {'min':>10} {'max':>10} {'unit':8} "
          f"{'nginx':>10} {'ratio':>7}")
    print(row(f"{big} PUT upload", s["put"]["mb_per_s"], "MB/s", n.get("put", {}).get("mb_per_s")))
    print(row(f"{big} multipart upload (vs nginx PUT)", s["multipart"]["mb_per_s"], "MB/s",
              n.get("put", {}).get("mb_per_s")))
    print(row("  peak RSS over idle during PUT", s["put"]["peak_rss_over_idle_mb"], "MB"))
    print(row("  peak RSS over idle during multipart", s["multipart"]["peak_rss_over_idle_mb"], "MB"))
    print(row(f"{big} download", s["download"]["mb_per_s"], "MB/s",
              n.get("download", {}).get("mb_per_s")))
    print(row("4 KiB uploads, c=8, durable", s["small"]["upload_files_per_s"], "files/s",
              n.get("small", {}).get("upload_files_per_s")))
    print(row("4 KiB downloads, c=8", s["small"]["download_files_per_s"], "files/s",
              n.get("small", {}).get("download_files_per_s")))
    if "bulk" in s:
        print(row("4 KiB files via /bulk (100 a request, c=2)", s["bulk"]["files_per_s"],
                  "files/s", n.get("small", {}).get("upload_files_per_s")))
    if "sync" in s:
        print(row(f"/sync, {entries:,} entries", s["sync"]["seconds"], "s"))
        print(row("  extra RSS during /sync", s["sync"]["extra_rss_mb"], "MB"))
        print(f"{f'  start over {entries:,} files: first / restart':46} {s['sync']['first_start_s']:10.1f} "
              f"{s['sync']['restart_s']:10.1f} {'':10} s")
    if "fan_out" in s:
        clients = s["fan_out"]["clients"]
        for key, label in (("last_client_ms", f"fan-out to {clients}: last client after answer"),
                           ("last_client_from_start_ms", "  ... after the upload's start")):
            fan = s["fan_out"][key]
            print(f"{label:46} {fan['median']:10.1f} {fan['min']:10.1f} {fan['max']:10.1f} "
                  f"{'ms':8} p99 {fan['p99']:.1f}")
    print(f"{'idle RSS':46} {s['idle_rss_mb']:10.1f} {'':10} {'':10} MB")
    if "live" in s:
        print(row("live client: write on A -> bytes on B", s["live"]["ms"], "ms"))
    print_versions(results)
    print_clients(results)


def print_clients(results: dict[str, Any]) -> None:
    """Workload 11's lines: the reference client beside Syncthing and rsync."""
    client = results["syncd"].get("client")
    if client is None:
        return
    syncthing, rsync = results.get("syncthing") or {}, results.get("rsync") or {}
    live = results["syncd"].get("live")

    def cell(figures: dict[str, Any], key: str) -> str:
        return f"{figures[key]['median']:10.2f}" if key in figures else f"{'-':>10}"

    def vs(ours: dict[str, Any], key: str, theirs: dict[str, Any], their_key: str) -> str:
        if key not in ours or their_key not in theirs:
            return f"{'-':>9}"
        return f"{ours[key]['median'] / theirs[their_key]['median']:8.2f}x"
    print(f"\nthe reference client ({results['tree']}; medians, seconds unless marked)")
    print(f"{'':46} {'syncd':>10} {'Syncthing':>10} {'rsync -a':>10} {'/Syncthing':>10} {'/rsync':>9}")
    print(f"{'initial sync A -> empty B':46} {cell(client, 'initial_s')} "
          f"{cell(syncthing, 'initial_s')} {cell(rsync, 'initial_s')} "
          f"{vs(client, 'initial_s', syncthing, 'initial_s'):>10} {vs(client, 'initial_s', rsync, 'initial_s')}")
    if live:
        print(f"{'one new 4 KiB file A -> B, live (ms)':46} {live['ms']['median']:10.1f} "
              f"{cell(syncthing, 'live_ms')} {'-':>10} "
              f"{vs({'ms': live['ms']}, 'ms', syncthing, 'live_ms'):>10} {'-':>9}")
    for key, label in (("one_change_s", "--once after one 4 KiB change"),
                       ("nothing_changed_s", "--once with nothing changed")):
        print(f"{label:46} {cell(client, key)} {'-':>10} {cell(rsync, key)} {'-':>10} "
              f"{vs(client, key, rsync, key)}")


def print_versions(results: dict[str, Any]) -> None:
    """Workload 9's lines of the table."""
    s, big = results["syncd"], results["large_file"]
    if "versions" in s:
        on, off = s["versions"]["on"], s["versions"]["off"]
        print(f"{'versions on vs off (same run)':46} {'on':>10} {'off':>10} {'on/off':>10}")
        for key, label, unit in (("overwrite_files_per_s", "4 KiB overwrites, c=8", "files/s"),
                                 ("big_overwrite_mb_per_s", f"{big} overwrite", "MB/s")):
            print(f"{'  ' + label:46} {on[key]['median']:10.1f} {off[key]['median']:10.1f} "
                  f"{on[key]['median'] / off[key]['median']:9.2f}x {unit}")
        disk = s["versions"]["disk"]
        print(f"{'  editing scenario: live / versions MB':46} {disk['live_mb']:10.1f} "
              f"{disk['version_mb']:10.1f} {'':10} ({disk['versions']:.0f} versions, blob "
              f"folder {disk['blob_dir_mb']:.1f} MB)")


def bench_clients(results: dict[str, Any], work: Path, args: argparse.Namespace) -> None:
    """Workload 11: syncd's client, rsync and Syncthing on the same tree, one after another."""
    files, tree_big = (200, 16 << 20) if args.quick else (2000, 256 << 20)
    results["tree"] = f"{files:,} x 4 KiB in 20 folders + {tree_big >> 20} MiB"
    results["syncd"]["client"] = bench_client_passes(work, files, tree_big, args.rounds)
    results["rsync"] = bench_rsync(work, files, tree_big, args.rounds)
    results["syncthing"] = bench_syncthing(work, files, tree_big, args.rounds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="runs of each large workload")
    parser.add_argument("--quick", action="store_true",
                        help="64 MiB instead of 1 GiB, 10,000 instead of 100,000 entries, "
                             "200 WebSocket clients: a smoke run")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--skip", default="",
                        help="comma-separated: sync,fanout,live,nginx,versions,bulk,clients")
    parser.add_argument("--only", default="",
                        help="comma-separated workloads to run alone: versions, clients, cluster")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 20000), hard))
    for tool in ("curl", "wrk"):
        if shutil.which(tool) is None:
            raise SystemExit(f"bench: {tool} is needed (Debian: apt-get install -y {tool})")
    size = 64 * 1024 * 1024 if args.quick else GIB
    entries = 10_000 if args.quick else 100_000
    fan_clients = 200 if args.quick else 1000
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"), "version": "", "syncd": {},
        "large_file": "64 MiB" if args.quick else "1 GiB", "manifest_entries": entries,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"}
    sys.path.insert(0, str(ROOT))
    import syncd
    results["version"] = syncd.__version__
    with tempfile.TemporaryDirectory(prefix="syncd-bench-", dir=os.environ.get("BENCH_DIR")) as temp:
        work = Path(temp)
        if "cluster" in args.only.split(","):
            results["syncd"]["cluster"] = bench_cluster(work, args.rounds, fan_clients)
            print_cluster(results)
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=2))
            return 0
        big = make_big_file(work, size)
        if "versions" in args.only.split(","):
            results["syncd"]["versions"] = bench_versions(work, big, args.rounds)
            print_versions(results)
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=2))
            return 0
        if "clients" in args.only.split(","):
            bench_clients(results, work, args)
            live_server = start_syncd(work, "live-data")
            try:
                results["syncd"]["live"] = bench_live(work, live_server.url, 20)
            finally:
                live_server.stop()
            print_clients(results)
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=2))
            return 0
        server = start_syncd(work)
        try:
            time.sleep(0.5)
            results["syncd"]["idle_rss_mb"] = server.rss_mb()
            results["syncd"]["put"] = bench_large(server, big, args.rounds, multipart=False)
            results["syncd"]["multipart"] = bench_large(server, big, args.rounds, multipart=True)
            results["syncd"]["download"] = bench_download(server, size, args.rounds)
            results["syncd"]["small"] = bench_small(server, work, args.rounds)
            if "bulk" not in skip:
                results["syncd"]["bulk"] = bench_bulk(server, args.rounds)
            if "fanout" not in skip:
                results["syncd"]["fan_out"] = asyncio.run(fan_out(server, fan_clients, 30))
        finally:
            server.stop()
        if "live" not in skip:      # a fresh server: a new client's first pass downloads everything
            live_server = start_syncd(work, "live-data")
            try:
                results["syncd"]["live"] = bench_live(work, live_server.url, 20)
            finally:
                live_server.stop()
        if "sync" not in skip:
            results["syncd"]["sync"] = bench_sync_manifest(work, entries, args.rounds)
        if "versions" not in skip:
            results["syncd"]["versions"] = bench_versions(work, big, args.rounds)
        if "clients" not in skip:
            bench_clients(results, work, args)
        nginx = None if "nginx" in skip else start_nginx(work)
        if nginx is not None:
            try:
                results["nginx"] = {
                    "put": bench_large(nginx, big, args.rounds, multipart=False),
                    "download": bench_download(nginx, size, args.rounds),
                    "small": bench_small(nginx, work, args.rounds)}
            finally:
                nginx.stop()
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
