"""Shared fixtures: an in-process app on a temp tree, helpers, and a real daemon."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import pwd
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import syncd  # noqa: E402


def sha(data: bytes) -> str:
    """The contract's checksum of data."""
    return hashlib.sha256(data).hexdigest()


def make_config(tmp_path: Path, **overrides: Any) -> syncd.Config:
    """A config serving tmp_path/data, with overrides."""
    overrides.setdefault("sync_directory", str(tmp_path / "data"))
    return syncd.Config(**overrides)


# -- PostgreSQL: a real server, started as an unprivileged user -----------------------

PG_BIN = Path("/usr/lib/postgresql/15/bin")
ON_POSTGRES = os.environ.get("SYNCD_TEST_DATABASE") == "postgres"   # the whole suite on it


class Postgres:
    """A throw-away PostgreSQL server on a free loopback port (trust authentication)."""

    def __init__(self) -> None:
        initdb = shutil.which("initdb") or str(PG_BIN / "initdb")
        if not Path(initdb).exists():
            pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
        self.bin = Path(initdb).parent
        self.dir = Path(tempfile.mkdtemp(prefix="syncd-pg-"))
        self.port = free_port()
        self.as_user: list[str] = []
        if os.geteuid() == 0:               # PostgreSQL refuses to run as root
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                pytest.skip("no postgres user to run PostgreSQL as")
            os.chown(self.dir, pwd.getpwnam("postgres").pw_uid, -1)
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self.run("initdb", "-D", str(self.dir / "data"), "-A", "trust", "-U", "postgres",
                 "--no-sync", "-E", "UTF8")
        self.start()
        self.databases = 0

    def run(self, tool: str, *args: str) -> None:
        subprocess.run([*self.as_user, str(self.bin / tool), *args], check=True,
                       capture_output=True, timeout=120)

    def start(self) -> None:
        self.run("pg_ctl", "-D", str(self.dir / "data"), "-l", str(self.dir / "log"), "-w",
                 "start", "-o", f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 "
                                "-c fsync=off -c max_connections=300")

    def stop(self, mode: str = "fast") -> None:
        self.run("pg_ctl", "-D", str(self.dir / "data"), "-m", mode, "-w", "stop")

    def url(self, database: str = "postgres") -> str:
        # sslmode=disable: no TLS to a loopback server, and no look at ~/.postgresql (which
        # a daemon run as nobody cannot read)
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}?sslmode=disable"

    def new_database(self) -> str:
        """A fresh, empty database; its URL."""
        import asyncpg
        self.databases += 1
        name = f"syncd_test_{self.databases}"

        async def create() -> None:
            conn = await asyncpg.connect(self.url())
            try:
                await conn.execute(f"CREATE DATABASE {name}")
            finally:
                await conn.close()
        _in_thread(create)      # the caller may be inside an event loop already
        return self.url(name)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


def _in_thread(work: Callable[[], Any]) -> None:
    """Run a coroutine function to its end on a loop of its own, in a thread."""
    import asyncio
    failure: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(work())
        except BaseException as exc:
            failure.append(exc)
    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=60)
    if failure:
        raise failure[0]


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """One PostgreSQL server for the test session (skips where it cannot be had)."""
    server = Postgres()
    yield server
    server.close()


@pytest.fixture
def own_postgres() -> Iterator[Postgres]:
    """A PostgreSQL server of this test's own (it is stopped and started)."""
    server = Postgres()
    yield server
    server.close()


@pytest.fixture
def database_url(request: pytest.FixtureRequest) -> str | None:
    """With SYNCD_TEST_DATABASE=postgres, a fresh PostgreSQL database for this test (the
    apps it starts share it, as one server's restarts would); else None: SQLite."""
    if not ON_POSTGRES:
        return None
    url = str(request.getfixturevalue("postgres").new_database())
    CURRENT_DATABASE.append(url)
    return url


sqlite_only = pytest.mark.skipif(ON_POSTGRES,
                                 reason="about SQLite itself (its file, errors or connections)")
