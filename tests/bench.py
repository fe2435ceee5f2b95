"""syncd benchmarks: `python tests/bench.py [--json FILE] [--rounds N]`. Not collected by pytest.

Starts syncd on a loopback port with a temp directory and measures, as the median
of several runs with min and max:

- live: the time from a file written in client folder A to the same bytes in
  client folder B, both running `python syncd.py client` live.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.01)
    raise SystemExit(f"bench: timed out waiting for {what}")


def start_daemon(work: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "syncd.py"), "--port", str(port), "--sync-directory",
         str(work / "server"), "--log-level", "warning", "--max-file-size", "2GiB"],
        stdout=subprocess.DEVNULL, stderr=open(work / "daemon.log", "wb"))

    def ready() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return True
        except OSError:
            return False
    wait_for(ready, 20, "the daemon")
    return process, f"http://127.0.0.1:{port}"


def start_client(work: Path, name: str, url: str) -> subprocess.Popen[bytes]:
    folder = work / name
    folder.mkdir()
    log = work / f"client-{name}.log"
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "syncd.py"), "client", str(folder), "--server", url,
         "--client-id", f"bench-{name}"], stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    wait_for(lambda: "live server=" in log.read_text(errors="replace"), 30, f"client {name}")
    return process


def bench_live(work: Path, url: str, rounds: int) -> dict[str, float]:
    """Seconds from a write in A to the same bytes in B."""
    clients = [start_client(work, name, url) for name in ("A", "B")]
    try:
        samples = []
        for index in range(rounds):
            data = os.urandom(4096)
            path_a, path_b = work / "A" / f"live-{index}.bin", work / "B" / f"live-{index}.bin"
            started = time.monotonic()
            path_a.write_bytes(data)

            def arrived() -> bool:
                try:
                    return path_b.read_bytes() == data
                except FileNotFoundError:
                    return False
            wait_for(arrived, 30, f"live round {index}")
            samples.append(time.monotonic() - started)
            time.sleep(0.2)        # let both sides settle: rounds do not overlap
        return summary(samples)
    finally:
        for process in clients:
            process.send_signal(signal.SIGINT)
            process.wait(timeout=20)


def summary(samples: list[float]) -> dict[str, float]:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples),
            "n": len(samples)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20, help="samples per workload")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="syncd-bench-") as temp:
        work = Path(temp)
        daemon, url = start_daemon(work)
        try:
            results["live_sync_seconds"] = bench_live(work, url, args.rounds)
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=30)
    print(f"{'workload':44} {'median':>10} {'min':>10} {'max':>10}")
    live = results["live_sync_seconds"]
    print(f"{'live: write on A -> same bytes on B (ms)':44} {live['median'] * 1000:10.1f} "
          f"{live['min'] * 1000:10.1f} {live['max'] * 1000:10.1f}   (n={live['n']})")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
