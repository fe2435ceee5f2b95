"""syncd installed as in the README and run by a real systemd, booted in a
container (systemd-nspawn from Debian's systemd-container). Skips where it cannot boot."""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import PKI, ROOT, free_port, wait_until

KEY = "container-key"


def skip_reason() -> str | None:
    """Why a container cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root"
    if shutil.which("systemd-nspawn") is None or shutil.which("nsenter") is None:
        return "systemd-nspawn (Debian: systemd-container) is not installed"
    if not Path("/usr/bin/python3").exists() or not Path("/lib/systemd/systemd").exists():
        return "no system python3 or systemd to boot"
    version = subprocess.run(["/usr/bin/python3", "-c", "import sys; print(sys.version_info[:2])"],
                             capture_output=True, text=True).stdout.strip()
    if version != str(sys.version_info[:2]):
        return f"/usr/bin/python3 is {version}, the test venv {sys.version_info[:2]}"
    return None


class Container:
    """A booted systemd in a container, with /opt/syncd and /etc/syncd bound in."""

    def __init__(self, tmp_path: Path) -> None:
        self.opt = tmp_path / "opt-syncd"
        self.etc = tmp_path / "etc-syncd"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(tmp_path / "nspawn.log", "wb")
        self.process: subprocess.Popen[bytes] | None = None
        self.pid = 0
        self.binds: list[str] = []         # more --bind=HOST:INSIDE, before boot()

    def install(self) -> None:
        """What the README's install steps put on disk, from this checkout."""
        self.opt.mkdir()
        for name in ("syncd.py", "README.md"):
            shutil.copy(ROOT / name, self.opt / name)
        # The container has the host's /usr: a venv of Debian's python3 with
        # this venv's packages (the same 3.11 ABI) stands in for `pip install`.
        subprocess.run(["/usr/bin/python3", "-m", "venv", "--without-pip", str(self.opt / ".venv")],
                       check=True, timeout=60)
        target = self.opt / ".venv" / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
        shutil.copytree(sysconfig.get_paths()["purelib"], target, dirs_exist_ok=True)
        self.etc.mkdir()
        config = (ROOT / "syncd.toml").read_text().replace("port = 8000", f"port = {self.port}")
        (self.etc / "syncd.toml").write_text(config)
        (self.etc / "api_key").write_text(KEY + "\n")
        (self.etc / "api_key").chmod(0o600)

    def boot(self) -> None:
        """Start the container and wait until its systemd is up."""
        self.process = subprocess.Popen(
            ["systemd-nspawn", "--register=no", "--keep-unit", "--volatile=yes", "-D", "/",
             "--boot", "--console=pipe", "-M", f"syncdtest{os.getpid()}",
             f"--bind-ro={self.opt}:/opt/syncd", f"--bind={self.etc}:/etc/syncd",
             *(f"--bind={bind}" for bind in self.binds)],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
            env={**os.environ, "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "0"})
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self.process.poll() is None:
            found = subprocess.run(["pgrep", "-P", str(self.process.pid), "-x", "systemd"],
                                   capture_output=True, text=True).stdout.split()
            if found:
                self.pid = int(found[0])
                state = self.run("systemctl", "is-system-running", check=False).stdout.strip()
                if state in ("running", "degraded"):
                    return
            time.sleep(0.2)
        pytest.skip(f"the container did not boot: {(self.log.name and Path(self.log.name).read_text(errors='replace'))[-500:]}")

    def run(self, *command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """A command inside the container."""
        return subprocess.run(["nsenter", "-t", str(self.pid), "-a", *command],
                              capture_output=True, text=True, timeout=60, check=check)

    def install_unit(self, name: str = "syncd.service") -> None:
        """A unit of systemd/ goes to /run/systemd/system inside, then daemon-reload."""
        units = Path(f"/proc/{self.pid}/root/run/systemd/system")
        units.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / "systemd" / name, units / name)
        self.run("systemctl", "daemon-reload")

    def show(self, prop: str, unit: str = "syncd") -> str:
        """systemctl show -p PROP --value UNIT."""
        return self.run("systemctl", "show", "-p", prop, "--value", unit).stdout.strip()

    def journal(self, *extra: str, unit: str = "syncd") -> str:
        """journalctl -u UNIT."""
        return self.run("journalctl", "-u", unit, "--no-pager", *extra).stdout

    def stop(self) -> None:
        """SIGTERM to nspawn powers the container off."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.log.close()


def booted(tmp_path: Path, unit: str, binds: tuple[str, ...] = ()) -> Iterator[Container]:
    """A booted container with a unit of systemd/ installed (and more folders bound)."""
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    box = Container(tmp_path)
    box.binds.extend(binds)
    try:
        box.install()
        box.boot()
        box.install_unit(unit)
        yield box
    finally:
        box.stop()


@pytest.fixture
def container(tmp_path: Path) -> Iterator[Container]:
    yield from booted(tmp_path, "syncd.service")


@pytest.fixture
def node_container(tmp_path: Path) -> Iterator[Container]:
    """The node template installed, and /srv/syncd bound from tmp_path/shared."""
    (tmp_path / "shared").mkdir()
    yield from booted(tmp_path, "syncd-node@.service", (f"{tmp_path / 'shared'}:/srv/syncd",))


def http(url: str, method: str = "GET", data: bytes | None = None,
         headers: dict[str, str] | None = None) -> int:
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code




def test_service_runs_reloads_logs_and_stops_under_systemd(container: Container) -> None:
    container.run("systemctl", "start", "syncd")
    assert container.show("ActiveState") == "active"
    assert container.show("StatusText").startswith("serving 0 files")
    assert http(container.url + "/health") == 200
    assert http(container.url + "/files") == 401                       # the credential is the key
    auth = {"Authorization": f"Bearer {KEY}", "X-Client-Id": "host"}
    assert http(container.url + "/files/hello.txt", "PUT", b"hello", auth) == 201

    container.run("systemctl", "reload", "syncd")                      # SIGHUP, RELOADING=1, READY=1
    assert container.show("ActiveState") == "active"
    wait_until(lambda: "configuration reloaded" in container.journal(), "the reload")
    assert container.show("StatusText").startswith("serving 1 files")

    verbose = container.journal("-o", "verbose")
    listening = verbose.split("MESSAGE=syncd: syncd ")[0].rsplit("PRIORITY=", 1)[1][:1]
    assert listening == "6"                                            # <6> prefix became PRIORITY=6
    (container.etc / "syncd.toml").write_text("max_file_size = 'enormous'\n")
    container.run("systemctl", "reload", "syncd")
    wait_until(lambda: "configuration not reloaded" in container.journal(), "the failed reload")
    assert "configuration not reloaded" in container.journal("-p", "err")   # PRIORITY=3
    assert container.show("ActiveState") == "active"                   # the old config serves on
    assert http(container.url + "/files", headers=auth) == 200

    container.run("systemctl", "stop", "syncd")
    assert container.show("ActiveState") == "inactive"
    assert container.show("ExecMainStatus") == "0"
    assert "stopped" in container.journal()

    # A bad config exits 2, and the unit does not restart it in a loop.
    container.run("systemctl", "start", "syncd", check=False)
    time.sleep(3)                                                      # longer than RestartSec
    assert container.show("ExecMainStatus") == "2"
    assert container.show("NRestarts") == "0"
    assert container.show("ActiveState") == "failed"
    assert "max_file_size" in container.journal()


def test_service_serves_https_with_its_certificate_as_a_credential(container: Container,
                                                                  tmp_path: Path) -> None:
    """systemd/syncd-tls.conf as the README installs it: the key stays root-only."""
    pki = PKI(tmp_path / "pki")
    cert, key = pki.server("service")
    (container.etc / "tls").mkdir()
    for source, name in ((cert, "fullchain.pem"), (key, "privkey.pem")):
        shutil.copy(source, container.etc / "tls" / name)
        (container.etc / "tls" / name).chmod(0o600)
    dropins = Path(f"/proc/{container.pid}/root/run/systemd/system/syncd.service.d")
    dropins.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "systemd" / "syncd-tls.conf", dropins / "tls.conf")
    container.run("systemctl", "daemon-reload")
    container.run("systemctl", "start", "syncd")
    assert container.show("ActiveState") == "active"
    url = container.url.replace("http://", "https://")
    context = ssl.create_default_context(cafile=pki.ca)
    with urllib.request.urlopen(url + "/health", timeout=10, context=context) as response:
        assert response.status == 200
    assert "listening on https://" in container.journal()


def test_two_cluster_nodes_run_from_the_template(node_container: Container, postgres: Any,
                                                  tmp_path: Path) -> None:
    """systemd/syncd-node@.service as the README installs it: a fixed user syncd, the
    instance name as the node's name, its own config file, the database password as a
    credential; two nodes on one database and one shared folder serve the same files."""
    box = node_container
    box.run("useradd", "--system", "--user-group", "--no-create-home", "syncd")
    uid = int(box.run("id", "-u", "syncd").stdout)
    os.chown(tmp_path / "shared", uid, uid)
    url = postgres.new_database()
    ports = {"node-1": box.port, "node-2": free_port()}
    for node, port in ports.items():
        (box.etc / f"{node}.toml").write_text(
            f'port = {port}\nsync_directory = "/srv/syncd"\ndatabase_url = "{url}"\n')
    (box.etc / "pgpass").write_text("*:*:*:*:unused-with-trust\n")
    (box.etc / "pgpass").chmod(0o600)
    for node in ports:
        box.run("systemctl", "start", f"syncd-node@{node}")
        assert box.show("ActiveState", f"syncd-node@{node}") == "active", box.journal(
            unit=f"syncd-node@{node}")
    auth = {"Authorization": f"Bearer {KEY}", "X-Client-Id": "host"}
    one, two = (f"http://127.0.0.1:{port}" for port in ports.values())
    assert http(one + "/files/hello.txt", "PUT", b"hello", auth) == 201
    with urllib.request.urlopen(urllib.request.Request(two + "/download/hello.txt",
                                                       headers=auth), timeout=10) as answer:
        assert answer.read() == b"hello"
    with urllib.request.urlopen(two + "/health", timeout=10) as answer:
        assert json.loads(answer.read())["node"] == "node-2"
    assert (tmp_path / "shared" / "hello.txt").stat().st_uid == uid
    assert sorted(os.listdir(tmp_path / "shared" / ".syncd" / "tmp")) == ["node-1", "node-2"]
    box.run("systemctl", "stop", "syncd-node@node-1", "syncd-node@node-2")
    assert box.show("ExecMainStatus", "syncd-node@node-1") == "0"