CURRENT_DATABASE: list[str] = []     # with SYNCD_TEST_DATABASE=postgres: this test's database


def db_query(data_dir: Path, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """A statement on the server's metadata (written with ?, committed at once): the SQLite
    file in data_dir/.syncd/, or, on PostgreSQL, this test's database. Its rows."""
    if not ON_POSTGRES:
        with contextlib.closing(sqlite3.connect(data_dir / ".syncd" / "syncd.db")) as db:
            with db:
                return db.execute(sql, params).fetchall()
    return db_query_url(CURRENT_DATABASE[-1], sql, params)


def db_query_url(url: str, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """A statement (written with ?) on the PostgreSQL database at url; its rows."""
    import asyncpg
    rows: list[tuple[Any, ...]] = []

    async def run() -> None:
        conn = await asyncpg.connect(url)
        try:
            rows.extend(tuple(row) for row in await conn.fetch(syncd.numbered(sql), *params))
        finally:
            await conn.close()
    _in_thread(run)
    return rows


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """The sync directory of the default app."""
    return tmp_path / "data"


@pytest.fixture
def app_client(aiohttp_client: Any, tmp_path: Path, database_url: str | None,
               request: pytest.FixtureRequest) -> Callable[..., Any]:
    """Start an in-process app with the given settings; returns its test client."""
    databases = {str(tmp_path / "data"): database_url}   # one per tree, as one server's

    async def start(**overrides: Any) -> Any:
        config = make_config(tmp_path, **overrides)
        if database_url is not None and "database_url" not in overrides:
            if config.sync_directory not in databases:
                databases[config.sync_directory] = str(
                    request.getfixturevalue("postgres").new_database())
            config = replace(config, database_url=databases[config.sync_directory])
        return await aiohttp_client(syncd.make_app(config))
    return start


@pytest.fixture
async def client(app_client: Callable[..., Any]) -> Any:
    """A test client of an app with the default settings."""
    return await app_client()


async def put(client: Any, path: str, data: bytes, client_id: str = "laptop",
              **headers: str) -> Any:
    """PUT /files/{path}."""
    return await client.put(f"/files/{path}", data=data,
                            headers={"X-Client-Id": client_id, **headers})


async def upload(client: Any, path: str, data: bytes, client_id: str = "laptop",
                 file_first: bool = False, **fields: str) -> Any:
    """POST /upload with the text fields before (or after) the file part."""
    form = aiohttp.FormData()
    text = {"relative_path": path, "client_id": client_id, **fields}
    if file_first:
        form.add_field("file", data, filename="blob")
    for key, value in text.items():
        form.add_field(key, value)
    if not file_first:
        form.add_field("file", data, filename="blob")
    return await client.post("/upload", data=form)


async def error_of(response: Any, status: int) -> dict[str, Any]:
    """Assert the status and the contract's error shape; return the body."""
    assert response.status == status, await response.text()
    body = await response.json()
    assert isinstance(body["error"], str) and isinstance(body["message"], str)
    return body


async def recovered(client: Any) -> Any:
    """The client, once the app's background rehash of changed files is done."""
    task = client.server.app[syncd.STATE].tree.recovery
    if task is not None:
        await task
    return client


def database_error(full: bool) -> Exception:
    """What the metadata database's driver raises when its disk is full (full) or failing:
    SQLite's result codes, or PostgreSQL's SQLSTATE (53100 disk_full, 58030 io_error)."""
    if ON_POSTGRES:
        import asyncpg
        return (asyncpg.exceptions.DiskFullError("could not extend file: No space left")
                if full else asyncpg.exceptions.PostgresIOError("could not write block"))
    return (sqlite_error(sqlite3.SQLITE_FULL, "database or disk is full") if full
            else sqlite_error(sqlite3.SQLITE_IOERR, "disk I/O error"))


def sqlite_error(code: int, message: str) -> sqlite3.OperationalError:
    """The error SQLite raises with this result code (as a failing disk or database would)."""
    error = sqlite3.OperationalError(message)
    error.sqlite_errorcode = code
    error.sqlite_errorname = next(name for name in dir(sqlite3) if name.startswith("SQLITE_")
                                  and getattr(sqlite3, name) == code)
    return error


def wait_until(check: Callable[[], bool], what: str, timeout: float = 20) -> None:
    """Poll check every 50 ms until it holds; fail after timeout seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def node_tmp(data_dir: Path) -> Path:
    """The server's temp folder: .syncd/tmp/, or on PostgreSQL the node's .syncd/tmp/NODE/."""
    tmp = data_dir / ".syncd" / "tmp"
    return tmp / socket.gethostname() if ON_POSTGRES else tmp


def tmp_files(data_dir: Path) -> list[str]:
    """What is left in the server's temp folder, but for the empty temp files made ahead
    for uploads."""
    tmp = node_tmp(data_dir)
    left = sorted(name for name in os.listdir(tmp)
                  if not (name.startswith("spare-") and (tmp / name).stat().st_size == 0))
    assert len(os.listdir(tmp)) - len(left) <= syncd.SPARE_TEMP_FILES
    return left


# -- a real daemon ---------------------------------------------------------------

def http_request(port: int, method: str, path: str, body: Any = None,
                 headers: dict[str, str] | None = None,
                 timeout: float = 60) -> tuple[int, dict[str, str], bytes]:
    """One request to 127.0.0.1:port: status, headers, body."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Root reads a chmod 000 file; tests of what a tree may hold run the daemon as nobody,
# with the system's Python 3.11 and this venv's packages (the venv's own interpreter
# may sit in /root, which nobody cannot enter).
NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "/usr/bin/python3"]
NOBODY_ENV = {"PYTHONPATH": sysconfig.get_paths()["purelib"]}


def nobody_can_run() -> str | None:
    """Why the daemon cannot run as nobody here, or None when it can."""
    if os.geteuid() != 0:
        return "the tests do not run as root"
    try:
        result = subprocess.run([*NOBODY, "-c", "import aiohttp, aiosqlite; open(%r).close()"
                                 % str(ROOT / "syncd.py")], env={**os.environ, **NOBODY_ENV},
                                capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"setpriv or /usr/bin/python3 is missing: {exc}"
    return None if result.returncode == 0 else f"nobody cannot run syncd: {result.stderr[-300:]}"


@pytest.fixture
def nobody_dir() -> Iterator[Path]:
    """A folder nobody owns, outside pytest's root-only tmp_path (skip where nobody cannot
    run the daemon)."""
    reason = nobody_can_run()
    if reason:
        pytest.skip(reason)
    base = Path(tempfile.mkdtemp(prefix="syncd-nobody-"))
    os.chmod(base, 0o755)
    pw = pwd.getpwnam("nobody")
    os.chown(base, pw.pw_uid, pw.pw_gid)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


class Daemon:
    """syncd.py running as a subprocess on a loopback port (as nobody if asked)."""

    def __init__(self, tmp_path: Path, *args: str, env: dict[str, str] | None = None,
                 port: int | None = None, as_nobody: bool = False,
                 preexec_fn: Callable[[], None] | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp_path / f"daemon-{self.port}.log"
        self.data = tmp_path / "data"
        python = NOBODY if as_nobody else [sys.executable]
        command = [*python, str(ROOT / "syncd.py"), "--port", str(self.port),
                   "--sync-directory", str(self.data), *args]
        self.log_file = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            command, cwd=tmp_path, stdout=self.log_file, stderr=subprocess.STDOUT,
            env={**os.environ, **(NOBODY_ENV if as_nobody else {}), **(env or {})},
            preexec_fn=preexec_fn)

    def wait_ready(self, timeout: float = 15.0) -> None:
        """Wait until /health answers."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"daemon exited: {self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"daemon not ready: {self.log()}")

    def seen_at(self, url: str) -> Daemon:
        """This daemon as clients see it at url (behind a proxy)."""
        copy = Daemon.__new__(Daemon)
        copy.__dict__.update(self.__dict__, url=url)
        return copy

    def recovered(self) -> None:
        """Wait for start-up recovery's summary (its background rehash is done: until then a
        file it rehashes is 503)."""
        wait_until(lambda: "temp file(s) removed" in self.log(), "start-up recovery")

    def log(self) -> str:
        """Everything the daemon printed so far."""
        self.log_file.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        """SIGTERM, wait, return the exit code."""
        if self.process.poll() is None:
            self.process.terminate()
        try:
            return self.process.wait(timeout=20)
        finally:
            self.log_file.close()


def kill_mid_put(server: Daemon, path: str, data: bytes, cut: int, delay: float) -> None:
    """A raw PUT of path that sends cut bytes of data, then, delay seconds later, kill -9."""
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"PUT /files/%s HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Client-Id: a\r\n"
                     b"Content-Length: %d\r\n\r\n" % (path.encode(), len(data)))
        sock.sendall(data[:cut])
        time.sleep(delay)
        server.process.kill()
        server.process.wait(timeout=10)


@pytest.fixture
def daemon(tmp_path: Path, database_url: str | None,
           request: pytest.FixtureRequest) -> Iterator[Callable[..., Daemon]]:
    """Start real daemons; each is stopped (SIGTERM, then SIGKILL) at the end. With
    SYNCD_TEST_DATABASE=postgres each tree gets a PostgreSQL database of its own."""
    started: list[Daemon] = []
    databases = {tmp_path: database_url}

    def start(*args: str, env: dict[str, str] | None = None, port: int | None = None,
              base: Path | None = None, as_nobody: bool = False,
              preexec_fn: Callable[[], None] | None = None) -> Daemon:
        base = base or tmp_path
        if database_url is not None and "--database-url" not in args:
            if base not in databases:
                databases[base] = str(request.getfixturevalue("postgres").new_database())
            args = (*args, "--database-url", str(databases[base]))
        instance = Daemon(base, *args, env=env, port=port, as_nobody=as_nobody,
                          preexec_fn=preexec_fn)
        started.append(instance)
        instance.wait_ready()
        return instance

    yield start
    for instance in started:
        if instance.process.poll() is None:
            instance.process.kill()
            instance.process.wait(timeout=10)
        instance.log_file.close()


@contextlib.contextmanager
def tmpfs_daemon(tmp_path: Path, size: str = "4m") -> Iterator[tuple[int, Path, Path, int]]:
    """syncd serving a tmpfs of size in a private mount namespace (unshare -m): a real
    full disk. Yields its port, the tree, its log file and its pid (for nsenter); skips
    where that is refused."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare")
    data = tmp_path / "small"
    data.mkdir()
    port = free_port()
    script = (f"mount -t tmpfs -o size={size} syncdtest {data} || exit 97; "
              f"exec {sys.executable} {ROOT / 'syncd.py'} --port {port} --sync-directory {data}")
    log_path = tmp_path / "daemon.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c",
                                    script], stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                if process.poll() is not None:
                    pytest.skip(f"cannot mount a tmpfs here (exit {process.returncode})")
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    time.sleep(0.05)
            yield port, data, log_path, process.pid
        finally:
            process.terminate()
            process.wait(timeout=20)


