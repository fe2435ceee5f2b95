"""Devices with a real daemon: `python syncd.py devices ...`, the reference client with a
token, revocation of a live client, devices across reload and restart, and the issue's
"done when": two devices syncing over TLS, one revoked, the other going on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from conftest import PKI, ROOT, Clients, tree, wait_until, write

ADMIN = "the-admin-key"


def devices(server_url: str, key_file: Path, *args: str, ca: Path | None = None,
            expect: int = 0) -> str:
    command = [sys.executable, str(ROOT / "syncd.py"), "devices", *args, "--server",
               server_url, "--api-key-file", str(key_file)]
    if ca is not None:
        command += ["--ca-file", str(ca)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == expect, result.stdout + result.stderr
    return result.stdout + result.stderr


def enrol(server_url: str, key_file: Path, name: str, folder: Path,
          ca: Path | None = None) -> tuple[str, Path]:
    """A device enrolled with the CLI; its token, and a file holding it (mode 600)."""
    output = devices(server_url, key_file, "add", name, ca=ca)
    assert f"device {name} enrolled with the scope write" in output
    token = output.strip().splitlines()[-1]
    token_file = folder / f"{name}.token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    return token, token_file


def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "admin.key"
    path.write_text(ADMIN + "\n")
    path.chmod(0o600)
    return path


def test_devices_from_the_command_line_across_reload_and_restart(tmp_path: Path,
                                                                  daemon: Any) -> None:
    admin = key_file(tmp_path)
    server = daemon("--api-key-file", str(admin))
    group = Clients(tmp_path, server)
    token, token_file = enrol(server.url, admin, "laptop", tmp_path)
    write(group.folder("A"), "a.txt", b"from the laptop")
    group.once("A", "--client-id", "laptop", "--token-file", str(token_file))
    assert (server.data / "a.txt").read_bytes() == b"from the laptop"

    # SYNCD_TOKEN stands for --token-file; another client id than the device's is refused
    result = subprocess.run(group.command("B") + ["--once"], capture_output=True, text=True,
                            timeout=60, env={**os.environ, "SYNCD_TOKEN": token})
    assert result.returncode == 2
    assert "acts only as the client id laptop" in result.stderr
    result = subprocess.run([sys.executable, str(ROOT / "syncd.py"), "client",
                             str(group.folder("B")), "--server", server.url, "--client-id",
                             "laptop", "--once"], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "SYNCD_TOKEN": token})
    assert result.returncode == 0 and tree(group.folder("B")) == {"a.txt": b"from the laptop"}

    server.process.send_signal(signal.SIGHUP)
    wait_until(lambda: "configuration reloaded" in server.log(), "the reload")
    listing = devices(server.url, admin, "list")
    assert "laptop" in listing and "write" in listing and "active" in listing
    server.stop()
    server = daemon("--api-key-file", str(admin), port=server.port)
    group.once("A", "--client-id", "laptop", "--token-file", str(token_file))   # still valid
    devices(server.url, admin, "revoke", "laptop")
    assert "revoked" in devices(server.url, admin, "list")
    output = group.once("A", "--client-id", "laptop", "--token-file", str(token_file), expect=2)
    assert "revoked" in output
    assert "already enrolled" not in devices(server.url, admin, "add", "laptop")  # re-enrol
    refused = devices(server.url, admin, "revoke", "nobody", expect=1)
    assert "404" in refused and "no device nobody" in refused
    for log in tmp_path.glob("daemon-*.log"):
        assert token not in log.read_text(errors="replace")   # never logged


def test_two_devices_over_tls_one_revoked_the_other_goes_on(tmp_path: Path, daemon: Any) -> None:
    pki = PKI(tmp_path / "pki")
    cert, key = pki.server("server")
    admin = key_file(tmp_path)
    server = daemon("--api-key-file", str(admin), "--tls-cert-file", str(cert),
                    "--tls-key-file", str(key))
    server.url = server.url.replace("http://", "https://")
    group = Clients(tmp_path, server)
    try:
        _, laptop = enrol(server.url, admin, "device-a", tmp_path, ca=pki.ca)
        _, phone = enrol(server.url, admin, "device-b", tmp_path, ca=pki.ca)
        a = group.start("A", "--token-file", str(laptop), "--ca-file", str(pki.ca))
        group.start("B", "--token-file", str(phone), "--ca-file", str(pki.ca))
        write(group.folder("A"), "first.txt", b"1")
        wait_until(lambda: tree(group.folder("B")).get("first.txt") == b"1", "A's file at B")
        devices(server.url, admin, "revoke", "device-a", ca=pki.ca)
        a.wait(timeout=15)                                 # it stops, and says why
        assert a.returncode == 2
        errors = [line for line in group.log("A").splitlines() if " ERROR " in line]
        assert len(errors) == 1 and "(401)" in errors[0] and "revoked" in errors[0]
        write(group.folder("B"), "second.txt", b"2")       # B goes on
        wait_until(lambda: (server.data / "second.txt").exists(), "B's upload")
        assert "second.txt" not in tree(group.folder("A"))
    finally:
        group.stop()