# -- reference clients against a real daemon ----------------------------------------

def tree(folder: Path) -> dict[str, bytes]:
    """Every file under folder but the client's state, with its bytes."""
    found = {}
    for current, subfolders, names in os.walk(folder):
        subfolders[:] = [name for name in subfolders if name != ".syncd-client"]
        for name in names:
            path = Path(current) / name
            found[path.relative_to(folder).as_posix()] = path.read_bytes()
    return found


def write(folder: Path, path: str, data: bytes) -> None:
    target = folder / path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)




class CountingProxy:
    """A TCP proxy on a loopback port that counts the bytes each way (the wire); given
    cuts, it drops every connection each time the bytes sent up reach the next of them
    (a link that fails mid-transfer); given cut_answer, it drops them instead of passing
    on the first answer holding those bytes (an answer lost on the way back)."""

    def __init__(self, target_port: int, cuts: Iterable[int] = (),
                 cut_answer: bytes | None = None) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.bytes = 0
        self.sent = 0                  # client to server
        self.cuts = sorted(cuts)
        self.cut_answer = cut_answer
        self.lock = threading.Lock()
        self.open: list[socket.socket] = []
        self.threads: list[threading.Thread] = []
        self.spawn(self.accept)

    def spawn(self, target: Any, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self.threads.append(thread)
        thread.start()

    def accept(self) -> None:
        while True:
            try:
                downstream, _ = self.listener.accept()
            except OSError:
                return                                   # closed
            self.spawn(self.serve, downstream)

    def serve(self, downstream: socket.socket) -> None:
        with downstream, socket.create_connection(("127.0.0.1", self.target_port)) as upstream:
            with self.lock:
                self.open.extend((downstream, upstream))
            back = threading.Thread(target=self.pipe, args=(upstream, downstream, False),
                                    daemon=True)
            back.start()
            self.pipe(downstream, upstream, True)
            back.join(timeout=60)

    def pipe(self, source: socket.socket, sink: socket.socket, up: bool) -> None:
        try:
            while data := source.recv(65536):
                with self.lock:
                    self.bytes += len(data)
                    if up:
                        self.sent += len(data)
                        if self.cuts and self.sent >= self.cuts[0]:
                            self.cuts.pop(0)
                            self.drop_all()
                            return
                    elif self.cut_answer is not None and self.cut_answer in data:
                        self.cut_answer = None
                        self.drop_all()
                        return
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def drop_all(self) -> None:
        """Shut every open connection (with the lock held)."""
        for sock in self.open:
            try:
                sock.shutdown(socket.SHUT_RDWR)      # wakes a thread waiting in recv
            except OSError:
                pass
        self.open.clear()

    def close(self) -> None:
        try:
            self.listener.shutdown(socket.SHUT_RDWR)     # wakes the thread in accept()
        except OSError:
            pass
        self.listener.close()
        with self.lock:
            self.drop_all()
        for thread in self.threads:
            thread.join(timeout=10)


class Nginx:
    """nginx started for real, serving one of the README's site files in front of daemons."""

    def __init__(self, work: Path, site_file: Path, servers: Sequence[Daemon], pki: PKI) -> None:
        """site_file as it is, but for its certificate, its port, and its upstream servers
        (127.0.0.1:8000, or 8001, 8002, ...: the servers' ports, in order)."""
        binary = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists()
                                           else None)
        if binary is None:
            pytest.skip("nginx is not installed (.ci/run installs it)")
        cert, key = pki.server("nginx")
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.body_dir = work / "client_body"
        self.body_dir.mkdir(parents=True)
        site = site_file.read_text()
        upstreams = re.findall(r"server (127\.0\.0\.1:80\d\d)", site)
        assert len(upstreams) == len(servers), upstreams
        for address, server in zip(upstreams, servers, strict=True):
            site = site.replace(f"server {address}", f"server 127.0.0.1:{server.port}", 1)
        for old, new in (("listen 443 ssl;", f"listen 127.0.0.1:{self.port} ssl;"),
                         ("/etc/letsencrypt/live/sync.example.com/fullchain.pem", str(cert)),
                         ("/etc/letsencrypt/live/sync.example.com/privkey.pem", str(key))):
            assert old in site, old
            site = site.replace(old, new)
        (work / "syncd.conf").write_text(site)
        temp = " ".join(f"{kind}_temp_path {work}/{kind};" for kind in
                        ("proxy", "fastcgi", "uwsgi", "scgi"))
        (work / "nginx.conf").write_text(
            f"{'user root;' if os.geteuid() == 0 else ''}\nworker_processes 1;\n"
            f"daemon off;\npid {work}/nginx.pid;\nerror_log {work}/error.log warn;\n"
            f"events {{ worker_connections 512; }}\nhttp {{\n access_log off;\n"
            f" client_body_temp_path {self.body_dir};\n {temp}\n include {work}/syncd.conf;\n}}\n")
        self.process = subprocess.Popen([binary, "-c", str(work / "nginx.conf"), "-p", str(work)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.error_log = work / "error.log"
        wait_until(self.listening, "nginx to listen")

    def listening(self) -> bool:
        assert self.process.poll() is None, self.error_log.read_text(errors="replace")
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
            return True
        except OSError:
            return False

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=20)


class PKI:
    """A throw-away certificate authority made with the openssl command, and server
    certificates for 127.0.0.1 that it signs (or not)."""

    def __init__(self, folder: Path) -> None:
        if shutil.which("openssl") is None:
            pytest.skip("the openssl command is not installed")
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "db").mkdir()
        (folder / "db" / "index.txt").touch()
        (folder / "db" / "serial").write_text("01\n")
        (folder / "ca.cnf").write_text(
            "[ca]\ndefault_ca = test\n[test]\ndatabase = db/index.txt\nserial = db/serial\n"
            "new_certs_dir = db\ndefault_md = sha256\npolicy = any\ncopy_extensions = copy\n"
            "unique_subject = no\n[any]\ncommonName = supplied\n")
        (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        self.ca = folder / "ca.pem"
        self.openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                     "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
                     "-subj", "/CN=syncd test CA")

    def openssl(self, *args: str) -> None:
        subprocess.run(["openssl", *args], cwd=self.folder, check=True, capture_output=True,
                       timeout=60)

    def server(self, name: str, expired: bool = False) -> tuple[Path, Path]:
        """A key and a certificate for 127.0.0.1 signed by the CA (expired if asked)."""
        self.openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                     "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", "/CN=127.0.0.1")
        dates = (["-startdate", "20250101000000Z", "-enddate", "20250102000000Z"] if expired
                 else ["-days", "1"])
        self.openssl("ca", "-batch", "-notext", "-config", "ca.cnf", "-cert", "ca.pem", "-keyfile",
                     "ca.key", "-in", f"{name}.csr", "-out", f"{name}.pem", "-extfile",
                     "san.ext", *dates)
        return self.folder / f"{name}.pem", self.folder / f"{name}.key"


class Clients:
    """Client folders A, B, C against one server."""

    def __init__(self, tmp_path: Path, server: Daemon) -> None:
        self.tmp_path = tmp_path
        self.server = server
        self.live: list[subprocess.Popen[bytes]] = []
        self.logs: list[Any] = []
        for name in ("A", "B", "C"):
            (tmp_path / name).mkdir()

    def folder(self, name: str) -> Path:
        return self.tmp_path / name

    def command(self, name: str, *extra: str) -> list[str]:
        return [sys.executable, str(ROOT / "syncd.py"), "client", str(self.folder(name)),
                "--server", self.server.url, "--client-id", f"device-{name.lower()}", *extra]

    def once(self, name: str, *extra: str, expect: int = 0) -> str:
        result = subprocess.run(self.command(name, "--once", *extra), capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == expect, result.stdout + result.stderr
        return result.stdout + result.stderr

    def start(self, name: str, *extra: str) -> subprocess.Popen[bytes]:
        log = open(self.tmp_path / f"client-{name}.log", "ab")
        self.logs.append(log)
        process = subprocess.Popen(self.command(name, *extra), stdout=log,
                                   stderr=subprocess.STDOUT)
        self.live.append(process)
        wait_until(lambda: "live server=" in self.log(name) or process.poll() is not None,
                   f"client {name} to go live")
        assert process.poll() is None, self.log(name)
        return process

    def log(self, name: str) -> str:
        path = self.tmp_path / f"client-{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        for process in self.live:
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=10)
        for log in self.logs:
            log.close()


@pytest.fixture
def clients(tmp_path: Path, daemon: Any) -> Iterator[Clients]:
    group = Clients(tmp_path, daemon())
    yield group
    group.stop()
