"""syncd: a small, careful, self-hosted file synchronization server.

Devices upload their changes over HTTP, are told at once over a WebSocket when
another device changed something, and download it.  The wire contract (the
endpoints, fields, status codes and sync rules) is documented in README.md.

Storage model
    The server keeps one tree of plain files under ``sync_directory``; an admin
    can ``ls`` it.  The server's own state lives in ``sync_directory/.syncd/``:
    ``syncd.db`` (SQLite, WAL) holds every file's metadata, tombstones of
    deleted files, the change journal and the client registry; ``tmp/`` holds
    uploads in flight.  An upload is streamed to ``tmp/``, hashed on the way,
    fsynced, renamed over the old file, the folder fsynced, and only then
    committed to the database and announced, so a reader sees the old file or
    the new one, never a part, and an acknowledged upload survives a crash.

Running
    ``python syncd.py`` serves with the settings of ``./syncd.toml`` (if there
    is one), then ``SYNCD_*`` environment variables, then command-line flags;
    ``python syncd.py --help`` lists them.

Security
    Every client path is validated once, after the router decoded it, and every
    file operation walks the tree with ``O_NOFOLLOW``, so no request reads or
    writes outside ``sync_directory`` and no symlink inside it is followed.
    With ``api_key`` set every endpoint but ``/health`` needs the key.  Without
    one the server is open, so it binds to 127.0.0.1 by default.
"""

# ===========================================================================
# Imports, version, constants
# ===========================================================================

from __future__ import annotations

import abc
import argparse
import asyncio
import base64
import collections
import concurrent.futures
import contextlib
import datetime
import errno
import fnmatch
import functools
import hashlib
import hmac
import importlib.util
import io
import ipaddress
import itertools
import json
import logging
import math
import mimetypes
import os
import re
import resource
import secrets
import signal
import socket
import ssl
import sqlite3
import stat
import sys
import time
import tomllib
import unicodedata
import uuid
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, NamedTuple, TypeVar, cast
from urllib.parse import quote

import aiohttp
import aiosqlite
from aiohttp import WSMsgType, web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram,
                               ProcessCollector, generate_latest)
from prometheus_client.core import GaugeMetricFamily
from yarl import URL      # aiohttp's own URL type: lets the client send a path encoded once

__version__ = "0.1.0"

log = logging.getLogger("syncd")
access_log = logging.getLogger("syncd.access")

T = TypeVar("T")

STATE_DIR = ".syncd"              # reserved folder inside sync_directory
CLIENT_STATE_DIR = ".syncd-client"  # the reference client's state, in the synced folder
RESERVED_NAMES = (STATE_DIR, CLIENT_STATE_DIR)   # no client path may name them
CHUNK_SIZE = 1024 * 1024          # streaming unit for uploads and downloads
READ_BUFFER = 1024 * 1024         # aiohttp's per-connection read buffer (its default: 64 KiB)
INLINE_LIMIT = 64 * 1024          # downloads up to this size are read, not sendfile'd
INCREMENTAL_MAX_CHANGES = 10_000  # a --once further behind the journal makes a full pass
SPARE_TEMP_FILES = 16             # temp files made ahead for uploads (FileStore._refill)
JSON_BODY_LIMIT = 64 * 1024 * 1024  # a /sync manifest of 100,000 entries is ~15 MB
SYNC_SLOTS = 1                    # /sync manifests parsed and planned at once (memory, CPU)
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
MAX_PATH_BYTES = 4096
MAX_SEGMENT_BYTES = 255
MAX_TEXT_FIELD = 8 * 1024         # a multipart text field (path, checksum, ...)
MAX_MULTIPART_PARTS = 16
MAX_WS_MESSAGE = 64 * 1024
DELETE_BATCH = 200                # files of a folder deleted per transaction
RESERVE_BYTES = 1024 * 1024       # kept free in .syncd/reserve: a full disk can still be pruned
CHANGES_DEFAULT_LIMIT = 1000
CHANGES_MAX_LIMIT = 10000
MAX_MODIFIED_TIME = 1e11          # ~ year 5138; beyond that utime() overflows on some systems
CLIENT_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
CHECKSUM_RE = re.compile(r"[0-9a-f]{64}")
CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f]")   # Unicode category Cc, exactly

# WebSocket close codes of our own (4000-4999 are for applications).
WS_CLOSE_SILENT = 4000
WS_CLOSE_REPLACED = 4001
WS_CLOSE_OVERFLOW = 4002
WS_CLOSE_REVOKED = 4003
WS_CLOSE_GOING_AWAY = 1001
STATUS_INTERVAL = 10.0          # seconds between STATUS= updates to systemd
HEALTH_CHECK_INTERVAL = 1.0     # /health asks the database at most this often
FD_RESERVE = 64                 # descriptors kept for the database, the walks, stdio and logs
LISTEN_BACKLOG = 100            # asyncio's default; it also accepts this many per loop turn
ACCEPTS_IN_FLIGHT = 4 * LISTEN_BACKLOG   # accepted but not yet closed: a refused connection
                                # is closed a few loop turns after its accept
CAP_WARNING_INTERVAL = 60.0     # seconds between two "refusing connections" warnings
FEW_CONNECTIONS = 1000          # a connection cap below this is worth a warning at start
WS_CLOSE_TIMEOUT = 2.0
WS_CLOSE_POLICY = 1008          # a client sending faster than WS_MESSAGE_RATE
WS_MESSAGE_RATE = 20.0          # messages a second a client may send, on average...
WS_MESSAGE_BURST = 500.0        # ...with bursts of up to this many (a client that sends a
                                # notice per local change, copying a few hundred files)
EXIT_CONFIG = 2                 # bad configuration: systemd must not restart us
EXIT_MASS_VANISH = 3            # most known files are gone: an admin must look first
EXIT_STORAGE = 4                # the tree or its database cannot be opened; the node name is taken


# ===========================================================================
# Configuration
# ===========================================================================

class ConfigError(Exception):
    """A setting is invalid; the message names the key and where it came from."""


def setting(default: Any, help_text: str) -> Any:
    """A Config field with the help text its flag shows."""
    return field(default=default, metadata={"help": help_text})


@dataclass(frozen=True)
class Config:
    """The daemon's settings, after syncd.toml, SYNCD_* and flags were merged."""

    host: str = setting("127.0.0.1", "address to listen on (0.0.0.0: every interface)")
    port: int = setting(8000, "TCP port to listen on")
    sync_directory: str = setting("./sync_data", "the tree of plain files to serve; "
                                  "the server's own state is in its .syncd/")
    max_file_size: int = setting(100_000_000, "the largest file accepted, e.g. 100MB or 1GiB")
    allowed_extensions: tuple[str, ...] = setting((), 'accept only these extensions, e.g. '
                                                  '".txt,.md" (empty: every file)')
    allow_case_clash: bool = setting(False, "allow paths that differ from a live one only "
                                     "by letter case")
    api_key: str | None = setting(None, "the key every endpoint but /health requires "
                                  "(prefer --api-key-file)")
    api_key_file: str | None = setting(None, "a file holding only the API key")
    heartbeat_interval: float = setting(30.0, "seconds between WebSocket pings")
    heartbeat_timeout: float = setting(90.0, "close a WebSocket client silent this many seconds")
    shutdown_timeout: float = setting(30.0, "seconds in-flight requests get to finish on SIGTERM")
    log_level: str = setting("info", "debug, info, warning, error or critical")
    ws_queue_size: int = setting(1000, "events that may wait for one slow WebSocket client")
    metrics_public: bool = setting(False, "serve GET /metrics without the API key")
    max_websocket_clients: int = setting(10000, "WebSocket clients at once")
    upload_idle_timeout: float = setting(60.0, "408 for a request body silent this many seconds")
    header_timeout: float = setting(60.0, "close a connection whose request header takes "
                                    "longer than this many seconds")
    allowed_origins: tuple[str, ...] = setting((), "browser origins to accept besides the "
                                               'server\'s own, e.g. "https://sync.example.com"')
    allowed_hosts: tuple[str, ...] = setting((), "host names served without api_key besides "
                                             'IP addresses and localhost, e.g. "nas.lan"')
    max_connections: int = setting(16384, "connections at once (fewer if the open-file "
                                   "limit is low)")
    versions_max_age_days: float = setting(30.0, "keep replaced and deleted content this many "
                                           "days (0: keep no versions)")
    versions_max_size: int | None = setting(None, "the most bytes kept versions may take; the "
                                            "oldest go first (unset: no cap)")
    max_bulk_files: int = setting(1000, "files one POST /bulk may carry")
    max_bulk_size: int = setting(256 * 1024 * 1024, "bytes of files one POST /bulk may carry")
    uvloop: bool = setting(True, "run on uvloop when it is installed (a faster event loop)")
    upload_expiry: float = setting(86400.0, "seconds a resumable upload is kept after its "
                                   "last byte (tus Upload-Expires)")
    max_partial_uploads: int = setting(16, "resumable uploads one client may have open")
    max_partial_bytes: int = setting(64 * 1024 ** 3, "bytes (Upload-Length) the open "
                                     "resumable uploads of one client may add up to")
    trusted_proxies: tuple[str, ...] = setting((), "addresses of reverse proxies whose "
                                               "X-Forwarded-For names the client, e.g. "
                                               '"127.0.0.1"')
    tls_cert_file: str | None = setting(None, "serve HTTPS and WSS with this certificate "
                                        "(PEM, the chain after it); SIGHUP reloads it")
    tls_key_file: str | None = setting(None, "the certificate's private key (PEM)")
    database_url: str | None = setting(None, "keep the metadata in PostgreSQL instead of the "
                                       "inline SQLite, e.g. postgresql://syncd@db/syncd "
                                       "(prefer the password in ~/.pgpass or PGPASSWORD)")
    database_pool_size: int = setting(10, "PostgreSQL connections a node keeps at most")
    node_name: str | None = setting(None, "this node's name in /health and, with several "
                                    "nodes, among them: unique to each (default: the host "
                                    "name)")


# Settings a SIGHUP cannot change: they need a restart.
RESTART_SETTINGS = ("host", "port", "sync_directory", "shutdown_timeout", "header_timeout",
                    "max_connections", "uvloop", "database_url", "database_pool_size",
                    "node_name")
SECRET_SETTINGS = ("api_key",)


SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def parse_text(value: Any) -> str:
    """A non-empty string."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError("expected a non-empty string")
    return value


def parse_whole(value: Any) -> int:
    """A whole number, from TOML or from text."""
    if isinstance(value, bool):
        raise ValueError("expected a whole number")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*[0-9]{1,18}\s*", value, re.ASCII):
        return int(value)
    raise ValueError("expected a whole number")


def parse_port(value: Any) -> int:
    """A TCP port, 1 to 65535."""
    port = parse_whole(value)
    if not 1 <= port <= 65535:
        raise ValueError("expected a port from 1 to 65535")
    return port


def parse_positive_whole(value: Any) -> int:
    """A whole number of at least 1."""
    number = parse_whole(value)
    if number < 1:
        raise ValueError("expected a whole number of at least 1")
    return number


def parse_size(value: Any) -> int:
    """Bytes: an integer, or text like "100MB" (powers of 1000) or "1GiB" (of 1024)."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]{1,18})\s*([A-Za-z]*)\s*", value, re.ASCII)
        unit = match.group(2).lower() if match else None
        if not match or unit not in SIZE_UNITS:
            raise ValueError('expected a size like 100MB, 1GiB or 1048576')
        size = int(match.group(1)) * SIZE_UNITS[unit]
    else:
        raise ValueError('expected a size like 100MB, 1GiB or 1048576')
    if size < 1:
        raise ValueError("expected a size of at least 1 byte")
    return size


def parse_seconds(value: Any) -> float:
    """A positive, finite number of seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a number of seconds")
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ValueError("expected a number of seconds") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError("expected a positive number of seconds")
    return seconds


def parse_days(value: Any) -> float:
    """A finite number of days, 0 or more."""
    if isinstance(value, bool):
        raise ValueError("expected a number of days")
    try:
        days = float(value) if not isinstance(value, str) else float(parse_decimal(value))
    except (TypeError, ValueError):
        raise ValueError("expected a number of days, like 30 or 0.5") from None
    if not math.isfinite(days) or days < 0:
        raise ValueError("expected a number of days, 0 or more")
    return days


def parse_decimal(text: str) -> str:
    """text, if it is a plain decimal number in ASCII digits (float() takes "١٢" and "1_0")."""
    if not re.fullmatch(r"\s*[0-9]{1,12}(\.[0-9]{1,9})?\s*", text, re.ASCII):
        raise ValueError(text)
    return text


def parse_bool(value: Any) -> bool:
    """true/false, from TOML or from text (true, false, yes, no, on, off, 1, 0)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("true", "yes", "on", "1"):
            return True
        if text in ("false", "no", "off", "0"):
            return False
    raise ValueError("expected true or false")


def parse_extensions(value: Any) -> tuple[str, ...]:
    """A list like [".txt", ".md"] (or text ".txt,.md"); stored lower-case."""
    if isinstance(value, str):
        items: list[Any] = [item.strip() for item in value.split(",") if item.strip()]
    elif isinstance(value, list):
        items = value
    else:
        raise ValueError('expected a list like [".txt", ".md"]')
    extensions = []
    for item in items:
        if not isinstance(item, str) or not re.fullmatch(r"\.[^/\\\x00-\x1f]+", item):
            raise ValueError(f'expected extensions like ".txt", got {item!r}')
        extensions.append(item.lower())
    return tuple(extensions)


def parse_list(value: Any, example: str) -> list[Any]:
    """A TOML list, or comma-separated text (from SYNCD_* or a flag)."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    if isinstance(value, list):
        return value
    raise ValueError(f"expected a list like {example}")


def normal_origin(text: str) -> str | None:
    """scheme://host:port, lower-case with the port made explicit; None if text is not an
    origin (a browser's Origin header, or an entry of allowed_origins)."""
    match = re.fullmatch(r"(https?)://(\[[0-9A-Fa-f:.]+\]|[^\s/:@\[\]]+)(?::([0-9]{1,5}))?/?",
                         text.strip())
    if not match:
        return None
    scheme, host, port = match.group(1).lower(), match.group(2).lower(), match.group(3)
    number = int(port) if port else (443 if scheme == "https" else 80)
    return f"{scheme}://{host}:{number}" if 0 < number < 65536 else None


def parse_origins(value: Any) -> tuple[str, ...]:
    """Origins like ["https://sync.example.com"], stored normalized."""
    origins = []
    for item in parse_list(value, '["https://sync.example.com"]'):
        origin = normal_origin(item) if isinstance(item, str) else None
        if origin is None:
            raise ValueError(f'expected origins like "https://sync.example.com:8443", got {item!r}')
        origins.append(origin)
    return tuple(origins)


def parse_hosts(value: Any) -> tuple[str, ...]:
    """Host names like ["sync.example.com"] (no port), stored lower-case."""
    hosts = []
    for item in parse_list(value, '["sync.example.com"]'):
        if not isinstance(item, str) or not re.fullmatch(r"[A-Za-z0-9._-]+", item):
            raise ValueError(f'expected host names like "sync.example.com", got {item!r}')
        hosts.append(item.lower().rstrip("."))
    return tuple(hosts)


def parse_addresses(value: Any) -> tuple[str, ...]:
    """IP addresses like ["127.0.0.1", "::1"], stored in their normal form."""
    addresses = []
    for item in parse_list(value, '["127.0.0.1"]'):
        try:
            addresses.append(str(ipaddress.ip_address(item.strip())))
        except (ValueError, AttributeError):
            raise ValueError(f'expected IP addresses like "127.0.0.1", got {item!r}') from None
    return tuple(addresses)


def parse_node_name(value: Any) -> str:
    """A node's name: what a client id may be (letters, digits, . _ -)."""
    if isinstance(value, str) and CLIENT_ID_RE.fullmatch(value.strip()):
        return value.strip()
    raise ValueError("expected a name like node-1 (letters, digits, '.', '_', '-')")


def node_name(config: Config) -> str:
    """The node's name: node_name, or the host's name."""
    return config.node_name or socket.gethostname()


def parse_database_url(value: Any) -> str:
    """A postgresql:// (or postgres://) URL."""
    if isinstance(value, str) and re.match(r"postgres(ql)?://", value.strip()):
        return value.strip()
    raise ValueError("expected a URL like postgresql://syncd@localhost/syncd")


def mask_password(url: str) -> str:
    """A database URL with its password, if any, masked."""
    return re.sub(r"^(postgres(?:ql)?://[^:/@]*:)[^@]*@", r"\1********@", url)


def parse_log_level(value: Any) -> str:
    """One of debug, info, warning, error, critical."""
    if isinstance(value, str) and value.strip().lower() in LOG_LEVELS:
        return value.strip().lower()
    raise ValueError("expected one of " + ", ".join(LOG_LEVELS))


SETTING_PARSERS: dict[str, Callable[[Any], Any]] = {
    "host": parse_text,
    "port": parse_port,
    "sync_directory": parse_text,
    "max_file_size": parse_size,
    "allowed_extensions": parse_extensions,
    "allow_case_clash": parse_bool,
    "api_key": parse_text,
    "api_key_file": parse_text,
    "heartbeat_interval": parse_seconds,
    "heartbeat_timeout": parse_seconds,
    "shutdown_timeout": parse_seconds,
    "log_level": parse_log_level,
    "ws_queue_size": parse_positive_whole,
    "metrics_public": parse_bool,
    "max_websocket_clients": parse_positive_whole,
    "upload_idle_timeout": parse_seconds,
    "header_timeout": parse_seconds,
    "allowed_origins": parse_origins,
    "allowed_hosts": parse_hosts,
    "max_connections": parse_positive_whole,
    "versions_max_age_days": parse_days,
    "versions_max_size": parse_size,
    "max_bulk_files": parse_positive_whole,
    "max_bulk_size": parse_size,
    "uvloop": parse_bool,
    "upload_expiry": parse_seconds,
    "max_partial_uploads": parse_positive_whole,
    "max_partial_bytes": parse_size,
    "trusted_proxies": parse_addresses,
    "tls_cert_file": parse_text,
    "tls_key_file": parse_text,
    "database_url": parse_database_url,
    "database_pool_size": parse_positive_whole,
    "node_name": parse_node_name,
}
assert set(SETTING_PARSERS) == {f.name for f in fields(Config)}


def read_regular_file(path: str) -> bytes:
    """A file's bytes; OSError (ENODEV) when it is not a regular file. Opened with
    O_NONBLOCK, so that a FIFO put there cannot hang start-up or a reload."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.ENODEV, "not a regular file")
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=False) as handle:
            return handle.read()
    finally:
        os.close(fd)


def read_config_file(path: str) -> dict[str, Any]:
    """The flat table of a syncd.toml; unknown keys are errors (they are typos)."""
    try:
        table = tomllib.loads(read_regular_file(path).decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    for key in table:
        if key not in SETTING_PARSERS:
            raise ConfigError(f"{key}: unknown setting in {path}")
    return table


def read_api_key_file(path: str) -> str:
    """The key in api_key_file, without its trailing newline."""
    try:
        key = read_regular_file(path).decode("utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc.__class__.__name__
        raise ConfigError(f"api_key_file: cannot read {path}: {why}") from None
    if not key.strip():
        raise ConfigError(f"api_key_file: {path} is empty")
    return key


def load_config(
    config_path: str | None,
    environ: Mapping[str, str],
    flags: Mapping[str, Any],
) -> Config:
    """Merge syncd.toml, then SYNCD_* variables, then flags, and validate each value."""
    raw: dict[str, tuple[Any, str]] = {}
    path = config_path or environ.get("SYNCD_CONFIG")
    if path is None and os.path.exists("syncd.toml"):
        path = "syncd.toml"
    if path is not None:
        raw.update((key, (value, path)) for key, value in read_config_file(path).items())
    for key in SETTING_PARSERS:
        variable = "SYNCD_" + key.upper()
        if variable in environ:
            raw[key] = (environ[variable], variable)
    for key, value in flags.items():
        if value is not None:
            raw[key] = (value, "--" + key.replace("_", "-"))
    values: dict[str, Any] = {}
    for key, (value, source) in raw.items():
        try:
            values[key] = SETTING_PARSERS[key](value)
        except ValueError as exc:
            raise ConfigError(f"{key}: {exc}, got {value!r} (from {source})") from None
    if "api_key" in values and "api_key_file" in values:
        raise ConfigError("api_key: set api_key or api_key_file, not both")
    if "api_key_file" in values:
        values["api_key"] = read_api_key_file(values["api_key_file"])
    config = Config(**values)
    if config.heartbeat_timeout < config.heartbeat_interval:
        raise ConfigError("heartbeat_timeout: must be at least heartbeat_interval")
    tls_context(config)
    if config.database_url and importlib.util.find_spec("asyncpg") is None:
        raise ConfigError("database_url: PostgreSQL needs asyncpg "
                          "(pip install -r requirements-postgres.txt)")
    return config


def tls_context(config: Config) -> ssl.SSLContext | None:
    """The server's TLS context (None without TLS): the ssl module's secure defaults for a
    server, TLS 1.2 at least. ConfigError, naming the setting, when a file cannot be read
    or the key does not match the certificate."""
    if (config.tls_cert_file is None) != (config.tls_key_file is None):
        missing = "tls_key_file" if config.tls_key_file is None else "tls_cert_file"
        raise ConfigError(f"{missing}: tls_cert_file and tls_key_file go together")
    if config.tls_cert_file is None or config.tls_key_file is None:
        return None
    for key in ("tls_cert_file", "tls_key_file"):
        path = getattr(config, key)
        try:
            with open(path, "rb") as handle:
                handle.read(1)
        except OSError as exc:
            raise ConfigError(f"{key}: cannot read {path}: {exc.strerror}") from None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(config.tls_cert_file, config.tls_key_file)
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc):
            raise ConfigError(f"tls_key_file: {config.tls_key_file} is not the key of the "
                              f"certificate in {config.tls_cert_file}") from None
        raise ConfigError(f"tls_cert_file: cannot load {config.tls_cert_file} with "
                          f"{config.tls_key_file} as PEM: {exc.reason or exc}") from None
    return context


def key_file_warning(config: Config) -> str | None:
    """A warning when api_key_file can be read by other users of the machine."""
    if config.api_key_file is None:
        return None
    try:
        mode = os.stat(config.api_key_file).st_mode
    except OSError:
        return None
    if mode & 0o077:
        return (f"api_key_file: {config.api_key_file} can be read by other users "
                f"(mode {stat.S_IMODE(mode):04o}); chmod 600 it")
    return None


def describe_config(config: Config) -> str:
    """The effective settings as TOML lines, secrets masked (for --check-config)."""
    lines = []
    for setting in fields(Config):
        value = getattr(config, setting.name)
        if value is None:
            lines.append(f"# {setting.name} is not set")
            continue
        if setting.name in SECRET_SETTINGS:
            value = "********"
        elif setting.name == "database_url":
            value = mask_password(value)
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, tuple):
            text = json.dumps(list(value))
        else:
            text = json.dumps(value)
        lines.append(f"{setting.name} = {text}")
    return "\n".join(lines)


# ===========================================================================
# Logging
# ===========================================================================

JOURNAL_PRIORITIES = {
    logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4,
    logging.ERROR: 3, logging.CRITICAL: 2,
}


class JournalFormatter(logging.Formatter):
    """Lines for journald: a <N> priority prefix on every line, no timestamp."""

    def format(self, record: logging.LogRecord) -> str:
        """Prefix each line, so a traceback keeps its priority in the journal."""
        priority = JOURNAL_PRIORITIES.get(record.levelno, 6)
        text = super().format(record)
        # split on "\n" only, as journald does (splitlines() would also split on U+2028)
        return "\n".join(f"<{priority}>{line}" for line in text.split("\n"))


def stderr_is_journal(environ: Mapping[str, str]) -> bool:
    """Whether stderr is journald's stream ($JOURNAL_STREAM names its device:inode)."""
    try:
        device, inode = (int(part) for part in environ["JOURNAL_STREAM"].split(":"))
        status = os.fstat(sys.stderr.fileno())
    except (KeyError, ValueError, OSError):
        return False
    return (status.st_dev, status.st_ino) == (device, inode)


class QuietParseErrors(logging.Filter):
    """aiohttp logs a traceback for each request it cannot parse: one line is enough for a
    client's mistake, and a client must not be able to flood the journal with tracebacks."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite a parse error's record as one INFO line."""
        error = record.exc_info[1] if record.exc_info else None
        if not isinstance(error, HttpProcessingError):
            return True
        detail = str(getattr(error, "message", "") or error).strip().splitlines()
        record.msg, record.exc_info, record.exc_text = "malformed request from %s: %s", None, None
        record.args = (record.args[0] if isinstance(record.args, tuple) and record.args else "-",
                       (detail[0] if detail else "")[:200])
        record.levelno, record.levelname = logging.INFO, "INFO"
        return log.isEnabledFor(logging.INFO)


# Control and line-separator characters: what could end a log line or a journal entry
# early and so let a client write a line of its own (Cc, Zl, Zp, and bidi overrides).
UNSAFE_LOG_RE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def escape_log_value(value: Any) -> Any:
    """A logged value, with every unsafe character as \\xNN or \\uNNNN (numbers as they are)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    text = str(value)
    return UNSAFE_LOG_RE.sub(lambda match: match.group().encode("unicode_escape").decode(), text) \
        if UNSAFE_LOG_RE.search(text) else text


class EscapeValues(logging.Filter):
    """Escape every argument of every record: paths, client names and error texts come from
    clients, and "x%0A2026-12-01 ... WARNING FORGED" must stay one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite the record's arguments in place."""
        if isinstance(record.args, tuple):
            record.args = tuple(escape_log_value(arg) for arg in record.args)
        elif isinstance(record.args, Mapping):
            record.args = {key: escape_log_value(arg) for key, arg in record.args.items()}
        return True


def setup_logging(level: str, environ: Mapping[str, str]) -> None:
    """Send syncd's (and aiohttp's) logs to stderr, in journald's format when it listens."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(EscapeValues())
    if stderr_is_journal(environ):
        handler.setFormatter(JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    aiohttp_log = logging.getLogger("aiohttp")
    for logger in (log, aiohttp_log):
        logger.handlers[:] = [handler]
        logger.propagate = False
    aiohttp_log.setLevel(logging.WARNING)
    logging.getLogger("aiohttp.server").addFilter(QuietParseErrors())
    set_log_level(level)


def set_log_level(level: str) -> None:
    """Change syncd's log level (at start and on reload)."""
    log.setLevel(level.upper())


# ===========================================================================
# Background tasks
# ===========================================================================

class Background:
    """Tasks that run on their own: each is held until it is done (asyncio keeps only a
    weak reference to a task), and all of them can be awaited or cancelled at shutdown."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Future[Any]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, work: Awaitable[T]) -> asyncio.Future[T]:
        """Start work in a task of its own."""
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def shielded(self, work: Awaitable[T]) -> T:
        """Await work, which goes on to its end even if the caller is cancelled meanwhile
        (a client that goes away must not stop a write between its rename and its COMMIT)."""
        return await asyncio.shield(self.spawn(work))

    async def wait(self) -> None:
        """Wait for every task to end (their errors are theirs: none is raised here)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def cancel(self) -> None:
        """Cancel every task and wait for them to end."""
        for task in list(self._tasks):
            task.cancel()
        await self.wait()


# ===========================================================================
# Errors and paths
# ===========================================================================

class Refused(Exception):
    """A request refused in the contract's words: the storage and the tree raise these,
    and the HTTP layer alone picks a status for them (error_middleware)."""

    code = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(Refused):
    """A field, header or body that does not follow the contract."""

    code = "invalid_request"


class InvalidPath(InvalidRequest):
    """A path that breaks the contract's rules (SPEC "Paths")."""

    code = "invalid_path"


class ChecksumMismatch(InvalidRequest):
    """The bytes received do not hash to the checksum the client sent."""

    code = "checksum_mismatch"


class NotFound(Refused):
    """Nothing live (or kept) at the path."""

    code = "not_found"


class Stale(Refused):
    """What the client believes about a path does not hold; server is the path's live
    record (None when there is none), sent back so that the client can decide."""

    def __init__(self, message: str, server: FileRecord | None) -> None:
        super().__init__(message)
        self.server = server


class Conflict(Stale):
    """A base_checksum that is not the server's, or a path that is taken."""

    code = "conflict"


class PathBlocked(Conflict):
    """A file stands where a folder must go, or a folder where a file must go."""

    def __init__(self, path: str, why: str) -> None:
        super().__init__(f"cannot write {path}: {why}", None)


class CaseConflict(Refused):
    """A path differs from a live one only by letter case."""

    code = "case_conflict"

    def __init__(self, own: str, other: str) -> None:
        super().__init__(f"{own} differs from {other} only by letter case")


class PreconditionFailed(Stale):
    """If-Match / If-None-Match does not hold."""

    code = "precondition_failed"


class TooLarge(Refused):
    """A file or a request body over its limit."""

    code = "too_large"


class ExtensionNotAllowed(Refused):
    """allowed_extensions is set and the file's name is not in it."""

    code = "extension_not_allowed"


class StorageFull(Refused):
    """The disk or the database is full; nothing was changed."""

    code = "insufficient_storage"

    def __init__(self, message: str = "the server's disk is full; nothing was changed") -> None:
        super().__init__(message)


class StorageFailing(Refused):
    """The disk or the database is read-only, failing, or busy; retry_after: seconds to
    suggest, when waiting is known to help."""

    code = "storage_unavailable"

    def __init__(self, message: str = "the server's storage is read-only or failing; "
                 "nothing was changed", retry_after: int | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def changed_behind_our_back(path: str) -> StorageFailing:
    """503 for a download of bytes that are being hashed (Tree._adopt)."""
    return StorageFailing(f"{path} changed on disk behind the server's back and is being "
                          "checked; retry shortly", retry_after=5)


class WrongOffset(Refused):
    """A resumable upload's chunk that does not start where the upload stands (tus 409)."""

    code = "conflict"


class ChunkChecksumMismatch(Refused):
    """A resumable upload's chunk that does not match its Upload-Checksum (tus 460)."""

    code = "checksum_mismatch"


class UploadGone(Refused):
    """A resumable upload that expired (tus 410)."""

    code = "gone"


class WrongContentType(Refused):
    """A body of the wrong Content-Type (tus PATCH: 415)."""

    code = "unsupported_media_type"


class TusUnsupported(Refused):
    """A request without Tus-Resumable: 1.0.0 (tus 412)."""

    code = "precondition_failed"


class TooManyUploads(Refused):
    """A client over its limits of open resumable uploads (429)."""

    code = "too_many_uploads"


class NameTaken(Refused):
    """A device of that name is enrolled (and not revoked)."""

    code = "conflict"


class StorageUnusable(Exception):
    """The tree or its database cannot be opened at start-up."""


def invalid_request(message: str) -> InvalidRequest:
    """400 invalid_request."""
    return InvalidRequest(message)


def path_problem(path: str) -> str | None:
    """Why an NFC path breaks the contract's rules (SPEC "Paths"), or None when it is valid."""
    if not path:
        return "the path is empty"
    try:
        encoded = path.encode("utf-8")
    except UnicodeEncodeError:
        return "the path is not valid UTF-8"
    if path.startswith("/"):
        return "the path must be relative (it starts with /)"
    if "\\" in path:
        return "the path contains a backslash"
    if CONTROL_RE.search(path):
        return "the path contains a control character"
    if len(encoded) > MAX_PATH_BYTES:
        return f"the path is longer than {MAX_PATH_BYTES} bytes"
    # "" "." ".." segments, found by substring search rather than a loop over segments
    framed = f"/{path}/"
    if "//" in framed or "/./" in framed or "/../" in framed:
        return "the path has an empty, '.' or '..' segment"
    if len(encoded) > MAX_SEGMENT_BYTES and any(
            len(segment.encode("utf-8")) > MAX_SEGMENT_BYTES for segment in path.split("/")):
        return f"a name in the path is longer than {MAX_SEGMENT_BYTES} bytes"
    first = path.partition("/")[0]
    if first.casefold() in RESERVED_NAMES:
        return f"{first}/ is reserved (the server's and its clients' own state)"
    return None


def validate_path(raw: str) -> str:
    """The NFC form of a client path, or InvalidPath."""
    path = unicodedata.normalize("NFC", raw)
    problem = path_problem(path)
    if problem is not None:
        raise InvalidPath(problem)
    return path


def is_stored_form(path: str) -> bool:
    """Whether a name found on disk, or sent by a server, is a valid path exactly as it is
    (the server stores NFC paths only; start-up recovery and the client share this)."""
    return unicodedata.is_normalized("NFC", path) and path_problem(path) is None


def fold_path(path: str) -> str:
    """The case-folded key under which case twins (ÉTÉ.txt, été.txt) collide."""
    return unicodedata.normalize("NFC", path.casefold())


def extension_allowed(path: str, allowed: tuple[str, ...]) -> bool:
    """Whether the file name ends with one of the allowed extensions (all when empty)."""
    name = path.rsplit("/", 1)[-1].lower()
    return not allowed or any(name.endswith(ext) and name != ext for ext in allowed)


def validate_client_id(value: Any) -> str:
    """A client id of the contract's form, or 400 invalid_request."""
    if not isinstance(value, str) or not CLIENT_ID_RE.fullmatch(value):
        raise invalid_request(
            "client_id is required and must match ^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    return value


def validate_checksum(value: Any, name: str, *, allow_empty: bool) -> str:
    """A lowercase hex SHA-256 ("" too where the absent file is meant)."""
    if isinstance(value, str) and len(value) == 64 and not value.strip("0123456789abcdef"):
        return value                    # the usual case: no copy, no regex
    if isinstance(value, str):
        checksum = value.strip().lower()
        if CHECKSUM_RE.fullmatch(checksum) or (allow_empty and checksum == ""):
            return checksum
    raise invalid_request(f"{name} must be a hex SHA-256" + (' or ""' if allow_empty else ""))


NUMBER_RE = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]{1,4})?", re.ASCII)


def validate_modified_time(value: Any, name: str = "modified_time") -> float:
    """Unix seconds, finite, from 0 to about the year 5000: a number, or text holding a
    decimal number or an ISO 8601 date and time (UTC when it names no zone)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise invalid_request(f"{name} must be a number of Unix seconds")
    try:
        seconds = float(value) if not isinstance(value, str) else parse_time_text(value)
    except (ValueError, OverflowError):
        raise invalid_request(f"{name} must be Unix seconds or an ISO 8601 time, "
                              "like 1764625735 or 2026-12-01T21:48:55Z") from None
    if not math.isfinite(seconds) or not 0 <= seconds <= MAX_MODIFIED_TIME:
        raise invalid_request(f"{name} must be Unix seconds from 0 to {MAX_MODIFIED_TIME:.0f}")
    return seconds


def parse_time_text(text: str) -> float:
    """Unix seconds from "1764625735.5" or "2026-12-01T21:48:55[.123][Z|+01:00]"; only
    ASCII digits (float() would take "١٢" and "1_0", and NaN)."""
    text = text.strip()
    if NUMBER_RE.fullmatch(text):
        return float(text)
    if not text.isascii():
        raise ValueError(text)
    moment = datetime.datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return moment.timestamp()


# ===========================================================================
# Metadata store: the interface, and SQLite's schema and every query
# ===========================================================================

class FileRecord(NamedTuple):
    """A path's state on the server: a live file or, with deleted, its tombstone.

    A NamedTuple, not a frozen dataclass: /sync makes 100,000 of them, and a
    frozen dataclass's __init__ sets each field through object.__setattr__.
    """

    path: str
    checksum: str          # for a tombstone: the checksum the file had when deleted
    size: int
    modified_time: float
    revision: int
    deleted: bool
    time: float
    client_id: str
    mtime_ns: int = -1     # st_mtime_ns of the file when committed: start-up recovery's "unchanged"

    def to_json(self) -> dict[str, Any]:
        """The contract's file entry."""
        return {"path": self.path, "checksum": self.checksum, "size": self.size,
                "modified_time": self.modified_time, "revision": self.revision}


@dataclass(frozen=True, slots=True)
class Change:
    """One entry of the change journal."""

    seq: int
    type: str              # "upsert" or "delete"
    path: str
    checksum: str
    size: int
    modified_time: float
    client_id: str
    time: float

    def to_json(self) -> dict[str, Any]:
        """The contract's /changes entry."""
        return {"seq": self.seq, "type": self.type, "path": self.path,
                "checksum": self.checksum, "size": self.size,
                "modified_time": self.modified_time, "revision": self.seq,
                "client_id": self.client_id, "time": self.time}


@dataclass(frozen=True, slots=True)
class ClientRecord:
    """A registered client."""

    client_id: str
    name: str | None
    platform: str | None
    version: str | None
    registered_at: float
    last_seen: float


@dataclass(slots=True)
class Device:
    """A device enrolled with a token of its own (SPEC Part 2, "Devices and tokens"): it acts
    only as the client id of its name, within its scope. The token itself is never kept."""

    name: str
    scope: str             # "read", "write" or "admin"
    token_hash: str        # SHA-256 of the token, hex
    created: float
    last_seen: float | None
    revoked: bool

    def to_json(self) -> dict[str, Any]:
        """The contract's device entry."""
        return {"device": self.name, "scope": self.scope, "created": self.created,
                "last_seen": self.last_seen, "revoked": self.revoked}


@dataclass(frozen=True, slots=True)
class Version:
    """Content a live file had until a change replaced or deleted it (SPEC "Versions and
    trash"); its bytes are the blob named by its checksum."""

    path: str
    revision: int          # the revision the content had while it was live
    checksum: str
    size: int
    modified_time: float
    replaced_at: int       # the seq of the change that replaced or deleted it
    replaced_by: str       # that change's client id
    time: float            # when
    reason: str            # "overwrite" or "delete"

    def to_json(self) -> dict[str, Any]:
        """The contract's VERSION."""
        return {"revision": self.revision, "checksum": self.checksum, "size": self.size,
                "modified_time": self.modified_time, "replaced_at": self.replaced_at,
                "replaced_by": self.replaced_by, "time": self.time, "reason": self.reason}

    def trash_json(self) -> dict[str, Any]:
        """The contract's /trash entry (for the version a delete kept)."""
        return {"path": self.path, "checksum": self.checksum, "size": self.size,
                "modified_time": self.modified_time, "revision": self.revision,
                "deleted_at": self.replaced_at, "deleted_by": self.replaced_by,
                "time": self.time}

    def as_record(self) -> FileRecord:
        """The version as a file to serve (ETag its checksum, X-Revision its revision)."""
        return FileRecord(self.path, self.checksum, self.size, self.modified_time,
                          self.revision, False, self.time, self.replaced_by)


@dataclass(slots=True)
class PartialUpload:
    """A resumable (tus) upload under way: its bytes so far are in .syncd/uploads/ID."""

    id: str
    client_id: str
    length: int | None       # None: Upload-Defer-Length, not known yet
    received: int            # bytes written and fsynced: the Upload-Offset
    metadata: dict[str, str]
    expires: float


def folder_range(prefix: str) -> tuple[str, str]:
    """Bounds such that lower <= p < upper holds exactly for the paths under prefix/."""
    return prefix + "/", prefix + "0"   # "0" is the character after "/"


# -- the live index ----------------------------------------------------------------

def folders_of(path: str) -> Iterator[str]:
    """The folders on the way to path, outermost first: a/b/c -> a, a/b."""
    end = path.find("/")
    while end != -1:
        yield path[:end]
        end = path.find("/", end + 1)


class Spellings:
    """Names by case-folded key. Nearly every key has one spelling, kept as a plain str
    (a set per key would cost a hundred bytes a file); case twins share a set."""

    __slots__ = ("_by_fold",)

    def __init__(self) -> None:
        self._by_fold: dict[str, str | set[str]] = {}

    def add(self, fold: str, name: str) -> None:
        present = self._by_fold.get(fold)
        if present is None:
            self._by_fold[fold] = name
        elif isinstance(present, set):
            present.add(name)
        elif present != name:
            self._by_fold[fold] = {present, name}

    def discard(self, fold: str, name: str) -> None:
        present = self._by_fold.get(fold)
        if present == name:
            del self._by_fold[fold]
        elif isinstance(present, set):
            present.discard(name)
            if len(present) == 1:
                self._by_fold[fold] = present.pop()

    def get(self, fold: str) -> tuple[str, ...]:
        present = self._by_fold.get(fold)
        if present is None:
            return ()
        return (present,) if isinstance(present, str) else tuple(sorted(present))


def folded_key(path: str) -> str:
    """fold_path(path), as path itself when folding changes nothing (one string, not two)."""
    folded = fold_path(path)
    return path if folded == path else folded


class LiveIndex:
    """Every file record, live and tombstone, in memory; and for the live files their
    case-folded names and how many live files each folder holds. Downloads, /files,
    /sync and the write checks read it instead of the database. The store changes it
    only after a commit, in one step with the cursor: it always shows committed state.
    """

    def __init__(self) -> None:
        self.records: dict[str, FileRecord] = {}
        self._files = Spellings()               # live files by folded path
        self._folders: dict[str, int] = {}      # live files below each folder
        self._folder_spellings = Spellings()    # folders holding live files, by folded path

    def __len__(self) -> int:
        return len(self.records)

    def get(self, path: str) -> FileRecord | None:
        """The path's record (live or tombstone)."""
        return self.records.get(path)

    def put(self, record: FileRecord) -> None:
        """Make record the path's record."""
        before = self.records.get(record.path)
        self.records[record.path] = record
        was_live = before is not None and not before.deleted
        if was_live == record.deleted:          # it became live, or stopped being live
            self._count(record.path, -1 if was_live else 1)

    def forget(self, path: str) -> None:
        """Drop the path's record."""
        before = self.records.pop(path, None)
        if before is not None and not before.deleted:
            self._count(path, -1)

    def _count(self, path: str, sign: int) -> None:
        """Add (sign 1) or remove (-1) a live file's name and its folders' counts."""
        folded = folded_key(path)
        if sign > 0:
            self._files.add(folded, path)
        else:
            self._files.discard(folded, path)
        for folder, folded_folder in zip(folders_of(path), folders_of(folded), strict=True):
            count = self._folders.get(folder, 0) + sign
            if count:
                self._folders[folder] = count
            else:
                del self._folders[folder]
            if count == 1 and sign > 0:
                self._folder_spellings.add(folded_folder, folder)
            elif count == 0:
                self._folder_spellings.discard(folded_folder, folder)

    # The questions check_writable asks; PendingIndex answers them too.
    def file_spellings(self, fold: str) -> tuple[str, ...]:
        """The live files whose folded path is fold."""
        return self._files.get(fold)

    def files_in(self, folder: str) -> int:
        """How many live files are below folder/."""
        return self._folders.get(folder, 0)

    def folder_spellings(self, fold: str) -> tuple[str, ...]:
        """The folders holding live files whose folded path is fold."""
        return self._folder_spellings.get(fold)

    def live_under(self, prefix: str, folder: bool) -> list[FileRecord]:
        """The live files below prefix/ (folder) or whose path starts with prefix, sorted."""
        start = prefix + "/" if folder else prefix
        return sorted((record for record in self.records.values()
                       if not record.deleted and record.path.startswith(start)),
                      key=lambda record: record.path)


class PendingIndex:
    """The index as an open transaction sees it: the committed index and, over it, the
    transaction's own changes (changed), which the store puts in the index once committed.

    added and removed hold the files this transaction made live or not live, so that
    the folder counts and case-folded names need no copy of the index.
    """

    def __init__(self, base: LiveIndex) -> None:
        self.base = base
        self.changed: dict[str, FileRecord] = {}
        self._added = LiveIndex()
        self._removed = LiveIndex()

    def get(self, path: str) -> FileRecord | None:
        """The path's record as this transaction sees it."""
        return self.changed[path] if path in self.changed else self.base.get(path)

    def put(self, record: FileRecord) -> None:
        """Note a change of one path's record."""
        path = record.path
        self.changed[path] = record
        committed = self.base.get(path)
        if committed is not None and not committed.deleted:    # live before: removed or not
            if record.deleted:
                self._removed.put(committed)
            else:
                self._removed.forget(path)
        elif record.deleted:
            self._added.forget(path)
        else:
            self._added.put(record)

    def file_spellings(self, fold: str) -> tuple[str, ...]:
        gone = set(self._removed.file_spellings(fold))
        return tuple(sorted({name for name in self.base.file_spellings(fold) if name not in gone}
                            | set(self._added.file_spellings(fold))))

    def files_in(self, folder: str) -> int:
        return (self.base.files_in(folder) + self._added.files_in(folder)
                - self._removed.files_in(folder))

    def folder_spellings(self, fold: str) -> tuple[str, ...]:
        names = set(self.base.folder_spellings(fold)) | set(self._added.folder_spellings(fold))
        return tuple(sorted(name for name in names if self.files_in(name)))

    def live_under(self, folder: str) -> list[FileRecord]:
        """The live files below folder/, sorted, as this transaction sees them."""
        start = folder + "/"
        records = {record.path: record for record in self.base.live_under(folder, True)}
        for path, record in self.changed.items():
            if path.startswith(start):
                if record.deleted:
                    records.pop(path, None)
                else:
                    records[path] = record
        return [records[path] for path in sorted(records)]


def check_writable(index: LiveIndex | PendingIndex, path: str, allow_case_clash: bool) -> None:
    """PathBlocked or CaseConflict when path cannot be written next to the live files.

    A live file where one of its folders must go, or a live folder where it must
    go, makes a 409 conflict; a file or folder that differs from one of its own
    only by letter case makes a 409 case_conflict.
    """
    names, folds = path.split("/"), fold_path(path).split("/")   # casefold keeps every "/"
    for depth in range(1, len(names) + 1):
        own, fold = "/".join(names[:depth]), "/".join(folds[:depth])
        if depth < len(names):      # a folder on the way
            record = index.get(own)
            if record is not None and not record.deleted:
                raise PathBlocked(path, f"{own} is a file, not a folder")
            clashes = [*index.file_spellings(fold),
                       *(name for name in index.folder_spellings(fold) if name != own)]
        else:                       # the file itself
            if index.files_in(own):
                raise PathBlocked(path, f"{own} is a folder on the server")
            clashes = [*(name for name in index.file_spellings(fold) if name != own),
                       *index.folder_spellings(fold)]
        if clashes and not allow_case_clash:
            raise CaseConflict(own, clashes[0])


def live_change(before: FileRecord | None, after: FileRecord | None) -> tuple[int, int]:
    """What a path's change from before to after adds to the live files and bytes."""
    files = size = 0
    for record, sign in ((before, -1), (after, 1)):
        if record is not None and not record.deleted:
            files += sign
            size += sign * record.size
    return files, size


class Transaction(abc.ABC):
    """One atomic change of the metadata, as the tree sees it.

    undo hooks run (newest first) when it fails, after the rollback: they put
    the disk back as the database was.  after_commit hooks run once it is
    durable, still in commit order (announcements leave in seq order).
    """

    def __init__(self, index: LiveIndex) -> None:
        self.pending = PendingIndex(index)   # the records as this transaction sees them
        self.undo: list[Callable[[], None]] = []
        self.after_commit: list[Callable[[], None]] = []
        self.last_seq = 0
        self.live_files = 0      # what this transaction adds to the totals, once committed
        self.live_bytes = 0
        self.versions = 0
        self.blob_bytes = 0
        self.gone_blobs: list[str] = []   # blobs no version refers to any more, once committed

    def get(self, path: str) -> FileRecord | None:
        """The path's record (live or tombstone), as this transaction sees it."""
        return self.pending.get(path)

    def live_under(self, folder: str) -> list[FileRecord]:
        """Every live file below folder/, sorted by path."""
        return self.pending.live_under(folder)

    def check_writable(self, path: str, allow_case_clash: bool) -> None:
        """PathBlocked or CaseConflict when path cannot be written next to the live files."""
        check_writable(self.pending, path, allow_case_clash)

    @abc.abstractmethod
    async def record_upsert(self, path: str, checksum: str, size: int, modified_time: float,
                            client_id: str, mtime_ns: int) -> FileRecord:
        """Journal a new version of path and make it the live file."""

    @abc.abstractmethod
    async def record_mtime(self, path: str, mtime_ns: int) -> None:
        """Note a new mtime for unchanged bytes (touched behind our back): no change to journal."""

    @abc.abstractmethod
    async def record_delete(self, live: FileRecord, client_id: str) -> FileRecord:
        """Journal the deletion of a live file and leave its tombstone."""

    @abc.abstractmethod
    async def record_version(self, old: FileRecord, change: FileRecord, reason: str) -> Version:
        """Keep old's content, whose blob is in the store, as replaced (reason "overwrite") or
        deleted ("delete") by change: a version row, and one more reference to the blob."""

    @abc.abstractmethod
    async def drop_versions(self, versions: Iterable[tuple[str, int]]) -> list[str]:
        """Forget these (path, revision) versions; the checksums of the blobs that no version
        refers to any more (the caller removes them after the commit)."""

    @abc.abstractmethod
    async def oldest_versions(self, limit: int) -> list[Version]:
        """The limit oldest versions (by time)."""

    @abc.abstractmethod
    async def move_versions(self, source: str, target: str) -> None:
        """The kept versions of source become target's (a moved file keeps its history)."""

    @abc.abstractmethod
    async def note_move(self, source: str, target: str, client_id: str) -> None:
        """Record that source is about to be renamed to target on disk (committed before the
        rename: start-up recovery finishes or forgets a move a crash cut short)."""

    @abc.abstractmethod
    async def forget_move(self, source: str) -> None:
        """The move of source is journalled, or undone: no longer pending."""

    @abc.abstractmethod
    async def versions_with(self, checksums: Iterable[str]) -> list[tuple[str, int]]:
        """The (path, revision) of every version of these contents."""

    def run_undo(self) -> None:
        """After a rollback: put back, newest first, the file operations it made."""
        for undo in reversed(self.undo):
            try:
                undo()
            except OSError:
                log.exception("could not undo a file operation after a failed commit")

    def _changed(self, before: FileRecord | None, after: FileRecord) -> None:
        """Note a change of one path's record: the pending index and the live totals."""
        self.pending.put(after)
        files, size = live_change(before, after)
        self.live_files += files
        self.live_bytes += size


class MetadataStore(abc.ABC):
    """What the tree needs of a metadata backend: files, tombstones, the journal, the
    clients and the epoch.  SQLiteStore is the default; a second backend is a second
    subclass, never a branch in the tree.

    cursor, epoch and the live totals are kept in memory (updated per commit):
    /health and /metrics must not query for them.
    """

    errors: tuple[type[BaseException], ...] = ()   # what its driver raises

    def __init__(self) -> None:
        self.cursor = 0
        self.epoch = ""
        self.live_files = 0
        self.live_bytes = 0
        self.version_count = 0     # version rows
        self.blob_bytes = 0        # bytes of the blobs they refer to (each content once)
        self.index = LiveIndex()   # every file record, as committed
        # What this node hears of the other nodes' work (a cluster; one node hears nothing):
        # their journal entries, in seq order, once in the index; and their messages.
        self.on_change: Callable[[Change], None] = lambda change: None
        self.on_message: Callable[[dict[str, Any]], None] = lambda message: None

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect (creating the schema if needed), and load the epoch, cursor and totals."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close every connection (an open one may keep the process from exiting)."""

    @abc.abstractmethod
    def transaction(self, journal: bool = True) -> contextlib.AbstractAsyncContextManager[Transaction]:
        """One write transaction at a time; rolled back, with its undo hooks run, on any failure.

        journal=False: a write that neither journals nor looks at the files (clients,
        devices, resumable uploads), which a cluster need not serialize with the others."""

    # -- what a cluster needs; one node on its own has nobody to hold off or tell ------

    def exclusive(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Hold every node's writes off, and bring the index up to date, for work that spans
        several transactions and renames in the tree between them (a move, start-up
        recovery). The tree's write lock does that alone on one node."""
        return contextlib.nullcontext()

    def behind(self) -> bool:
        """Whether another node committed a change this node has heard of but has not yet
        read into its index (a client told of it by that node may ask this one next)."""
        return False

    async def catch_up(self) -> bool:
        """Read what other nodes committed into the index, now; whether there was any."""
        return False

    async def broadcast(self, message: dict[str, Any]) -> None:
        """Hand message to the other nodes' on_message."""

    async def note_connection(self, client_id: str, opened: float, connected: bool) -> None:
        """Note that a client's WebSocket, opened at opened, is now open (or closed) on this
        node; an open one replaces the client's older WebSocket on another node."""

    async def connected_elsewhere(self) -> set[str]:
        """The clients with a WebSocket open on another node."""
        return set()

    def claim_upload(self, upload_id: str) -> contextlib.AbstractAsyncContextManager[bool]:
        """Whether this node may write to a resumable upload now (no other node is), for
        the duration of the context."""
        return contextlib.nullcontext(True)

    def _committed(self, tx: Transaction) -> None:
        """Bring the cursor, the totals and the index up to a transaction just committed
        (in one step, with no await: a reader sees all of it or none)."""
        if tx.last_seq:
            self.cursor = tx.last_seq
        self.live_files += tx.live_files
        self.live_bytes += tx.live_bytes
        self.version_count += tx.versions
        self.blob_bytes += tx.blob_bytes
        for record in tx.pending.changed.values():
            self.index.put(record)

    def _load(self, records: Iterable[Sequence[Any]]) -> None:
        """Fill the index from rows of FILE_COLUMNS, at open."""
        index, clients = LiveIndex(), {}
        for row in records:
            client_id = clients.setdefault(row[7], row[7])   # a few ids, shared by many rows
            index.put(FileRecord(row[0], row[1], row[2], row[3], row[4], bool(row[5]), row[6],
                                 client_id, row[8]))
        self.index = index
        live = [record for record in index.records.values() if not record.deleted]
        self.live_files, self.live_bytes = len(live), sum(record.size for record in live)

    def get(self, path: str) -> FileRecord | None:
        """The path's committed record (live or tombstone)."""
        return self.index.get(path)

    def snapshot(self) -> tuple[dict[str, FileRecord], int]:
        """Every record (live and tombstones) and the cursor, as of one moment."""
        return dict(self.index.records), self.cursor

    def list_live(self, prefix: str) -> tuple[list[FileRecord], int]:
        """Live files whose path starts with prefix, sorted, and the cursor."""
        return self.index.live_under(prefix, folder=False), self.cursor

    @abc.abstractmethod
    async def changes_since(self, since: int, limit: int) -> tuple[list[Change], int, bool]:
        """Journal entries with seq > since (at most limit), the cursor, and whether more wait."""

    @abc.abstractmethod
    async def pending_moves(self) -> list[tuple[str, str, str]]:
        """(source, target, client_id) of the moves noted but not finished."""

    @abc.abstractmethod
    async def save_upload(self, upload: PartialUpload) -> None:
        """Store (or update) a resumable upload's record, durably."""

    @abc.abstractmethod
    async def drop_upload(self, upload_id: str) -> None:
        """Forget a resumable upload."""

    @abc.abstractmethod
    async def get_upload(self, upload_id: str) -> PartialUpload | None:
        """A resumable upload's record."""

    @abc.abstractmethod
    async def uploads_of(self, client_id: str | None) -> list[PartialUpload]:
        """The resumable uploads of one client (None: of every client)."""

    @abc.abstractmethod
    async def register_client(self, client_id: str, name: str | None,
                              platform: str | None, version: str | None) -> bool:
        """Store or refresh a client; True when it is new."""

    @abc.abstractmethod
    async def touch_client(self, client_id: str) -> None:
        """Note that a registered client was seen now."""

    @abc.abstractmethod
    async def list_clients(self) -> list[ClientRecord]:
        """Every registered client, by id."""

    @abc.abstractmethod
    async def save_device(self, device: Device) -> None:
        """Store (or replace) a device's record."""

    @abc.abstractmethod
    async def list_devices(self) -> list[Device]:
        """Every device, revoked ones included."""

    @abc.abstractmethod
    async def note_devices_seen(self, seen: Mapping[str, float]) -> None:
        """Record when devices were last seen (name -> time)."""

    @abc.abstractmethod
    async def check(self) -> None:
        """Raise if the database cannot answer a query (cheap: /health calls it)."""

    @abc.abstractmethod
    async def versions_of(self, path: str) -> list[Version]:
        """The path's kept versions, newest first."""

    @abc.abstractmethod
    async def get_version(self, path: str, revision: int) -> Version | None:
        """One kept version."""

    @abc.abstractmethod
    async def trash(self, prefix: str) -> list[Version]:
        """For each path under prefix whose current state is deleted: the version its
        delete kept, if it is kept; sorted by path."""

    @abc.abstractmethod
    async def state_at(self, prefix: str, at: int) -> tuple[dict[str, Change], dict[str, FileRecord]]:
        """For the paths under prefix (the folder prefix/, or the file prefix; "": all):
        the last change of each with seq <= at, and each one's record now."""

    @abc.abstractmethod
    async def has_blob(self, checksum: str) -> bool:
        """Whether some version keeps this content."""

    @abc.abstractmethod
    async def blob_checksums(self) -> set[str]:
        """The checksum of every blob the versions refer to."""

    @abc.abstractmethod
    async def blobs_among(self, checksums: Sequence[str]) -> set[str]:
        """Those of these checksums whose blob some version refers to."""

    @abc.abstractmethod
    async def thinning_candidates(self, after: str, paths: int) -> list[tuple[Version, bool]]:
        """The versions of the first `paths` paths after `after` (by path, newest first), each
        with whether it is the kept content of its path's current deletion (never thinned)."""

    @abc.abstractmethod
    def failure(self, exc: BaseException) -> Refused | None:
        """The contract's answer to a database error (full, read-only, failing), or None when
        exc is not one (a bug, to be answered 500)."""


# -- SQLite -------------------------------------------------------------------------

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS files (
    path          TEXT PRIMARY KEY,
    fold          TEXT NOT NULL,
    checksum      TEXT NOT NULL,
    size          INTEGER NOT NULL,
    modified_time REAL NOT NULL,
    revision      INTEGER NOT NULL,
    deleted       INTEGER NOT NULL,
    time          REAL NOT NULL,
    client_id     TEXT NOT NULL,
    mtime_ns      INTEGER NOT NULL DEFAULT -1
);
CREATE TABLE IF NOT EXISTS changes (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    type          TEXT NOT NULL CHECK (type IN ('upsert', 'delete')),
    path          TEXT NOT NULL,
    checksum      TEXT NOT NULL,
    size          INTEGER NOT NULL,
    modified_time REAL NOT NULL,
    client_id     TEXT NOT NULL,
    time          REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS changes_by_path ON changes (path, seq);
CREATE TABLE IF NOT EXISTS versions (
    path          TEXT NOT NULL,
    revision      INTEGER NOT NULL,
    checksum      TEXT NOT NULL,
    size          INTEGER NOT NULL,
    modified_time REAL NOT NULL,
    replaced_at   INTEGER NOT NULL,
    replaced_by   TEXT NOT NULL,
    time          REAL NOT NULL,
    reason        TEXT NOT NULL CHECK (reason IN ('overwrite', 'delete')),
    PRIMARY KEY (path, revision)
);
CREATE INDEX IF NOT EXISTS versions_by_time ON versions (time);
CREATE INDEX IF NOT EXISTS versions_by_checksum ON versions (checksum);
CREATE TABLE IF NOT EXISTS blobs (
    checksum      TEXT PRIMARY KEY,
    size          INTEGER NOT NULL,
    refs          INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS uploads (
    id            TEXT PRIMARY KEY,
    client_id     TEXT NOT NULL,
    length        INTEGER,
    received      INTEGER NOT NULL,
    metadata      TEXT NOT NULL,
    expires       REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS moves (
    source        TEXT PRIMARY KEY,
    target        TEXT NOT NULL,
    client_id     TEXT NOT NULL,
    time          REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS clients (
    client_id     TEXT PRIMARY KEY,
    name          TEXT,
    platform      TEXT,
    version       TEXT,
    registered_at REAL NOT NULL,
    last_seen     REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS devices (
    name          TEXT PRIMARY KEY,
    scope         TEXT NOT NULL CHECK (scope IN ('read', 'write', 'admin')),
    token_hash    TEXT NOT NULL UNIQUE,
    created       REAL NOT NULL,
    last_seen     REAL,
    revoked       INTEGER NOT NULL
);
"""

FILE_COLUMNS = "path, checksum, size, modified_time, revision, deleted, time, client_id, mtime_ns"
FILES_ROW = "path, fold, " + FILE_COLUMNS.removeprefix("path, ")
CHANGE_COLUMNS = "seq, type, path, checksum, size, modified_time, client_id, time"
VERSION_COLUMNS = ("path, revision, checksum, size, modified_time, replaced_at, replaced_by,"
                   " time, reason")

# SQLite's primary result codes (sqlite3.Error.sqlite_errorcode & 0xff) that mean the
# storage, not the query, is at fault.
SQLITE_FULL_CODES = frozenset({sqlite3.SQLITE_FULL})
SQLITE_FAILING_CODES = frozenset({
    sqlite3.SQLITE_READONLY, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_CANTOPEN,
    sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_CORRUPT,
    sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_PERM})


UPLOAD_COLUMNS = "id, client_id, length, received, metadata, expires"
DEVICE_COLUMNS = "name, scope, token_hash, created, last_seen, revoked"


def partial_upload(row: Sequence[Any]) -> PartialUpload:
    """A PartialUpload from a row of UPLOAD_COLUMNS."""
    return PartialUpload(row[0], row[1], row[2], row[3], json.loads(row[4]), row[5])


def file_record(row: Sequence[Any]) -> FileRecord:
    """A FileRecord from a row of FILE_COLUMNS."""
    return FileRecord._make(row)     # deleted stays SQLite's 0 or 1: only its truth is used


def under_prefix(prefix: str, column: str = "path") -> tuple[str, list[Any]]:
    """An SQL condition (and its parameters) for the file prefix and the paths in the folder
    prefix/; true for every path when prefix is ""."""
    if not prefix:
        return "TRUE", []
    lower, upper = folder_range(prefix)
    return f"({column} = ? OR ({column} >= ? AND {column} < ?))", [prefix, lower, upper]


def sqlite_failure(exc: BaseException) -> Refused | None:
    """StorageFull or StorageFailing for an SQLite error of the storage, by its result code."""
    code = getattr(exc, "sqlite_errorcode", None) if isinstance(exc, sqlite3.Error) else None
    if code is None:
        return None
    if code & 0xFF in SQLITE_FULL_CODES:
        return StorageFull()
    if code & 0xFF in SQLITE_FAILING_CODES:
        return StorageFailing()
    return None


class SQLConnection(abc.ABC):
    """One database connection as the SQL stores use it. Every query is written once, with
    SQLite's ? placeholders and the SQL both engines speak (ON CONFLICT, RETURNING); the
    PostgreSQL connection numbers the placeholders."""

    @abc.abstractmethod
    async def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        """Run one statement."""

    @abc.abstractmethod
    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Sequence[Any]]:
        """Run one statement; its rows."""

    @abc.abstractmethod
    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """Run one statement for each row of parameters."""


class SQLiteConnection(SQLConnection):
    """An aiosqlite connection."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self.db = db

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        await self.db.execute(sql, params)

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Sequence[Any]]:
        return list(await self.db.execute_fetchall(sql, params))

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        await self.db.executemany(sql, rows)


FILES_UPSERT = (f"INSERT INTO files ({FILES_ROW}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (path) DO UPDATE SET " + ", ".join(
                    f"{column.strip()} = excluded.{column.strip()}"
                    for column in FILES_ROW.split(",")[1:]))


class SQLTransaction(Transaction):
    """One write transaction on an SQL connection (the store begins and ends it).

    The journal and file rows are buffered and written by flush() in one
    executemany each (before COMMIT, and before any statement that reads):
    each statement is a round trip to the driver, and a group commit of 100
    uploads would otherwise make 200 of them. So the transaction hands out the
    seqs itself, from the cursor on: it alone writes the journal.
    """

    def __init__(self, sql: SQLConnection, index: LiveIndex, cursor: int) -> None:
        super().__init__(index)
        self.sql = sql
        self._next_seq = cursor + 1
        self._journal: list[tuple[Any, ...]] = []     # rows of CHANGE_COLUMNS
        self._files: list[tuple[Any, ...]] = []       # rows of FILES_ROW, in order
        self.last_entry: tuple[int, str, float] | None = None    # seq, path, time

    def _journalled(self, kind: str, path: str, checksum: str, size: int,
                    modified_time: float, client_id: str, now: float) -> int:
        """Buffer a journal row; its seq."""
        seq = self.last_seq = self._next_seq
        self._next_seq += 1
        self._journal.append((seq, kind, path, checksum, size, modified_time, client_id, now))
        self.last_entry = (seq, path, now)
        return seq

    def _record(self, before: FileRecord | None, record: FileRecord) -> None:
        """Buffer record as the path's row, and note the change."""
        self._files.append((record.path, fold_path(record.path), *record[1:5],
                            int(record.deleted), *record[6:]))
        self._changed(before, record)

    async def flush(self) -> None:
        """Write the buffered rows."""
        if self._journal:
            rows, self._journal = self._journal, []
            await self.sql.executemany(
                f"INSERT INTO changes ({CHANGE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
        if self._files:
            rows, self._files = self._files, []
            await self.sql.executemany(FILES_UPSERT, rows)

    async def record_upsert(self, path: str, checksum: str, size: int, modified_time: float,
                            client_id: str, mtime_ns: int) -> FileRecord:
        """Journal a new version of path and make it the live file."""
        now = time.time()
        seq = self._journalled("upsert", path, checksum, size, modified_time, client_id, now)
        record = FileRecord(path, checksum, size, modified_time, seq, False, now,
                            sys.intern(client_id), mtime_ns)
        self._record(self.get(path), record)
        return record

    async def record_mtime(self, path: str, mtime_ns: int) -> None:
        """Note a new mtime for unchanged bytes (touched behind our back): no change to journal."""
        before = self.get(path)
        if before is not None:
            self._record(before, before._replace(mtime_ns=mtime_ns))

    async def record_delete(self, live: FileRecord, client_id: str) -> FileRecord:
        """Journal the deletion of a live file and leave its tombstone."""
        now = time.time()
        seq = self._journalled("delete", live.path, "", 0, now, client_id, now)
        tomb = live._replace(revision=seq, deleted=True, time=now, client_id=sys.intern(client_id))
        self._record(live, tomb)
        return tomb

    async def record_version(self, old: FileRecord, change: FileRecord, reason: str) -> Version:
        """Keep old's content as replaced or deleted by change (its blob is in the store)."""
        await self.flush()
        version = Version(old.path, old.revision, old.checksum, old.size, old.modified_time,
                          change.revision, change.client_id, change.time, reason)
        added = await self.sql.fetch(
            f"INSERT INTO versions ({VERSION_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT DO NOTHING RETURNING 1",
            (version.path, version.revision, version.checksum, version.size,
             version.modified_time, version.replaced_at, version.replaced_by, version.time,
             version.reason))
        if added:
            self.versions += 1
            rows = await self.sql.fetch(
                "INSERT INTO blobs (checksum, size, refs) VALUES (?, ?, 1) ON CONFLICT (checksum)"
                " DO UPDATE SET refs = blobs.refs + 1 RETURNING refs", (old.checksum, old.size))
            if rows[0][0] == 1:
                self.blob_bytes += old.size
        return version

    async def drop_versions(self, versions: Iterable[tuple[str, int]]) -> list[str]:
        """Forget versions; the checksums of the blobs no version refers to any more."""
        await self.flush()
        gone = []
        for path, revision in versions:
            rows = await self.sql.fetch(
                "DELETE FROM versions WHERE path = ? AND revision = ? RETURNING checksum",
                (path, revision))
            if not rows:
                continue
            self.versions -= 1
            left = await self.sql.fetch(
                "UPDATE blobs SET refs = refs - 1 WHERE checksum = ? RETURNING refs, size",
                (rows[0][0],))
            if left and left[0][0] <= 0:
                await self.sql.execute("DELETE FROM blobs WHERE checksum = ?", (rows[0][0],))
                self.blob_bytes -= left[0][1]
                gone.append(rows[0][0])
        self.gone_blobs.extend(gone)
        return gone

    async def oldest_versions(self, limit: int) -> list[Version]:
        """The limit oldest versions."""
        await self.flush()
        rows = await self.sql.fetch(
            f"SELECT {VERSION_COLUMNS} FROM versions ORDER BY time, path LIMIT ?", (limit,))
        return [Version(*row) for row in rows]

    async def move_versions(self, source: str, target: str) -> None:
        """The kept versions of source become target's."""
        await self.flush()
        await self.sql.execute("UPDATE versions SET path = ? WHERE path = ?", (target, source))

    async def note_move(self, source: str, target: str, client_id: str) -> None:
        """Record a move about to happen on disk."""
        await self.sql.execute(
            "INSERT INTO moves (source, target, client_id, time) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (source) DO UPDATE SET target = excluded.target,"
            " client_id = excluded.client_id, time = excluded.time",
            (source, target, client_id, time.time()))

    async def forget_move(self, source: str) -> None:
        """The move of source is no longer pending."""
        await self.sql.execute("DELETE FROM moves WHERE source = ?", (source,))

    async def versions_with(self, checksums: Iterable[str]) -> list[tuple[str, int]]:
        """The (path, revision) of every version of these contents."""
        await self.flush()
        found: list[tuple[str, int]] = []
        wanted = list(checksums)
        for start in range(0, len(wanted), 500):
            batch = wanted[start:start + 500]
            rows = await self.sql.fetch(
                "SELECT path, revision FROM versions WHERE checksum IN"
                f" ({', '.join('?' * len(batch))})", batch)
            found.extend((row[0], row[1]) for row in rows)
        return found


class SQLStore(MetadataStore):
    """The queries every SQL backend shares, written once; a backend supplies its
    connections (read(), read_transaction(), transaction()), how it opens, and the two
    queries its engine spells its own way (LATEST_CHANGES, CURSOR)."""

    # The last change of each path with seq <= ? under a prefix ({condition}).
    LATEST_CHANGES = ""
    # The journal's last seq.
    CURSOR = ""

    def __init__(self) -> None:
        super().__init__()
        self._checked = -math.inf  # when check() last reached the database

    @abc.abstractmethod
    async def read(self, sql: str, params: Sequence[Any] = ()) -> list[Sequence[Any]]:
        """One query on committed state."""

    @abc.abstractmethod
    def read_transaction(self) -> contextlib.AbstractAsyncContextManager[SQLConnection]:
        """Several reads that see one committed state."""

    async def _write(self, sql: str, params: Sequence[Any] = (),
                     notice: dict[str, Any] | None = None) -> None:
        """One statement in a transaction of its own (one that does not journal); notice,
        if given, for the other nodes at its COMMIT."""
        async with self.transaction(journal=False) as tx:
            assert isinstance(tx, SQLTransaction)
            await tx.sql.execute(sql, params)
            if notice is not None:
                await self.notify_in(tx.sql, notice)

    async def changes_since(self, since: int, limit: int) -> tuple[list[Change], int, bool]:
        """Journal entries with seq > since (at most limit), the cursor, and whether more wait."""
        async with self.read_transaction() as db:
            rows = await db.fetch(
                f"SELECT {CHANGE_COLUMNS} FROM changes WHERE seq > ? ORDER BY seq LIMIT ?",
                (since, limit + 1))
            cursor = await db.fetch(self.CURSOR)
        changes = [Change(*row) for row in rows[:limit]]
        return changes, int(cursor[0][0]), len(rows) > limit

    async def pending_moves(self) -> list[tuple[str, str, str]]:
        """The moves noted but not finished."""
        rows = await self.read("SELECT source, target, client_id FROM moves ORDER BY time")
        return [(row[0], row[1], row[2]) for row in rows]

    async def save_upload(self, upload: PartialUpload) -> None:
        """Store a resumable upload's record."""
        await self._write(
            f"INSERT INTO uploads ({UPLOAD_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (id) DO UPDATE SET length = excluded.length,"
            " received = excluded.received, metadata = excluded.metadata,"
            " expires = excluded.expires",
            (upload.id, upload.client_id, upload.length, upload.received,
             json.dumps(upload.metadata), upload.expires))

    async def drop_upload(self, upload_id: str) -> None:
        """Forget a resumable upload."""
        await self._write("DELETE FROM uploads WHERE id = ?", (upload_id,))

    async def get_upload(self, upload_id: str) -> PartialUpload | None:
        """A resumable upload's record."""
        rows = await self.read(f"SELECT {UPLOAD_COLUMNS} FROM uploads WHERE id = ?", (upload_id,))
        return partial_upload(rows[0]) if rows else None

    async def uploads_of(self, client_id: str | None) -> list[PartialUpload]:
        """The resumable uploads of one client, or of all."""
        if client_id is None:
            rows = await self.read(f"SELECT {UPLOAD_COLUMNS} FROM uploads")
        else:
            rows = await self.read(f"SELECT {UPLOAD_COLUMNS} FROM uploads WHERE client_id = ?",
                                   (client_id,))
        return [partial_upload(row) for row in rows]

    async def register_client(self, client_id: str, name: str | None,
                              platform: str | None, version: str | None) -> bool:
        """Store or refresh a client; True when it is new."""
        now = time.time()
        async with self.transaction(journal=False) as tx:
            assert isinstance(tx, SQLTransaction)
            existing = await tx.sql.fetch("SELECT 1 FROM clients WHERE client_id = ?",
                                          (client_id,))
            await tx.sql.execute(
                "INSERT INTO clients (client_id, name, platform, version, registered_at,"
                " last_seen) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (client_id) DO UPDATE"
                " SET name = excluded.name, platform = excluded.platform,"
                " version = excluded.version, last_seen = excluded.last_seen",
                (client_id, name, platform, version, now, now))
        return not existing

    async def touch_client(self, client_id: str) -> None:
        """Note that a registered client was seen now."""
        await self._write("UPDATE clients SET last_seen = ? WHERE client_id = ?",
                          (time.time(), client_id))

    async def list_clients(self) -> list[ClientRecord]:
        """Every registered client, by id."""
        rows = await self.read("SELECT client_id, name, platform, version, registered_at,"
                               " last_seen FROM clients ORDER BY client_id")
        return [ClientRecord(*row) for row in rows]

    async def save_device(self, device: Device) -> None:
        """Store or replace a device's record; the other nodes are told at its COMMIT."""
        await self._write(
            f"INSERT INTO devices ({DEVICE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (name) DO UPDATE SET scope = excluded.scope,"
            " token_hash = excluded.token_hash, created = excluded.created,"
            " last_seen = excluded.last_seen, revoked = excluded.revoked",
            (device.name, device.scope, device.token_hash, device.created, device.last_seen,
             int(device.revoked)), notice={"kind": "devices"})

    async def notify_in(self, db: SQLConnection, message: dict[str, Any]) -> None:
        """Hand message to the other nodes' on_message when db's transaction commits (one
        node alone tells nobody)."""

    async def list_devices(self) -> list[Device]:
        """Every device, by name."""
        rows = await self.read(f"SELECT {DEVICE_COLUMNS} FROM devices ORDER BY name")
        return [Device(row[0], row[1], row[2], row[3], row[4], bool(row[5])) for row in rows]

    async def note_devices_seen(self, seen: Mapping[str, float]) -> None:
        """Record when devices were last seen."""
        async with self.transaction(journal=False) as tx:
            assert isinstance(tx, SQLTransaction)
            await tx.sql.executemany("UPDATE devices SET last_seen = ? WHERE name = ?",
                                     [(when, name) for name, when in seen.items()])

    async def check(self) -> None:
        """Raise if the database cannot answer a query (asked at most once a second, so
        that a flood of /health calls cannot keep it busy)."""
        if time.monotonic() - self._checked < HEALTH_CHECK_INTERVAL:
            return
        await self.read("SELECT 1 FROM meta LIMIT 1")
        self._checked = time.monotonic()

    async def versions_of(self, path: str) -> list[Version]:
        """The path's kept versions, newest first."""
        rows = await self.read(f"SELECT {VERSION_COLUMNS} FROM versions WHERE path = ?"
                               " ORDER BY replaced_at DESC", (path,))
        return [Version(*row) for row in rows]

    async def get_version(self, path: str, revision: int) -> Version | None:
        """One kept version."""
        rows = await self.read(f"SELECT {VERSION_COLUMNS} FROM versions WHERE path = ?"
                               " AND revision = ?", (path, revision))
        return Version(*rows[0]) if rows else None

    async def trash(self, prefix: str) -> list[Version]:
        """The versions deletes kept, of the paths still deleted, under prefix (a string
        prefix, as for /files)."""
        columns = ", ".join(f"v.{column.strip()}" for column in VERSION_COLUMNS.split(","))
        rows = await self.read(
            f"SELECT {columns} FROM files f JOIN versions v ON v.path = f.path"
            " AND v.replaced_at = f.revision WHERE f.deleted = 1 AND v.reason = 'delete'"
            " AND f.path >= ? AND substr(f.path, 1, ?) = ? ORDER BY f.path",
            (prefix, len(prefix), prefix))
        return [Version(*row) for row in rows]

    async def state_at(self, prefix: str, at: int) -> tuple[dict[str, Change], dict[str, FileRecord]]:
        """The last change of each path under prefix with seq <= at, and its record now."""
        condition, params = under_prefix(prefix)
        async with self.read_transaction() as db:
            rows = await db.fetch(self.LATEST_CHANGES.format(condition=condition),
                                  [at, *params])
            then = {row[2]: Change(*row) for row in rows}
            rows = await db.fetch(f"SELECT {FILE_COLUMNS} FROM files WHERE {condition}", params)
        return then, {row[0]: file_record(row) for row in rows}

    async def has_blob(self, checksum: str) -> bool:
        """Whether some version keeps this content."""
        return bool(await self.read("SELECT 1 FROM blobs WHERE checksum = ?", (checksum,)))

    async def blob_checksums(self) -> set[str]:
        """Every blob the versions refer to."""
        return {row[0] for row in await self.read("SELECT checksum FROM blobs")}

    async def blobs_among(self, checksums: Sequence[str]) -> set[str]:
        """Those of these checksums whose blob some version refers to."""
        kept: set[str] = set()
        for start in range(0, len(checksums), 500):
            batch = checksums[start:start + 500]
            rows = await self.read("SELECT checksum FROM blobs WHERE checksum IN"
                                   f" ({', '.join('?' * len(batch))})", batch)
            kept.update(row[0] for row in rows)
        return kept

    async def thinning_candidates(self, after: str, paths: int) -> list[tuple[Version, bool]]:
        """The versions of the next paths after `after`, newest first, and which are the kept
        content of their path's current deletion."""
        columns = ", ".join(f"v.{column.strip()}" for column in VERSION_COLUMNS.split(","))
        rows = await self.read(
            f"SELECT {columns}, (f.deleted = 1 AND f.revision = v.replaced_at"
            "  AND v.reason = 'delete') FROM versions v LEFT JOIN files f ON f.path = v.path"
            " WHERE v.path IN (SELECT DISTINCT path FROM versions WHERE path > ?"
            "  ORDER BY path LIMIT ?) ORDER BY v.path, v.time DESC", (after, paths))
        return [(Version(*row[:9]), bool(row[9])) for row in rows]

    async def _load_state(self, db: SQLConnection) -> None:
        """At open: the epoch, the cursor, the index and the totals."""
        self.epoch = (await db.fetch("SELECT value FROM meta WHERE key = 'epoch'"))[0][0]
        self.cursor = int((await db.fetch(self.CURSOR))[0][0])
        self._load(await db.fetch(f"SELECT {FILE_COLUMNS} FROM files"))
        await self._load_totals(db)

    async def _load_totals(self, db: SQLConnection) -> None:
        """The number of versions and the bytes of their blobs."""
        rows = await db.fetch("SELECT (SELECT COUNT(*) FROM versions),"
                              " (SELECT COALESCE(SUM(size), 0) FROM blobs)")
        self.version_count, self.blob_bytes = int(rows[0][0]), int(rows[0][1])


class SQLiteStore(SQLStore):
    """The inline SQLite database in .syncd/: one writer connection behind a lock, one reader.

    Writes go through transaction(), one at a time.  Reads use a second
    connection, so that they see only committed state, never a write
    transaction half-way through (WAL lets both run at once).
    """

    errors = (sqlite3.Error,)
    # SQLite takes the bare columns from the row that holds MAX(seq)
    LATEST_CHANGES = ("SELECT MAX(seq), type, path, checksum, size, modified_time, client_id,"
                      " time FROM changes WHERE seq <= ? AND {condition} GROUP BY path")
    CURSOR = ("SELECT COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'changes'), 0)")

    def __init__(self, db_path: Path) -> None:
        super().__init__()
        self.db_path = db_path
        self._lock = asyncio.Lock()        # aiosqlite: one BEGIN ... COMMIT at a time (STYLE.md)
        self._read_lock = asyncio.Lock()   # one multi-statement read transaction at a time
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None

    async def open(self) -> None:
        """Open (or create) the database, and load the epoch and the cursor."""
        # Made 0600 before SQLite opens it: its -wal and -shm files take the same mode.
        os.close(os.open(self.db_path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
        # isolation_level=None: we issue BEGIN/COMMIT ourselves (STYLE.md).
        self._writer = await aiosqlite.connect(self.db_path, isolation_level=None)
        try:
            await self._writer.execute("PRAGMA journal_mode = WAL")
            # FULL: in WAL mode NORMAL may lose the last commits on power loss,
            # and we acknowledge an upload only once its commit is durable.
            await self._writer.execute("PRAGMA synchronous = FULL")
            await self._writer.executescript(SCHEMA)
            await self._migrate(self._writer)
            await self._writer.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('epoch', ?)",
                (secrets.token_hex(16),))
            self._reader = await aiosqlite.connect(self.db_path, isolation_level=None)
            await self._reader.execute("PRAGMA query_only = ON")
            await self._load_state(SQLiteConnection(self._reader))
        except BaseException:
            await self.close()
            raise

    @staticmethod
    async def _migrate(db: aiosqlite.Connection) -> None:
        """Bring a database made by an older syncd up to SCHEMA."""
        columns = {row[1] for row in await db.execute_fetchall("PRAGMA table_info(files)")}
        if "mtime_ns" not in columns:   # before 0.1.0's recovery: -1 makes it rehash once
            await db.execute("ALTER TABLE files ADD COLUMN mtime_ns INTEGER NOT NULL DEFAULT -1")
        # the case checks read the in-memory index now: the index would only cost writes
        await db.execute("DROP INDEX IF EXISTS files_live_fold")

    async def close(self) -> None:
        """Close both connections (an open one keeps the process from exiting)."""
        for db in (self._reader, self._writer):
            if db is not None:
                with contextlib.suppress(Exception):
                    await db.close()
        self._reader = self._writer = None

    @property
    def reader(self) -> aiosqlite.Connection:
        """The read-only connection."""
        assert self._reader is not None, "the store is not open"
        return self._reader

    async def read(self, sql: str, params: Sequence[Any] = ()) -> list[Sequence[Any]]:
        """One query on the reader."""
        return list(await self.reader.execute_fetchall(sql, params))

    @contextlib.asynccontextmanager
    async def read_transaction(self) -> AsyncIterator[SQLConnection]:
        """Several reads that see one committed state."""
        async with self._read_lock:
            await self.reader.execute("BEGIN")
            try:
                yield SQLiteConnection(self.reader)
            finally:
                await self.reader.execute("COMMIT")

    @contextlib.asynccontextmanager
    async def transaction(self, journal: bool = True) -> AsyncIterator[Transaction]:
        """BEGIN IMMEDIATE ... COMMIT; on any failure ROLLBACK and run the undo hooks.

        After-commit hooks run under the lock, so that announcements leave in
        seq order.  Callers must not be cancelled half-way: the tree runs its
        writes with Background.shielded.
        """
        assert self._writer is not None, "the store is not open"
        async with self._lock:
            tx = SQLTransaction(SQLiteConnection(self._writer), self.index, self.cursor)
            await self._writer.execute("BEGIN IMMEDIATE")
            try:
                yield tx
                await tx.flush()
                await self._writer.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(Exception):
                    await self._writer.execute("ROLLBACK")
                tx.run_undo()
                raise
            self._committed(tx)
            for hook in tx.after_commit:
                hook()

    def failure(self, exc: BaseException) -> Refused | None:
        """sqlite_failure."""
        return sqlite_failure(exc)


# -- PostgreSQL ---------------------------------------------------------------------

# The same tables as SCHEMA, in PostgreSQL's types. Paths sort by their bytes (COLLATE
# "C"), as in SQLite: /files, /trash and the thinning walk are in that order.
PG_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key           TEXT PRIMARY KEY,
    value         TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS files (
    path          TEXT COLLATE "C" PRIMARY KEY,
    fold          TEXT COLLATE "C" NOT NULL,
    checksum      TEXT NOT NULL,
    size          BIGINT NOT NULL,
    modified_time DOUBLE PRECISION NOT NULL,
    revision      BIGINT NOT NULL,
    deleted       INTEGER NOT NULL,
    time          DOUBLE PRECISION NOT NULL,
    client_id     TEXT NOT NULL,
    mtime_ns      BIGINT NOT NULL DEFAULT -1
);
CREATE TABLE IF NOT EXISTS changes (
    seq           BIGINT PRIMARY KEY,
    type          TEXT NOT NULL CHECK (type IN ('upsert', 'delete')),
    path          TEXT COLLATE "C" NOT NULL,
    checksum      TEXT NOT NULL,
    size          BIGINT NOT NULL,
    modified_time DOUBLE PRECISION NOT NULL,
    client_id     TEXT NOT NULL,
    time          DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS changes_by_path ON changes (path, seq);
CREATE TABLE IF NOT EXISTS versions (
    path          TEXT COLLATE "C" NOT NULL,
    revision      BIGINT NOT NULL,
    checksum      TEXT NOT NULL,
    size          BIGINT NOT NULL,
    modified_time DOUBLE PRECISION NOT NULL,
    replaced_at   BIGINT NOT NULL,
    replaced_by   TEXT NOT NULL,
    time          DOUBLE PRECISION NOT NULL,
    reason        TEXT NOT NULL CHECK (reason IN ('overwrite', 'delete')),
    PRIMARY KEY (path, revision)
);
CREATE INDEX IF NOT EXISTS versions_by_time ON versions (time);
CREATE INDEX IF NOT EXISTS versions_by_checksum ON versions (checksum);
CREATE TABLE IF NOT EXISTS blobs (
    checksum      TEXT PRIMARY KEY,
    size          BIGINT NOT NULL,
    refs          BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS uploads (
    id            TEXT PRIMARY KEY,
    client_id     TEXT NOT NULL,
    length        BIGINT,
    received      BIGINT NOT NULL,
    metadata      TEXT NOT NULL,
    expires       DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS moves (
    source        TEXT COLLATE "C" PRIMARY KEY,
    target        TEXT COLLATE "C" NOT NULL,
    client_id     TEXT NOT NULL,
    time          DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS clients (
    client_id     TEXT PRIMARY KEY,
    name          TEXT,
    platform      TEXT,
    version       TEXT,
    registered_at DOUBLE PRECISION NOT NULL,
    last_seen     DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS devices (
    name          TEXT PRIMARY KEY,
    scope         TEXT NOT NULL CHECK (scope IN ('read', 'write', 'admin')),
    token_hash    TEXT NOT NULL UNIQUE,
    created       DOUBLE PRECISION NOT NULL,
    last_seen     DOUBLE PRECISION,
    revoked       INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS connections (   -- which node holds each client's WebSocket
    client_id     TEXT PRIMARY KEY,
    node          TEXT NOT NULL,
    node_key      BIGINT NOT NULL,
    since         DOUBLE PRECISION NOT NULL
);
"""
# Advisory lock keys. One key: creating the schema; and every journalling write, taken at
# its BEGIN, so that the nodes commit one at a time (journal order is commit order, and
# one node at a time renames in the tree). Two keys (class, object): a node's name, held
# for as long as the node runs; a resumable upload, while a node writes to it.
PG_SCHEMA_LOCK = 0x73796E01
PG_WRITE_LOCK = 0x73796E02
PG_NODE_LOCKS = 0x73796E03
PG_UPLOAD_LOCKS = 0x73796E04
PG_CHANNEL = "syncd"            # NOTIFY: commits and messages, from node to node
PG_WATCH_INTERVAL = 2.0         # seconds between two looks at the node's own connection
PG_CATCH_UP_BATCH = 5000        # journal entries read at a time when catching up
PG_LANDED_TRIES = 5             # asks whether a COMMIT whose answer was lost was made
PG_COMMAND_TIMEOUT = 60.0       # seconds one statement may take before it fails
# SQLSTATE classes and codes that mean the database, not the query, is at fault.
PG_FULL_STATES = frozenset({"53100"})                          # disk_full
PG_FAILING_PREFIXES = ("08", "53", "57", "58", "25006")        # connection, resources,
                                                               # shutdown, system, read-only


def lock_key(name: str) -> int:
    """The second key of a two-key advisory lock for a name (31 bits: both of PostgreSQL's
    spellings of it, int4 and oid, read the same)."""
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


@functools.lru_cache(maxsize=512)
def numbered(sql: str) -> str:
    """SQLite's ? placeholders as PostgreSQL's $1, $2, ...: the one difference most of the
    shared queries have (no query holds a literal question mark)."""
    parts = sql.split("?")
    return parts[0] + "".join(f"${number}{part}" for number, part in enumerate(parts[1:], 1))


class PostgresConnection(SQLConnection):
    """An asyncpg connection."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        await self.conn.execute(numbered(sql), *params)

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Sequence[Any]]:
        return list(await self.conn.fetch(numbered(sql), *params))

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        await self.conn.executemany(numbered(sql), rows)


def postgres_failure(exc: BaseException) -> Refused | None:
    """StorageFull or StorageFailing for a PostgreSQL error of the server or the link."""
    state = getattr(exc, "sqlstate", None)
    if state in PG_FULL_STATES:
        return StorageFull()
    # the link: refused, reset, timed out, or closed under asyncpg (not any OSError: a
    # full disk under the tree is the file store's to answer)
    if (state and state.startswith(PG_FAILING_PREFIXES)) or isinstance(exc, (
            ConnectionError, asyncio.TimeoutError)) or type(exc).__name__ in (
            "InterfaceError", "ConnectionDoesNotExistError", "InternalClientError"):
        return StorageFailing()
    return None


class PostgresStore(SQLStore):
    """The metadata in PostgreSQL (database_url), which every node of a cluster shares.

    Each node keeps its own index and cursor, a pool for its queries, and one connection
    of its own, which holds the node's name, LISTENs and holds resumable uploads' locks.
    Every journalling write takes PG_WRITE_LOCK at its BEGIN and, under it, first catches
    the index up with what the other nodes committed: its checks see every commit, and
    seqs are handed out in commit order. Each such commit NOTIFYs; the other nodes catch
    up from the journal and hand the entries to on_change, in seq order. A node that
    lost its own connection connects again and catches up from the journal.
    """

    LATEST_CHANGES = ("SELECT DISTINCT ON (path) seq, type, path, checksum, size,"
                      " modified_time, client_id, time FROM changes"
                      " WHERE seq <= ? AND {condition} ORDER BY path, seq DESC")
    CURSOR = "SELECT COALESCE(MAX(seq), 0) FROM changes"

    def __init__(self, url: str, pool_size: int, node: str) -> None:
        super().__init__()
        import asyncpg  # type: ignore[import-untyped]   # only this backend needs it
        self.asyncpg = asyncpg
        self.errors = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError,
                       asyncio.TimeoutError)
        self.url, self.pool_size, self.node = url, pool_size, node
        self._lock = asyncio.Lock()       # this node's journalling writes and catch-ups
        self._pool: Any = None
        self._node: Any = None            # the node's own connection
        self._node_lock = asyncio.Lock()  # asyncpg runs one query at a time on a connection
        self._holder: asyncio.Task[Any] | None = None    # the task in exclusive(),
        self._held: Any = None                           # and the connection it holds
        self._notes = asyncio.Lock()      # note_connection, in order
        self._wake = asyncio.Event()      # another node committed: catch up
        self._last_heard = 0              # the last seq another node said it committed
        self._tasks = Background()

    async def open(self) -> None:
        """Connect, create the schema if needed, take the node's name, load the state."""
        try:
            # timeouts: a database host that stops answering must make requests fail
            # (503), not wait for ever
            self._pool = await self.asyncpg.create_pool(
                self.url, min_size=1, max_size=self.pool_size, timeout=10,
                command_timeout=PG_COMMAND_TIMEOUT)
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", PG_SCHEMA_LOCK)
                await conn.execute(PG_SCHEMA)
                await conn.execute("INSERT INTO meta (key, value) VALUES ('epoch', $1)"
                                   " ON CONFLICT DO NOTHING", secrets.token_hex(16))
            await self._connect_node()      # LISTEN before loading: no commit falls between
            async with self.read_transaction() as db:
                await self._load_state(db)
        except BaseException:
            await self.close()
            raise
        self._tasks.spawn(self._follow())
        self._tasks.spawn(self._watch())

    async def close(self) -> None:
        """Stop following, close the pool and the node's connection (its locks go with it)."""
        await self._tasks.cancel()
        if self._pool is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._pool.close(), 10)
        if self._node is not None:
            with contextlib.suppress(Exception):
                await self._node.close(timeout=10)
        self._pool = self._node = None

    # -- the node's own connection -------------------------------------------------

    async def _connect_node(self) -> None:
        """The node's connection: it takes the node's name (StorageUnusable when another
        node runs with it), forgets this node's WebSockets of before, and LISTENs."""
        conn = await self.asyncpg.connect(self.url, timeout=10,
                                          command_timeout=PG_COMMAND_TIMEOUT)
        try:
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1, $2)",
                                       PG_NODE_LOCKS, lock_key(self.node)):
                raise StorageUnusable(f"another syncd node named {self.node} uses this "
                                      "database: give each node its own node_name")
            await conn.execute("DELETE FROM connections WHERE node = $1", self.node)
            await conn.add_listener(PG_CHANNEL, self._heard)
        except BaseException:
            conn.terminate()
            raise
        self._node = conn

    def _drop_node(self) -> None:
        """Close the node's connection at once (what it held is let go)."""
        conn, self._node = self._node, None
        if conn is not None:
            conn.terminate()

    async def _on_node(self, sql: str, *args: Any) -> Any:
        """One query on the node's connection; its first value."""
        async with self._node_lock:
            if self._node is None:
                raise ConnectionError("the connection to the database is lost")
            return await self._node.fetchval(sql, *args)

    def _heard(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        """A NOTIFY: another node committed (catch up), or has a message for on_message."""
        try:
            message = json.loads(payload)
        except ValueError:
            return
        if not isinstance(message, dict) or message.get("node") == self.node:
            return
        if message.get("kind") == "commit":
            self.version_count += int(message.get("versions", 0))
            self.blob_bytes += int(message.get("blob_bytes", 0))
            self._last_heard = max(self._last_heard, int(message.get("seq", 0)))
            self._wake.set()
        else:
            self.on_message(message)

    def behind(self) -> bool:
        """Whether a commit heard of is not in the index yet."""
        return self._last_heard > self.cursor

    async def catch_up(self) -> bool:
        """Read the other nodes' commits into the index; whether there were any."""
        async with self._lock, self.read_transaction() as db:
            return bool(await self._catch_up(db))

    async def _follow(self) -> None:
        """Catch up each time another node committed (one catch-up at a time)."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self.catch_up()
            except Exception as exc:
                log.warning("could not catch up with the other nodes: %s (trying again)", exc)
                await asyncio.sleep(1.0)
                self._wake.set()

    async def _watch(self) -> None:
        """Look at the node's connection every PG_WATCH_INTERVAL seconds; when it is lost
        (the database restarted, the link broke), connect again and catch up."""
        while True:
            await asyncio.sleep(PG_WATCH_INTERVAL)
            try:
                await asyncio.wait_for(self._on_node("SELECT 1"), PG_WATCH_INTERVAL * 2)
                continue
            except Exception as exc:
                log.warning("lost the node's connection to the database (%s): other nodes' "
                            "changes reach this node once it is back", exc or type(exc).__name__)
            self._drop_node()
            while True:
                try:
                    await self._rejoin()
                    break
                except StorageUnusable as exc:
                    # Another node took this one's name (and so its temp folder) while the
                    # connection was away: both must not serve.
                    self.on_message({"kind": "name_taken", "error": str(exc)})
                    return
                except Exception as exc:
                    self._drop_node()
                    log.debug("database still unreachable: %s", exc)
                    await asyncio.sleep(PG_WATCH_INTERVAL)
            log.info("connected to the database again; caught up to seq %d", self.cursor)
            self.on_message({"kind": "rejoined"})

    async def _rejoin(self) -> None:
        """Connect the node again; catch up with the journal and the totals."""
        await self._connect_node()
        async with self._lock, self.read_transaction() as db:
            await self._catch_up(db)
            await self._load_totals(db)

    async def _catch_up(self, db: SQLConnection) -> int:
        """Bring the index, the cursor and the totals up to what other nodes committed, and
        hand their journal entries to on_change, in seq order (under self._lock); how many
        entries that was."""
        read = 0
        while True:
            rows = await db.fetch(f"SELECT {CHANGE_COLUMNS} FROM changes WHERE seq > ?"
                                  " ORDER BY seq LIMIT ?", (self.cursor, PG_CATCH_UP_BATCH))
            read += len(rows)
            if not rows:
                return read
            changes = [Change(*row) for row in rows]
            paths = sorted({change.path for change in changes})
            found = await db.fetch(f"SELECT {FILE_COLUMNS} FROM files WHERE path = ANY(?)",
                                   (paths,))
            now = {row[0]: file_record(row) for row in found}
            for path in paths:
                before, after = self.index.get(path), now.get(path)
                files, size = live_change(before, after)
                self.live_files, self.live_bytes = self.live_files + files, self.live_bytes + size
                if after is None:
                    self.index.forget(path)
                else:
                    self.index.put(after._replace(client_id=sys.intern(after.client_id)))
            self.cursor = changes[-1].seq
            for change in changes:
                self.on_change(change)
            if len(rows) < PG_CATCH_UP_BATCH:
                return read

    # -- reads and writes ------------------------------------------------------------

    async def read(self, sql: str, params: Sequence[Any] = ()) -> list[Sequence[Any]]:
        """One query on a pooled connection."""
        assert self._pool is not None, "the store is not open"
        return list(await self._pool.fetch(numbered(sql), *params))

    @contextlib.asynccontextmanager
    async def read_transaction(self) -> AsyncIterator[SQLConnection]:
        """Several reads that see one committed state (a REPEATABLE READ snapshot)."""
        assert self._pool is not None, "the store is not open"
        async with self._pooled() as conn, conn.transaction(isolation="repeatable_read",
                                                            readonly=True):
            yield PostgresConnection(conn)

    @contextlib.asynccontextmanager
    async def _pooled(self) -> AsyncIterator[Any]:
        """A pooled connection. Giving it back resets it, and a reset can fail when the
        database went away after the last statement: that costs the connection (asyncpg
        drops it), never the work done with it (a commit made must not be reported as
        failed)."""
        conn = await self._pool.acquire()
        try:
            yield conn
        finally:
            try:
                await self._pool.release(conn)
            except Exception as exc:
                log.debug("a database connection was dropped on its way back: %s", exc)

    def _holds(self) -> bool:
        """Whether the running task is inside exclusive()."""
        return self._holder is not None and self._holder is asyncio.current_task()

    @contextlib.asynccontextmanager
    async def transaction(self, journal: bool = True) -> AsyncIterator[Transaction]:
        """BEGIN ... COMMIT on a pooled connection (exclusive()'s, inside it); on any failure
        ROLLBACK and run the undo hooks. A journalling one takes PG_WRITE_LOCK and catches
        up first, NOTIFYs the other nodes, and runs its after-commit hooks under this
        node's lock, in seq order."""
        assert self._pool is not None, "the store is not open"
        async with contextlib.AsyncExitStack() as stack:
            if self._holds():
                conn = self._held
            else:
                if journal:
                    await stack.enter_async_context(self._lock)
                conn = await stack.enter_async_context(self._pooled())
            db, tx, committing = PostgresConnection(conn), None, False
            transaction = conn.transaction()
            await transaction.start()
            try:
                if journal:
                    await conn.execute("SELECT pg_advisory_xact_lock($1)", PG_WRITE_LOCK)
                    await self._catch_up(db)
                tx = SQLTransaction(db, self.index, self.cursor)
                yield tx
                await tx.flush()
                if journal and (tx.last_seq or tx.versions or tx.blob_bytes):
                    await conn.execute("SELECT pg_notify($1, $2)", PG_CHANNEL, json.dumps(
                        {"kind": "commit", "node": self.node, "seq": tx.last_seq,
                         "versions": tx.versions, "blob_bytes": tx.blob_bytes}))
                committing = True
                await transaction.commit()
            except BaseException as exc:
                with contextlib.suppress(Exception):
                    await transaction.rollback()
                if tx is None or not (committing and await self._landed(tx, exc)):
                    if tx is not None:
                        tx.run_undo()
                    raise
            self._committed(tx)
            for hook in tx.after_commit:
                hook()

    async def _landed(self, tx: SQLTransaction, exc: BaseException) -> bool:
        """Whether a COMMIT whose answer was lost (the link broke) was made all the same:
        its last journal entry is in the journal, asked on another connection (for a few
        seconds, while the database comes back): undoing the renames of a commit that was
        made would leave records whose bytes are gone. (A transaction that journalled
        nothing renamed nothing in the tree: it is taken as failed.)"""
        if self.failure(exc) is None or tx.last_entry is None:
            return False
        seq, path, when = tx.last_entry
        for attempt in range(PG_LANDED_TRIES):
            try:
                rows = await self.read("SELECT 1 FROM changes WHERE seq = ? AND path = ?"
                                       " AND time = ?", (seq, path, when))
            except Exception as error:
                if self.failure(error) is None:
                    raise
                await asyncio.sleep(0.5 * (attempt + 1))
                continue
            if rows:
                log.warning("the answer to a COMMIT was lost, but it was made (seq %d): kept",
                            seq)
            return bool(rows)
        log.error("the answer to a COMMIT was lost and the database cannot say whether it "
                  "was made; it is taken as not made (seq %d, %s): if it was, start-up recovery "
                  "of a node finds the files that differ from their records", seq, path)
        return False

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        """PG_WRITE_LOCK held as a session lock on one connection, which this task's
        transactions use meanwhile; caught up first."""
        assert self._pool is not None, "the store is not open"
        async with self._lock, self._pooled() as conn:
            await conn.execute("SELECT pg_advisory_lock($1)", PG_WRITE_LOCK)
            try:
                await self._catch_up(PostgresConnection(conn))
                self._holder, self._held = asyncio.current_task(), conn
                try:
                    yield
                finally:
                    self._holder = self._held = None
            finally:
                try:
                    await conn.execute("SELECT pg_advisory_unlock($1)", PG_WRITE_LOCK)
                except BaseException:
                    conn.terminate()    # a pooled connection must not keep the lock
                    raise

    # -- the cluster ---------------------------------------------------------------

    async def broadcast(self, message: dict[str, Any]) -> None:
        """NOTIFY the other nodes."""
        await self.read("SELECT pg_notify(?, ?)",
                        (PG_CHANNEL, json.dumps({**message, "node": self.node})))

    async def notify_in(self, db: SQLConnection, message: dict[str, Any]) -> None:
        """NOTIFY the other nodes, in db's transaction: PostgreSQL sends it at COMMIT, so
        a change and the notice of it are made, or lost, together."""
        await db.execute("SELECT pg_notify(?, ?)",
                         (PG_CHANNEL, json.dumps({**message, "node": self.node})))

    async def note_connection(self, client_id: str, opened: float, connected: bool) -> None:
        """Note where a client's WebSocket is open (its row), or that it closed. The newer
        connection's row wins, whichever note arrives first (two nodes note at once); this
        node's notes are made one at a time, in order (a close never before its open)."""
        async with self._notes:
            await self._note_connection(client_id, opened, connected)

    async def _note_connection(self, client_id: str, opened: float, connected: bool) -> None:
        if connected:       # the row, and the notice that closes an older one elsewhere
            await self._write(
                "INSERT INTO connections (client_id, node, node_key, since) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (client_id) DO UPDATE SET node = excluded.node,"
                " node_key = excluded.node_key, since = excluded.since"
                " WHERE connections.since <= excluded.since",
                (client_id, self.node, lock_key(self.node), opened),
                notice={"kind": "connected", "client_id": client_id, "since": opened})
        else:
            await self._write("DELETE FROM connections WHERE client_id = ? AND node = ?"
                              " AND since = ?", (client_id, self.node, opened))

    async def connected_elsewhere(self) -> set[str]:
        """The clients connected to another node that runs (holds its name's lock: the row
        of a node that died is not believed)."""
        rows = await self.read(
            "SELECT client_id FROM connections WHERE node <> ? AND node_key IN"
            " (SELECT objid::bigint FROM pg_locks WHERE locktype = 'advisory' AND granted"
            "  AND classid = ? AND objsubid = 2 AND database ="
            "  (SELECT oid FROM pg_database WHERE datname = current_database()))",
            (self.node, PG_NODE_LOCKS))
        return {row[0] for row in rows}

    @contextlib.asynccontextmanager
    async def claim_upload(self, upload_id: str) -> AsyncIterator[bool]:
        """The upload's lock, on the node's connection (a node that dies lets it go)."""
        key = lock_key(upload_id)
        claimed = await self._on_node("SELECT pg_try_advisory_lock($1, $2)", PG_UPLOAD_LOCKS, key)
        try:
            yield bool(claimed)
        finally:
            if claimed:
                try:
                    await self._on_node("SELECT pg_advisory_unlock($1, $2)", PG_UPLOAD_LOCKS, key)
                except Exception:
                    self._drop_node()   # the lock must not stay: the watcher connects again

    def failure(self, exc: BaseException) -> Refused | None:
        """postgres_failure."""
        return postgres_failure(exc)


# ===========================================================================
# File store: temp file, hash, fsync, rename; reads
# ===========================================================================

class FolderBlocked(Exception):
    """A file (or symlink) stands where the path needs a folder, or a folder where it needs a file."""


class NotCached(Exception):
    """A read that would have to wait for the disk (FileStore.read_small with cached_only)."""


class NotRegular(FileNotFoundError):
    """Nothing that can be served is at the path: missing, a symlink, a FIFO, a socket, a device."""


@dataclass
class StagedFile:
    """An upload written to .syncd/tmp/, hashed, not yet in place."""

    name: str
    fd: int
    size: int = 0
    checksum: str = ""
    mtime_ns: int = -1
    placed: bool = False     # renamed into the tree and committed: no temp file to remove


@dataclass
class Swap:
    """A file renamed into place, with what it replaced kept until the commit."""

    path: str
    backup: str | None     # name in tmp/ of the replaced file, if any
    staged: str = ""           # the new file's name in tmp/ before the rename (an undo puts it back)
    blob: str | None = None    # the replaced content's checksum, once it is in the blob store
    new_blob: bool = False     # ...and this swap put it there (its undo takes it out)
    kept: FileRecord | None = None   # what the blob holds (see FileStore.keepable)


@dataclass
class Removal:
    """A file moved from the tree into tmp/, until the commit."""

    path: str
    parked: str            # name in tmp/
    blob: str | None = None    # its content's checksum, once it is in the blob store
    new_blob: bool = False     # ...and this removal put it there
    kept: FileRecord | None = None   # what the blob holds (see FileStore.keepable)


def file_failure(exc: BaseException) -> Refused | None:
    """StorageFull or StorageFailing for an error of the disk, by its errno; None for others."""
    if is_full(exc):
        return StorageFull()
    if isinstance(exc, OSError):
        if exc.errno in (errno.EROFS, errno.EIO, errno.EACCES, errno.EPERM, errno.ENOENT):
            return StorageFailing()
    return None


def sync_folder(folder: Path) -> None:
    """fsync a folder: the entries made in it are durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is written."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def write_and_hash(fd: int, hasher: Any, data: bytes) -> None:
    """Write one chunk, then hash it (hashlib drops the GIL: fine in a worker thread); a
    failed write is cut back to where the chunk began, so that it can be written again."""
    start = os.lseek(fd, 0, os.SEEK_CUR)
    try:
        write_all(fd, data)
    except OSError:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, start)
            os.lseek(fd, start, os.SEEK_SET)
        raise
    hasher.update(data)


def sha256_of(handle: Any) -> str:
    """The SHA-256 of what is left to read of a binary file object."""
    hasher = hashlib.sha256()
    while chunk := handle.read(CHUNK_SIZE):
        hasher.update(chunk)
    return hasher.hexdigest()


def is_full(exc: BaseException) -> bool:
    """Whether an error is a full disk (or quota)."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


class SmallFile(io.BytesIO):
    """A small file's bytes, read at once, with the mtime they had (FileStore.describes)."""

    def __init__(self, data: bytes | bytearray, mtime_ns: int) -> None:
        super().__init__(data)
        self.mtime_ns = mtime_ns


class FileStore:
    """The tree of plain files under sync_directory, and .syncd/tmp/ beside it (in a
    cluster, .syncd/tmp/NODE/: each node empties its own at start, never another's).

    Every operation walks the tree from the root with O_NOFOLLOW and dir_fd, so
    a symlink planted in the tree is never followed, in or out.
    """

    def __init__(self, root: Path, node: str | None = None) -> None:
        self.root = root
        self.state_dir = root / STATE_DIR
        self.tmp_dir = self.state_dir / "tmp" / node if node else self.state_dir / "tmp"
        self.blob_dir = self.state_dir / "blobs"    # kept versions, one file per content
        self.upload_dir = self.state_dir / "uploads"   # resumable uploads: kept across starts
        # Our own pool for upload chunks, so that an aborted upload can wait for the
        # chunk still being written before it closes the file.
        self.writers = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="syncd-write")
        self._names = itertools.count()      # temp names: tmp/ is emptied at every start
        # Temp files made ahead by a writer thread: creating one can wait for the
        # filesystem's journal, which the uploads' fsyncs keep busy, and the event
        # loop must not wait with it (it spent a third of its time there).
        self._spare: collections.deque[tuple[str, int]] = collections.deque()
        self._refilling = False

    def close(self) -> None:
        """Stop the writer threads; remove the temp files made ahead."""
        self.writers.shutdown(wait=True)
        while self._spare:
            name, fd = self._spare.popleft()
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(self.tmp_dir / name)

    def _make_temp(self, kind: str = "upload") -> tuple[str, int]:
        """A new empty file in tmp/: its name and a descriptor open for writing."""
        name = f"{kind}-{next(self._names)}"
        return name, os.open(self.tmp_dir / name,
                             os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)

    def _refill(self) -> None:
        """In a writer thread: make temp files until SPARE_TEMP_FILES wait. A failure stops
        it quietly: the next upload then makes its own and meets the error itself."""
        try:
            while len(self._spare) < SPARE_TEMP_FILES:
                self._spare.append(self._make_temp("spare"))
        except OSError:
            pass
        finally:
            self._refilling = False

    async def _temp_file(self) -> tuple[str, int]:
        """A temp file for an upload: one made ahead, else one made now in a thread."""
        try:
            made = self._spare.popleft()
        except IndexError:
            made = await asyncio.to_thread(self._make_temp)
        if len(self._spare) < SPARE_TEMP_FILES // 2 and not self._refilling:
            self._refilling = True
            self.writers.submit(self._refill)
        return made

    def prepare(self) -> int:
        """Create .syncd/ and tmp/, private to us (0700); empty tmp/ of what a crash left
        there; return how many files that was."""
        for folder in (self.state_dir, self.state_dir / "tmp", self.tmp_dir, self.blob_dir,
                       self.upload_dir):
            folder.mkdir(mode=0o700, exist_ok=True)
            try:
                os.chmod(folder, 0o700)      # made world-readable by an older syncd
            except PermissionError:
                log.warning("cannot make %s private (owned by another user?)", folder)
        removed = 0
        for leftover in self.tmp_dir.iterdir():
            try:
                if stat.S_ISDIR(leftover.lstat().st_mode):
                    log.warning("%s is a folder we did not make (or another node's): left alone",
                                leftover)
                    continue
                leftover.unlink()
                removed += 1
            except FileNotFoundError:
                continue
        self.ensure_reserve()
        made = False
        for index in range(256):        # made once, so that a write never has to
            try:
                os.mkdir(self.blob_dir / f"{index:02x}", 0o700)
                made = True
            except FileExistsError:
                pass
        if made:
            fd = os.open(self.blob_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return removed

    # -- writing ---------------------------------------------------------------

    async def stage(self, chunks: AsyncIterator[bytes], max_size: int,
                    make_room: Callable[[int], Awaitable[bool]] | None = None) -> StagedFile:
        """Stream chunks into a new temp file, hashing and counting; TooLarge past max_size.
        On a full disk, make_room(bytes) may free space (True: it did): the chunk is written
        again, once."""
        staged = StagedFile(*await self._temp_file())
        fd = staged.fd
        hasher = hashlib.sha256()
        # One chunk is hashed and written in a worker thread while the event loop
        # receives the next: network, hashing and the disk overlap.
        writing: concurrent.futures.Future[None] | None = None
        pending = b""                                  # the chunk the worker writes
        retried = False

        async def rewrite_if_full(exc: OSError) -> None:
            nonlocal retried
            if not is_full(exc) or retried or make_room is None \
                    or not await make_room(len(pending)):
                raise exc
            retried = True
            await asyncio.to_thread(write_and_hash, fd, hasher, pending)

        async def settle() -> None:
            nonlocal writing
            assert writing is not None
            try:
                await asyncio.wrap_future(writing)
            except OSError as exc:
                await rewrite_if_full(exc)
            finally:
                writing = None
        try:
            async for chunk in chunks:
                staged.size += len(chunk)
                if staged.size > max_size:
                    raise TooLarge(f"the file exceeds max_file_size ({max_size} bytes)")
                if writing is not None:
                    await settle()
                pending = chunk
                if len(chunk) <= INLINE_LIMIT and staged.size == len(chunk):
                    try:       # a small file: a thread hop costs more than the write
                        write_and_hash(fd, hasher, chunk)
                    except OSError as exc:
                        await rewrite_if_full(exc)
                else:
                    writing = self.writers.submit(write_and_hash, fd, hasher, chunk)
            if writing is not None:
                await settle()
        except BaseException:
            if writing is not None:
                concurrent.futures.wait([writing])     # never close a file a thread writes to
            self.discard(staged)
            raise
        staged.checksum = hasher.hexdigest()
        return staged

    def seal(self, staged: StagedFile, modified_time: float) -> None:
        """Set the mtime, fsync and close the temp file (in a worker thread); once."""
        if staged.fd < 0:
            return
        os.utime(staged.fd, (modified_time, modified_time))
        staged.mtime_ns = os.fstat(staged.fd).st_mtime_ns
        os.fsync(staged.fd)
        os.close(staged.fd)
        staged.fd = -1

    def discard(self, staged: StagedFile) -> None:
        """Close and remove a temp file that will not be used (none once it is placed)."""
        if staged.fd >= 0:
            os.close(staged.fd)
            staged.fd = -1
        if not staged.placed:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.tmp_dir / staged.name)

    def _walk(self, folders: Sequence[str], create: bool) -> int:
        """Open the folder at the end of folders, from the root, with O_NOFOLLOW.

        At most two descriptors are open at a time, whatever the depth (a path
        may have 2,048 levels), and a folder we create is fsynced at once, so
        its entry is durable before anything is renamed into it.
        """
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for name in folders:
                child = self._open_folder(fd, name, create)
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd

    @staticmethod
    def _open_folder(parent: int, name: str, create: bool) -> int:
        """The folder name in parent (made if create and missing); FolderBlocked if not a folder."""
        try:
            try:
                return os.open(name, DIR_FLAGS, dir_fd=parent)
            except FileNotFoundError:
                if not create:
                    raise
            try:
                os.mkdir(name, 0o777, dir_fd=parent)     # the umask decides, as for files
            except FileExistsError:
                pass                                      # made meanwhile by another upload
            else:
                os.fsync(parent)
            return os.open(name, DIR_FLAGS, dir_fd=parent)
        except OSError as exc:
            if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                raise FolderBlocked(name) from None
            raise

    def _tmp_fd(self) -> int:
        return os.open(self.tmp_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    # -- resumable uploads: .syncd/uploads/ID, the bytes received so far ------------

    def new_partial(self, upload_id: str) -> None:
        """An empty file for a new resumable upload, its entry durable."""
        os.close(os.open(self.upload_dir / upload_id,
                         os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
        sync_folder(self.upload_dir)

    def open_partial(self, upload_id: str, offset: int) -> int:
        """A descriptor of a resumable upload's file, cut back to offset (bytes past the last
        acknowledged offset are dropped: they were never confirmed) and positioned there."""
        fd = os.open(self.upload_dir / upload_id, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.ftruncate(fd, offset)
            os.lseek(fd, offset, os.SEEK_SET)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def hash_partial(self, upload_id: str, length: int) -> Any:
        """A SHA-256 of the first length bytes of a resumable upload (to go on after a
        restart: a hash state cannot be stored)."""
        hasher = hashlib.sha256()
        with open(self.upload_dir / upload_id, "rb") as handle:
            left = length
            while left and (chunk := handle.read(min(CHUNK_SIZE, left))):
                hasher.update(chunk)
                left -= len(chunk)
        return hasher

    def stage_partial(self, upload_id: str, size: int, checksum: str) -> StagedFile:
        """A completed resumable upload as a staged file in tmp/ (a second name for the same
        bytes: the upload keeps its own until the commit, for a retry)."""
        name = f"upload-{next(self._names)}"
        os.link(self.upload_dir / upload_id, self.tmp_dir / name)
        fd = os.open(self.tmp_dir / name, os.O_WRONLY | os.O_CLOEXEC)
        return StagedFile(name, fd, size, checksum)

    def remove_partial(self, upload_id: str) -> None:
        """Remove a resumable upload's file."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.upload_dir / upload_id)

    def swap_in(self, staged: StagedFile, path: str, keep: FileRecord | None = None,
                sync: bool = True) -> Swap:
        """Rename a sealed temp file over path, keep the old one in tmp/, fsync the folder
        (unless sync is False: a group commit fsyncs each folder once, see sync_folders).

        keep: the old file's record, to keep it as a version: it is hard-linked into
        the blob store (durably) before the rename, so that a crash at any moment
        leaves the old content live or kept (swap.kept says what it holds).
        """
        *folders, name = path.split("/")
        parent = self._walk(folders, create=True)
        tmp_fd = self._tmp_fd()
        swap = Swap(path, None, staged.name)
        try:
            try:
                old = os.stat(name, dir_fd=parent, follow_symlinks=False)
            except FileNotFoundError:
                old = None
            if old is not None and stat.S_ISDIR(old.st_mode):
                raise FolderBlocked(name)
            try:
                if old is not None and stat.S_ISREG(old.st_mode):
                    backup = f"old-{uuid.uuid4().hex}"
                    os.link(name, backup, src_dir_fd=parent, dst_dir_fd=tmp_fd,
                            follow_symlinks=False)
                    swap.backup = backup
                    if keep is not None:
                        swap.kept = self.keepable(keep, backup, tmp_fd)
                        swap.blob = swap.kept.checksum
                        swap.new_blob = self._link_blob(swap.backup, tmp_fd, swap.blob)
                        self._sync_blob_dirs([swap.blob])
                os.rename(staged.name, name, src_dir_fd=tmp_fd, dst_dir_fd=parent)
            except BaseException:
                self._drop_new_blob(swap.blob if swap.new_blob else None)
                if swap.backup is not None:
                    os.unlink(swap.backup, dir_fd=tmp_fd)
                raise
            try:
                if sync:
                    os.fsync(parent)
            except BaseException:
                self._undo_swap_in(swap, parent, tmp_fd)
                raise
        finally:
            os.close(parent)
            os.close(tmp_fd)
        return swap

    def swap_many(self, items: Sequence[tuple[StagedFile, str, FileRecord | None]]) -> list[Swap]:
        """swap_in of each (staged, path, keep), then one fsync of each folder; on a failure
        the swaps made are undone and the error raised."""
        swaps: list[Swap] = []
        try:
            for staged, path, keep in items:
                swaps.append(self.swap_in(staged, path, keep, sync=False))
            self.sync_folders([path for _, path, _ in items])
        except BaseException:
            for swap in reversed(swaps):
                try:
                    self.undo_swap(swap)
                except OSError:
                    log.exception("could not undo the rename of %s", swap.path)
            raise
        return swaps

    def rename(self, source: str, target: str) -> None:
        """Move a file or a folder within the tree, making target's folders, and fsync both
        folders. FolderBlocked when something is at target on disk (an empty folder
        excepted, which a folder replaces) or a file is where one of its folders must go;
        FileNotFoundError when source is not on disk. Empty folders left at the source are
        removed."""
        *source_folders, source_name = source.split("/")
        *target_folders, target_name = target.split("/")
        from_fd = self._walk(source_folders, create=False)
        try:
            moving = os.stat(source_name, dir_fd=from_fd, follow_symlinks=False)
            to_fd = self._walk(target_folders, create=True)
            try:
                try:
                    there = os.stat(target_name, dir_fd=to_fd, follow_symlinks=False)
                except FileNotFoundError:
                    there = None
                if there is not None and not (stat.S_ISDIR(there.st_mode)
                                              and stat.S_ISDIR(moving.st_mode)):
                    raise FolderBlocked(target)
                try:
                    os.rename(source_name, target_name, src_dir_fd=from_fd, dst_dir_fd=to_fd)
                except OSError as exc:
                    if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                        raise FolderBlocked(target) from None
                    raise
                os.fsync(to_fd)
            finally:
                os.close(to_fd)
            os.fsync(from_fd)
        finally:
            os.close(from_fd)
        self._prune(source_folders)

    def lexists(self, path: str) -> bool:
        """Whether anything is at path (a symlink is not followed)."""
        *folders, name = path.split("/")
        try:
            parent = self._walk(folders, create=False)
        except (FileNotFoundError, FolderBlocked):
            return False
        try:
            os.stat(name, dir_fd=parent, follow_symlinks=False)
            return True
        except FileNotFoundError:
            return False
        finally:
            os.close(parent)

    def sync_folders(self, paths: Iterable[str]) -> None:
        """fsync the folder of each path once (the renames of a group commit)."""
        for folder in sorted({path.rpartition("/")[0] for path in paths}):
            fd = self._walk(folder.split("/") if folder else [], create=False)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    # -- the blob store: kept versions, one hard link per content ------------------

    def _blob_path(self, checksum: str) -> Path:
        return self.blob_dir / checksum[:2] / checksum

    @staticmethod
    def keepable(record: FileRecord, name: str, dir_fd: int) -> FileRecord:
        """What keeping the file name (in dir_fd) as record's content keeps: record, or, when
        the file is not what record says (its size or mtime: changed behind the server's
        back, or renamed into place by a cluster node that died before its commit), its
        own bytes, hashed now, so that a blob always holds what its checksum says."""
        with os.fdopen(os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                               dir_fd=dir_fd), "rb") as handle:
            status = os.fstat(handle.fileno())
            if record.mtime_ns < 0 or (status.st_size, status.st_mtime_ns) == (
                    record.size, record.mtime_ns):
                return record
            checksum = sha256_of(handle)
        log.warning("%s was not what its record says (changed behind the server's back?): "
                    "its own bytes are kept as the version", record.path)
        return record._replace(checksum=checksum, size=status.st_size,
                               modified_time=status.st_mtime, mtime_ns=status.st_mtime_ns)

    def _link_blob(self, name: str, dir_fd: int, checksum: str) -> bool:
        """Hard-link a file into the blob store as checksum; False when that content is kept
        already (identical content is kept once)."""
        try:
            os.link(name, self._blob_path(checksum), src_dir_fd=dir_fd, follow_symlinks=False)
        except FileExistsError:
            return False
        return True

    def _sync_blob_dirs(self, checksums: Iterable[str]) -> None:
        """fsync the blob folders these checksums live in, so that their links are durable."""
        for prefix in sorted({checksum[:2] for checksum in checksums}):
            fd = os.open(self.blob_dir / prefix, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _drop_new_blob(self, checksum: str | None) -> None:
        if checksum is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._blob_path(checksum))

    def open_blob(self, checksum: str) -> Any:
        """A binary file object for a kept content; NotRegular if it is not there."""
        try:
            fd = os.open(self._blob_path(checksum),
                         os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ELOOP, errno.ENXIO):
                raise NotRegular(checksum) from None
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise NotRegular(checksum)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")

    def stage_blob(self, checksum: str, live_copy: str | None = None) -> StagedFile:
        """A copy of a kept content as a new temp file, hashed on the way (a restore writes a
        new file: the blob is never put back into the tree, where it could be edited). When
        it is not kept: a copy of the live file live_copy, if that hashes to checksum."""
        staged = StagedFile(*self._make_temp())
        fd = staged.fd
        hasher = hashlib.sha256()
        try:
            source, kept = self._kept_or_live(checksum, live_copy)
            with source:
                while chunk := source.read(CHUNK_SIZE):
                    write_and_hash(fd, hasher, chunk)
                    staged.size += len(chunk)
            staged.checksum = hasher.hexdigest()
            if staged.checksum != checksum:      # a live file may have changed since its record
                if kept:
                    log.error("the kept content %s is damaged: its bytes hash to %s",
                              checksum, staged.checksum)
                raise NotRegular(checksum)
        except BaseException:
            self.discard(staged)
            raise
        return staged

    def _kept_or_live(self, checksum: str, live_copy: str | None) -> tuple[Any, bool]:
        """The kept content open for reading, or else the live file live_copy; and whether
        it is the kept one."""
        try:
            return self.open_blob(checksum), True
        except NotRegular:
            if live_copy is None:
                raise
            return self.open_read(live_copy), False

    # -- the reserve: space a full disk gives back, so that versions can be pruned --

    def ensure_reserve(self, spare: int = 2 * RESERVE_BYTES) -> bool:
        """Make .syncd/reserve (RESERVE_BYTES of zeros) if it is missing and the disk has
        spare bytes free; whether it is there."""
        reserve = self.state_dir / "reserve"
        try:
            if reserve.stat().st_size == RESERVE_BYTES:
                return True
        except FileNotFoundError:
            pass
        status = os.statvfs(self.state_dir)
        if status.f_bavail * status.f_frsize < spare:
            return False
        try:
            fd = os.open(reserve, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                write_all(fd, bytes(RESERVE_BYTES))
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                reserve.unlink()
            if not is_full(exc):
                raise
            return False
        return True

    def release_reserve(self) -> bool:
        """Remove the reserve (the disk is full: pruning needs room to write to the
        database); whether there was one."""
        try:
            (self.state_dir / "reserve").unlink()
        except FileNotFoundError:
            return False
        return True

    def has_blob(self, checksum: str) -> bool:
        """Whether a content is in the blob store."""
        return os.path.isfile(self._blob_path(checksum))

    def remove_blobs(self, checksums: Iterable[str]) -> None:
        """Remove blobs no version refers to any more."""
        for checksum in checksums:
            self._drop_new_blob(checksum)

    def list_blobs(self) -> dict[str, int]:
        """Every blob on disk: its checksum and size."""
        found = {}
        for folder in self.blob_dir.iterdir():
            if folder.is_dir() and not folder.is_symlink():
                for entry in os.scandir(folder):
                    if CHECKSUM_RE.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                        found[entry.name] = entry.stat(follow_symlinks=False).st_size
        return found

    def undo_swap(self, swap: Swap) -> None:
        """Put back what swap_in replaced (or remove the new file)."""
        parent = self._walk(swap.path.split("/")[:-1], create=False)
        tmp_fd = self._tmp_fd()
        try:
            self._undo_swap_in(swap, parent, tmp_fd)
        finally:
            os.close(parent)
            os.close(tmp_fd)

    def _undo_swap_in(self, swap: Swap, parent: int, tmp_fd: int) -> None:
        """Put the old file back, and the new one back in tmp/ (a retry may use it)."""
        name = swap.path.rsplit("/", 1)[-1]
        self._drop_new_blob(swap.blob if swap.new_blob else None)
        os.rename(name, swap.staged, src_dir_fd=parent, dst_dir_fd=tmp_fd)
        if swap.backup is not None:
            os.rename(swap.backup, name, src_dir_fd=tmp_fd, dst_dir_fd=parent)
        os.fsync(parent)

    def finish_swaps(self, swaps: Iterable[Swap]) -> None:
        """Drop the replaced files once the new ones are committed (in a worker thread: an
        unlink can wait for the journal)."""
        for swap in swaps:
            if swap.backup is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.tmp_dir / swap.backup)

    def remove_many(self, paths: Sequence[str],
                    keep: Mapping[str, FileRecord] | None = None) -> list[Removal]:
        """Move paths out of the tree into tmp/, one walk and one fsync per folder; the
        paths not on disk are left out. On a failure, what was moved is put back.

        keep: path -> record of the files to keep as versions: each is hard-linked
        into the blob store, durably, before it leaves the tree (removal.kept says what
        it holds).
        """
        removals: list[Removal] = []
        by_folder: dict[str, list[str]] = {}
        for path in paths:
            folder, _, name = path.rpartition("/")
            by_folder.setdefault(folder, []).append(name)
        tmp_fd = self._tmp_fd()
        try:
            for folder, names in by_folder.items():
                try:
                    parent = self._walk(folder.split("/") if folder else [], create=False)
                except (FileNotFoundError, FolderBlocked):
                    continue
                try:
                    removals.extend(self._remove_from(parent, folder, names, tmp_fd, keep or {}))
                finally:
                    os.close(parent)
        except BaseException:
            for removal in reversed(removals):
                self.undo_remove(removal)
            raise
        finally:
            os.close(tmp_fd)
        return removals

    def _remove_from(self, parent: int, folder: str, names: Sequence[str], tmp_fd: int,
                     keep: Mapping[str, FileRecord]) -> list[Removal]:
        """remove_many for the names of one folder."""
        pending = [Removal(f"{folder}/{name}" if folder else name, f"del-{uuid.uuid4().hex}")
                   for name in names]
        done: list[Removal] = []
        try:
            for removal in pending:
                record = keep.get(removal.path)
                if record is not None:
                    name = removal.path.rsplit("/", 1)[-1]
                    with contextlib.suppress(FileNotFoundError):      # gone: nothing to keep
                        kept = self.keepable(record, name, parent)
                        removal.new_blob = self._link_blob(name, parent, kept.checksum)
                        removal.blob, removal.kept = kept.checksum, kept
            self._sync_blob_dirs(r.blob for r in pending if r.new_blob and r.blob)
            for removal in pending:
                try:
                    os.rename(removal.path.rsplit("/", 1)[-1], removal.parked,
                              src_dir_fd=parent, dst_dir_fd=tmp_fd)
                except FileNotFoundError:
                    self._drop_new_blob(removal.blob if removal.new_blob else None)
                    continue
                done.append(removal)
            os.fsync(parent)
        except BaseException:
            for removal in reversed(done):
                self.undo_remove(removal)
            for removal in pending:
                if removal not in done:
                    self._drop_new_blob(removal.blob if removal.new_blob else None)
            raise
        return done

    def undo_remove(self, removal: Removal) -> None:
        """Put a removed file back where it was (and take out the blob it put in the store)."""
        self._drop_new_blob(removal.blob if removal.new_blob else None)
        *folders, name = removal.path.split("/")
        parent = self._walk(folders, create=True)
        tmp_fd = self._tmp_fd()
        try:
            os.rename(removal.parked, name, src_dir_fd=tmp_fd, dst_dir_fd=parent)
            os.fsync(parent)
        finally:
            os.close(parent)
            os.close(tmp_fd)

    def finish_removals(self, removals: Sequence[Removal]) -> None:
        """Delete parked files for good, and the folders their removal left empty."""
        for removal in removals:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.tmp_dir / removal.parked)
        for folder in sorted({removal.path.rpartition("/")[0] for removal in removals},
                             reverse=True):
            if folder:
                self._prune(folder.split("/"))

    def _prune(self, folders: list[str]) -> None:
        """Remove the folder at the end of folders if it is empty, then its parents."""
        if not folders:
            return
        try:
            fd = self._walk(folders[:-1], create=False)
        except (FileNotFoundError, FolderBlocked):
            return
        try:
            # Upwards through "..": one descriptor at a time, however deep the path.
            for depth in range(len(folders), 0, -1):
                try:
                    os.rmdir(folders[depth - 1], dir_fd=fd)
                except OSError:
                    break   # not empty (or gone): the folders above are not empty either
                if depth == 1:
                    break
                parent = os.open("..", DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = parent
        finally:
            os.close(fd)

    # -- reading ---------------------------------------------------------------

    def open_read(self, path: str) -> Any:
        """A binary file object for path; NotRegular unless it is a regular file."""
        fd = self._open_regular(path)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")

    def read_small(self, path: str, cached_only: bool) -> Any:
        """The bytes of path, in a BytesIO, when it is at most INLINE_LIMIT long (else a file
        object, as open_read); NotCached if cached_only and the page cache does not hold
        them all."""
        fd = self._open_regular(path)
        try:
            status = os.fstat(fd)
            size = status.st_size
            if size > INLINE_LIMIT:
                os.set_blocking(fd, True)
                handle, fd = os.fdopen(fd, "rb"), -1
                return handle
            if not cached_only:
                return SmallFile(os.pread(fd, size, 0), status.st_mtime_ns)
            buffer = bytearray(size)
            try:
                if os.preadv(fd, [buffer], 0, os.RWF_NOWAIT) == size:
                    return SmallFile(buffer, status.st_mtime_ns)
            except OSError as exc:    # EAGAIN: not all cached; EOPNOTSUPP: not on this filesystem
                if exc.errno not in (errno.EAGAIN, errno.EOPNOTSUPP):
                    raise
            raise NotCached(path)
        finally:
            if fd != -1:
                os.close(fd)

    @staticmethod
    def describes(handle: Any, record: FileRecord) -> bool:
        """Whether an open file (open_read, read_small) has the size and mtime its record
        says (a record from before mtimes were kept is believed)."""
        if record.mtime_ns < 0:
            return True
        if isinstance(handle, SmallFile):
            return (len(handle.getbuffer()), handle.mtime_ns) == (record.size, record.mtime_ns)
        status = os.fstat(handle.fileno())
        return (status.st_size, status.st_mtime_ns) == (record.size, record.mtime_ns)

    def _open_regular(self, path: str) -> int:
        """A descriptor of path opened for reading; NotRegular unless it is a regular file.

        O_NONBLOCK: opening a FIFO for reading would otherwise wait for a
        writer (and a device file may do anything); the type is checked on
        the open descriptor, so nothing can be swapped in between.
        """
        *folders, name = path.split("/")
        try:
            parent = self._walk(folders, create=False)
        except (FileNotFoundError, FolderBlocked):
            raise NotRegular(path) from None
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                         dir_fd=parent)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ELOOP, errno.ENXIO, errno.ENOTDIR):
                raise NotRegular(path) from None     # gone, a symlink, a socket
            raise
        finally:
            os.close(parent)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise NotRegular(path)
        return fd

    def usable(self) -> bool:
        """Whether the tree is a writable folder."""
        return self.root.is_dir() and os.access(self.root, os.W_OK | os.X_OK)


# ===========================================================================
# Start-up recovery: reconcile the database with the tree
# ===========================================================================

SERVER_CLIENT_ID = "server"   # the author of changes found on disk at start-up
RECOVERY_BATCH = 500          # files hashed and committed per transaction


class MassVanish(Exception):
    """Most of the files known to be there are missing (an unmounted disk or folder?): their
    deletion is not recorded. Raised by start-up recovery and by the client alike."""


@dataclass
class RecoveryReport:
    """What start-up recovery found."""

    unchanged: int = 0
    added: int = 0
    modified: int = 0
    touched: int = 0
    vanished: int = 0
    skipped: list[str] = field(default_factory=list)      # not servable: kept as they are
    unreadable: list[str] = field(default_factory=list)   # not readable: not taken as gone
    versions_adopted: int = 0   # blobs of changes that crashed before their commit
    versions_lost: int = 0      # versions whose blob was missing
    orphans_removed: int = 0    # blobs no version refers to

    def summary(self) -> str:
        """One log line."""
        return (f"{self.unchanged} unchanged, {self.added} added, {self.modified} modified, "
                f"{self.touched} touched, {self.vanished} gone (tombstoned), "
                f"{len(self.skipped)} skipped, {len(self.unreadable)} unreadable; versions: "
                f"{self.versions_adopted} adopted, {self.versions_lost} lost (blob missing), "
                f"{self.orphans_removed} orphan blob(s) removed")


def is_mass_vanish(missing: int, known: int) -> bool:
    """More than half of the live files gone, two at least: an unmounted disk, not a cleanup."""
    return missing >= 2 and 2 * missing > known


def guard_vanished(missing: int, known: int, accept_deletions: bool, refusal: str) -> None:
    """MassVanish (refusal, formatted with {missing} and {known}) when is_mass_vanish holds
    and the user did not say --accept-deletions."""
    if is_mass_vanish(missing, known) and not accept_deletions:
        raise MassVanish(refusal.format(missing=missing, known=known))


@dataclass
class TreeScan:
    """What a walk of the tree found."""

    found: dict[str, os.stat_result] = field(default_factory=dict)   # regular files, by path
    skipped: list[str] = field(default_factory=list)     # names that cannot be served
    unreadable: set[str] = field(default_factory=set)    # files and folders we could not look at

    def hides(self, path: str) -> bool:
        """Whether path is, or is under, something we could not look at (so not known gone)."""
        dark = self.unreadable
        if not dark:
            return False
        if "" in dark or path in dark:         # "": the root itself could not be listed
            return True
        index = path.find("/")
        while index != -1:
            if path[:index] in dark:
                return True
            index = path.find("/", index + 1)
        return False


@dataclass
class Folder:
    """One folder on the walk's stack: its descriptor (None once closed) and the
    subfolders still to visit."""

    path: str
    fd: int | None
    subfolders: list[str] = field(default_factory=list)


WALK_OPEN_FOLDERS = 64     # descriptors the walk keeps open along its path


def scan_tree(root: Path, exclude: Callable[[str], bool] | None = None) -> TreeScan:
    """Every regular file under root but .syncd/ and what exclude(path) names (files and
    whole folders), by path, without following symlinks. The server's start-up recovery
    and the client's scans share it.

    Iterative, and with descriptors (openat) rather than path names, so that a
    tree 2,048 levels deep or longer than PATH_MAX is walked like any other.
    Only the last WALK_OPEN_FOLDERS folders of the path stay open; one deeper
    than that is opened again from its nearest open ancestor when the walk
    comes back to it.  What cannot be read is reported, never taken as gone.
    """
    scan = TreeScan()
    stack = [Folder("", os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))]
    try:
        list_folder(stack[0], scan, exclude)
        while stack:
            top = stack[-1]
            if not top.subfolders:
                if top.fd is not None:
                    os.close(top.fd)
                stack.pop()
                continue
            name = top.subfolders.pop()
            if top.fd is None and not reopen_folder(stack, scan):
                continue
            assert top.fd is not None
            child = Folder(f"{top.path}/{name}" if top.path else name, None)
            try:
                child.fd = os.open(name, DIR_FLAGS, dir_fd=top.fd)
            except FileNotFoundError:
                continue                      # removed while we walk
            except OSError as exc:
                if exc.errno not in (errno.ENOTDIR, errno.ELOOP):   # else: replaced meanwhile
                    scan.unreadable.add(child.path)
                continue
            stack.append(child)
            list_folder(child, scan, exclude)
            if len(stack) > WALK_OPEN_FOLDERS + 1:
                far = stack[-WALK_OPEN_FOLDERS - 1]
                if far.fd is not None and far is not stack[0]:
                    os.close(far.fd)
                    far.fd = None
    finally:
        for folder in stack:
            if folder.fd is not None:
                os.close(folder.fd)
    return scan


def list_folder(folder: Folder, scan: TreeScan,
                exclude: Callable[[str], bool] | None = None) -> None:
    """Sort one folder's entries into files, subfolders, skipped and unreadable names."""
    assert folder.fd is not None
    prefix = folder.path + "/" if folder.path else ""
    try:
        with os.scandir(folder.fd) as entries:
            names = [entry.name for entry in entries]
    except OSError:
        scan.unreadable.add(folder.path)
        return
    for name in names:
        path = prefix + name
        if (not folder.path and name == STATE_DIR) or (exclude is not None and exclude(path)):
            continue
        try:
            status = os.stat(name, dir_fd=folder.fd, follow_symlinks=False)
        except FileNotFoundError:
            continue
        except OSError:                        # a folder we may list but not enter (r--)
            scan.unreadable.add(path)
            continue
        if stat.S_ISDIR(status.st_mode):
            folder.subfolders.append(name)
        elif not stat.S_ISREG(status.st_mode) or not is_stored_form(path):
            scan.skipped.append(path)          # symlinks, FIFOs, sockets, devices, bad names
        else:
            scan.found[path] = status


def reopen_folder(stack: list[Folder], scan: TreeScan) -> bool:
    """Open the top folder again from its nearest open ancestor; False if it is gone."""
    index = max(i for i, folder in enumerate(stack) if folder.fd is not None)
    for depth in range(index + 1, len(stack)):
        parent, folder = stack[depth - 1], stack[depth]
        assert parent.fd is not None
        try:
            folder.fd = os.open(folder.path.rsplit("/", 1)[-1], DIR_FLAGS, dir_fd=parent.fd)
        except OSError:
            scan.unreadable.add(folder.path)   # moved or changed meanwhile: not known gone
            for rest in stack[depth:]:
                rest.subfolders.clear()
            return False
    for folder in stack[1:len(stack) - WALK_OPEN_FOLDERS]:
        if folder.fd is not None:
            os.close(folder.fd)
            folder.fd = None
    return True


def hash_steady(open_file: Callable[[], Any]) -> tuple[str, os.stat_result] | None:
    """The checksum of a file and the status it had while read; None if it is gone or
    kept changing (three tries). Shared by start-up recovery and the client's scans."""
    for _ in range(3):
        try:
            with open_file() as handle:
                before = os.fstat(handle.fileno())
                checksum = sha256_of(handle)
                after = os.fstat(handle.fileno())
        except FileNotFoundError:
            return None
        if (before.st_size, before.st_mtime_ns) == (after.st_size, after.st_mtime_ns):
            return checksum, after
    return None


def hash_on_disk(files: FileStore, path: str) -> tuple[str, os.stat_result] | None:
    """hash_steady of a file in the tree, opened without following symlinks."""
    return hash_steady(lambda: files.open_read(path))


@dataclass
class Recovery:
    """The part of start-up recovery that must happen before serving, and what is left:
    files whose size or mtime changed, to hash in the background."""

    report: RecoveryReport
    suspects: list[tuple[str, FileRecord | None]]     # path, and its record (or tombstone) then
    pending: set[str] = field(default_factory=set)    # live records not yet checked: stale?


async def recover(store: MetadataStore, files: FileStore, accept_deletions: bool) -> Recovery:
    """Tombstone what vanished from the tree while we were not running; list what to rehash.

    Only a stat of each file, so it is quick even over 100,000 files: a file
    whose size and mtime match its record is taken as unchanged, unread.
    Files gone from disk get tombstones (as client "server"), unless most are
    gone (MassVanish) and accept_deletions is off.  Whatever could not be
    looked at (an unreadable folder, a FIFO where a file was) is not gone.
    """
    report = RecoveryReport()
    scan = await asyncio.to_thread(scan_tree, files.root)
    report.skipped, report.unreadable = scan.skipped, sorted(scan.unreadable)
    records, _ = store.snapshot()
    live = {path: record for path, record in records.items() if not record.deleted}
    present = set(scan.skipped)
    missing = [record for path, record in live.items()
               if path not in scan.found and path not in present and not scan.hides(path)]
    guard_vanished(len(missing), len(live), accept_deletions, (
        "refusing to start: {missing} of the {known} files the database knows are missing "
        f"from {files.root} (an unmounted disk?); nothing was changed. If they were deleted "
        "on purpose, start once with --accept-deletions to record the deletions."))
    suspects = [(path, records.get(path)) for path, status in sorted(scan.found.items())
                if path not in live or (live[path].size, live[path].mtime_ns)
                != (status.st_size, status.st_mtime_ns)]
    report.unchanged = len(scan.found) - len(suspects)
    pending = {path for path, record in suspects if record is not None and not record.deleted}
    blobs = await asyncio.to_thread(files.list_blobs)
    lost = await store.blob_checksums() - set(blobs)
    async with store.transaction() as tx:
        # Versions whose blob is gone (removed by hand, a disk error) cannot be restored.
        if lost:
            await tx.drop_versions(await tx.versions_with(lost))
            report.versions_lost = -tx.versions
        for record in missing:
            tomb = await tx.record_delete(record, SERVER_CLIENT_ID)
            if record.checksum in blobs:    # a delete that crashed before its commit kept it
                await tx.record_version(record, tomb, "delete")
                report.versions_adopted += 1
    report.vanished = len(missing)
    return Recovery(report, suspects, pending)


def hash_for_recovery(files: FileStore, path: str) -> tuple[str, os.stat_result] | None | OSError:
    """hash_on_disk, with a file that cannot be read returned as its error."""
    try:
        return hash_on_disk(files, path)
    except OSError as exc:
        return exc


async def rehash_suspects(transaction: Callable[[], contextlib.AbstractAsyncContextManager[Transaction]],
                          files: FileStore, recovery: Recovery,
                          announce: Callable[[FileRecord], None]) -> RecoveryReport:
    """Hash the files that changed behind our back and journal them, while we serve.

    A 20 GB file must not keep the server from listening, so this runs after
    start.  A client may write one of these paths meanwhile: a record that is
    no longer the one we scanned is left alone, since the client's is newer.
    """
    report = recovery.report
    for start in range(0, len(recovery.suspects), RECOVERY_BATCH):
        batch = recovery.suspects[start:start + RECOVERY_BATCH]
        hashed = await asyncio.to_thread(
            lambda items: [hash_for_recovery(files, path) for path, _ in items], batch)
        try:
            await journal_rehashed(transaction, files, batch, hashed, report, announce)
        finally:
            recovery.pending.difference_update(path for path, _ in batch)
    return report


async def journal_rehashed(transaction: Callable[[], contextlib.AbstractAsyncContextManager[Transaction]],
                           files: FileStore, batch: Sequence[tuple[str, FileRecord | None]],
                           hashed: Sequence[tuple[str, os.stat_result] | None | OSError],
                           report: RecoveryReport,
                           announce: Callable[[FileRecord], None]) -> None:
    """Commit one batch of rehashed files (see rehash_suspects). A replaced content whose
    blob is in the store (an overwrite that crashed before its commit) becomes a version."""
    async with transaction() as tx:
        for (path, old), result in zip(batch, hashed, strict=True):
            if isinstance(result, OSError):
                report.unreadable.append(path)
                continue
            if result is None:
                report.skipped.append(path)
                continue
            if tx.get(path) != old:
                continue                       # written by a client since the scan
            checksum, status = result
            if old is not None and not old.deleted and old.checksum == checksum:
                await tx.record_mtime(path, status.st_mtime_ns)
                report.touched += 1
                continue
            record = await tx.record_upsert(path, checksum, status.st_size, status.st_mtime,
                                            SERVER_CLIENT_ID, status.st_mtime_ns)
            if old is not None and not old.deleted and files.has_blob(old.checksum):
                await tx.record_version(old, record, "overwrite")
                report.versions_adopted += 1
            tx.after_commit.append(lambda record=record: announce(record))
            if old is None or old.deleted:
                report.added += 1
            else:
                report.modified += 1


# ===========================================================================
# Sync planning: the pure function behind POST /sync
# ===========================================================================

class ClientEntry(NamedTuple):
    """One file as a client lists it in POST /sync (a NamedTuple: see FileRecord)."""

    path: str
    checksum: str
    size: int
    modified_time: float
    base_checksum: str | None    # None: the client keeps no state

    def to_json(self) -> dict[str, Any]:
        """The entry as the client sent it."""
        entry: dict[str, Any] = {"path": self.path, "checksum": self.checksum,
                                 "size": self.size, "modified_time": self.modified_time}
        if self.base_checksum is not None:
            entry["base_checksum"] = self.base_checksum
        return entry


@dataclass(frozen=True, slots=True)
class SyncConflict:
    """A path that both sides changed."""

    entry: ClientEntry
    reason: str                  # "both_modified" or "server_newer"
    server: FileRecord

    def to_json(self) -> dict[str, Any]:
        """The contract's conflict entry."""
        return {"path": self.entry.path, "reason": self.reason,
                "client": self.entry.to_json(), "server": self.server.to_json()}


@dataclass
class SyncPlan:
    """What a client should do, path by path."""

    upload: list[str] = field(default_factory=list)
    download: list[FileRecord] = field(default_factory=list)
    delete: list[FileRecord] = field(default_factory=list)
    conflicts: list[SyncConflict] = field(default_factory=list)

    def to_json(self, epoch: str, cursor: int) -> dict[str, Any]:
        """The contract's SyncResponse."""
        return {"epoch": epoch, "upload": self.upload,
                "download": [record.to_json() for record in self.download],
                "delete": [{"path": r.path, "revision": r.revision} for r in self.delete],
                "conflicts": [conflict.to_json() for conflict in self.conflicts],
                "cursor": cursor}


def plan_entry(entry: ClientEntry, server: FileRecord | None, plan: SyncPlan) -> None:
    """Apply rules 1, 2, 4, 5 and 6 of the contract to one listed path."""
    if server is None:
        plan.upload.append(entry.path)                       # 2: never seen
    elif server.deleted:
        # 5: a modification beats a deletion.  Beyond the letter of the contract,
        # base "" (the client says its copy never came from the server) is a
        # re-creation, never deleted on the strength of someone else's delete.
        if entry.checksum == server.checksum and entry.base_checksum != "":
            plan.delete.append(server)
        else:
            plan.upload.append(entry.path)
    elif entry.checksum == server.checksum:
        return                                               # 1: in sync
    elif entry.base_checksum is not None:                    # 4: three-way
        if entry.base_checksum == server.checksum:
            plan.upload.append(entry.path)
        elif entry.base_checksum == entry.checksum:
            plan.download.append(server)
        else:
            plan.conflicts.append(SyncConflict(entry, "both_modified", server))
    elif entry.modified_time > server.modified_time:         # 6: no state, newer wins
        plan.upload.append(entry.path)
    else:
        plan.conflicts.append(SyncConflict(entry, "server_newer", server))


def plan_sync(entries: Sequence[ClientEntry], server: Mapping[str, FileRecord]) -> SyncPlan:
    """The plan for a client's listing against the server's records (live and tombstones)."""
    plan = SyncPlan()
    for entry in entries:
        plan_entry(entry, server.get(entry.path), plan)
    listed = {entry.path for entry in entries}
    plan.download.extend(                                    # 3: server only
        record for path, record in server.items()
        if not record.deleted and path not in listed)
    plan.download.sort(key=lambda record: record.path)
    return plan


# ===========================================================================
# WebSocket hub: connections, per-client queues, broadcast
# ===========================================================================

PING = object()          # queue item: send a WebSocket ping
STOP = object()          # queue item: wakes the writer of a closing connection


@dataclass(eq=False)
class Connection:
    """One client's WebSocket, with its own bounded queue and writer task."""

    client_id: str
    ws: web.WebSocketResponse
    queue: asyncio.Queue[Any]
    transport: asyncio.BaseTransport | None
    last_heard: float = field(default_factory=time.monotonic)
    writer: asyncio.Task[None] | None = None
    closing: bool = False
    allowance: float = WS_MESSAGE_BURST     # token bucket for the client's own messages
    told_unknown: bool = False              # unknown message types are answered once
    device: str | None = None               # the device whose token opened it
    opened: float = field(default_factory=time.time)
    replaced: bool = False                  # by a newer connection on another node

    def may_send(self, now: float) -> bool:
        """Take one token; False when the client sends faster than WS_MESSAGE_RATE."""
        self.allowance = min(WS_MESSAGE_BURST,
                             self.allowance + (now - self.last_heard) * WS_MESSAGE_RATE)
        self.last_heard = now
        if self.allowance < 1:
            return False
        self.allowance -= 1
        return True


class Hub:
    """Who is connected, and the fan-out of events to them.

    publish() never awaits: it drops each event into every other connection's
    queue, and each connection's writer task sends at that client's pace.  A
    client whose queue overflows is closed (4002) and resyncs from /changes.
    """

    def __init__(self, queue_size: int, heartbeat_interval: float,
                 heartbeat_timeout: float) -> None:
        self.queue_size = queue_size
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.connections: dict[str, Connection] = {}
        self._closers = Background()
        self._sweeper: asyncio.Task[None] | None = None

    def configure(self, config: Config) -> None:
        """Take new heartbeat and queue settings (on reload; queues of open sockets keep
        theirs); a new heartbeat_interval applies from now, not after the old one ran out."""
        self.queue_size = config.ws_queue_size
        self.heartbeat_timeout = config.heartbeat_timeout
        if config.heartbeat_interval != self.heartbeat_interval:
            self.heartbeat_interval = config.heartbeat_interval
            if self._sweeper is not None:
                self._sweeper.cancel()
                self.start()

    def start(self) -> None:
        """Start pinging clients and closing silent ones."""
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    def connect(self, client_id: str, ws: web.WebSocketResponse,
                transport: asyncio.BaseTransport | None, hello: dict[str, Any]) -> Connection:
        """Register a connection whose first message is hello; replace an older one (4001)."""
        conn = Connection(client_id, ws, asyncio.Queue(self.queue_size), transport)
        conn.queue.put_nowait(json.dumps(hello))
        old = self.connections.get(client_id)
        self.connections[client_id] = conn
        conn.writer = asyncio.get_running_loop().create_task(self._write(conn))
        if old is not None:
            self.drop(old, WS_CLOSE_REPLACED, "replaced by a newer connection")
        return conn

    def disconnect(self, conn: Connection) -> bool:
        """Forget a closed connection; True if it was the client's current one."""
        if conn.writer is not None:
            conn.writer.cancel()
        if self.connections.get(conn.client_id) is conn:
            del self.connections[conn.client_id]
            return True
        return False

    def replace_remote(self, client_id: str, since: float) -> None:
        """The client connected to another node at since: close its connection here (4001),
        if it is older (two nodes told at once each keep the newer one)."""
        conn = self.connections.get(client_id)
        if conn is not None and conn.opened <= since:
            conn.replaced = True
            self.drop(conn, WS_CLOSE_REPLACED, "replaced by a newer connection")

    def drop_device(self, name: str) -> int:
        """Close (4003) the connections a revoked device's token opened; how many."""
        gone = [conn for conn in self.connections.values() if conn.device == name]
        for conn in gone:
            self.drop(conn, WS_CLOSE_REVOKED, "the device was revoked")
        return len(gone)

    def publish(self, event: dict[str, Any], exclude: str | None = None) -> None:
        """Queue event for every connected client but exclude, without waiting."""
        message = json.dumps(event)
        for conn in list(self.connections.values()):
            if conn.client_id != exclude:
                self.send(conn, message)

    def send(self, conn: Connection, item: Any) -> None:
        """Queue one message (or PING) for one connection; close it if its queue is full."""
        if conn.closing:
            return
        try:
            conn.queue.put_nowait(item)
        except asyncio.QueueFull:
            log.warning("client %s is not reading its events: closing it (4002)", conn.client_id)
            # A slow but live client reads what is buffered, then the close frame behind it:
            # it gets up to heartbeat_timeout for that, not the 2 s of other closes.
            self.drop(conn, WS_CLOSE_OVERFLOW, "event queue overflow: resync with /changes",
                      patience=self.heartbeat_timeout)

    def drop(self, conn: Connection, code: int, reason: str,
             patience: float = WS_CLOSE_TIMEOUT) -> None:
        """Close a connection in the background, without waiting for it; cut it off if the
        close handshake has not finished after patience seconds."""
        if self._stop_writing(conn):
            self._closers.spawn(self._close(conn, code, reason, patience))

    async def close(self, conn: Connection, code: int, reason: str) -> None:
        """Close a connection and wait for it (from its own handler, which must not return first)."""
        if self._stop_writing(conn):
            await self._close(conn, code, reason)

    @staticmethod
    def _stop_writing(conn: Connection) -> bool:
        """Mark conn closing, so that its writer sends nothing more; False if it was already.

        The writer is told, not cancelled: cancelling it while it waits for the
        socket to drain would cancel aiohttp's drain future, which the close
        frame's send then waits on too, and the close would end at once.
        """
        if conn.closing:
            return False
        conn.closing = True
        with contextlib.suppress(asyncio.QueueFull):     # full: the writer is not waiting
            conn.queue.put_nowait(STOP)
        return True

    async def _close(self, conn: Connection, code: int, reason: str,
                     patience: float = WS_CLOSE_TIMEOUT) -> None:
        closed = False
        try:
            await asyncio.wait_for(conn.ws.close(code=code, message=reason.encode()), patience)
            closed = True
        except (asyncio.TimeoutError, ConnectionError, RuntimeError):
            pass
        finally:
            # A client that reads nothing never lets the close frame through, and
            # transport.close() would wait for it forever (and the close can end
            # cancelled, when aiohttp's drain waiter is): cut the connection.
            if not closed and conn.transport is not None:
                conn.transport.abort()

    async def _write(self, conn: Connection) -> None:
        try:
            while True:
                item = await conn.queue.get()
                if conn.closing:          # what is still queued is dropped: /changes has it
                    return
                if item is PING:
                    await conn.ws.ping()
                elif isinstance(item, bytes):
                    await conn.ws.pong(item)
                else:
                    await conn.ws.send_str(item)
        except asyncio.CancelledError:
            raise
        except Exception as exc:   # the socket broke: its reader will see it and clean up
            log.debug("writer for %s stopped: %s", conn.client_id, exc)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            now = time.monotonic()
            for conn in list(self.connections.values()):
                if now - conn.last_heard > self.heartbeat_timeout:
                    log.info("client %s silent for %.0f s: closing it",
                             conn.client_id, now - conn.last_heard)
                    self.drop(conn, WS_CLOSE_SILENT, "silent past heartbeat_timeout")
                else:
                    self.send(conn, PING)

    async def close_all(self, code: int = WS_CLOSE_GOING_AWAY) -> None:
        """Close every connection (server shutdown) and stop the sweeper."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        for conn in list(self.connections.values()):
            self.drop(conn, code, "server shutting down")
        await self._closers.wait()


# ===========================================================================
# Metrics (Prometheus, by prometheus-client)
# ===========================================================================

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Gauges:
    """A collector that reads its gauges when scraped: (name, help, value) from read()."""

    def __init__(self, read: Callable[[], Iterable[tuple[str, str, float]]]) -> None:
        self.read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """One family per gauge, with its value now."""
        for name, help_text, value in self.read():
            yield GaugeMetricFamily(name, help_text, value=value)


class Metrics:
    """One app's counters, in a registry of its own (a test process runs many apps), with
    the library's process metrics (memory, CPU, open descriptors)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = Counter("syncd_http_requests", "HTTP requests by route, method and status.",
                                ("route", "method", "status"), registry=registry)
        self.durations = Histogram("syncd_http_request_duration_seconds",
                                   "Time to answer a request.", ("route",),
                                   buckets=DURATION_BUCKETS, registry=registry)
        self.bytes_received = Counter("syncd_received_bytes", "File bytes received in uploads.",
                                      registry=registry)
        self.bytes_sent = Counter("syncd_sent_bytes", "File bytes sent in downloads.",
                                  registry=registry)
        self.uploads = Counter("syncd_uploads", "Uploads stored as a new revision.",
                               registry=registry)
        self.deletes = Counter("syncd_deletes", "Files deleted.", registry=registry)
        self.moves = Counter("syncd_moves", "Files moved (POST /move).", registry=registry)
        self.prunes = Counter("syncd_version_prunes", "Versions removed by retention or to "
                              "free space.", registry=registry)
        ProcessCollector(registry=registry)

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count a finished request."""
        self.requests.labels(route, method, str(status)).inc()
        self.durations.labels(route).observe(seconds)

    def watch(self, read: Callable[[], Iterable[tuple[str, str, float]]]) -> None:
        """Report the gauges read() gives at each scrape."""
        self.registry.register(Gauges(read))

    def render(self) -> bytes:
        """The exposition text."""
        return generate_latest(self.registry)


# ===========================================================================
# The tree: every change to the synced files, in one place
# ===========================================================================

@dataclass(frozen=True)
class Precondition:
    """What the client believes the server holds, if it says."""

    base_checksum: str | None = None            # /upload and DELETE: 409 on mismatch
    if_match: tuple[str, ...] | None = None     # 412 on mismatch
    if_none_match: tuple[str, ...] | None = None

    def is_set(self) -> bool:
        """Whether any condition was given."""
        return (self.base_checksum, self.if_match, self.if_none_match) != (None, None, None)


@dataclass(frozen=True)
class Upload:
    """What a client asks to store, besides the bytes: where, as whom, and what it believes."""

    path: str
    client_id: str
    modified_time: float
    checksum: str | None = None                 # its SHA-256 of the bytes, if it sent one
    pre: Precondition = Precondition()


def check_precondition(pre: Precondition, current: FileRecord | None) -> None:
    """Conflict or PreconditionFailed when the client's belief is stale."""
    live = current if current is not None and not current.deleted else None
    if pre.base_checksum is not None:
        accepted = {live.checksum if live else ""}
        if current is not None and current.deleted:
            accepted.add(current.checksum)   # an edit of a deleted file re-creates it
        if pre.base_checksum not in accepted:
            raise Conflict("the file changed on the server since base_checksum", live)
    if pre.if_match is not None and not (
            live is not None and ("*" in pre.if_match or live.checksum in pre.if_match)):
        raise PreconditionFailed("If-Match does not match the server's file", live)
    if pre.if_none_match is not None and live is not None and (
            "*" in pre.if_none_match or live.checksum in pre.if_none_match):
        raise PreconditionFailed("If-None-Match: the file exists", live)


def file_changed_event(record: FileRecord) -> dict[str, Any]:
    """The WebSocket announcement of a new version."""
    return {"type": "file_changed", **record.to_json(), "seq": record.revision,
            "client_id": record.client_id}


def file_deleted_event(record: FileRecord) -> dict[str, Any]:
    """The WebSocket announcement of a deletion."""
    return {"type": "file_deleted", "path": record.path, "revision": record.revision,
            "seq": record.revision, "client_id": record.client_id}


@dataclass(eq=False)
class PendingUpload:
    """An upload waiting for the group commit that will hold it."""

    staged: StagedFile
    upload: Upload
    done: asyncio.Future[tuple[FileRecord, bool]]
    sealed: asyncio.Future[None]        # the fsync of its bytes, under way
    swap: Swap | None = None
    record: FileRecord | None = None
    created: bool = False
    error: BaseException | None = None
    seal_error: BaseException | None = None


class SwapsFailed(Exception):
    """A rename of a group commit failed: all were undone, to be made one by one."""


GROUP_COMMIT_MAX = 256    # uploads one transaction may hold


@dataclass
class PointInTime:
    """What a point-in-time restore did."""

    restored: int = 0
    deleted: int = 0
    unavailable: list[str] = field(default_factory=list)   # content at `at` no longer kept
    blocked: list[str] = field(default_factory=list)       # changed meanwhile, or in the way
    cursor: int = 0

    def to_json(self) -> dict[str, Any]:
        """The contract's answer (blocked is ours)."""
        return {"success": True, "restored": self.restored, "deleted": self.deleted,
                "unavailable": self.unavailable, "blocked": self.blocked, "cursor": self.cursor}


@dataclass
class RestorePlan:
    """What a point-in-time restore would do: (path, its content then, its record now)
    to restore, (path, live record) to delete, paths whose content then is not kept."""

    restore: list[tuple[str, Change, FileRecord | None]] = field(default_factory=list)
    delete: list[tuple[str, FileRecord]] = field(default_factory=list)
    unavailable: list[str] = field(default_factory=list)
    live_copies: dict[str, str] = field(default_factory=dict)   # checksum -> a live path

    def to_json(self, cursor: int) -> dict[str, Any]:
        """The answer to a dry run (ours)."""
        return {"success": True, "dry_run": True,
                "restore": [path for path, _, _ in self.restore],
                "delete": [path for path, _ in self.delete],
                "unavailable": self.unavailable, "cursor": cursor}


PRUNE_INTERVAL = 60.0     # seconds between two rounds of retention
PRUNE_PATHS = 500         # paths whose versions one round thins
PRUNE_BATCH = 500         # versions one step of age-out or of the size cap removes
PRUNE_ROUNDS = 4          # size-cap steps one round may take
MOVES_INTERVAL = 5.0      # seconds between two looks for moves cut short (a node died)


def versions_to_thin(candidates: Sequence[tuple[Version, bool]], now: float,
                     max_age: float) -> list[tuple[str, int]]:
    """The (path, revision) to prune among candidates (by path, newest first): those older
    than max_age; of the rest older than an hour, all but the newest per path per hour,
    older than a day all but the newest per path per day. The content of a path's current
    deletion (protected) is never thinned, only aged out."""
    doomed = []
    kept: set[tuple[str, str, int]] = set()
    for version, protected in candidates:
        age = now - version.time
        if age > max_age:
            doomed.append((version.path, version.revision))
            continue
        if protected or age <= 3600:
            continue
        bucket = ((version.path, "day", int(version.time // 86400)) if age > 86400
                  else (version.path, "hour", int(version.time // 3600)))
        if bucket in kept:
            doomed.append((version.path, version.revision))
        else:
            kept.add(bucket)
    return doomed


class Tree:
    """The synced tree, and the only place where it changes.

    It owns the metadata store, the file store, the hub and the metrics, and
    has one method per change (store_upload, delete, restore, restore_at,
    remove_versions, prune_versions) and one open_for_read (open_revision for
    kept versions). Every route and protocol that writes ends in one of them,
    so each guarantee is written once: bytes in a temp file, fsynced;
    preconditions checked under the commit lock; the replaced content kept as
    a version; the rename and the journal entry in one transaction (undone
    together); the announcement after the commit; and the work carried to its
    end even if the client goes away.

    A download must pair a record with exactly the bytes it describes: the
    tree's writes form a seqlock (_writes is odd while one is under way), so
    a read that saw no write begin or end between reading the record and
    opening the file is consistent; otherwise it is done again under the lock.
    """

    def __init__(self, config: Config, store: MetadataStore, files: FileStore, hub: Hub,
                 metrics: Metrics) -> None:
        self.config = config
        self.store = store
        self.files = files
        self.hub = hub
        self.metrics = metrics
        self.background = Background()
        self.recovery: asyncio.Future[None] | None = None  # the background half of recovery
        self.rehashing: set[str] = set()    # paths whose record may be stale until rehashed
        self.adopting: set[str] = set()     # paths whose bytes are not their record's, being hashed
        self._adoptions = Background()      # their hashing (stopped at close, as the rehash is)
        self._write_lock = asyncio.Lock()
        self._writes = 0
        self._thinned_up_to = ""            # the retention's place among the paths
        self._pending: list[PendingUpload] = []     # uploads waiting for a group commit
        self._committing: asyncio.Future[None] | None = None
        self._pruner: asyncio.Future[None] | None = None
        self._mover: asyncio.Future[None] | None = None
        store.on_change = self._announce_remote

    def configure(self, config: Config) -> None:
        """Take a reloaded configuration."""
        self.config = config
        self.hub.configure(config)

    @property
    def keeps_versions(self) -> bool:
        """Whether replaced and deleted content is kept (versions_max_age_days > 0)."""
        return self.config.versions_max_age_days > 0

    def failure(self, exc: BaseException) -> Refused | None:
        """The contract's answer to a storage error (disk or database), or None."""
        return self.store.failure(exc) or file_failure(exc)

    # -- start and stop ----------------------------------------------------------

    async def open(self, accept_deletions: bool) -> None:
        """Prepare the tree and the database, and recover what happened while we were
        stopped: vanished files now, changed ones hashed in the background.

        MassVanish when most files are gone; StorageUnusable when the tree or the
        database cannot be opened.
        """
        root = self.files.root
        try:
            if not root.exists():
                log.info("creating the sync directory %s", root)
            root.mkdir(parents=True, exist_ok=True)
            removed = self.files.prepare()
            await self.store.open()
            try:
                async with self.store.exclusive():    # in a cluster: one node at a time
                    await self.finish_moves()
                    recovery = await recover(self.store, self.files, accept_deletions)
            except BaseException:
                await self.store.close()
                raise
        except (OSError, *self.store.errors) as exc:
            raise StorageUnusable(str(exc)) from exc
        self.hub.start()
        self.rehashing = recovery.pending
        self.recovery = self.background.spawn(self._finish_recovery(recovery, removed))
        self._pruner = asyncio.ensure_future(self._prune_forever())
        self._mover = asyncio.ensure_future(self._finish_moves_forever())
        log.info("serving %s (epoch %s, cursor %d)", root.resolve(), self.store.epoch,
                 self.store.cursor)

    async def close(self) -> None:
        """Stop the rehash, close the WebSockets, let writes finish, close the stores."""
        if self.recovery is not None:
            self.recovery.cancel()
        await self._adoptions.cancel()
        for loop in (self._pruner, self._mover):
            if loop is not None:
                loop.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await loop
        await self.hub.close_all()
        await self.background.wait()
        await self.store.close()
        self.files.close()

    async def _finish_recovery(self, recovery: Recovery, removed: int) -> None:
        """Rehash what changed behind our back, announce it, and log what recovery found."""
        if recovery.suspects:
            log.info("recovery: hashing %d new or changed file(s) in the background",
                     len(recovery.suspects))
        try:
            report = await rehash_suspects(
                self._writing, self.files, recovery,
                lambda record: self.hub.publish(file_changed_event(record)))
            report.orphans_removed = await self._remove_orphan_blobs()
        except Exception as exc:
            if self.failure(exc) is None:
                raise
            log.error("recovery stopped: %s; the files not yet hashed are served as recorded", exc)
            return
        finally:
            recovery.pending.clear()
        log.info("recovery: %s; %d temp file(s) removed", report.summary(), removed)
        for kind, paths, why in (
                ("cannot be served", report.skipped,
                 "not a valid NFC path, not a regular file, or changing"),
                ("cannot be read", report.unreadable, "permissions? they are not taken as deleted")):
            if paths:
                log.warning("%d path(s) in the tree %s (%s): %s%s", len(paths), kind, why,
                            ", ".join(paths[:5]), ", ..." if len(paths) > 5 else "")

    # -- writes ------------------------------------------------------------------

    def check_extension(self, path: str) -> None:
        """ExtensionNotAllowed when allowed_extensions is set and path's name is not in it."""
        allowed = self.config.allowed_extensions
        if not extension_allowed(path, allowed):
            raise ExtensionNotAllowed("allowed extensions: " + ", ".join(allowed))

    async def receive(self, chunks: AsyncIterator[bytes]) -> StagedFile:
        """Stream a file's bytes into a temp file, hashed on the way; TooLarge (nothing kept)
        past max_file_size."""
        received = self.metrics.bytes_received

        async def counted() -> AsyncIterator[bytes]:
            async for chunk in chunks:
                received.inc(len(chunk))
                yield chunk
        return await self.files.stage(counted(), self.config.max_file_size, self.make_room)

    def discard(self, staged: StagedFile) -> None:
        """Drop a received file that will not be stored."""
        self.files.discard(staged)

    async def store_upload(self, staged: StagedFile, upload: Upload) -> tuple[FileRecord, bool]:
        """Make a received file the live content of upload.path; the record, and whether
        the path was created. Takes staged over: its temp file is gone afterwards."""
        return await self.background.shielded(self._store_upload(staged, upload))

    async def _store_upload(self, staged: StagedFile, upload: Upload) -> tuple[FileRecord, bool]:
        try:
            self.check_extension(upload.path)
            if upload.checksum is not None and staged.checksum != upload.checksum:
                raise ChecksumMismatch(f"the bytes received hash to {staged.checksum}, "
                                       f"not {upload.checksum}")
            return await self._retry_when_full(lambda: self._put_in_place(staged, upload),
                                               staged.size)
        finally:
            self.files.discard(staged)

    async def _put_in_place(self, staged: StagedFile, upload: Upload) -> tuple[FileRecord, bool]:
        """store_upload's one try: wait for the group commit that holds this upload (uploads
        that arrive while one commits share the next). Its bytes are fsynced meanwhile;
        nothing is awaited before it joins the queue, so uploads are journalled in the
        order they were handed over (a /bulk's files in request order)."""
        item = PendingUpload(staged, upload, asyncio.get_running_loop().create_future(),
                             self.background.spawn(asyncio.to_thread(
                                 self.files.seal, staged, upload.modified_time)))
        self._pending.append(item)
        if self._committing is None or self._committing.done():
            self._committing = self.background.spawn(self._commit_pending())
        return await item.done

    async def _commit_pending(self) -> None:
        """Group commit: the pending uploads, GROUP_COMMIT_MAX at a time, until none wait."""
        while self._pending:
            group = self._pending[:GROUP_COMMIT_MAX]
            del self._pending[:len(group)]
            try:
                await self._commit_group(group)
            except BaseException as exc:     # a bug, or a cancel: no upload may wait for ever
                for item in group:
                    if not item.done.done():
                        item.done.set_exception(exc)
                raise

    async def _commit_group(self, group: Sequence[PendingUpload]) -> None:
        """One transaction for a group of uploads: for each the checks, the old content kept
        as a version, the rename and the journal; then one fsync per folder, one COMMIT,
        and each upload's announcement and answer. One refused upload does not stop the
        others; a failure of the folder fsync or of the database fails them all (undone).

        The renames are made together in one worker thread; if one fails, the group is
        undone and placed again one upload at a time, so that the failure is that
        upload's alone."""
        for item, sealed in zip(group, await asyncio.gather(
                *(item.sealed for item in group), return_exceptions=True), strict=True):
            if isinstance(sealed, BaseException):
                item.error = item.seal_error = sealed
        try:
            try:
                async with self._writing() as tx:
                    await self._place_together(tx, group)
            except SwapsFailed:
                for item in group:
                    item.error, item.record, item.created = item.seal_error, None, False
                async with self._writing() as tx:
                    await self._place_one_by_one(tx, group)
        except Exception as exc:       # undone: every upload of the group failed with it
            for item in group:
                if item.error is None:
                    item.error, item.swap = exc, None
        placed = [item.swap for item in group if item.error is None and item.swap is not None]
        if placed:     # before the answers: an answered upload leaves nothing in tmp/
            try:
                await asyncio.to_thread(self.files.finish_swaps, placed)
            except OSError as exc:      # committed all the same: the next start empties tmp/
                log.warning("could not remove replaced files from tmp/: %s", exc)
        for item in group:
            if item.error is not None:
                item.done.set_exception(item.error)
                continue
            assert item.record is not None
            if item.swap is not None:
                item.staged.placed = True
                self.rehashing.discard(item.upload.path)   # what a client wrote is on disk now
                self.metrics.uploads.inc()
                log.info("stored %s (%d bytes, revision %d) from %s", item.upload.path,
                         item.record.size, item.record.revision, item.upload.client_id)
            item.done.set_result((item.record, item.created))

    async def _place_together(self, tx: Transaction, group: Sequence[PendingUpload]) -> None:
        """Check and journal each upload, then rename them all and fsync their folders in
        one worker thread; SwapsFailed (every rename undone) if any rename fails."""
        placing: list[tuple[PendingUpload, FileRecord | None, FileRecord]] = []
        for item in group:
            if item.error is not None:
                continue
            try:
                live = self._check_upload(tx, item)
            except Refused as exc:
                item.error = exc           # nothing of it was changed
                continue
            if item.record is None:        # not the same bytes again
                placing.append((item, live, await self._journal_upload(tx, item)))
        if not placing:
            return
        keeps = [live if self.keeps_versions else None for _, live, _ in placing]
        try:
            swaps = await asyncio.to_thread(self.files.swap_many, [
                (item.staged, item.upload.path, keep)
                for (item, _, _), keep in zip(placing, keeps, strict=True)])
        except (OSError, FolderBlocked) as exc:
            raise SwapsFailed() from exc
        for (item, live, record), swap in zip(placing, swaps, strict=True):
            await self._placed(tx, item, live, record, swap)

    async def _place_one_by_one(self, tx: Transaction, group: Sequence[PendingUpload]) -> None:
        """_place_together's slow way, after a rename failed: each upload renamed on its own,
        so that a failure refuses that upload alone."""
        for item in group:
            if item.error is not None:
                continue
            try:
                await self._place_alone(tx, item)
            except Refused as exc:
                item.error = exc           # nothing of it was changed
        await asyncio.to_thread(self.files.sync_folders,
                                [item.upload.path for item in group if item.swap])

    async def _place_alone(self, tx: Transaction, item: PendingUpload) -> None:
        """One upload's checks, rename, journal row and version."""
        upload, staged = item.upload, item.staged
        live = self._check_upload(tx, item)
        if item.record is not None:
            return
        keep = live if self.keeps_versions else None
        try:
            swap = await asyncio.to_thread(self.files.swap_in, staged, upload.path, keep, False)
        except FolderBlocked as exc:
            raise PathBlocked(upload.path, f"{exc} is in the way") from None

        except OSError as exc:       # this file alone (swap_in undid itself): not the group
            refusal = self.failure(exc)
            if refusal is None:
                raise
            log.error("storing %s for %s: %s (%s)", upload.path, upload.client_id,
                      refusal.message, exc)
            raise refusal from exc
        await self._placed(tx, item, live, await self._journal_upload(tx, item), swap)

    def _check_upload(self, tx: Transaction, item: PendingUpload) -> FileRecord | None:
        """An upload's precondition and path checks; the live record it replaces. When the
        live file has the same bytes already, item.record is set: nothing is to change."""
        path = item.upload.path
        current = tx.get(path)
        check_precondition(item.upload.pre, current)
        live = current if current is not None and not current.deleted else None
        if live is not None and live.checksum == item.staged.checksum:
            item.record = live       # the same bytes again: nothing changes, nothing to announce
            return live
        tx.check_writable(path, self.config.allow_case_clash)
        return live

    @staticmethod
    async def _journal_upload(tx: Transaction, item: PendingUpload) -> FileRecord:
        """The upload's journal row and live record, in the transaction."""
        upload, staged = item.upload, item.staged
        return await tx.record_upsert(upload.path, staged.checksum, staged.size,
                                      upload.modified_time, upload.client_id, staged.mtime_ns)

    async def _placed(self, tx: Transaction, item: PendingUpload, live: FileRecord | None,
                      record: FileRecord, swap: Swap) -> None:
        """After an upload's rename: its undo, the version of what it replaced, its event."""
        files, client_id = self.files, item.upload.client_id
        item.swap = swap
        tx.undo.append(lambda: files.undo_swap(swap))
        if live is not None and swap.kept is not None:
            await tx.record_version(swap.kept, record, "overwrite")
        tx.after_commit.append(lambda: self.hub.publish(file_changed_event(record), client_id))
        item.record, item.created = record, live is None

    async def _retry_when_full(self, attempt: Callable[[], Awaitable[T]], needed: int) -> T:
        """attempt(); if the disk or the database is full, prune the oldest versions to free
        needed bytes and try once more (SPEC: 507 only if that fails too)."""
        try:
            return await attempt()
        except Exception as exc:
            if not isinstance(self.failure(exc), StorageFull) or not await self.make_room(needed):
                raise
        log.warning("the disk was full: oldest versions pruned, trying again")
        return await attempt()

    async def delete(self, path: str, client_id: str, pre: Precondition) -> tuple[int, int]:
        """Delete the file at path, or every file under the folder path; (count, last revision)."""
        return await self.background.shielded(self._delete(path, client_id, pre))

    async def _delete(self, path: str, client_id: str, pre: Precondition) -> tuple[int, int]:
        # A folder goes DELETE_BATCH files per transaction, so that downloads and
        # other writes get the lock between batches; a file written under it since
        # the delete began is newer than the delete and stays.
        async with self._writing() as tx:
            current = tx.get(path)
            if current is not None and not current.deleted:
                targets = [current]
                check_precondition(pre, current)
            else:
                targets = tx.live_under(path)
                if not targets:
                    raise NotFound(f"no file or folder at {path}")
                if pre.is_set():
                    raise Conflict(f"{path} is a folder: a precondition applies to a single "
                                   "file", None)
            parked, tombs = await self._delete_batch(tx, targets[:DELETE_BATCH], client_id)
        deleted, last_seq = len(tombs), tx.last_seq
        await self.finish_delete_batch(parked, len(tombs))
        for start in range(DELETE_BATCH, len(targets), DELETE_BATCH):
            async with self._writing() as tx:
                batch = [target for target in targets[start:start + DELETE_BATCH]
                         if tx.get(target.path) == target]
                parked, tombs = await self._delete_batch(tx, batch, client_id)
            deleted, last_seq = deleted + len(tombs), tx.last_seq or last_seq
            await self.finish_delete_batch(parked, len(tombs))
        log.info("deleted %s (%d file(s), revision %d) for %s", path, deleted, last_seq, client_id)
        return deleted, last_seq

    async def _delete_batch(self, tx: Transaction, targets: Sequence[FileRecord],
                            client_id: str) -> tuple[list[Removal], list[FileRecord]]:
        """In tx: move the targets out of the tree and leave their tombstones; announce them
        after the commit, or put the files back if it fails."""
        files, hub = self.files, self.hub
        keep = {target.path: target for target in targets} if self.keeps_versions else {}
        removals = await asyncio.to_thread(
            files.remove_many, [target.path for target in targets], keep)
        tx.undo.append(lambda: [files.undo_remove(removal) for removal in reversed(removals)])
        kept = {removal.path: removal.kept for removal in removals if removal.kept is not None}
        tombs = []
        for target in targets:
            tomb = await tx.record_delete(target, client_id)
            if target.path in kept:
                await tx.record_version(kept[target.path], tomb, "delete")
            tombs.append(tomb)
            tx.after_commit.append(
                lambda tomb=tomb: hub.publish(file_deleted_event(tomb), client_id))
        return removals, tombs

    async def finish_delete_batch(self, removals: list[Removal], count: int) -> None:
        """After a batch's commit: drop the parked files and prune empty folders."""
        self.metrics.deletes.inc(count)
        await asyncio.to_thread(self.files.finish_removals, removals)

    # -- moves -------------------------------------------------------------------

    async def move(self, source: str, target: str, client_id: str,
                   pre: Precondition) -> tuple[int, int]:
        """Rename a file, or a folder with every file in it, without their bytes moving;
        (files moved, last revision). Each file's journal is an upsert of its new path,
        then a delete of its old one; its kept versions follow it.

        Crash-safe in three steps under the write lock: the move is noted (committed),
        the tree is renamed on disk (one rename, fsynced), then the journal and the note's
        removal are committed. Start-up recovery finishes a noted move found done on
        disk, and forgets one that is not (finish_moves)."""
        return await self.background.shielded(self._move(source, target, client_id, pre))

    async def _move(self, source: str, target: str, client_id: str,
                    pre: Precondition) -> tuple[int, int]:
        if target == source or target.startswith(source + "/"):
            raise InvalidRequest(f"{source} cannot move to {target}, inside itself")
        async with self._locked(), self.store.exclusive():
            moves = self._plan_move(source, target, pre)
            async with self.store.transaction() as tx:
                await tx.note_move(source, target, client_id)
            try:
                await asyncio.to_thread(self.files.rename, source, target)
            except BaseException as exc:
                await self._forget_move(source)
                if isinstance(exc, FolderBlocked):
                    raise PathBlocked(target, f"{exc} is in the way on disk") from None
                raise
            try:
                async with self.store.transaction() as tx:
                    tx.undo.append(lambda: self.files.rename(target, source))
                    last = await self._journal_move(tx, moves, client_id)
                    await tx.forget_move(source)
            except BaseException:
                if await asyncio.to_thread(self._moved_back, source, target):
                    await self._forget_move(source)
                else:      # the note stays: _finish_moves_forever finishes the move
                    log.error("the move of %s to %s failed and could not be undone on disk: "
                              "it is finished once the database answers", source, target)
                raise
        log.info("moved %s to %s (%d file(s), revision %d) for %s", source, target, len(moves),
                 last, client_id)
        self.metrics.moves.inc(len(moves))
        return len(moves), last

    def _plan_move(self, source: str, target: str,
                   pre: Precondition) -> list[tuple[FileRecord, str]]:
        """What a move would do, (live record, new path) for each file; or why it cannot:
        NotFound (nothing live at source), Conflict (something at target, a stale base, a
        precondition on a folder), PathBlocked or CaseConflict (a new path's checks, made
        as though the old paths were gone already: photos -> Photos is allowed)."""
        index = self.store.index
        current = index.get(source)
        if current is not None and not current.deleted:
            check_precondition(pre, current)
            records = [current]
        else:
            records = index.live_under(source, folder=True)
            if not records:
                raise NotFound(f"no file or folder at {source}")
            if pre.is_set():
                raise Conflict(f"{source} is a folder: a precondition applies to a single file",
                               None)
        there = index.get(target)
        if there is not None and not there.deleted:
            raise Conflict(f"{target} exists", there)
        if index.files_in(target):
            raise Conflict(f"{target} is a folder on the server", None)
        after = PendingIndex(index)
        for record in records:
            after.put(record._replace(deleted=True))
        moves = []
        for record in records:
            new_path = target + record.path[len(source):]
            check_writable(after, new_path, self.config.allow_case_clash)
            after.put(record._replace(path=new_path))
            moves.append((record, new_path))
        return moves

    async def _journal_move(self, tx: Transaction, moves: Sequence[tuple[FileRecord, str]],
                            client_id: str) -> int:
        """In tx: each moved file's upsert at its new path, its old path's delete, its versions
        carried over, and the events after the commit; the last seq."""
        hub = self.hub
        for record, new_path in moves:
            moved = await tx.record_upsert(new_path, record.checksum, record.size,
                                           record.modified_time, client_id, record.mtime_ns)
            tomb = await tx.record_delete(record, client_id)
            await tx.move_versions(record.path, new_path)
            tx.after_commit.append(functools.partial(hub.publish, file_changed_event(moved),
                                                     client_id))
            tx.after_commit.append(functools.partial(hub.publish, file_deleted_event(tomb),
                                                     client_id))
        return tx.last_seq

    def _moved_back(self, source: str, target: str) -> bool:
        """Whether the tree is as before a move (source there, target not)."""
        return self.files.lexists(source) and not self.files.lexists(target)

    async def _forget_move(self, source: str) -> None:
        """Drop a move's note after it failed (if even that fails, start-up recovery will)."""
        try:
            async with self.store.transaction() as tx:
                await tx.forget_move(source)
        except Exception as exc:
            if self.failure(exc) is None:
                raise
            log.error("could not forget the failed move of %s: %s", source, exc)

    async def finish_moves(self) -> None:
        """A move noted but not journalled is journalled if its rename is on disk (only the
        target there), else forgotten. At start, before recovery looks for vanished files;
        later, under exclusive() (where no move is under way)."""
        for source, target, client_id in await self.store.pending_moves():
            renamed = await asyncio.to_thread(self._moved_back, target, source)
            moves = []
            if renamed:
                index = self.store.index
                current = index.get(source)
                records = ([current] if current is not None and not current.deleted
                           else index.live_under(source, folder=True))
                moves = [(record, target + record.path[len(source):]) for record in records]
            async with self.store.transaction() as tx:
                if moves:
                    await self._journal_move(tx, moves, client_id)
                await tx.forget_move(source)
            log.warning("recovery: the move of %s to %s was cut short: %s", source, target,
                        f"finished ({len(moves)} file(s))" if renamed else "not made")

    # -- versions: restore, removal, retention ------------------------------------

    async def restore(self, path: str, revision: int, client_id: str,
                      pre: Precondition) -> tuple[FileRecord, bool]:
        """Make a kept version of path its live content again, as a new change."""
        version = await self.store.get_version(path, revision)
        if version is None:
            raise NotFound(f"revision {revision} of {path} is not kept")
        return await self._restore_content(path, version.checksum, version.modified_time,
                                           client_id, pre)

    async def _restore_content(self, path: str, checksum: str, modified_time: float,
                               client_id: str, pre: Precondition,
                               live_copy: str | None = None) -> tuple[FileRecord, bool]:
        """store_upload of a copy of kept content (so that the replaced content is kept in
        turn); when it is not kept, of the live file live_copy if that still holds it."""
        try:
            staged = await self._retry_when_full(
                lambda: asyncio.to_thread(self.files.stage_blob, checksum, live_copy), 0)
        except NotRegular:
            raise NotFound(f"the content of {path} is no longer kept") from None
        return await self.store_upload(staged, Upload(path, client_id, modified_time, checksum, pre))

    async def plan_restore_at(self, prefix: str, at: int, delete_newer: bool) -> RestorePlan:
        """What a point-in-time restore of prefix to just after change at would do, as things
        stand now (a preview, and the plan restore_at carries out)."""
        if at > self.store.cursor:
            raise InvalidRequest(f"at must be a seq up to the cursor ({self.store.cursor})")
        then, now = await self.store.state_at(prefix, at)
        plan = RestorePlan()
        for path in sorted(set(then) | set(now)):
            was, current = then.get(path), now.get(path)
            live = current if current is not None and not current.deleted else None
            if was is None or was.type == "delete":
                if live is not None and delete_newer:
                    plan.delete.append((path, live))
            elif live is None or live.checksum != was.checksum:
                if await self.store.has_blob(was.checksum):
                    plan.restore.append((path, was, current))
                    continue
                # Not kept as a version: it may be live elsewhere (a move keeps no version).
                if not plan.live_copies:
                    plan.live_copies = self._live_copies()
                if was.checksum in plan.live_copies:
                    plan.restore.append((path, was, current))
                else:
                    plan.unavailable.append(path)
        return plan

    def _live_copies(self) -> dict[str, str]:
        """For each content some live file holds: one such file's path."""
        return {record.checksum: record.path
                for record in self.store.index.records.values() if not record.deleted}

    async def restore_at(self, prefix: str, at: int, client_id: str,
                         delete_newer: bool) -> PointInTime:
        """Give every path under prefix the state it had just after change at; each path that
        changes is a change of its own. A path written meanwhile by someone else is left
        as it is (its restore is conditional on what we saw) and reported as blocked."""
        plan = await self.plan_restore_at(prefix, at, delete_newer)
        result = PointInTime(unavailable=list(plan.unavailable))
        for path, live in plan.delete:
            try:
                await self.delete(path, client_id, Precondition(base_checksum=live.checksum))
                result.deleted += 1
            except (Conflict, NotFound):
                result.blocked.append(path)
        for path, was, current in plan.restore:
            now = current if current is not None and not current.deleted else None
            try:
                await self._restore_content(path, was.checksum, was.modified_time, client_id,
                                            Precondition(base_checksum=now.checksum if now
                                                         else current.checksum if current else ""),
                                            plan.live_copies.get(was.checksum))
                result.restored += 1
            except (Conflict, CaseConflict):
                result.blocked.append(path)
            except NotFound:
                result.unavailable.append(path)
        result.cursor = self.store.cursor
        log.info("restored %s as at seq %d for %s: %d restored, %d deleted, %d unavailable, "
                 "%d blocked", prefix or "the whole tree", at, client_id, result.restored,
                 result.deleted, len(result.unavailable), len(result.blocked))
        return result

    async def remove_versions(self, path: str, revision: int | None) -> int:
        """Destroy one kept version of path, or all of them; how many (NotFound: none)."""
        if revision is not None:
            keys = [(path, revision)]
        else:
            keys = [(version.path, version.revision) for version in await self.store.versions_of(path)]
        async with self._writing() as tx:
            await tx.drop_versions(keys)
        if not tx.versions:
            raise NotFound(f"no kept version of {path}" + (f" at revision {revision}"
                                                            if revision is not None else ""))
        return -tx.versions

    async def make_room(self, needed: int) -> bool:
        """Free at least needed bytes by pruning the oldest versions; whether anything was
        freed. The reserve goes first: on a disk full to the last byte the database
        cannot even record a prune. It is put back at once when there was nothing to
        prune (a write that cannot fit must not use it up), else by the next retention
        round, once the disk has room again."""
        released = await asyncio.to_thread(self.files.release_reserve)
        async with self._writing() as tx:
            await self._drop_oldest(tx, lambda: -tx.blob_bytes >= max(needed, 1))
        if tx.versions:
            self.metrics.prunes.inc(-tx.versions)
            log.warning("the disk is full: %d oldest version(s) pruned (%d bytes freed)",
                        -tx.versions, -tx.blob_bytes)
        if tx.blob_bytes >= 0 and released:
            await asyncio.to_thread(self.files.ensure_reserve, 0)
        return tx.blob_bytes < 0

    async def prune_versions(self, now: float | None = None) -> int:
        """One bounded round of retention: thin the versions of the next few paths, age out
        the oldest, then keep under versions_max_size; how many versions went."""
        now = time.time() if now is None else now
        max_age = self.config.versions_max_age_days * 86400
        candidates = await self.store.thinning_candidates(self._thinned_up_to, PRUNE_PATHS)
        self._thinned_up_to = candidates[-1][0].path if candidates else ""
        doomed = set(versions_to_thin(candidates, now, max_age))
        cap = self.config.versions_max_size
        async with self._writing() as tx:
            doomed.update((version.path, version.revision)
                          for version in await tx.oldest_versions(PRUNE_BATCH)
                          if now - version.time > max_age)
            await tx.drop_versions(sorted(doomed))
            if cap is not None:
                await self._drop_oldest(tx, lambda: self.store.blob_bytes + tx.blob_bytes <= cap)
        if tx.versions:
            self.metrics.prunes.inc(-tx.versions)
            log.info("retention: %d version(s) pruned, %d bytes freed", -tx.versions,
                     -tx.blob_bytes)
        return -tx.versions

    async def _remove_orphan_blobs(self) -> int:
        """Remove the blobs no version refers to (left by a change that crashed before its
        commit and was not adopted); under the write lock, so that no write is half-way."""
        async with self._write_lock:
            on_disk = await asyncio.to_thread(self.files.list_blobs)
            orphans = set(on_disk) - await self.store.blob_checksums()
            await asyncio.to_thread(self.files.remove_blobs, orphans)
        return len(orphans)

    @staticmethod
    async def _drop_oldest(tx: Transaction, enough: Callable[[], bool]) -> None:
        """In tx, drop the oldest versions one by one until enough() (PRUNE_ROUNDS batches
        at most: a round's work is bounded)."""
        for _ in range(PRUNE_ROUNDS):
            oldest = [] if enough() else await tx.oldest_versions(PRUNE_BATCH)
            for version in oldest:
                if enough():
                    return
                await tx.drop_versions([(version.path, version.revision)])
            if len(oldest) < PRUNE_BATCH:
                return

    async def _prune_forever(self) -> None:
        """The background pruner: a bounded round every PRUNE_INTERVAL seconds (sooner while
        there is more to do)."""
        while True:
            try:
                pruned = await self.prune_versions()
                await asyncio.to_thread(self.files.ensure_reserve)
            except Exception as exc:
                if self.failure(exc) is None:
                    raise
                log.error("retention stopped for a while: %s", exc)
                pruned = 0
            await asyncio.sleep(1.0 if pruned >= PRUNE_BATCH else PRUNE_INTERVAL)

    async def _finish_moves_forever(self) -> None:
        """Finish, within seconds, a move cut short: its node died between its rename and
        its commit (in a cluster, the other nodes serve on), or its commit failed and its
        rename could not be undone. A move under way has a note too, but it holds
        exclusive() until the note is gone: finish_moves, under it, sees only leftovers."""
        while True:
            await asyncio.sleep(MOVES_INTERVAL)
            try:
                if await self.store.pending_moves():
                    async with self._locked(), self.store.exclusive():
                        await self.finish_moves()
            except Exception as exc:
                if self.failure(exc) is None:
                    raise
                log.error("could not finish the moves cut short (tried again later): %s", exc)

    @contextlib.asynccontextmanager
    async def _locked(self) -> AsyncIterator[None]:
        """The write lock, with the seqlock odd: the writer side of downloads' check."""
        async with self._write_lock:
            self._writes += 1
            try:
                yield
            finally:
                self._writes += 1

    @contextlib.asynccontextmanager
    async def _writing(self) -> AsyncIterator[Transaction]:
        """A store transaction that may rename in the tree, under the write lock."""
        async with self._locked():
            async with self.store.transaction() as tx:
                yield tx
            if tx.gone_blobs:
                await self._remove_blobs(tx.gone_blobs)

    async def _remove_blobs(self, checksums: Sequence[str]) -> None:
        """Remove the blobs a commit left unreferenced, with every write held off (no write
        may link that content meanwhile); in a cluster, another node may have kept the
        same content again since that commit: those stay."""
        async with self.store.exclusive():
            kept = await self.store.blobs_among(checksums)
            await asyncio.to_thread(self.files.remove_blobs,
                                    [checksum for checksum in checksums if checksum not in kept])

    def _announce_remote(self, change: Change) -> None:
        """Another node's journal entry, in the index now: announce it to this node's
        WebSockets, as that node announced it to its own."""
        record = FileRecord(change.path, change.checksum, change.size, change.modified_time,
                            change.seq, change.type == "delete", change.time, change.client_id)
        event = file_deleted_event(record) if record.deleted else file_changed_event(record)
        self.hub.publish(event, change.client_id)

    # -- reads -------------------------------------------------------------------

    async def open_for_read(self, path: str) -> tuple[Any, FileRecord]:
        """The open file at path and the record that describes exactly those bytes;
        NotFound, or StorageFailing while start-up recovery has not yet checked it.

        Once open, a later upload replaces the name, not our bytes.
        """
        if path in self.rehashing:
            raise StorageFailing(f"{path} changed on disk while the server was stopped and is "
                                 "being checked; retry shortly", retry_after=5)
        if path in self.adopting:
            raise changed_behind_our_back(path)
        if self.store.behind():
            await self.store.catch_up()
        # In a cluster, a client told of a change by another node may ask this one before
        # that node's notice arrived: no such file, or bytes that are not the record's
        # (size and mtime), send this node to the database before it answers.
        try:
            handle, record = await self._open_committed(path)
        except NotFound:
            if not await self.store.catch_up():
                raise
            return await self._open_committed(path)
        if not self.files.describes(handle, record):
            handle.close()
            if await self.store.catch_up():
                return await self._open_committed(path)
            self._adopt(path, record)
            raise changed_behind_our_back(path)
        return handle, record

    def _adopt(self, path: str, record: FileRecord) -> None:
        """Bytes at path that are not its record's, and nothing newer in the journal: a
        node died between its rename into place and its commit, or someone wrote into the
        tree behind the server's back. Never serve them under the record: hash them and
        journal them in the background, as start-up recovery does (a client's write
        meanwhile wins); downloads of path answer 503 until then."""
        if path in self.adopting:
            return
        self.adopting.add(path)
        log.warning("%s on disk is not what its record says (size %d, mtime %s): hashing "
                    "it to journal it as a change", path, record.size, record.mtime_ns)
        recovery = Recovery(RecoveryReport(), [(path, record)])

        def announce(journalled: FileRecord) -> None:
            self.adopting.discard(path)     # servable before the event says it changed
            self.hub.publish(file_changed_event(journalled))

        async def adopt() -> None:
            try:
                report = await rehash_suspects(self._writing, self.files, recovery, announce)
                log.info("%s checked: %s", path, report.summary())
            except Exception as exc:
                if self.failure(exc) is None:
                    raise
                log.error("could not journal the bytes found at %s: %s", path, exc)
            finally:
                self.adopting.discard(path)
        self._adoptions.spawn(adopt())

    async def _open_committed(self, path: str) -> tuple[Any, FileRecord]:
        """open_for_read, as the index stands."""
        before = self._writes
        if before % 2 == 0:
            handle, record = await self._open_with_record(path)
            if self._writes == before:
                return self._found(path, handle, record)
            if handle is not None:
                handle.close()
        async with self._write_lock:
            handle, record = await self._open_with_record(path)
        return self._found(path, handle, record)

    @staticmethod
    def _found(path: str, handle: Any, record: FileRecord | None) -> tuple[Any, FileRecord]:
        """open_for_read's answer: both, or NotFound."""
        if handle is None or record is None:
            raise NotFound(f"no file at {path}")
        return handle, record

    async def versions(self, path: str) -> tuple[FileRecord | None, list[Version]]:
        """The path's live record (None when deleted) and its kept versions, newest first;
        NotFound when it has neither."""
        current = self.store.get(path)
        live = current if current is not None and not current.deleted else None
        kept = await self.store.versions_of(path)
        if live is None and not kept:
            raise NotFound(f"no file and no kept version at {path}")
        return live, kept

    async def open_revision(self, path: str, revision: int) -> tuple[Any, FileRecord]:
        """open_for_read of one revision of path: a kept version, or the live file."""
        version = await self.store.get_version(path, revision)
        if version is None:
            handle, record = await self.open_for_read(path)
            if record.revision == revision:
                return handle, record
            handle.close()
            raise NotFound(f"revision {revision} of {path} is not kept")
        try:
            handle = await asyncio.to_thread(self.files.open_blob, version.checksum)
        except NotRegular:
            raise NotFound(f"revision {revision} of {path} is no longer kept") from None
        return handle, version.as_record()

    async def _open_with_record(self, path: str) -> tuple[Any, FileRecord | None]:
        """The path's live record (or None) and, only if there is one, the file opened (or
        None), or for a small file its bytes.

        The record comes first, so a name with no record (a FIFO an admin left in
        the tree, say) is never opened. A large file opens in a worker thread,
        since a disk can block; a small one on the loop, as nginx opens files:
        the thread's hand-off costs more than the open (17,000 against 6,300
        4 KiB reads a second here), and it is read there only from the page cache.
        """
        record = self.store.get(path)
        if record is None or record.deleted:
            return None, None
        try:
            if record.size > INLINE_LIMIT:
                handle = await asyncio.to_thread(self.files.open_read, path)
            else:
                try:
                    handle = self.files.read_small(path, cached_only=True)
                except NotCached:
                    handle = await asyncio.to_thread(self.files.read_small, path, False)
        except NotRegular:
            log.warning("%s is in the database but not a regular file on disk", path)
            return None, record
        return handle, record


# ===========================================================================
# Resumable uploads (tus 1.0.0): the bytes of a large file over several requests
# ===========================================================================

TUS_VERSION = "1.0.0"
TUS_EXTENSIONS = ("creation,creation-with-upload,creation-defer-length,expiration,"
                  "termination,checksum")
TUS_CHECKSUMS: dict[str, Callable[[], Any]] = {"sha1": hashlib.sha1, "sha256": hashlib.sha256}
TUS_CONTENT_TYPE = "application/offset+octet-stream"
UPLOAD_SWEEP_INTERVAL = 600.0     # seconds between two looks for expired uploads
EXPIRED_KEPT = 86400.0            # an expired upload answers 410 (not 404) this long


class ResumableUploads:
    """The open resumable uploads: created, appended to chunk by chunk (each chunk fsynced
    and its offset committed before it is acknowledged), and, at the last byte, handed to
    Tree.store_upload like any other upload.

    The whole file's SHA-256 is carried in memory from chunk to chunk; after a restart
    it is computed again from the bytes received (a hashlib state cannot be stored).
    A chunk cut short keeps the bytes that arrived (see CutShort); a chunk refused (its
    checksum, past the length, a failing disk) is dropped: the file goes back to the last
    acknowledged offset.
    """

    def __init__(self, tree: Tree) -> None:
        self.tree = tree
        self.hashers: dict[str, tuple[int, Any]] = {}   # id -> (offset, SHA-256 so far)
        self.busy: set[str] = set()                     # ids with a PATCH under way

    async def create(self, client_id: str, length: int | None,
                     metadata: dict[str, str]) -> PartialUpload:
        """A new upload, once its metadata passed the checks an upload meets at its start."""
        config = self.tree.config
        if length is not None and length > config.max_file_size:
            raise TooLarge(f"the file exceeds max_file_size ({config.max_file_size} bytes)")
        upload_of_metadata(self.tree, metadata)       # 400, 409, 415: before any byte
        open_ones = [upload for upload in await self.tree.store.uploads_of(client_id)
                     if upload.received >= 0]
        if len(open_ones) >= config.max_partial_uploads:
            raise TooManyUploads(f"{client_id} has {len(open_ones)} resumable uploads open "
                                 f"(max_partial_uploads): finish or terminate one")
        if sum(upload.length or 0 for upload in open_ones) + (length or 0) > config.max_partial_bytes:
            raise TooManyUploads(f"the open resumable uploads of {client_id} would exceed "
                                 f"max_partial_bytes ({config.max_partial_bytes} bytes)")
        upload = PartialUpload(secrets.token_hex(16), client_id, length, 0, metadata,
                               time.time() + config.upload_expiry)
        await asyncio.to_thread(self.tree.files.new_partial, upload.id)
        await self.tree.store.save_upload(upload)
        log.info("resumable upload %s of %s (%s bytes) created for %s", upload.id,
                 metadata.get("relative_path"), length if length is not None else "?", client_id)
        return upload

    async def get(self, upload_id: str) -> PartialUpload:
        """An open upload; NotFound, or UploadGone when it expired."""
        upload = await self.tree.store.get_upload(upload_id) if len(upload_id) == 32 else None
        if upload is None:
            raise NotFound(f"no resumable upload {upload_id}")
        if upload.received >= 0 and upload.expires < time.time():
            await self._expire(upload)
        if upload.received < 0:
            raise UploadGone(f"the resumable upload {upload_id} expired")
        return upload

    async def append(self, upload: PartialUpload, offset: int, length: int | None,
                     chunks: AsyncIterator[bytes], checksum: tuple[str, bytes] | None
                     ) -> tuple[PartialUpload, FileRecord | None]:
        """Write a chunk at offset (which must be where the upload stands), fsync it, then
        acknowledge it; at the last byte, store the file. The upload, and the stored
        file's record once it is complete."""
        if upload.id in self.busy:
            raise WrongOffset("another PATCH of this upload is under way")
        self.busy.add(upload.id)
        try:
            async with self.tree.store.claim_upload(upload.id) as claimed:
                if not claimed:
                    raise WrongOffset("another PATCH of this upload is under way (on another "
                                      "node)")
                upload = await self.get(upload.id)   # as the last node to write it left it
                if offset != upload.received:
                    raise WrongOffset(f"Upload-Offset is {upload.received}, not {offset}")
                if length is not None:
                    self._set_length(upload, length)
                await self._write(upload, chunks, checksum)
                if upload.length is not None and upload.received == upload.length:
                    return upload, await self._complete(upload)
                return upload, None
        finally:
            self.busy.discard(upload.id)

    def _set_length(self, upload: PartialUpload, length: int) -> None:
        """Upload-Length given late (creation-defer-length)."""
        if upload.length is not None and upload.length != length:
            raise InvalidRequest(f"Upload-Length is {upload.length} already")
        if length < upload.received:
            raise InvalidRequest(f"Upload-Length {length} is less than the bytes received")
        if length > self.tree.config.max_file_size:
            raise TooLarge(f"the file exceeds max_file_size "
                           f"({self.tree.config.max_file_size} bytes)")
        upload.length = length

    async def _write(self, upload: PartialUpload, chunks: AsyncIterator[bytes],
                     checksum: tuple[str, bytes] | None) -> None:
        """The chunk, written and fsynced; the offset committed. Any failure drops it."""
        files, limit = self.tree.files, upload.length
        if limit is None:
            limit = self.tree.config.max_file_size
        hasher = await self._hasher(upload)
        before = hasher.copy()
        chunk_hasher = TUS_CHECKSUMS[checksum[0]]() if checksum else None
        fd = await asyncio.to_thread(files.open_partial, upload.id, upload.received)
        written = 0
        try:
            async for chunk in chunks:
                if upload.received + written + len(chunk) > limit:
                    raise TooLarge(f"the chunk goes past Upload-Length ({limit} bytes)")
                await asyncio.to_thread(write_and_hash_both, fd, hasher, chunk_hasher, chunk)
                written += len(chunk)
            if checksum is not None and chunk_hasher is not None \
                    and chunk_hasher.digest() != checksum[1]:
                raise ChunkChecksumMismatch("the chunk does not match its Upload-Checksum: "
                                            "it was not kept")
            await asyncio.to_thread(os.fsync, fd)
        except BaseException:
            self.hashers[upload.id] = (upload.received, before)
            raise
        finally:
            os.close(fd)
        upload.received += written
        upload.expires = time.time() + self.tree.config.upload_expiry
        await self.tree.store.save_upload(upload)
        self.hashers[upload.id] = (upload.received, hasher)
        self.tree.metrics.bytes_received.inc(written)

    async def _hasher(self, upload: PartialUpload) -> Any:
        """The SHA-256 of the bytes received, carried over or computed again."""
        offset, hasher = self.hashers.get(upload.id, (-1, None))
        if offset != upload.received or hasher is None:
            hasher = await asyncio.to_thread(self.tree.files.hash_partial, upload.id,
                                             upload.received)
        return hasher

    async def _complete(self, upload: PartialUpload) -> FileRecord:
        """Store the whole file as /upload would. A refusal of the file itself (a stale
        base, a bad checksum) ends the upload; a failing disk keeps it, for a retry (an
        empty PATCH at the last offset)."""
        hasher = await self._hasher(upload)
        assert upload.length is not None
        try:
            fields = upload_of_metadata(self.tree, upload.metadata)
            staged = await asyncio.to_thread(self.tree.files.stage_partial, upload.id,
                                             upload.length, hasher.hexdigest())
            record, _ = await self.tree.store_upload(staged, fields)
        except (StorageFailing, StorageFull):
            raise
        except Refused:
            await self._remove(upload)
            raise
        await self._remove(upload)
        return record

    async def terminate(self, upload: PartialUpload) -> None:
        """DELETE: the upload and its bytes are gone."""
        if upload.id in self.busy:
            raise WrongOffset("a PATCH of this upload is under way")
        async with self.tree.store.claim_upload(upload.id) as claimed:
            if not claimed:
                raise WrongOffset("a PATCH of this upload is under way (on another node)")
            await self._remove(upload)
        log.info("resumable upload %s terminated", upload.id)

    async def _remove(self, upload: PartialUpload) -> None:
        self.hashers.pop(upload.id, None)
        await asyncio.to_thread(self.tree.files.remove_partial, upload.id)
        await self.tree.store.drop_upload(upload.id)

    async def _expire(self, upload: PartialUpload) -> None:
        """Drop an expired upload's bytes; it answers 410 for a while, then 404."""
        self.hashers.pop(upload.id, None)
        await asyncio.to_thread(self.tree.files.remove_partial, upload.id)
        upload.received = -1
        await self.tree.store.save_upload(upload)
        log.info("resumable upload %s expired", upload.id)

    async def sweep(self) -> None:
        """Expire what is past its Upload-Expires; forget the long expired."""
        now = time.time()
        for upload in await self.tree.store.uploads_of(None):
            if upload.id in self.busy:
                continue
            async with self.tree.store.claim_upload(upload.id) as claimed:
                if not claimed:
                    continue
                if upload.received >= 0 and upload.expires < now:
                    await self._expire(upload)
                elif upload.received < 0 and upload.expires + EXPIRED_KEPT < now:
                    await self.tree.store.drop_upload(upload.id)

    async def sweep_forever(self) -> None:
        """The sweeper task."""
        while True:
            try:
                await self.sweep()
            except Exception as exc:
                if self.tree.failure(exc) is None:
                    raise
                log.warning("could not expire resumable uploads: %s", exc)
            await asyncio.sleep(UPLOAD_SWEEP_INTERVAL)


def write_and_hash_both(fd: int, hasher: Any, chunk_hasher: Any, data: bytes) -> None:
    """In a worker thread: write a chunk and feed both hashes."""
    write_all(fd, data)
    hasher.update(data)
    if chunk_hasher is not None:
        chunk_hasher.update(data)


def upload_of_metadata(tree: Tree, metadata: Mapping[str, str]) -> Upload:
    """The Upload that a resumable upload's metadata describes, checked as /upload checks
    its fields (and its precondition against the live file now)."""
    raw_path = metadata.get("relative_path")
    if raw_path is None:
        raise invalid_request("Upload-Metadata needs relative_path")
    path = validate_path(raw_path)
    tree.check_extension(path)
    if "client_id" not in metadata:
        raise invalid_request("Upload-Metadata needs client_id")
    client_id = validate_client_id(metadata["client_id"])
    claimed = metadata.get("checksum")
    pre = Precondition(base_checksum=None if "base_checksum" not in metadata else
                       validate_checksum(metadata["base_checksum"], "base_checksum",
                                         allow_empty=True))
    check_precondition(pre, tree.store.get(path))
    return Upload(path, client_id,
                  validate_modified_time(metadata["modified_time"])
                  if "modified_time" in metadata else time.time(),
                  None if claimed is None else validate_checksum(claimed, "checksum",
                                                                 allow_empty=False),
                  pre)


# ===========================================================================
# Devices: a token per device, revocable; failed authentications per address
# ===========================================================================

DEVICE_SCOPES = ("read", "write", "admin")      # each allows what the ones before it do
TOKEN_PREFIX = "syncd_"                         # makes a leaked token easy to grep for
DEVICE_SEEN_FLUSH = 60.0                        # seconds between writes of last_seen


def token_hash(token: str) -> str:
    """What is kept of a token. A fast hash is enough: a token has 256 random bits, so
    there is no dictionary to try, unlike a password."""
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


class Devices:
    """The enrolled devices, held in memory (every request asks) and kept in the store.
    last_seen is noted in memory and written every DEVICE_SEEN_FLUSH seconds."""

    def __init__(self, store: MetadataStore) -> None:
        self.store = store
        self.by_name: dict[str, Device] = {}
        self.by_hash: dict[str, Device] = {}
        self.seen: dict[str, float] = {}

    async def load(self) -> None:
        """Read the devices from the store."""
        self.by_name = {device.name: device for device in await self.store.list_devices()}
        self.by_hash = {device.token_hash: device for device in self.by_name.values()}

    def find(self, token: str) -> Device | None:
        """The device a token belongs to, revoked or not. Looked up by its hash, never
        compared as itself: the time a lookup takes can tell only about the hash, which
        does not lead back to a token (so this is the constant-time comparison)."""
        return self.by_hash.get(token_hash(token))

    async def add(self, name: str, scope: str) -> tuple[Device, str]:
        """Enrol a device (again, if it was revoked): the device and its new token, which
        exists only in the answer."""
        current = self.by_name.get(name)
        if current is not None and not current.revoked:
            raise NameTaken(f"a device named {name} is enrolled: revoke it first, or choose "
                            "another name")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        device = Device(name, scope, token_hash(token), time.time(), None, False)
        await self.store.save_device(device)
        if current is not None:
            self.by_hash.pop(current.token_hash, None)
        self.by_name[name], self.by_hash[device.token_hash] = device, device
        log.info("device %s enrolled (scope %s)", name, scope)
        return device, token

    async def revoke(self, name: str) -> Device:
        """Revoke a device's token: it is refused from now on (its record stays)."""
        device = self.by_name.get(name)
        if device is None:
            raise NotFound(f"no device {name}")
        if not device.revoked:
            await self.store.save_device(replace(device, revoked=True))
            device.revoked = True
            log.info("device %s revoked", name)
        return device

    def note_seen(self, device: Device) -> None:
        """The device made a request now."""
        device.last_seen = self.seen[device.name] = time.time()

    async def flush_seen(self) -> None:
        """Write the last_seen times noted since the last flush."""
        if self.seen:
            seen, self.seen = self.seen, {}
            await self.store.note_devices_seen(seen)

    async def flush_forever(self) -> None:
        """The task that writes last_seen now and then."""
        while True:
            await asyncio.sleep(DEVICE_SEEN_FLUSH)
            try:
                await self.flush_seen()
            except Exception as exc:
                log.warning("could not record when devices were last seen: %s", exc)


AUTH_FAILURE_RATE = 2.0        # failed authentications per second an address earns back
AUTH_FAILURE_BURST = 10        # failed authentications an address may make at once
AUTH_ADDRESSES_KEPT = 10_000   # addresses tracked at most (the oldest are forgotten)


@dataclass
class LoginBucket:
    """One address's allowance of failed authentications."""

    allowance: float
    when: float
    warned: bool = False


class FailedLogins:
    """Failed authentications per source address, as a token bucket each: a few per
    second, then 429 with Retry-After, so that a token cannot be guessed online. A
    warning is logged once per burst of one address, not once per request."""

    def __init__(self, rate: float = AUTH_FAILURE_RATE, burst: int = AUTH_FAILURE_BURST,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self.clock = rate, burst, clock
        self.buckets: dict[str, LoginBucket] = {}

    def _bucket(self, address: str) -> LoginBucket | None:
        """The address's bucket, refilled up to now; None (and forgotten) once full."""
        bucket = self.buckets.get(address)
        if bucket is None:
            return None
        now = self.clock()
        bucket.allowance = min(self.burst, bucket.allowance + (now - bucket.when) * self.rate)
        bucket.when = now
        if bucket.allowance >= self.burst:          # recovered: forget it
            del self.buckets[address]
            return None
        return bucket

    def retry_after(self, address: str) -> int | None:
        """Seconds until the address may try again, or None when it may now."""
        bucket = self._bucket(address)
        if bucket is None or bucket.allowance >= 1:
            return None
        return max(1, math.ceil((1 - bucket.allowance) / self.rate))

    def failed(self, address: str) -> None:
        """Count a failed authentication from address."""
        bucket = self._bucket(address)
        if bucket is None:
            if len(self.buckets) >= AUTH_ADDRESSES_KEPT:
                del self.buckets[next(iter(self.buckets))]
            bucket = self.buckets[address] = LoginBucket(float(self.burst), self.clock())
        bucket.allowance -= 1
        if bucket.allowance < 1 and not bucket.warned:
            bucket.warned = True
            log.warning("authentication failed %d times in a row from %s: refusing it for a "
                        "while (429)", self.burst, address)


# ===========================================================================
# HTTP: request parsing helpers
# ===========================================================================

class ApiError(Exception):
    """An error of the HTTP layer itself, answered as {"error": code, "message": ...}
    (what the tree refuses arrives as a Refused; error_middleware maps both)."""

    def __init__(self, status: int, code: str, message: str,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})
        self.extra: dict[str, Any] = {}      # more fields of the JSON answer


@dataclass
class State:
    """Everything the handlers share, hung off the Application."""

    tree: Tree
    uploads: ResumableUploads
    devices: Devices
    failed_logins: FailedLogins = field(default_factory=FailedLogins)
    tls: ssl.SSLContext | None = None       # the live one: a reload loads new files into it
    started: float = field(default_factory=time.monotonic)
    in_flight: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    stopping: bool = False
    stop: asyncio.Event = field(default_factory=asyncio.Event)    # SIGTERM, or halt()
    halted: str | None = None       # why the node stopped itself (it exits EXIT_STORAGE)
    accept_deletions: bool = False
    sync_slots: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(SYNC_SLOTS))
    tasks: Background = field(default_factory=Background)   # what runs beside the requests

    @property
    def config(self) -> Config:
        """The configuration in force (a reload replaces it)."""
        return self.tree.config


STATE = web.AppKey("state", State)
CLIENT_ID = web.RequestKey("client_id", str)
DEVICE = web.RequestKey("device", Device)      # set when a device token authenticated it


def state_of(request: web.Request) -> State:
    """The application's State."""
    return request.app[STATE]


# -- a cluster: what the nodes tell each other (one node alone tells nobody) ------------

def tell_nodes(state: State, news: str, telling: Callable[[], Awaitable[None]]) -> None:
    """Tell the other nodes news, by telling(), in the background: not worth failing a
    request for (a node that missed it reads the connections again when it reconnects)."""
    async def tell() -> None:
        try:
            await telling()
        except Exception as exc:
            if state.tree.failure(exc) is None:
                log.exception("telling the other nodes that %s failed", news)
            else:
                log.warning("could not tell the other nodes that %s: %s", news, exc)
    state.tasks.spawn(tell())


def announce(state: State, event: dict[str, Any], exclude: str | None) -> None:
    """An event about clients for every WebSocket but exclude's, on every node."""
    state.tree.hub.publish(event, exclude)
    tell_nodes(state, f"{event['client_id']} {event['type'].removeprefix('client_')}",
               lambda: state.tree.store.broadcast(
                   {"kind": "event", "event": event, "exclude": exclude}))


def hear_node(state: State, message: dict[str, Any]) -> None:
    """What another node told this one (the store's on_message)."""
    kind, hub = message.get("kind"), state.tree.hub
    if kind == "connected" and isinstance(message.get("client_id"), str):
        hub.replace_remote(message["client_id"], float(message.get("since", 0)))
    elif kind == "event" and isinstance(message.get("event"), dict):
        hub.publish(message["event"], message.get("exclude"))
    elif kind in ("devices", "rejoined"):
        state.tasks.spawn(reload_devices(state, rejoined=kind == "rejoined"))
    elif kind == "name_taken":
        halt(state, str(message.get("error")))


def halt(state: State, why: str) -> None:
    """Stop serving, as on SIGTERM, and exit EXIT_STORAGE: this node cannot go on safely."""
    log.error("stopping: %s", why)
    state.halted = why
    state.stop.set()


async def reload_devices(state: State, rejoined: bool) -> None:
    """Another node enrolled or revoked a device (or this one missed what it said while
    its connection was away): read the devices again, close the revoked ones' WebSockets;
    after a reconnection, note this node's WebSockets again."""
    hub = state.tree.hub
    try:
        await state.devices.load()
        for device in state.devices.by_name.values():
            if device.revoked and hub.drop_device(device.name):
                log.info("device %s was revoked on another node: its WebSockets closed",
                         device.name)
        if rejoined:
            for conn in list(hub.connections.values()):
                await state.tree.store.note_connection(conn.client_id, conn.opened, True)
    except Exception as exc:
        if state.tree.failure(exc) is None:
            raise
        log.warning("could not read the devices again: %s", exc)


def request_timeout(seconds: float) -> ApiError:
    """408: the client stopped sending."""
    return ApiError(408, "request_timeout", f"no bytes arrived for {seconds:g} s")


async def within(work: Awaitable[T], seconds: float) -> T:
    """work, or 408 if the client sends nothing for seconds."""
    try:
        async with asyncio.timeout(seconds):   # cheaper than wait_for: no task of its own
            return await work
    except TimeoutError:
        raise request_timeout(seconds) from None


async def idle_limited(chunks: AsyncIterator[bytes], seconds: float) -> AsyncIterator[bytes]:
    """chunks, but a 408 when the next one takes longer than seconds (a stalled client)."""
    iterator = chunks.__aiter__()
    while True:
        try:
            chunk = await within(iterator.__anext__(), seconds)
        except StopAsyncIteration:
            return
        yield chunk


def reject_constant(name: str) -> Any:
    """json.loads hook: NaN and Infinity are not JSON."""
    raise ValueError(f"{name} is not allowed in JSON")


def parse_json(text: str) -> Any:
    """json.loads that refuses NaN/Infinity and survives absurd nesting."""
    try:
        return json.loads(text, parse_constant=reject_constant)
    except RecursionError:
        raise invalid_request("the JSON is nested too deeply") from None
    except ValueError as exc:
        raise invalid_request(f"malformed JSON: {exc}") from None


async def read_body(request: web.Request, limit: int = JSON_BODY_LIMIT) -> bytearray:
    """The whole request body, or 413 past limit; 408 only when the client falls silent
    for upload_idle_timeout (a slow but steady link gets through, as for uploads)."""
    if request.content_length is not None and request.content_length > limit:
        raise body_too_large(limit)
    data = bytearray()
    async for chunk in idle_limited(request.content.iter_any(),
                                    state_of(request).config.upload_idle_timeout):
        data += chunk
        if len(data) > limit:
            raise body_too_large(limit)
    return data


def body_too_large(limit: int) -> TooLarge:
    """413 for a request body (not a file) over its limit."""
    return TooLarge(f"the request body is over {limit} bytes")


def decode_json_object(body: bytes | bytearray) -> dict[str, Any]:
    """A body as a JSON object, or 400."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise invalid_request("the body is not UTF-8") from None
    data = parse_json(text)
    if not isinstance(data, dict):
        raise invalid_request("the body must be a JSON object")
    return data


async def read_json_object(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object, or 400."""
    return decode_json_object(await read_body(request))


def optional_text(data: Mapping[str, Any], key: str, limit: int = 256) -> str | None:
    """An optional short string field."""
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > limit:
        raise invalid_request(f"{key} must be a string of at most {limit} characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:        # "\ud800" in JSON: a lone surrogate is no text
        raise invalid_request(f"{key} is not valid Unicode text") from None
    return value


def whole_number(value: Any, name: str) -> int:
    """A non-negative JSON integer."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise invalid_request(f"{name} must be a non-negative integer")
    return value


def query_int(request: web.Request, name: str, default: int) -> int:
    """A non-negative integer query parameter."""
    raw = request.query.get(name)
    if raw is None:
        return default
    if not re.fullmatch(r"[0-9]{1,18}", raw):
        raise invalid_request(f"{name} must be a non-negative integer")
    return int(raw)


def parse_sync_entries(value: Any) -> list[ClientEntry]:
    """The files list of a SyncRequest: validated, NFC paths, no path twice."""
    if not isinstance(value, list):
        raise invalid_request("files must be a list")
    entries: list[ClientEntry] = []
    seen: set[str] = set()
    for index, item in enumerate(value):
        try:
            entry = parse_sync_entry(item)
        except InvalidRequest as exc:   # name the entry only when it is wrong (100,000 are right)
            raise type(exc)(f"files[{index}]{exc.message}") from None
        if entry.path in seen:
            raise invalid_request(f"files[{index}].path {entry.path} is listed twice")
        seen.add(entry.path)
        entries.append(entry)
    return entries


def parse_sync_entry(item: Any) -> ClientEntry:
    """One entry of a SyncRequest; error messages start with the field (".path: ...")."""
    if not isinstance(item, dict):
        raise invalid_request(" must be an object")
    raw_path = item.get("path")
    if not isinstance(raw_path, str):
        raise invalid_request(".path must be a string")
    try:
        path = validate_path(raw_path)
    except InvalidPath as exc:
        raise InvalidPath(f".path: {exc.message}") from None
    base = item.get("base_checksum")
    return ClientEntry(
        path,
        validate_checksum(item.get("checksum"), ".checksum", allow_empty=False),
        whole_number(item.get("size"), ".size"),
        validate_modified_time(item.get("modified_time"), ".modified_time"),
        None if base is None else validate_checksum(base, ".base_checksum", allow_empty=True))


def parse_etags(header: str | None, *, strong: bool) -> tuple[str, ...] | None:
    """The entity tags of If-Match / If-None-Match ("*" kept as is), unquoted.

    If-Match compares strongly (RFC 9110 13.1.1): a weak tag W/"..." never
    matches, so it is kept with its W/ and matches no checksum. If-None-Match
    compares weakly: W/ is dropped. An empty tag "" is a tag that matches nothing.
    """
    if header is None:
        return None
    tags = []
    for part in header.split(","):
        tag = part.strip()
        weak = tag.startswith("W/")
        if weak:
            tag = tag[2:]
        if len(tag) >= 2 and tag[0] == tag[-1] == '"':
            tag = tag[1:-1]
        elif not tag:
            continue
        tag = tag.lower() if tag != "*" else tag
        tags.append("W/" + tag if weak and strong else tag)
    if not tags:
        raise invalid_request("an empty If-Match / If-None-Match header")
    return tuple(tags)


# ===========================================================================
# HTTP: downloads
# ===========================================================================

def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(offset, count) of a single byte range; None to send it all; 416 when outside."""
    if header is None:
        return None
    match = re.fullmatch(r"\s*bytes\s*=\s*([0-9]*)\s*-\s*([0-9]*)\s*", header,
                         re.IGNORECASE | re.ASCII)
    if not match or match.group(1) == match.group(2) == "":
        return None    # malformed or several ranges: RFC 9110 lets us ignore Range
    first, last = match.group(1), match.group(2)
    if first == "":
        suffix = range_number(last)
        if suffix == 0 or size == 0:
            raise range_not_satisfiable(size)
        return max(0, size - suffix), min(suffix, size)
    start = range_number(first)
    end = min(range_number(last), size - 1) if last else size - 1
    if start >= size or (last and range_number(last) < start):
        raise range_not_satisfiable(size)
    return start, end - start + 1


def range_number(digits: str) -> int:
    """A byte position; one of more than 18 digits is past any file (and int() refuses
    over 4,300 digits)."""
    return int(digits) if len(digits) <= 18 else 10**18


def range_not_satisfiable(size: int) -> ApiError:
    """416 with the Content-Range the RFC asks for."""
    return ApiError(416, "range_not_satisfiable", f"the range is outside the file ({size} bytes)",
                    headers={"Content-Range": f"bytes */{size}"})


def etag_matches(header: str | None, checksum: str) -> bool:
    """Whether a GET's If-None-Match names this checksum (or *); one that cannot be
    parsed is ignored, as RFC 9110 lets a cache condition be."""
    try:
        tags = parse_etags(header, strong=False)
    except InvalidRequest:
        return False
    return tags is not None and ("*" in tags or checksum in tags)


WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def http_date(seconds: float) -> str:
    """An RFC 9110 date (email.utils.formatdate takes five times as long: every download
    has one)."""
    t = time.gmtime(seconds)
    return (f"{WEEKDAYS[t.tm_wday]}, {t.tm_mday:02d} {MONTHS[t.tm_mon - 1]} {t.tm_year} "
            f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT")


@functools.lru_cache(maxsize=1024)
def content_type_of(extension: str) -> str:
    return mimetypes.guess_type("x" + extension)[0] or "application/octet-stream"


def content_type(path: str) -> str:
    """The Content-Type a download of path gets, by its extension."""
    name = path.rsplit("/", 1)[-1]
    dot = name.find(".", 1)        # from the first dot: x.tar.gz is guessed as a whole
    return content_type_of(name[dot:] if dot > 0 else "")


async def send_file(request: web.Request, handle: Any, record: FileRecord,
                    metrics: Metrics) -> web.StreamResponse:
    """Answer with the open file (sendfile) or the bytes read (a BytesIO), honouring Range
    and If-None-Match."""
    read = handle.getvalue() if isinstance(handle, io.BytesIO) else None
    size = len(read) if read is not None else os.fstat(handle.fileno()).st_size
    headers = {
        "ETag": f'"{record.checksum}"',
        "Last-Modified": http_date(record.modified_time),
        "X-Revision": str(record.revision),
        "Accept-Ranges": "bytes",
        "Content-Type": content_type(record.path),
        # A synced x.html or x.svg must never run script in the API's origin.
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": "sandbox",
    }
    if etag_matches(request.headers.get("If-None-Match"), record.checksum):
        return web.Response(status=304, headers=headers)
    if_range = request.headers.get("If-Range")
    use_range = if_range is None or if_range.strip() == f'"{record.checksum}"'
    span = parse_range(request.headers.get("Range"), size) if use_range else None
    offset, count = span if span is not None else (0, size)
    status = 206 if span else 200
    if span:
        headers["Content-Range"] = f"bytes {offset}-{offset + count - 1}/{size}"
    if count <= INLINE_LIMIT and request.method != "HEAD":
        # For a small file one read beats sendfile's set-up (it waits for the
        # transport to drain first); the fd still pins the version we opened.
        body = (read[offset:offset + count] if read is not None else
                await asyncio.to_thread(os.pread, handle.fileno(), count, offset))
        metrics.bytes_sent.inc(len(body))
        return web.Response(status=status, body=body, headers=headers)
    response = web.StreamResponse(status=status, headers=headers)
    response.content_length = count
    await response.prepare(request)
    if request.method == "HEAD" or count == 0:
        await response.write_eof()
        return response
    transport = request.transport
    if transport is None:
        raise ConnectionResetError("the client went away")
    loop = asyncio.get_running_loop()
    try:
        await loop.sendfile(transport, handle, offset, count)
        sent = count
    except NotImplementedError:   # no sendfile for this transport (TLS, some event loops)
        handle.seek(offset)
        sent = 0
        while sent < count:
            chunk = await loop.run_in_executor(None, handle.read, min(CHUNK_SIZE, count - sent))
            if not chunk:
                break
            await response.write(chunk)
            sent += len(chunk)
    metrics.bytes_sent.inc(sent)
    await response.write_eof()
    return response


# ===========================================================================
# HTTP: handlers
# ===========================================================================

def compact_json(data: Any) -> str:
    """JSON without spaces."""
    return json.dumps(data, separators=(",", ":"))


def json_response(data: Any, status: int = 200) -> web.Response:
    """A compact JSON response."""
    return web.json_response(data, status=status, dumps=compact_json)


def note_client(request: web.Request, client_id: str) -> str:
    """Remember the request's client id for the access log; 403 when a device token
    claims another client id than its device's (a device acts only as itself)."""
    device = request.get(DEVICE)
    if device is not None and client_id != device.name:
        raise forbidden(f"this token belongs to device {device.name}, which acts only as the "
                        f"client id {device.name} (not {client_id})")
    request[CLIENT_ID] = client_id
    return client_id


async def handle_health(request: web.Request) -> web.Response:
    """GET /health: liveness, with a few figures; 503 when storage is unusable."""
    state = state_of(request)
    tree = state.tree
    body: dict[str, Any] = {
        "status": "ok",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "version": __version__,
        "uptime_s": round(time.monotonic() - state.started, 3),
        "clients_connected": len(tree.hub.connections),
        "cursor": tree.store.cursor,
        "epoch": tree.store.epoch,
        "bytes": tree.store.live_bytes,
        "node": node_name(state.config),
    }
    try:
        await tree.store.check()
        body["files"] = tree.store.live_files
    except Exception as exc:
        log.error("health: the database is unusable: %s", exc)
        body.update(status="error", files=0, message="the database is unusable")
        return json_response(body, 503)
    if not tree.files.usable():
        log.error("health: the sync directory is not a writable folder")
        body.update(status="error", message="the sync directory is unusable")
        return json_response(body, 503)
    return json_response(body)


async def handle_register(request: web.Request) -> web.Response:
    """POST /register: store or refresh a client; announce it to the others."""
    tree = state_of(request).tree
    data = await read_json_object(request)
    client_id = note_client(request, validate_client_id(data.get("client_id")))
    name = optional_text(data, "name")
    is_new = await tree.store.register_client(
        client_id, name, optional_text(data, "platform"), optional_text(data, "version"))
    announce(state_of(request), {"type": "client_joined", "client_id": client_id,
                                 "name": name}, exclude=client_id)
    log.info("client %s %s", client_id, "registered" if is_new else "registered again")
    return json_response({"success": True,
                          "message": "registered" if is_new else "welcome back",
                          "cursor": tree.store.cursor})


async def handle_clients(request: web.Request) -> web.Response:
    """GET /clients: the registry, with who is connected now (to any node)."""
    tree = state_of(request).tree
    clients = await tree.store.list_clients()
    connected = set(tree.hub.connections) | await tree.store.connected_elsewhere()
    return json_response({"clients": [
        {"client_id": c.client_id, "name": c.name, "platform": c.platform,
         "version": c.version, "registered_at": c.registered_at, "last_seen": c.last_seen,
         "connected": c.client_id in connected}
        for c in clients]})


async def handle_sync(request: web.Request) -> web.Response:
    """POST /sync: the plan for a client's listing.

    A manifest of 100,000 entries is ~17.5 MB and costs ~80 MiB to parse and plan
    (README): at most SYNC_SLOTS are worked on at once, in a worker thread so
    that other requests are served meanwhile. The body is read before taking a
    slot, so a slow client holds none.
    """
    state = state_of(request)
    body = await read_body(request)
    async with state.sync_slots:     # plan_answer's data is gone before the next slot starts
        client_id, text = await plan_answer(state, body)
    note_client(request, client_id)
    try:
        await state.tree.store.touch_client(client_id)
    except Exception as exc:
        if state.tree.failure(exc) is None:
            raise
        log.warning("could not note that %s was seen: %s", client_id, exc)   # not worth a 503
    return web.Response(text=text, content_type="application/json")


async def plan_answer(state: State, body: bytearray) -> tuple[str, str]:
    """The client id of a SyncRequest body and the JSON text of its plan."""
    client_id, entries = await asyncio.to_thread(decode_sync_request, body)
    body.clear()                     # the parsed entries replace the bytes
    records, cursor = state.tree.store.snapshot()
    epoch = state.tree.store.epoch
    return client_id, await asyncio.to_thread(
        lambda: compact_json(plan_sync(entries, records).to_json(epoch, cursor)))


def decode_sync_request(body: bytearray) -> tuple[str, list[ClientEntry]]:
    """A SyncRequest's client id and entries (in a worker thread: it is the costly part)."""
    data = decode_json_object(body)
    client_id = validate_client_id(data.get("client_id"))
    return client_id, parse_sync_entries(data.pop("files", None))


# What aiohttp's multipart reader raises on a body it cannot parse (a wrong or missing
# boundary, a truncated body, a bad _charset_ part, a Content-Length that is no number).
MULTIPART_ERRORS = (ValueError, AssertionError, RuntimeError, LookupError, AttributeError,
                    HttpProcessingError)
MAX_PART_HEADERS = 128
MAX_PART_HEADER_BYTES = 8190      # as aiohttp allows for a request's own header lines
MAX_EPILOGUE = 64 * 1024          # text after the closing boundary (RFC 2046 lets it be)
HEADER_CONTROL_RE = re.compile("[\x00-\x08\x0a-\x1f\x7f]")


def malformed(exc: BaseException) -> InvalidRequest:
    """400 for a multipart body aiohttp could not parse (a client's mistake: no traceback)."""
    lines = str(exc).strip().splitlines()
    return invalid_request("malformed multipart body: " + (lines[0][:200] if lines else
                                                           type(exc).__name__))


async def multipart_step(work: Awaitable[T], idle: float) -> T:
    """One read of a multipart body: 408 when it stalls, 400 when it is malformed."""
    try:
        return await within(work, idle)
    except MULTIPART_ERRORS as exc:
        raise malformed(exc) from None


async def next_part(reader: aiohttp.MultipartReader, idle: float) -> aiohttp.BodyPartReader | None:
    """The next part of an upload, checked; None after the closing boundary."""
    part = await multipart_step(reader.next(), idle)
    if part is None:
        return None
    if not isinstance(part, aiohttp.BodyPartReader):
        raise invalid_request("a part of the upload is itself multipart")
    if len(part.headers) > MAX_PART_HEADERS:
        raise invalid_request(f"a part has more than {MAX_PART_HEADERS} headers")
    for name, value in part.headers.items():
        if len(name) + len(value) > MAX_PART_HEADER_BYTES or HEADER_CONTROL_RE.search(value):
            raise invalid_request(f"a part's {name[:50]} header is too long or holds a "
                                  "control character")
    length = part.headers.get("Content-Length")
    if length is not None and not re.fullmatch(r"[0-9]{1,18}", length.strip()):
        raise invalid_request("a part's Content-Length is not a number")   # aiohttp ignores it
    return part


async def check_epilogue(request: web.Request, idle: float) -> None:
    """400 when more than MAX_EPILOGUE bytes follow the closing boundary."""
    seen = 0
    while chunk := await multipart_step(request.content.readany(), idle):
        seen += len(chunk)
        if seen > MAX_EPILOGUE:
            raise invalid_request(f"more than {MAX_EPILOGUE} bytes after the closing boundary")


async def part_chunks(part: aiohttp.BodyPartReader) -> AsyncIterator[bytes]:
    """The bytes of one multipart part, chunk by chunk (stage_body applies the idle limit)."""
    while True:
        try:
            chunk = await part.read_chunk(CHUNK_SIZE)
        except MULTIPART_ERRORS as exc:
            raise malformed(exc) from None
        if not chunk:
            return
        yield chunk


async def read_text_field(part: aiohttp.BodyPartReader, idle: float) -> str:
    """A small multipart text field, or 400 (408 if it stalls)."""
    data = bytearray()
    while chunk := await multipart_step(part.read_chunk(MAX_TEXT_FIELD), idle):
        data += chunk
        if len(data) > MAX_TEXT_FIELD:
            raise invalid_request(f"the field {part.name} is longer than {MAX_TEXT_FIELD} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise invalid_request(f"the field {part.name} is not UTF-8") from None


async def receive_body(tree: Tree, chunks: AsyncIterator[bytes], idle: float) -> StagedFile:
    """A request's file bytes into the tree's temp file; 408 if the client falls silent."""
    return await tree.receive(idle_limited(chunks, idle))


async def handle_upload(request: web.Request) -> web.Response:
    """POST /upload (multipart): store a file; its text fields may come before or after it."""
    tree = state_of(request).tree
    try:
        reader = await request.multipart()
    except (AssertionError, ValueError, KeyError):
        raise invalid_request("the body must be multipart/form-data") from None
    fields_seen: dict[str, str] = {}
    staged: StagedFile | None = None
    idle = tree.config.upload_idle_timeout
    try:
        for _ in range(MAX_MULTIPART_PARTS + 1):
            part = await next_part(reader, idle)
            if part is None:
                await check_epilogue(request, idle)
                break
            if part.name == "file":
                if staged is not None:
                    raise invalid_request("more than one file part")
                if "relative_path" in fields_seen:      # refuse early, before the bytes
                    tree.check_extension(validate_path(fields_seen["relative_path"]))
                staged = await receive_body(tree, part_chunks(part), idle)
            elif part.name in fields_seen:
                raise invalid_request(f"the field {part.name} is given twice")
            else:
                fields_seen[part.name or ""] = await read_text_field(part, idle)
        else:
            raise invalid_request(f"more than {MAX_MULTIPART_PARTS} parts")
        if staged is None:
            raise invalid_request("the file part is missing")
        upload = upload_of_fields(request, tree, fields_seen)
    except BaseException:
        if staged is not None:
            tree.discard(staged)
        raise
    record, _ = await tree.store_upload(staged, upload)
    return json_response({"success": True, **record.to_json()})


def upload_of_fields(request: web.Request, tree: Tree, fields_seen: Mapping[str, str]) -> Upload:
    """The Upload that /upload's text fields describe, or 400 (415)."""
    raw_path = fields_seen.get("relative_path")
    if raw_path is None:
        raise invalid_request("relative_path is required")
    path = validate_path(raw_path)
    tree.check_extension(path)
    client_id = note_client(request, validate_client_id(fields_seen.get("client_id")))
    pre = Precondition(base_checksum=None if "base_checksum" not in fields_seen else
                       validate_checksum(fields_seen["base_checksum"], "base_checksum",
                                         allow_empty=True))
    claimed = fields_seen.get("checksum")
    checksum = None if claimed is None else validate_checksum(claimed, "checksum",
                                                              allow_empty=False)
    modified_time = (validate_modified_time(fields_seen["modified_time"])
                     if "modified_time" in fields_seen else time.time())
    return Upload(path, client_id, modified_time, checksum, pre)


@dataclass
class BulkFile:
    """One file of a POST /bulk: what its meta asked, and its bytes or why it is refused."""

    path: str                            # as the client wrote it, for its result
    upload: Upload | None = None
    staged: StagedFile | None = None
    refusal: Exception | None = None     # a Refused, or a storage error


async def handle_bulk(request: web.Request) -> web.Response:
    """POST /bulk: many files in one multipart body (client_id, then meta + file pairs),
    each checked and stored as by /upload, independently; all durable before the answer.
    A malformed body, or one over max_bulk_files / max_bulk_size, stores nothing."""
    tree = state_of(request).tree
    config = tree.config
    if request.content_length is not None and request.content_length > config.max_bulk_size + \
            config.max_bulk_files * MAX_TEXT_FIELD + MAX_TEXT_FIELD:
        raise TooLarge(f"a bulk upload carries at most {config.max_bulk_size} bytes")
    try:
        reader = await request.multipart()
    except (AssertionError, ValueError, KeyError):
        raise invalid_request("the body must be multipart/form-data") from None
    files: list[BulkFile] = []
    try:
        client_id = await receive_bulk(request, reader, tree, files)
        # all at once: they join one group commit, in request order
        results = await asyncio.gather(*(store_bulk_file(tree, client_id, item)
                                         for item in files))
    finally:
        for item in files:
            if item.staged is not None:
                tree.discard(item.staged)
    return json_response({"results": results, "cursor": tree.store.cursor})


async def receive_bulk(request: web.Request, reader: aiohttp.MultipartReader, tree: Tree,
                       files: list[BulkFile]) -> str:
    """Read a whole /bulk body into files (each file's bytes in a temp file); its client id."""
    config = tree.config
    idle = config.upload_idle_timeout
    first = await next_part(reader, idle)
    if first is None or first.name != "client_id":
        raise invalid_request("a bulk upload starts with the field client_id")
    client_id = note_client(request, validate_client_id(await read_text_field(first, idle)))
    received = 0
    while (part := await next_part(reader, idle)) is not None:
        if part.name != "meta":
            raise invalid_request(f"part {part.name!r} where a meta part was expected "
                                  "(each file is a meta part, then its file part)")
        if len(files) == config.max_bulk_files:
            raise TooLarge(f"a bulk upload carries at most {config.max_bulk_files} files")
        item = bulk_file(request, tree, client_id, await read_text_field(part, idle))
        files.append(item)
        part = await next_part(reader, idle)
        if part is None or part.name != "file":
            raise invalid_request(f"the meta of {item.path!r} is not followed by its file part")
        chunks = CountedChunks(part_chunks(part))
        if item.refusal is None:
            try:
                item.staged = await receive_body(tree, chunks, idle)
            except TooLarge as exc:
                item.refusal = exc
        async for _ in idle_limited(chunks, idle):   # a refused file's bytes count too
            pass
        received += chunks.count
        if received > config.max_bulk_size:
            raise TooLarge(f"a bulk upload carries at most {config.max_bulk_size} bytes")
    await check_epilogue(request, idle)
    return client_id


class CountedChunks:
    """An async iterator of chunks that counts their bytes (and can be drained after a
    consumer stopped early)."""

    def __init__(self, chunks: AsyncIterator[bytes]) -> None:
        self.chunks = chunks
        self.count = 0

    def __aiter__(self) -> CountedChunks:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self.chunks.__anext__()
        self.count += len(chunk)
        return chunk


def bulk_file(request: web.Request, tree: Tree, client_id: str, meta_text: str) -> BulkFile:
    """The BulkFile a meta part describes; a meta that is not a JSON object is a malformed
    body (400 for the whole request), a bad field refuses this file alone."""
    meta = decode_json_object(meta_text.encode("utf-8"))
    raw_path = meta.get("relative_path")
    item = BulkFile(raw_path if isinstance(raw_path, str) else "")
    try:
        fields_seen = {key: value for key, value in meta.items()
                       if key in ("relative_path", "checksum", "base_checksum", "modified_time")}
        if not isinstance(raw_path, str):
            raise invalid_request("relative_path is required")
        if not all(isinstance(value, (str, int, float)) and not isinstance(value, bool)
                   for value in fields_seen.values()):
            raise invalid_request("meta fields are strings (modified_time may be a number)")
        item.upload = upload_of_fields(request, tree, {
            **{key: str(value) for key, value in fields_seen.items()}, "client_id": client_id})
    except Refused as exc:
        item.refusal = exc
    return item


async def store_bulk_file(tree: Tree, client_id: str, item: BulkFile) -> dict[str, Any]:
    """Store one received file of a /bulk; its result."""
    if item.refusal is None and item.upload is not None and item.staged is not None:
        staged, item.staged = item.staged, None         # store_upload takes it over
        try:
            record, _ = await tree.store_upload(staged, item.upload)
            return {"path": record.path, "status": 200, "success": True, **record.to_json()}
        except Refused as exc:
            item.refusal = exc
        except Exception as exc:
            if tree.failure(exc) is None:
                raise
            log.error("bulk upload of %s for %s: %s", item.path, client_id, exc)
            item.refusal = tree.failure(exc)
    assert isinstance(item.refusal, Refused)
    error = refusal_error(item.refusal)
    return {"path": item.path, "status": error.status, "error": error.code,
            "message": error.message, **error.extra}


async def handle_put_file(request: web.Request) -> web.Response:
    """PUT /files/{path}: store the raw body; 201 when it created the file."""
    tree = state_of(request).tree
    path = validate_path(request.match_info["path"])
    tree.check_extension(path)
    client_id = note_client(request, validate_client_id(request.headers.get("X-Client-Id")))
    claimed = request.headers.get("X-Checksum-Sha256")
    checksum = None if claimed is None else validate_checksum(claimed, "X-Checksum-Sha256",
                                                              allow_empty=False)
    raw_mtime = request.headers.get("X-Modified-Time")
    modified_time = (validate_modified_time(raw_mtime, "X-Modified-Time")
                     if raw_mtime is not None else time.time())
    pre = Precondition(if_match=parse_etags(request.headers.get("If-Match"), strong=True),
                       if_none_match=parse_etags(request.headers.get("If-None-Match"),
                                                 strong=False))
    limit = tree.config.max_file_size
    if request.content_length is not None and request.content_length > limit:
        raise TooLarge(f"the file exceeds max_file_size ({limit} bytes)")
    staged = await receive_body(tree, request.content.iter_chunked(CHUNK_SIZE),
                                tree.config.upload_idle_timeout)
    record, created = await tree.store_upload(
        staged, Upload(path, client_id, modified_time, checksum, pre))
    return json_response({"success": True, **record.to_json()}, 201 if created else 200)


async def handle_delete_file(request: web.Request) -> web.Response:
    """DELETE /files/{path}: remove a file, or every file under a folder."""
    tree = state_of(request).tree
    path = validate_path(request.match_info["path"])
    client_id = note_client(request, validate_client_id(request.query.get("client_id")))
    base = request.query.get("base_checksum")
    pre = Precondition(
        base_checksum=None if base is None else validate_checksum(
            base, "base_checksum", allow_empty=True),
        if_match=parse_etags(request.headers.get("If-Match"), strong=True))
    deleted, revision = await tree.delete(path, client_id, pre)
    return json_response({"success": True, "path": path, "deleted": deleted,
                          "revision": revision})


async def handle_move(request: web.Request) -> web.Response:
    """POST /move {"client_id", "from", "to", "base_checksum"?}: rename a file or a folder."""
    tree = state_of(request).tree
    data = await read_json_object(request)
    client_id = note_client(request, validate_client_id(data.get("client_id")))
    paths = []
    for key in ("from", "to"):
        raw = data.get(key)
        if not isinstance(raw, str):
            raise invalid_request(f"{key} must be a path")
        try:
            paths.append(validate_path(raw))
        except InvalidPath as exc:
            raise InvalidPath(f"{key}: {exc.message}") from None
    base = data.get("base_checksum")
    pre = Precondition(base_checksum=None if base is None else validate_checksum(
        base, "base_checksum", allow_empty=False))
    moved, cursor = await tree.move(paths[0], paths[1], client_id, pre)
    return json_response({"success": True, "moved": moved, "cursor": cursor})


def tus_headers(upload: PartialUpload | None = None) -> dict[str, str]:
    """The headers every tus answer carries, and an upload's state."""
    headers = {"Tus-Resumable": TUS_VERSION}
    if upload is not None:
        headers["Upload-Offset"] = str(upload.received)
        headers["Upload-Expires"] = http_date(upload.expires)
        if upload.length is None:
            headers["Upload-Defer-Length"] = "1"
        else:
            headers["Upload-Length"] = str(upload.length)
    return headers


def tus_route(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
              ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """A tus handler: Tus-Resumable checked (412 without it; OPTIONS needs none) and put on
    every answer, errors included (as the contract's JSON)."""
    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            if request.method != "OPTIONS" and request.headers.get("Tus-Resumable") != TUS_VERSION:
                raise TusUnsupported("Tus-Resumable: 1.0.0 is required")
            response = await handler(request)
        except Refused as exc:
            error = refusal_error(exc)
            error.headers["Tus-Resumable"] = TUS_VERSION
            if isinstance(exc, TusUnsupported):
                error.headers["Tus-Version"] = TUS_VERSION
            raise error from None
        except ApiError as error:       # 408: the client stalled
            error.headers["Tus-Resumable"] = TUS_VERSION
            raise
        response.headers["Tus-Resumable"] = TUS_VERSION
        return response
    return wrapped


def tus_number(request: web.Request, name: str) -> int | None:
    """A non-negative integer header, or None when absent; 400 when it is not one."""
    raw = request.headers.get(name)
    if raw is None:
        return None
    if not raw.isdigit() or len(raw) > 19:
        raise invalid_request(f"{name} must be a non-negative integer")
    return int(raw)


def parse_upload_metadata(header: str | None) -> dict[str, str]:
    """Upload-Metadata: comma-separated "key base64(value)" pairs (the value may be left
    out); 400 when it cannot be read."""
    metadata: dict[str, str] = {}
    for item in (header or "").split(","):
        if not item.strip():
            continue
        key, _, encoded = item.strip().partition(" ")
        if not key or key in metadata or " " in encoded.strip():
            raise invalid_request("Upload-Metadata must be comma-separated 'key base64' pairs, "
                                  "each key once")
        try:
            metadata[key] = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            raise invalid_request(f"Upload-Metadata {key}: not base64 of UTF-8 text") from None
    return metadata


def parse_upload_checksum(header: str | None) -> tuple[str, bytes] | None:
    """Upload-Checksum: "sha1|sha256 base64(digest)"; 400 otherwise."""
    if header is None:
        return None
    algorithm, _, encoded = header.strip().partition(" ")
    if algorithm not in TUS_CHECKSUMS:
        raise invalid_request("Upload-Checksum algorithm must be one of "
                              + ", ".join(TUS_CHECKSUMS))
    try:
        return algorithm, base64.b64decode(encoded.strip(), validate=True)
    except ValueError:
        raise invalid_request("Upload-Checksum must be 'algorithm base64'") from None


def tus_method(request: web.Request) -> str:
    """The method meant: X-HTTP-Method-Override on a POST (for clients that cannot send
    PATCH or DELETE), else the request's own."""
    override = request.headers.get("X-HTTP-Method-Override")
    if request.method == "POST" and override:
        return override.strip().upper()
    return request.method


@tus_route
async def handle_tus_options(request: web.Request) -> web.Response:
    """OPTIONS /uploads/: what this tus server speaks."""
    return web.Response(status=204, headers={
        "Tus-Version": TUS_VERSION, "Tus-Extension": TUS_EXTENSIONS,
        "Tus-Max-Size": str(state_of(request).config.max_file_size),
        "Tus-Checksum-Algorithm": ",".join(TUS_CHECKSUMS)})


@tus_route
async def handle_tus_create(request: web.Request) -> web.StreamResponse:
    """POST /uploads/: a new upload (creation), with its first bytes if the body has them
    (creation-with-upload)."""
    if tus_method(request) != "POST":
        raise invalid_request("X-HTTP-Method-Override is for an upload's own URL")
    uploads = state_of(request).uploads
    length = tus_number(request, "Upload-Length")
    deferred = request.headers.get("Upload-Defer-Length")
    if (length is None) == (deferred is None) or deferred not in (None, "1"):
        raise invalid_request("either Upload-Length, or Upload-Defer-Length: 1, is required")
    metadata = parse_upload_metadata(request.headers.get("Upload-Metadata"))
    client_id = note_client(request, validate_client_id(metadata.get("client_id")))
    upload = await uploads.create(client_id, length, metadata)
    headers = {"Location": f"/uploads/{upload.id}"}
    if request.content_type == TUS_CONTENT_TYPE and request.can_read_body:
        upload, record = await receive_chunk(request, upload, 0)
        if record is not None:
            headers["X-Revision"] = str(record.revision)
    headers.update(tus_headers(upload))
    return web.Response(status=201, headers=headers)


@tus_route
async def handle_tus_upload(request: web.Request) -> web.StreamResponse:
    """HEAD, PATCH, DELETE (or POST with X-HTTP-Method-Override) /uploads/{id}."""
    uploads = state_of(request).uploads
    method = tus_method(request)
    upload = await uploads.get(request.match_info["id"])
    note_client(request, upload.client_id)          # a device may touch only its own
    if method == "HEAD":
        return web.Response(status=200, headers={**tus_headers(upload),
                                                 "Cache-Control": "no-store"})
    if method == "DELETE":
        await uploads.terminate(upload)
        return web.Response(status=204)
    if method != "PATCH":
        raise web.HTTPMethodNotAllowed(method, ["HEAD", "PATCH", "DELETE", "OPTIONS"])
    if request.content_type != TUS_CONTENT_TYPE:
        raise WrongContentType(f"Content-Type must be {TUS_CONTENT_TYPE}")
    offset = tus_number(request, "Upload-Offset")
    if offset is None:
        raise invalid_request("Upload-Offset is required")
    upload, record = await receive_chunk(request, upload, offset)
    headers = tus_headers(upload)
    if record is not None:
        headers["X-Revision"] = str(record.revision)
    return web.Response(status=204, headers=headers)


class CutShort:
    """A request body that ends, instead of failing, where the client went away or
    stalled: tus asks a server to keep as much of a chunk as it received (a hotel Wi-Fi
    that drops every few minutes would otherwise never get a large chunk through). The
    failure is kept for the handler, once the bytes are stored. A chunk with an
    Upload-Checksum cut short fails its checksum and is dropped, as tus says."""

    def __init__(self, chunks: AsyncIterator[bytes]) -> None:
        self.source = chunks
        self.failure: BaseException | None = None

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self.source:
                yield chunk
        except ConnectionResetError as exc:
            self.failure = exc
        except ApiError as exc:
            if exc.status != 408:
                raise
            self.failure = exc


async def receive_chunk(request: web.Request, upload: PartialUpload,
                        offset: int) -> tuple[PartialUpload, FileRecord | None]:
    """The request body as the upload's next chunk (as much of it as arrived)."""
    state = state_of(request)
    body = CutShort(idle_limited(request.content.iter_chunked(CHUNK_SIZE),
                                 state.config.upload_idle_timeout))
    result = await state.uploads.append(
        upload, offset, tus_number(request, "Upload-Length"), body.chunks(),
        parse_upload_checksum(request.headers.get("Upload-Checksum")))
    if isinstance(body.failure, ApiError):
        raise body.failure
    if body.failure is not None:    # nobody to answer: one line, not a traceback
        log.info("resumable upload %s: the connection was lost; %d bytes kept", upload.id,
                 result[0].received)
    return result


async def handle_download(request: web.Request) -> web.StreamResponse:
    """GET/HEAD /download/{path} and /files/{path}: the file's bytes (?revision=N: that
    revision's, kept as a version or live)."""
    tree = state_of(request).tree
    path = validate_path(request.match_info["path"])
    if "revision" in request.query:
        handle, record = await tree.open_revision(path, query_int(request, "revision", 0))
    else:
        handle, record = await tree.open_for_read(path)
    try:
        return await send_file(request, handle, record, tree.metrics)
    finally:
        handle.close()


async def handle_versions(request: web.Request) -> web.Response:
    """GET /versions/{path}: the live file and its kept versions, newest first."""
    path = validate_path(request.match_info["path"])
    live, kept = await state_of(request).tree.versions(path)
    return json_response({"path": path, "current": live.to_json() if live else None,
                          "versions": [version.to_json() for version in kept]})


async def handle_trash(request: web.Request) -> web.Response:
    """GET /trash?prefix=P: deleted paths whose last content is kept."""
    prefix = unicodedata.normalize("NFC", request.query.get("prefix", ""))
    kept = await state_of(request).tree.store.trash(prefix)
    return json_response({"files": [version.trash_json() for version in kept]})


async def handle_restore(request: web.Request) -> web.Response:
    """POST /restore: one path to a kept revision, or a folder (or everything) to a moment."""
    tree = state_of(request).tree
    data = await read_json_object(request)
    client_id = note_client(request, validate_client_id(data.get("client_id")))
    if "at" in data or "prefix" in data:
        prefix = data.get("prefix", "")
        if not isinstance(prefix, str):
            raise invalid_request("prefix must be a path, or \"\" for the whole tree")
        delete_newer = data.get("delete_newer", False)
        if not isinstance(delete_newer, bool):
            raise invalid_request("delete_newer must be true or false")
        dry_run = data.get("dry_run", False)
        if not isinstance(dry_run, bool):
            raise invalid_request("dry_run must be true or false")
        prefix, at = validate_path(prefix) if prefix else "", whole_number(data.get("at"), "at")
        if dry_run:
            plan = await tree.plan_restore_at(prefix, at, delete_newer)
            return json_response(plan.to_json(tree.store.cursor))
        result = await tree.restore_at(prefix, at, client_id, delete_newer)
        return json_response(result.to_json())
    raw_path = data.get("path")
    if not isinstance(raw_path, str):
        raise invalid_request("path (with revision), or prefix with at, is required")
    base = data.get("base_checksum")
    pre = Precondition(base_checksum=None if base is None else validate_checksum(
        base, "base_checksum", allow_empty=True))
    record, _ = await tree.restore(validate_path(raw_path), whole_number(
        data.get("revision"), "revision"), client_id, pre)
    return json_response({"success": True, **record.to_json()})


async def handle_delete_versions(request: web.Request) -> web.Response:
    """DELETE /versions/{path}?client_id=ID[&revision=N]: destroy kept versions."""
    tree = state_of(request).tree
    path = validate_path(request.match_info["path"])
    client_id = note_client(request, validate_client_id(request.query.get("client_id")))
    revision = query_int(request, "revision", 0) if "revision" in request.query else None
    removed = await tree.remove_versions(path, revision)
    log.info("%d version(s) of %s destroyed by %s", removed, path, client_id)
    return json_response({"success": True, "removed": removed})


async def handle_list_files(request: web.Request) -> web.Response:
    """GET /files?prefix=P: live files whose path starts with P."""
    store = state_of(request).tree.store
    prefix = unicodedata.normalize("NFC", request.query.get("prefix", ""))
    records, cursor = store.list_live(prefix)
    return json_response({"files": [record.to_json() for record in records], "cursor": cursor})


async def handle_changes(request: web.Request) -> web.Response:
    """GET /changes?since=N&limit=M: the journal after N."""
    store = state_of(request).tree.store
    since = query_int(request, "since", 0)
    limit = query_int(request, "limit", CHANGES_DEFAULT_LIMIT)
    if limit < 1:
        raise invalid_request("limit must be at least 1")
    changes, cursor, has_more = await store.changes_since(
        since, min(limit, CHANGES_MAX_LIMIT))
    return json_response({
        "changes": [change.to_json() for change in changes],
        "cursor": changes[-1].seq if changes else cursor,
        "has_more": has_more,
        "epoch": store.epoch,
    })


def ws_error(code: str, message: str) -> str:
    """An error message on the WebSocket."""
    return json.dumps({"type": "error", "error": code, "message": message})


def answer_ws_message(hub: Hub, conn: Connection, msg: Any) -> None:
    """React to one frame from a client."""
    if msg.type == WSMsgType.PING:
        hub.send(conn, bytes(msg.data))
    elif msg.type == WSMsgType.BINARY:
        hub.send(conn, ws_error("invalid_request", "binary frames are not supported"))
    elif msg.type == WSMsgType.TEXT:
        try:
            data = parse_json(msg.data)
        except InvalidRequest as exc:
            hub.send(conn, ws_error("invalid_request", exc.message))
            return
        kind = data.get("type") if isinstance(data, dict) else None
        if kind == "heartbeat":
            hub.send(conn, json.dumps({"type": "heartbeat_ack", "timestamp": time.time()}))
        elif not conn.told_unknown:     # once: a client of another design may send many
            conn.told_unknown = True
            hub.send(conn, ws_error("unknown_type", f"unknown message type {kind!r} (ignored, "
                                    "and not answered again on this connection)"))


async def handle_ws(request: web.Request) -> web.WebSocketResponse:
    """GET /ws/{client_id}: live events for one client."""
    tree = state_of(request).tree
    hub = tree.hub
    client_id = note_client(request, validate_client_id(request.match_info["client_id"]))
    limit = tree.config.max_websocket_clients
    if client_id not in hub.connections and len(hub.connections) >= limit:
        raise ApiError(503, "too_many_clients", f"{limit} WebSocket clients are connected already")
    # autoping off: we answer pings ourselves, so that a pong counts as hearing from the client
    # + 1: aiohttp refuses a frame whose length reaches max_msg_size; the contract allows 64 KiB
    ws = web.WebSocketResponse(autoping=False, max_msg_size=MAX_WS_MESSAGE + 1, timeout=5.0,
                               protocols=(WS_PROTOCOL,))
    await ws.prepare(request)
    hello = {"type": "hello", "client_id": client_id, "cursor": tree.store.cursor,
             "epoch": tree.store.epoch, "server_time": time.time()}
    # No await between reading the cursor and joining the hub: no event is missed or doubled.
    conn = hub.connect(client_id, ws, request.transport, hello)
    if (device := request.get(DEVICE)) is not None:
        conn.device = device.name
    log.info("client %s connected", client_id)
    state = state_of(request)
    tell_nodes(state, f"{client_id} connected",
               lambda: tree.store.note_connection(client_id, conn.opened, True))
    try:
        async for msg in ws:
            if not conn.may_send(time.monotonic()):
                log.warning("client %s sends too many messages: closing it (1008)", client_id)
                await hub.close(conn, WS_CLOSE_POLICY, "too many messages")
                break
            answer_ws_message(hub, conn, msg)
    finally:
        if hub.disconnect(conn):
            if not conn.replaced:
                announce(state, {"type": "client_left", "client_id": client_id},
                         exclude=client_id)
            tell_nodes(state, f"{client_id} disconnected",
                       lambda: tree.store.note_connection(client_id, conn.opened, False))
            log.info("client %s disconnected", client_id)
    return ws


async def handle_add_device(request: web.Request) -> web.Response:
    """POST /devices {"name", "scope"?}: enrol a device; its token is in this answer only."""
    data = await read_json_object(request)
    name = validate_client_id(data.get("name"))
    scope = data.get("scope", "write")
    if scope not in DEVICE_SCOPES:
        raise invalid_request("scope must be one of " + ", ".join(DEVICE_SCOPES))
    device, token = await state_of(request).devices.add(name, scope)
    response = json_response({"device": device.name, "scope": device.scope, "token": token},
                             status=201)
    response.headers["Cache-Control"] = "no-store"
    return response


async def handle_list_devices(request: web.Request) -> web.Response:
    """GET /devices: every device, revoked ones too (never a token)."""
    devices = sorted(state_of(request).devices.by_name.values(), key=lambda device: device.name)
    return json_response({"devices": [device.to_json() for device in devices]})


async def handle_revoke_device(request: web.Request) -> web.Response:
    """DELETE /devices/{name}: its token is refused from now on, its WebSockets closed."""
    state = state_of(request)
    device = await state.devices.revoke(request.match_info["name"])
    closed = state.tree.hub.drop_device(device.name)
    if closed:
        log.info("device %s: %d WebSocket(s) closed", device.name, closed)
    return json_response({"success": True, **device.to_json()})


async def handle_whoami(request: web.Request) -> web.Response:
    """GET /whoami: whose credentials the request carries (ours: the web page asks)."""
    device = request.get(DEVICE)
    if device is None:
        return json_response({"admin": True, "device": None, "scope": "admin"})
    return json_response({"admin": device.scope == "admin", "device": device.name,
                          "scope": device.scope})


async def handle_metrics(request: web.Request) -> web.Response:
    """GET /metrics: Prometheus text format (the gauges are read by watch_gauges)."""
    body = state_of(request).tree.metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST,
                                            "X-Content-Type-Options": "nosniff"})


def gauges_of(state: State) -> list[tuple[str, str, float]]:
    """The gauges /metrics reports, as they are now."""
    tree = state.tree
    return [
        ("syncd_websocket_clients", "WebSocket clients connected now.", len(tree.hub.connections)),
        ("syncd_files", "Live files stored.", tree.store.live_files),
        ("syncd_stored_bytes", "Bytes of the live files stored.", tree.store.live_bytes),
        ("syncd_cursor", "The last change's seq.", tree.store.cursor),
        ("syncd_versions", "Versions kept.", tree.store.version_count),
        ("syncd_version_bytes", "Bytes the kept versions take (each content once).",
         tree.store.blob_bytes),
        ("syncd_uptime_seconds", "Seconds since start.", time.monotonic() - state.started),
    ]


# ===========================================================================
# Web page: one page for the people who run the server (GET /), on the public API
# ===========================================================================

# The page runs only its own script and style, talks only to this server, and cannot be
# framed; every value it shows from the server is put in as text (textContent).
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "img-src 'self'; connect-src 'self'; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

PAGE_HTML = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>syncd</title>
<link rel="stylesheet" href="/app.css">
<script src="/app.js" defer></script>
</head>
<body>
<header>
  <h1>syncd</h1>
  <span id="whoami"></span>
  <button id="logout" type="button" hidden>Sign out</button>
</header>
<div id="error" role="alert" hidden></div>
<section id="login" hidden>
  <h2>Sign in</h2>
  <p>This server needs its API key, or a device token.</p>
  <input id="key" type="password" autocomplete="current-password" aria-label="API key or device token" placeholder="API key or device token">
  <button id="signin" type="button">Sign in</button>
</section>
<main id="app" hidden>
  <nav>
    <a href="#status">Status</a><a href="#clients">Clients</a><a href="#feed">Changes</a>
    <a href="#files">Files</a><a href="#trash">Trash</a><a href="#pit">Restore a folder</a>
    <a href="#devices" class="admin-only">Devices</a>
  </nav>
  <section id="status" class="card"><h2>Status</h2><dl id="status-list"></dl></section>
  <section id="clients" class="card"><h2>Clients</h2>
    <table><thead><tr><th>Client</th><th>Name</th><th>Platform</th><th>Version</th><th>Connected</th><th>Last seen</th></tr></thead>
    <tbody id="clients-body"></tbody></table></section>
  <section id="feed" class="card"><h2>Latest changes <span id="feed-state" class="muted"></span></h2>
    <ul id="feed-list" class="feed"></ul></section>
  <section id="files" class="card"><h2>Files</h2>
    <div id="crumbs" class="crumbs"></div>
    <table><thead><tr><th>Name</th><th>Size</th><th>Modified</th></tr></thead><tbody id="files-body"></tbody></table>
    <div id="versions" hidden>
      <h3>Versions of <span id="versions-path"></span></h3>
      <table><thead><tr><th>Revision</th><th>Size</th><th>Modified</th><th>Replaced</th><th></th></tr></thead>
      <tbody id="versions-body"></tbody></table>
    </div>
  </section>
  <section id="trash" class="card"><h2>Trash</h2>
    <table><thead><tr><th>Path</th><th>Size</th><th>Deleted</th><th>By</th><th></th></tr></thead>
    <tbody id="trash-body"></tbody></table></section>
  <section id="pit" class="card"><h2>Restore a folder as it was</h2>
    <div class="form">
      <label>Folder <input id="pit-prefix" placeholder="(the whole tree)"></label>
      <label>As it was at <input id="pit-time" type="datetime-local" step="1"></label>
      <label class="check"><input id="pit-delete" type="checkbox"> also delete files created since</label>
      <button id="pit-preview" type="button">Preview</button>
    </div>
    <div id="pit-result" hidden>
      <p id="pit-summary"></p>
      <ul id="pit-list"></ul>
      <button id="pit-go" type="button" class="danger">Restore</button>
    </div>
  </section>
  <section id="devices" class="card admin-only"><h2>Devices</h2>
    <div class="form">
      <label>Name <input id="device-name" placeholder="laptop"></label>
      <label>Scope <select id="device-scope"><option>write</option><option>read</option><option>admin</option></select></label>
      <button id="device-add" type="button">Add device</button>
    </div>
    <div id="token-box" hidden>
      <p>The token of <b id="token-device"></b>, shown this once:</p>
      <code id="token-value"></code> <button id="token-copy" type="button">Copy</button>
    </div>
    <table><thead><tr><th>Device</th><th>Scope</th><th>Enrolled</th><th>Last seen</th><th></th></tr></thead>
    <tbody id="devices-body"></tbody></table>
  </section>
</main>
</body>
</html>
"""

PAGE_CSS = r""":root { --fg: #1d2330; --muted: #667085; --line: #d9dee7; --bg: #f6f7f9; --card: #fff;
        --accent: #2457c5; --danger: #b42318; font-family: system-ui, sans-serif; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--fg); font-size: 15px; }
header { display: flex; align-items: center; gap: 1em; padding: .6em 1em; background: var(--card);
         border-bottom: 1px solid var(--line); }
header h1 { font-size: 1.2em; margin: 0; }
#whoami { color: var(--muted); flex: 1; }
nav { display: flex; flex-wrap: wrap; gap: .3em 1em; padding: .6em 1em; }
nav a { color: var(--accent); text-decoration: none; }
main { display: grid; grid-template-columns: repeat(auto-fit, minmax(420px, 1fr)); gap: 1em;
       padding: 0 1em 1em; }
main > nav { grid-column: 1 / -1; padding: .6em 0 0; }
.card, #login { background: var(--card); border: 1px solid var(--line); border-radius: 8px;
                padding: .8em 1em; overflow-x: auto; }
#login { max-width: 28em; margin: 3em auto; }
h2 { font-size: 1.05em; margin: 0 0 .6em; }
h3 { font-size: 1em; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: .3em .5em; border-bottom: 1px solid var(--line);
         vertical-align: top; word-break: break-word; }
th { color: var(--muted); font-weight: 600; font-size: .9em; white-space: nowrap;
     word-break: normal; }
.nowrap { white-space: nowrap; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: .2em 1em; margin: 0; }
dt { color: var(--muted); }
dd { margin: 0; word-break: break-all; }
.feed { list-style: none; padding: 0; margin: 0; max-height: 22em; overflow-y: auto; }
.feed li { padding: .3em 0; border-bottom: 1px solid var(--line); }
.muted, .when { color: var(--muted); font-size: .9em; }
.crumbs button, .link { background: none; border: none; color: var(--accent); cursor: pointer;
                        padding: 0; font: inherit; text-align: left; }
.form { display: flex; flex-wrap: wrap; gap: .6em 1em; align-items: end; margin-bottom: .8em; }
label { display: flex; flex-direction: column; gap: .2em; color: var(--muted); font-size: .9em; }
label.check { flex-direction: row; align-items: center; }
input, select, button { font: inherit; padding: .35em .6em; }
button { border: 1px solid var(--line); border-radius: 6px; background: #fff; cursor: pointer; }
button.danger { color: var(--danger); border-color: var(--danger); }
#error { background: #fef3f2; color: var(--danger); border: 1px solid #fecdca; margin: .6em 1em;
         padding: .6em 1em; border-radius: 6px; }
code { background: var(--bg); padding: .2em .4em; border-radius: 4px; word-break: break-all; }
.deleted { color: var(--danger); }
@media (max-width: 600px) {
  main { grid-template-columns: 1fr; padding: 0 .5em .5em; }
  header, nav { padding-left: .5em; padding-right: .5em; }
  #clients th:nth-child(3), #clients td:nth-child(3),
  #clients th:nth-child(4), #clients td:nth-child(4) { display: none; }
}
"""

PAGE_JS = r""""use strict";
// The syncd web page: the public API only, with the key or token typed in (kept in
// sessionStorage). Every value from the server is put in as text, never as HTML.
const KEY_SLOT = "syncd-key";
const FEED_MAX = 100;
let me = null;            // GET /whoami
let folder = "";          // the file browser's folder ("" : the top)
let socket = null;
let pollTimer = null;
let lastSeq = 0;

const $ = (id) => document.getElementById(id);

function el(tag, text, attrs) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, value);
  return node;
}

function row(cells) {
  const tr = el("tr");
  for (const cell of cells) {
    const td = el("td");
    if (cell instanceof Node) td.append(cell); else td.textContent = cell === null ? "" : String(cell);
    tr.append(td);
  }
  return tr;
}

function button(label, action, danger) {
  const b = el("button", label, { type: "button" });
  if (danger) b.className = "danger";
  b.addEventListener("click", () => action(b));
  return b;
}

function size(bytes) {
  const units = ["bytes", "KiB", "MiB", "GiB", "TiB"];
  let value = bytes, unit = 0;
  while (value >= 1024 && unit < units.length - 1) { value /= 1024; unit++; }
  return unit === 0 ? `${bytes} bytes` : `${value.toFixed(value < 10 ? 1 : 0)} ${units[unit]}`;
}

function ago(seconds) {
  const delta = Date.now() / 1000 - seconds;
  if (delta < 45) return "just now";
  if (delta < 3600) return `${Math.round(delta / 60)} min ago`;
  if (delta < 86400) return `${Math.round(delta / 3600)} h ago`;
  return `${Math.round(delta / 86400)} days ago`;
}

function sizeCell(bytes) { return el("span", size(bytes), { class: "nowrap" }); }

function fill(body, rows, empty, columns) {
  if (rows.length) { body.replaceChildren(...rows); return; }
  const line = el("tr");
  line.append(el("td", empty, { class: "muted", colspan: String(columns) }));
  body.replaceChildren(line);
}

function when(seconds) {
  if (!seconds) return el("span", "never", { class: "when" });
  const local = new Date(seconds * 1000).toLocaleString();
  return el("span", `${ago(seconds)} (${local})`, { class: "when", title: local });
}

function duration(seconds) {
  const d = Math.floor(seconds / 86400), h = Math.floor(seconds % 86400 / 3600),
        m = Math.floor(seconds % 3600 / 60);
  return d ? `${d} d ${h} h` : h ? `${h} h ${m} min` : `${m} min ${Math.floor(seconds % 60)} s`;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

class ApiError extends Error {
  constructor(status, code, message) { super(message); this.status = status; this.code = code; }
}

function authHeaders() {
  const key = sessionStorage.getItem(KEY_SLOT);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function api(method, path, body) {
  const options = { method, headers: authHeaders() };
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, options);
  } catch (error) {
    throw new ApiError(0, "unreachable", "The server cannot be reached. Is it running?");
  }
  const data = response.headers.get("Content-Type")?.startsWith("application/json")
    ? await response.json() : null;
  if (!response.ok) {
    const words = {
      401: "The key or token was refused.", 403: "This key or token may not do that.",
      404: "It is not there (any more).", 409: "It changed meanwhile; look again and retry.",
      429: "Too many failed sign-ins from here; wait a little.",
      503: "The server's storage is failing.", 507: "The server's disk is full.",
    };
    const detail = data && data.message ? ` (${data.message})` : "";
    throw new ApiError(response.status, data && data.error,
                       (words[response.status] || `The server answered ${response.status}.`) + detail);
  }
  return data;
}

function actor() { return me && me.device ? me.device : "web-console"; }

function quotePath(path) { return path.split("/").map(encodeURIComponent).join("/"); }

// -- sign in ----------------------------------------------------------------------------

async function start() {
  $("signin").addEventListener("click", signIn);
  $("key").addEventListener("keydown", (event) => { if (event.key === "Enter") signIn(); });
  $("logout").addEventListener("click", signOut);
  $("pit-preview").addEventListener("click", () => guarded(previewRestore));
  $("device-add").addEventListener("click", () => guarded(addDevice));
  $("token-copy").addEventListener("click", copyToken);
  try {
    me = await api("GET", "/whoami");
  } catch (error) {
    if (error.status === 401) { showLogin(); return; }
    showError(error.message);
    return;
  }
  await enter();
}

function showLogin() {
  $("login").hidden = false;
  $("app").hidden = true;
  $("key").focus();
}

async function signIn() {
  sessionStorage.setItem(KEY_SLOT, $("key").value.trim());
  $("key").value = "";
  try {
    me = await api("GET", "/whoami");
  } catch (error) {
    sessionStorage.removeItem(KEY_SLOT);
    showError(error.message);
    return;
  }
  showError("");
  $("login").hidden = true;
  await enter();
}

function signOut() {
  sessionStorage.removeItem(KEY_SLOT);
  if (socket) socket.close();
  location.reload();
}

async function enter() {
  $("app").hidden = false;
  $("logout").hidden = !sessionStorage.getItem(KEY_SLOT);
  $("whoami").textContent = me.device ? `device ${me.device} (${me.scope})` : "admin";
  for (const node of document.querySelectorAll(".admin-only")) node.hidden = !me.admin;
  await guarded(async () => {
    await Promise.all([loadStatus(), loadClients(), loadFeed(), loadFolder(""), loadTrash(),
                       me.admin ? loadDevices() : null]);
  });
  follow();
  setInterval(() => guarded(() => Promise.all([loadStatus(), loadClients()])), 10000);
}

async function guarded(work) {
  try {
    await work();
    showError("");
  } catch (error) {
    showError(error.message);
    if (error.status === 401) signOutSoon();
  }
}

function signOutSoon() { sessionStorage.removeItem(KEY_SLOT); setTimeout(() => location.reload(), 3000); }

// -- status and clients -----------------------------------------------------------------

async function loadStatus() {
  const health = await api("GET", "/health");
  const list = $("status-list");
  list.replaceChildren();
  const items = [["status", health.status + (health.message ? `: ${health.message}` : "")],
                 ["version", health.version], ["uptime", duration(health.uptime_s)],
                 ["files", health.files], ["bytes", size(health.bytes || 0)],
                 ["cursor", health.cursor], ["epoch", health.epoch],
                 ["clients connected", health.clients_connected]];
  if (health.node) items.push(["node", health.node]);
  for (const [name, value] of items) list.append(el("dt", name), el("dd", value));
}

async function loadClients() {
  const { clients } = await api("GET", "/clients");
  fill($("clients-body"), clients.map((c) => row(
    [c.client_id, c.name, c.platform, c.version, c.connected ? "connected" : "no", when(c.last_seen)])),
    "No client has registered yet.", 6);
}

// -- live feed --------------------------------------------------------------------------

async function loadFeed() {
  const health = await api("GET", "/health");
  const since = Math.max(0, health.cursor - 30);
  const page = await api("GET", `/changes?since=${since}&limit=30`);
  for (const change of page.changes) addChange(change, change.time);
  lastSeq = Math.max(lastSeq, page.cursor);
}

function addChange(change, time) {
  lastSeq = Math.max(lastSeq, change.seq || 0);
  const deleted = change.type === "delete" || change.type === "file_deleted";
  const item = el("li");
  item.append(el("b", change.path, deleted ? { class: "deleted" } : {}), " ",
              el("span", deleted ? "deleted" : size(change.size)), " ",
              el("span", `by ${change.client_id}`, { class: "muted" }), " ", when(time));
  const list = $("feed-list");
  list.prepend(item);
  while (list.children.length > FEED_MAX) list.lastChild.remove();
}

function follow() {
  // A device's own id would replace its sync client's WebSocket: a device polls instead.
  if (me.device) { poll(); return; }
  const key = sessionStorage.getItem(KEY_SLOT);
  const protocols = ["syncd"];
  if (key) protocols.push("syncd.auth." + base64url(key));
  const id = "web-" + Math.random().toString(16).slice(2, 10);
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  socket = new WebSocket(`${scheme}://${location.host}/ws/${id}`, protocols);
  socket.addEventListener("open", () => { $("feed-state").textContent = "(live)"; });
  socket.addEventListener("message", (event) => {
    const message = JSON.parse(event.data);
    if (message.type === "file_changed" || message.type === "file_deleted") {
      addChange(message, Date.now() / 1000);
      if (parentOf(message.path) === folder) guarded(() => loadFolder(folder));
      if (message.type === "file_deleted") guarded(loadTrash);
    } else if (message.type === "client_joined" || message.type === "client_left") {
      guarded(loadClients);
    }
  });
  socket.addEventListener("close", () => {
    $("feed-state").textContent = "(reconnecting)";
    setTimeout(follow, 3000);
  });
}

function poll() {
  $("feed-state").textContent = "(every 3 s)";
  pollTimer = setInterval(() => guarded(async () => {
    const page = await api("GET", `/changes?since=${lastSeq}&limit=100`);
    for (const change of page.changes) addChange(change, change.time);
  }), 3000);
}

function base64url(text) {
  const bytes = new TextEncoder().encode(text);
  let binary = "";
  for (const byte of bytes) binary += String.fromCharCode(byte);
  return btoa(binary).replaceAll("+", "-").replaceAll("/", "_").replaceAll("=", "");
}

// -- files and versions -----------------------------------------------------------------

function parentOf(path) { const cut = path.lastIndexOf("/"); return cut < 0 ? "" : path.slice(0, cut); }

async function loadFolder(target) {
  const prefix = target ? target + "/" : "";
  const { files } = await api("GET", `/files?prefix=${encodeURIComponent(prefix)}`);
  folder = target;
  const subfolders = new Map(), here = [];
  for (const file of files) {
    const rest = file.path.slice(prefix.length);
    const cut = rest.indexOf("/");
    if (cut < 0) here.push(file);
    else {
      const name = rest.slice(0, cut);
      const entry = subfolders.get(name) || { count: 0, size: 0 };
      entry.count++; entry.size += file.size;
      subfolders.set(name, entry);
    }
  }
  const crumbs = $("crumbs");
  crumbs.replaceChildren(button("top", () => guarded(() => loadFolder(""))));
  let walked = "";
  for (const part of target ? target.split("/") : []) {
    walked = walked ? `${walked}/${part}` : part;
    const destination = walked;
    crumbs.append(" / ", button(part, () => guarded(() => loadFolder(destination))));
  }
  const body = $("files-body");
  body.replaceChildren();
  if (!files.length) fill(body, [], target ? "This folder is empty now." : "No files yet.", 3);
  for (const [name, entry] of [...subfolders].sort()) {
    const link = el("button", name + "/", { type: "button", class: "link" });
    link.addEventListener("click", () => guarded(() => loadFolder(prefix + name)));
    body.append(row([link, `${entry.count} files, ${size(entry.size)}`, ""]));
  }
  for (const file of here) {
    const link = el("button", file.path.slice(prefix.length), { type: "button", class: "link" });
    link.addEventListener("click", () => guarded(() => loadVersions(file.path)));
    body.append(row([link, sizeCell(file.size), when(file.modified_time)]));
  }
}

async function loadVersions(path) {
  const data = await api("GET", `/versions/${quotePath(path)}`);
  $("versions").hidden = false;
  $("versions-path").textContent = path;
  const body = $("versions-body");
  body.replaceChildren();
  if (data.current) {
    body.append(row([`${data.current.revision} (current)`, sizeCell(data.current.size),
                     when(data.current.modified_time), "",
                     button("Download", () => guarded(() => download(path, data.current.revision)))]));
  }
  for (const version of data.versions) {
    const actions = el("span");
    actions.append(button("Download", () => guarded(() => download(path, version.revision))), " ",
                   button("Restore", () => guarded(() => restoreVersion(path, version, data.current))));
    body.append(row([version.revision, sizeCell(version.size), when(version.modified_time),
                     `${version.reason} by ${version.replaced_by}`, actions]));
  }
}

async function download(path, revision) {
  const response = await fetch(`/download/${quotePath(path)}?revision=${revision}`,
                               { headers: authHeaders() });
  if (!response.ok) throw new ApiError(response.status, "", `The download failed (${response.status}).`);
  const url = URL.createObjectURL(await response.blob());
  const link = el("a", "", { href: url, download: path.split("/").pop() });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60000);
}

async function restoreVersion(path, version, current) {
  const replacing = current ? " The current content is kept as a version." : "";
  if (!confirm(`Make revision ${version.revision} of ${path} the live file again?${replacing}`)) return;
  await api("POST", "/restore", { client_id: actor(), path, revision: version.revision,
                                  base_checksum: current ? current.checksum : "" });
  await Promise.all([loadVersions(path), loadFolder(folder), loadTrash()]);
}

// -- trash ------------------------------------------------------------------------------

async function loadTrash() {
  const { files } = await api("GET", "/trash");
  fill($("trash-body"), files.map((file) => row([
    file.path, sizeCell(file.size), when(file.time), file.deleted_by,
    button("Restore", () => guarded(() => restoreFromTrash(file)))])), "The trash is empty.", 5);
}

async function restoreFromTrash(file) {
  await api("POST", "/restore", { client_id: actor(), path: file.path, revision: file.revision,
                                  base_checksum: "" });
  await Promise.all([loadTrash(), loadFolder(folder)]);
}

// -- point in time ----------------------------------------------------------------------

let pending = null;

async function seqAt(moment) {
  let since = 0, found = 0;
  for (let pages = 0; pages < 10000; pages++) {
    const page = await api("GET", `/changes?since=${since}&limit=1000`);
    for (const change of page.changes) {
      if (change.time > moment) return found;
      found = change.seq;
    }
    if (!page.has_more || page.changes.length === 0) return found;
    since = page.changes[page.changes.length - 1].seq;
  }
  return found;
}

async function previewRestore() {
  const chosen = $("pit-time").value;
  if (!chosen) throw new ApiError(0, "", "Choose the moment to go back to.");
  const moment = new Date(chosen).getTime() / 1000;
  const prefix = $("pit-prefix").value.trim().replace(/\/+$/, "");
  const at = await seqAt(moment);
  const request = { client_id: actor(), prefix, at, delete_newer: $("pit-delete").checked };
  const plan = await api("POST", "/restore", { ...request, dry_run: true });
  pending = request;
  const list = $("pit-list");
  list.replaceChildren(...plan.restore.map((path) => el("li", `restore ${path}`)),
                       ...plan.delete.map((path) => el("li", `delete ${path}`, { class: "deleted" })),
                       ...plan.unavailable.map((path) => el("li", `${path}: its content then is no longer kept`,
                                                            { class: "muted" })));
  $("pit-summary").textContent = `${prefix || "The whole tree"} as at ${new Date(moment * 1000).toLocaleString()}` +
    ` (change ${at}): ${plan.restore.length} to restore, ${plan.delete.length} to delete, ` +
    `${plan.unavailable.length} no longer kept.`;
  $("pit-result").hidden = false;
  const go = $("pit-go");
  go.disabled = plan.restore.length + plan.delete.length === 0;
  go.onclick = () => guarded(carryOutRestore);
}

async function carryOutRestore() {
  if (!pending || !confirm("Restore these files now? What they hold now is kept as versions.")) return;
  const result = await api("POST", "/restore", pending);
  pending = null;
  $("pit-result").hidden = true;
  $("pit-summary").textContent = "";
  showError("");
  alert(`${result.restored} restored, ${result.deleted} deleted` +
        (result.blocked.length ? `, ${result.blocked.length} changed meanwhile and left alone` : "") + ".");
  await Promise.all([loadFolder(folder), loadTrash()]);
}

// -- devices ----------------------------------------------------------------------------

async function loadDevices() {
  const { devices } = await api("GET", "/devices");
  fill($("devices-body"), devices.map((device) => row([
    device.device, device.scope, when(device.created), when(device.last_seen),
    device.revoked ? el("span", "revoked", { class: "muted" })
                   : button("Revoke", () => guarded(() => revokeDevice(device.device)), true)])),
    "No device enrolled: each device can have a token of its own.", 5);
}

async function addDevice() {
  const name = $("device-name").value.trim();
  if (!name) throw new ApiError(0, "", "Give the device a name.");
  const added = await api("POST", "/devices", { name, scope: $("device-scope").value });
  $("device-name").value = "";
  $("token-device").textContent = added.device;
  $("token-value").textContent = added.token;
  $("token-box").hidden = false;
  await loadDevices();
}

async function copyToken() {
  const token = $("token-value").textContent;
  try {
    await navigator.clipboard.writeText(token);
    $("token-copy").textContent = "Copied";
  } catch (error) {
    const range = document.createRange();
    range.selectNodeContents($("token-value"));
    getSelection().removeAllRanges();
    getSelection().addRange(range);
    $("token-copy").textContent = "Selected: press Ctrl+C";
  }
}

async function revokeDevice(name) {
  if (!confirm(`Revoke ${name}? Its token stops working at once.`)) return;
  await api("DELETE", `/devices/${encodeURIComponent(name)}`);
  await loadDevices();
}

start();
"""

PAGE_FILES = {"/": (PAGE_HTML, "text/html"), "/app.css": (PAGE_CSS, "text/css"),
              "/app.js": (PAGE_JS, "text/javascript")}


async def handle_page(request: web.Request) -> web.Response:
    """GET /, /app.css, /app.js: the web page (open: it holds no secret; it asks for one)."""
    text, kind = PAGE_FILES[request.path]
    return web.Response(text=text, content_type=kind, charset="utf-8", headers=PAGE_HEADERS)


# ===========================================================================
# HTTP: middlewares (metrics, errors, auth) and the access log
# ===========================================================================

def route_name(request: web.Request) -> str:
    """The route's pattern, e.g. /files/{path} (bounded: never the request's own path)."""
    route = request.match_info.route
    canonical = route.resource.canonical if route.resource is not None else None
    return canonical.replace("{path:.*}", "{path}") if canonical else "unmatched"


@web.middleware
async def accounting_middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Count requests in progress, so that shutdown can wait for them (see drain); count
    every request by route, method and final status, and time it. (One middleware for
    both: each layer costs every request a coroutine.)"""
    state = state_of(request)
    state.in_flight += 1
    state.idle.clear()
    started = time.monotonic()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        if state.stopping and not response.prepared:
            response.force_close()     # no further request on this connection
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        state.tree.metrics.observe_request(route_name(request), request.method, status,
                                           time.monotonic() - started)
        state.in_flight -= 1
        if state.in_flight == 0:
            state.idle.set()

# The contract's status for each kind of refusal (the first class of its MRO listed here).
REFUSAL_STATUS: dict[type[Refused], int] = {
    InvalidRequest: 400, NotFound: 404, Conflict: 409, CaseConflict: 409,
    PreconditionFailed: 412, TooLarge: 413, ExtensionNotAllowed: 415,
    StorageFailing: 503, StorageFull: 507,
    WrongOffset: 409, UploadGone: 410, TusUnsupported: 412, WrongContentType: 415,
    TooManyUploads: 429, ChunkChecksumMismatch: 460, NameTaken: 409,
}


def refusal_error(refusal: Refused) -> ApiError:
    """The HTTP answer to what the tree (or a parser) refused."""
    status = next(REFUSAL_STATUS[kind] for kind in type(refusal).__mro__ if kind in REFUSAL_STATUS)
    error = ApiError(status, refusal.code, refusal.message)
    if isinstance(refusal, Stale):
        error.extra["server"] = refusal.server.to_json() if refusal.server else None
    if isinstance(refusal, StorageFailing) and refusal.retry_after is not None:
        error.headers["Retry-After"] = str(refusal.retry_after)
    return error


HTTP_ERROR_CODES = {400: "invalid_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                    405: "method_not_allowed", 413: "too_large"}


def error_response(error: ApiError) -> web.Response:
    """The contract's JSON error."""
    response = json_response({"error": error.code, "message": error.message, **error.extra},
                             error.status)
    response.headers.update(error.headers)
    return response


@web.middleware
async def error_middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Every error as JSON; never a traceback or a server path."""
    try:
        return await handler(request)
    except ApiError as exc:
        response = error_response(exc)
        if exc.status == 408:
            response.force_close()      # the rest of the body may still come: drop it
        return response
    except Refused as exc:
        return error_response(refusal_error(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = HTTP_ERROR_CODES.get(exc.status, "invalid_request" if exc.status < 500 else "internal")
        message = exc.reason if exc.status != 413 else "the request body is too large"
        return error_response(ApiError(exc.status, code, message))
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception as exc:
        answer = state_of(request).tree.failure(exc)
        if answer is not None:
            log.error("%s %s: %s (%s)", request.method, request.path, answer.message, exc)
            return error_response(refusal_error(answer))
        log.exception("error while handling %s %s", request.method, request.path)
        return error_response(ApiError(500, "internal", "internal server error"))


def forbidden(message: str) -> ApiError:
    """403 forbidden."""
    return ApiError(403, "forbidden", message)


def host_name(host: str) -> str:
    """A Host header's name: no port, no IPv6 brackets, lower-case, no trailing dot."""
    host = host.strip().lower()
    if host.startswith("[") and "]" in host:
        return host[1:host.index("]")]
    return host.rsplit(":", 1)[0].rstrip(".")


@functools.lru_cache(maxsize=256)     # asked on every request, of a handful of names
def is_local_host(name: str) -> bool:
    """Whether a host name is an IP address or localhost (what DNS rebinding cannot fake)."""
    if name == "localhost":
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def source_address(request: web.Request, config: Config) -> str:
    """Who sent the request: the peer, or, when the peer is a trusted proxy, the address
    that proxy says it forwarded for (the last X-Forwarded-For entry: the one it added)."""
    peer = request.remote or "-"
    forwarded = request.headers.get("X-Forwarded-For")
    if forwarded and peer in config.trusted_proxies:
        return forwarded.rsplit(",", 1)[-1].strip() or peer
    return peer


def request_scheme(request: web.Request, config: Config) -> str:
    """http or https as the client used it: a trusted proxy's X-Forwarded-Proto (TLS ends
    at the proxy), else our own."""
    proto = request.headers.get("X-Forwarded-Proto", "").strip().lower()
    if proto in ("http", "https") and (request.remote or "") in config.trusted_proxies:
        return proto
    return request.scheme


def check_browser_request(request: web.Request, config: Config) -> None:
    """403 for what a web page in the user's browser could send us (SPEC Part 2, "Browsers").

    An Origin header that is neither ours nor allowed is another site's page
    (a cross-site form, fetch or WebSocket); without an API key, a Host that
    is no IP address, not localhost and not allowed is a DNS-rebinding page.
    """
    origin = request.headers.get("Origin")
    host = request.headers.get("Host")
    if origin is not None and not (request.method == "GET" and request.path == "/health"):
        own = normal_origin(f"{request_scheme(request, config)}://{host}") if host else None
        theirs = normal_origin(origin)
        if theirs is None or (theirs != own and theirs not in config.allowed_origins):
            raise forbidden("requests from another site's page are refused "
                            "(allowed_origins lists the ones to accept)")
    name = host_name(host) if host is not None else "localhost"
    if config.api_key is None and not is_local_host(name) and name not in config.allowed_hosts:
        raise forbidden("unknown Host: without api_key only IP addresses, localhost and "
                        "allowed_hosts are served")


WS_PROTOCOL = "syncd"                 # the subprotocol a WebSocket answer names
WS_AUTH_PROTOCOL = "syncd.auth."      # + base64url(key): a browser's way to send the key


def presented_key(request: web.Request) -> str | None:
    """The API key or token the request carries, if any. A WebSocket may carry it in the
    query (?token=) or, from a browser, which can set no header and should not put a
    secret in a URL (proxies log URLs), as a subprotocol syncd.auth.BASE64URL(key)."""
    authorization = request.headers.get("Authorization", "")
    if authorization[:7].lower() == "bearer ":
        return authorization[7:].strip()
    if "X-API-Key" in request.headers:
        return request.headers["X-API-Key"]
    if request.path.startswith("/ws/"):
        for offered in request.headers.get("Sec-WebSocket-Protocol", "").split(","):
            if offered.strip().startswith(WS_AUTH_PROTOCOL):
                encoded = offered.strip()[len(WS_AUTH_PROTOCOL):]
                try:
                    return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)
                                                    ).decode("utf-8")
                except (ValueError, UnicodeDecodeError):
                    return ""           # presented, and wrong
        return request.query.get("token")
    return None


def key_matches(presented: str, expected: str) -> bool:
    """Constant-time comparison (of bytes: compare_digest refuses non-ASCII str)."""
    return hmac.compare_digest(presented.encode("utf-8", "surrogateescape"),
                               expected.encode("utf-8"))


def unauthorized(message: str) -> ApiError:
    """401, with the challenge RFC 6750 names."""
    return ApiError(401, "unauthorized", message, headers={"WWW-Authenticate": "Bearer"})


def required_scope(method: str, path: str) -> str:
    """The scope a route needs: admin for the devices and for destroying versions (a
    stolen device must not be able to make its deletions final), read for what only
    reads (and /sync, /register, the WebSocket), write for the rest."""
    if path == "/devices" or path.startswith("/devices/") or (
            method == "DELETE" and path.startswith("/versions/")):
        return "admin"
    if method in ("GET", "HEAD", "OPTIONS") or path in ("/sync", "/register"):
        return "read"
    return "write"


def authenticate(request: web.Request, state: State) -> None:
    """401 unless the request carries the API key (the admin) or a device's token that is
    not revoked, 403 when the device's scope does not cover the route, 429 for an address
    that failed too often. /health, and /metrics when public, are open. Without api_key
    every request is, but a device token, when presented, still confines it (and a revoked
    one is refused); any other key presented is ignored there, as it always was."""
    config = state.config
    open_paths = ("/health", "/metrics") if config.metrics_public else ("/health",)
    if request.path in open_paths or (request.path in PAGE_FILES and request.method in (
            "GET", "HEAD")):
        return
    presented = presented_key(request)
    if presented is None:
        if config.api_key is not None:
            raise unauthorized("a valid API key or device token is required")
        return
    address = source_address(request, config)
    if (wait := state.failed_logins.retry_after(address)) is not None:
        raise ApiError(429, "too_many_attempts", "too many failed authentications from "
                       f"{address}: try again in {wait} s", headers={"Retry-After": str(wait)})
    if config.api_key is not None and key_matches(presented, config.api_key):
        return
    device = state.devices.find(presented)
    if device is None and config.api_key is None:
        return
    if device is None or device.revoked:
        state.failed_logins.failed(address)
        raise unauthorized("this device's token was revoked" if device is not None else
                           "a valid API key or device token is required")
    state.devices.note_seen(device)
    request[DEVICE] = device
    needed = required_scope(request.method, request.path)
    if DEVICE_SCOPES.index(device.scope) < DEVICE_SCOPES.index(needed):
        raise forbidden(f"device {device.name} has the scope {device.scope}; "
                        f"this needs {needed}")


@web.middleware
async def admission_middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Refuse cross-site and DNS-rebinding requests before anything else looks at them,
    then requests without the API key or a device token."""
    state = state_of(request)
    check_browser_request(request, state.config)
    authenticate(request, state)
    return await handler(request)


class AccessLogger(AbstractAccessLogger):
    """One line per request: method, path, status, bytes, duration, client id."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        """Log the finished request (the query string is left out: it may carry a token)."""
        self.logger.info("%s %s %d %d %.1fms client=%s", request.method, request.path,
                         response.status, response.body_length, time * 1000,
                         request.get(CLIENT_ID, "-"))


# ===========================================================================
# App factory
# ===========================================================================

async def storage_context(app: web.Application) -> AsyncIterator[None]:
    """Open the tree (recovering, rehashing in the background), serve, close it."""
    state = app[STATE]
    state.tree.store.on_message = functools.partial(hear_node, state)
    await state.tree.open(state.accept_deletions)
    await state.devices.load()
    tasks = state.tasks
    tasks.spawn(state.uploads.sweep_forever())
    tasks.spawn(state.devices.flush_forever())
    try:
        yield
    finally:
        await tasks.cancel()
        try:
            await state.devices.flush_seen()
        except Exception as exc:
            log.warning("could not record when devices were last seen: %s", exc)
        await state.tree.close()


async def close_websockets(app: web.Application) -> None:
    """On shutdown, close every WebSocket with 1001 so that handlers can finish."""
    await app[STATE].tree.hub.close_all(WS_CLOSE_GOING_AWAY)


def make_app(config: Config, accept_deletions: bool = False) -> web.Application:
    """The syncd Application for config; tests import this."""
    root = Path(config.sync_directory)
    node = node_name(config)
    store: MetadataStore = (
        PostgresStore(config.database_url, config.database_pool_size, node)
        if config.database_url else SQLiteStore(root / STATE_DIR / "syncd.db"))
    tree = Tree(config,
                store=store,
                files=FileStore(root, node if config.database_url else None),
                hub=Hub(config.ws_queue_size, config.heartbeat_interval, config.heartbeat_timeout),
                metrics=Metrics())
    state = State(tree, ResumableUploads(tree), Devices(tree.store),
                  accept_deletions=accept_deletions)
    tree.metrics.watch(lambda: gauges_of(state))
    app = web.Application(middlewares=[accounting_middleware, error_middleware,
                                       admission_middleware],
                          client_max_size=JSON_BODY_LIMIT)
    app[STATE] = state
    app.cleanup_ctx.append(storage_context)
    app.on_shutdown.append(close_websockets)
    app.router.add_get("/health", handle_health)
    app.router.add_post("/register", handle_register)
    app.router.add_get("/clients", handle_clients)
    app.router.add_post("/sync", handle_sync)
    app.router.add_post("/upload", handle_upload)
    app.router.add_post("/bulk", handle_bulk)
    app.router.add_post("/move", handle_move)
    app.router.add_route("OPTIONS", "/uploads/", handle_tus_options)
    app.router.add_route("OPTIONS", "/uploads/{id}", handle_tus_options)
    app.router.add_post("/uploads/", handle_tus_create)
    for method in ("HEAD", "PATCH", "DELETE", "POST"):
        app.router.add_route(method, "/uploads/{id}", handle_tus_upload)
    app.router.add_get("/files", handle_list_files)
    app.router.add_put("/files/{path:.*}", handle_put_file)
    app.router.add_get("/files/{path:.*}", handle_download)     # HEAD too
    app.router.add_delete("/files/{path:.*}", handle_delete_file)
    app.router.add_get("/download/{path:.*}", handle_download)  # HEAD too
    app.router.add_get("/changes", handle_changes)
    app.router.add_get("/ws/{client_id}", handle_ws)
    app.router.add_get("/metrics", handle_metrics)
    app.router.add_get("/versions/{path:.*}", handle_versions)
    app.router.add_delete("/versions/{path:.*}", handle_delete_versions)
    app.router.add_get("/trash", handle_trash)
    app.router.add_post("/restore", handle_restore)
    app.router.add_post("/devices", handle_add_device)
    app.router.add_get("/devices", handle_list_devices)
    app.router.add_delete("/devices/{name}", handle_revoke_device)
    app.router.add_get("/whoami", handle_whoami)
    for path in PAGE_FILES:
        app.router.add_get(path, handle_page)
    return app


# ===========================================================================
# Daemon: runner, signals, systemd notify, reload
# ===========================================================================

class Notifier:
    """sd_notify(3) without libsystemd: datagrams to $NOTIFY_SOCKET; nothing when it is unset."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        address = environ.get("NOTIFY_SOCKET", "")
        # "@name" is a socket in the abstract namespace (sd_notify(3)).
        self.address = ("\0" + address[1:] if address.startswith("@") else address) or None
        self.watchdog_interval = watchdog_interval(environ)
        self._socket: socket.socket | None = None

    def send(self, *assignments: str) -> None:
        """Send VAR=value lines in one datagram; a failure is logged, never raised."""
        if self.address is None:
            return
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.sendto("\n".join(assignments).encode(), self.address)
        except OSError as exc:
            log.warning("cannot notify systemd: %s", exc)

    def close(self) -> None:
        """Close the socket."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def watchdog_interval(environ: Mapping[str, str]) -> float | None:
    """Seconds between WATCHDOG=1 pings: half of $WATCHDOG_USEC, if it is meant for us."""
    try:
        usec = int(environ["WATCHDOG_USEC"])
        pid = int(environ.get("WATCHDOG_PID", os.getpid()))
    except (KeyError, ValueError):
        return None
    return usec / 2e6 if usec > 0 and pid == os.getpid() else None


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, for RELOADING=1."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


async def status_line(state: State) -> str:
    """STATUS= for systemctl status."""
    tree = state.tree
    return (f"STATUS=serving {tree.store.live_files} files, {len(tree.hub.connections)} "
            "clients connected")


async def send_watchdog(notifier: Notifier, interval: float) -> None:
    """WATCHDOG=1 from the event loop itself: if the loop hangs, systemd notices."""
    while True:
        notifier.send("WATCHDOG=1")
        await asyncio.sleep(interval)


async def send_status(notifier: Notifier, state: State) -> None:
    """STATUS= every few seconds."""
    while True:
        await asyncio.sleep(STATUS_INTERVAL)
        with contextlib.suppress(Exception):
            notifier.send(await status_line(state))


def apply_config(state: State, new: Config) -> None:
    """Make a reloaded config current; settings that need a restart keep their old value.
    A certificate and key are loaded for new connections (the way a renewal is taken);
    turning TLS on or off needs a restart."""
    old = state.config
    kept = list(RESTART_SETTINGS)
    if (new.tls_cert_file is None) != (old.tls_cert_file is None):
        kept += ["tls_cert_file", "tls_key_file"]
    for name in kept:
        if getattr(new, name) != getattr(old, name):
            log.warning("%s changed in the configuration: it takes effect after a restart", name)
    new = replace(new, **{name: getattr(old, name) for name in kept})
    if state.tls is not None and new.tls_cert_file is not None:
        state.tls.load_cert_chain(new.tls_cert_file, new.tls_key_file)   # checked by load()
        log.info("TLS certificate loaded from %s for new connections", new.tls_cert_file)
    state.tree.configure(new)


async def reload_config(state: State, notifier: Notifier,
                        load: Callable[[], Config]) -> None:
    """SIGHUP: read the configuration again; a bad one is logged and the old one kept."""
    notifier.send("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}")
    try:
        new = load()
        apply_config(state, new)
        log.info("configuration reloaded")
        if warning := key_file_warning(new):
            log.warning("%s", warning)
        set_log_level(state.config.log_level)     # after the line above, which it may silence
    except (ConfigError, ssl.SSLError, OSError) as exc:
        log.error("configuration not reloaded, keeping the old one: %s", exc)
    notifier.send("READY=1", await status_line(state))


def raise_descriptor_limit() -> int:
    """Lift the soft limit on open files to the hard one (1,024 is a common soft default,
    and systemd's own advice is that a service that needs more raises it); return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard, 1 << 20) if hard != resource.RLIM_INFINITY else 1 << 20
    if wanted > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass
    return soft


def connection_cap(setting: int, descriptors: int) -> int:
    """How many connections to hold at once: max_connections, or fewer when the descriptors
    would run out first: each connection may need a second one for its upload's temp file,
    the database and the walks need some, and asyncio accepts up to LISTEN_BACKLOG
    connections per turn of the loop, a few turns before a refused one is closed)."""
    return max(1, min(setting, (descriptors - FD_RESERVE - ACCEPTS_IN_FLIGHT) // 2))


REFUSAL_BODY = (b'{"error":"too_many_connections",'
                b'"message":"the server holds max_connections connections already"}')
REFUSAL = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
           b"Retry-After: 5\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
           % (len(REFUSAL_BODY), REFUSAL_BODY))


class Refusal(asyncio.Protocol):
    """A connection over the cap: a 503 and the door closed, before we read anything."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Answer and close (close() sends what is buffered first)."""
        # A cast, not an isinstance check: uvloop's transports are not asyncio's classes
        # (the assert that stood here reset every refused connection on uvloop).
        transport = cast(asyncio.WriteTransport, transport)
        transport.write(REFUSAL)
        transport.close()


class Counted(asyncio.Protocol):
    """aiohttp's protocol for one connection, counted from its creation to its loss.

    asyncio creates up to LISTEN_BACKLOG protocols in one go before any of
    them is connected, so aiohttp's own list of connections lags behind.
    """

    def __init__(self, inner: asyncio.Protocol, cap: ConnectionCap) -> None:
        self.inner = inner
        self.cap = cap
        cap.open += 1

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Pass on."""
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        """Pass on."""
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        """Pass on."""
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        """Pass on."""
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        """Pass on."""
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        """Pass on, and free the connection's place."""
        self.cap.open -= 1
        self.inner.connection_lost(exc)


class ConnectionCap:
    """The listening socket's protocol factory: aiohttp's handler while fewer than limit
    connections are open, a Refusal past it (never an accept that fails for lack of
    descriptors, which asyncio logs with a traceback per try)."""

    def __init__(self, server: Callable[[], asyncio.Protocol], limit: int) -> None:
        self.server = server
        self.limit = limit
        self.open = 0
        self.refused = 0
        self._warned = -math.inf

    def __call__(self) -> asyncio.BaseProtocol:
        """A protocol for one new connection."""
        if self.open < self.limit:
            return Counted(self.server(), self)
        self.refused += 1
        now = time.monotonic()
        if now - self._warned >= CAP_WARNING_INTERVAL:    # once per burst, not per connection
            log.warning("%d connections are open (max_connections): refusing new ones with "
                        "503 (%d so far)", self.limit, self.refused)
            self._warned = now
        return Refusal()


async def drain(listener: asyncio.AbstractServer, state: State) -> None:
    """Stop accepting, close WebSockets (1001), and let requests in flight finish.

    aiohttp's own graceful shutdown stops reading from connections at once
    (aio-libs/aiohttp#2298), so an upload whose body is still arriving could
    never finish; we wait for it here, up to shutdown_timeout, before
    runner.cleanup() closes what is left.
    """
    state.stopping = True
    listener.close()          # no new connections; the open ones go on
    await state.tree.hub.close_all(WS_CLOSE_GOING_AWAY)
    if state.in_flight:
        log.info("waiting for %d request(s) in flight", state.in_flight)
        try:
            await asyncio.wait_for(state.idle.wait(), state.config.shutdown_timeout)
        except asyncio.TimeoutError:
            log.warning("%d request(s) still running after shutdown_timeout: cutting them off",
                        state.in_flight)


def loop_factory(config: Config) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop when it is installed and the uvloop setting is on; else None
    (asyncio's own). An optional speed-up: measured here, +16% 4 KiB uploads a second
    and twice the MB/s of a large upload."""
    if not config.uvloop:
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def loop_name() -> str:
    """What the running event loop is, for the start-up line."""
    loop = asyncio.get_running_loop()
    if type(loop).__module__.startswith("uvloop"):
        import uvloop
        return f"uvloop {uvloop.__version__}"
    return "asyncio"


async def run_daemon(config: Config, load: Callable[[], Config] | None = None,
                     environ: Mapping[str, str] = os.environ,
                     accept_deletions: bool = False) -> int:
    """Serve until SIGTERM or SIGINT; SIGHUP reloads.

    0 on a clean stop, 1 if we cannot listen, EXIT_MASS_VANISH if recovery refused,
    EXIT_STORAGE if the tree or the database cannot be opened, or if the node halted.
    """
    notifier = Notifier(environ)
    app = make_app(config, accept_deletions)
    state = app[STATE]
    try:
        state.tls = tls_context(config)
    except ConfigError as exc:      # the files changed since the config was checked
        log.error("%s", exc)
        return EXIT_CONFIG
    # aiohttp's keep-alive timer runs from the connection's start until a whole
    # request has arrived, so it is also the deadline for slow request headers.
    runner = web.AppRunner(app, handle_signals=False, access_log_class=AccessLogger,
                           access_log=access_log, shutdown_timeout=config.shutdown_timeout,
                           keepalive_timeout=config.header_timeout, read_bufsize=READ_BUFFER)
    try:
        await runner.setup()
    except MassVanish as exc:
        log.error("%s", exc)
        await runner.cleanup()
        return EXIT_MASS_VANISH
    except StorageUnusable as exc:
        log.error("cannot start: the sync directory or its database is unusable: %s", exc)
        await runner.cleanup()
        return EXIT_STORAGE
    tasks = Background()
    loop = asyncio.get_running_loop()
    # before the port opens: a SIGTERM the moment it does must stop us cleanly, not kill
    stop = state.stop
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        descriptors = raise_descriptor_limit()
        cap = connection_cap(config.max_connections, descriptors)
        if cap < config.max_connections:    # a warning only when it is few for a server
            log.log(logging.WARNING if cap < FEW_CONNECTIONS else logging.INFO,
                    "max_connections is %d, but %d open files are allowed: serving at most "
                    "%d connections (raise LimitNOFILE or ulimit -n)",
                    config.max_connections, descriptors, cap)
        try:
            listener = await loop.create_server(
                ConnectionCap(runner.server, cap), config.host, config.port,  # type: ignore[arg-type]
                reuse_address=True, backlog=LISTEN_BACKLOG, ssl=state.tls)
        except OSError as exc:
            log.error("cannot listen on %s:%d: %s", config.host, config.port, exc.strerror)
            return 1
        log.info("syncd %s listening on %s://%s:%d (event loop: %s)", __version__,
                 "https" if state.tls else "http", config.host, config.port, loop_name())
        notifier.send("READY=1", await status_line(state))
        if notifier.watchdog_interval:
            tasks.spawn(send_watchdog(notifier, notifier.watchdog_interval))
        tasks.spawn(send_status(notifier, state))
        if load is not None:
            loop.add_signal_handler(signal.SIGHUP, lambda: tasks.spawn(reload_config(state, notifier, load)))
        await stop.wait()
        log.info("shutting down")
        notifier.send("STOPPING=1", "STATUS=shutting down")
        await drain(listener, state)
    finally:
        await tasks.cancel()
        await runner.cleanup()
        notifier.close()
    log.info("stopped")
    return EXIT_STORAGE if state.halted else 0


# ===========================================================================
# Client: the reference sync client (python syncd.py client DIR --server URL)
# ===========================================================================

client_log = logging.getLogger("syncd.client")

IGNORE_FILE = ".syncignore"
CLIENT_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS base (
    path     TEXT PRIMARY KEY,
    checksum TEXT NOT NULL,
    size     INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS base_by_checksum ON base (checksum);
CREATE TABLE IF NOT EXISTS resumable (
    path     TEXT PRIMARY KEY,
    url      TEXT NOT NULL,
    checksum TEXT NOT NULL,
    size     INTEGER NOT NULL
);
"""
PROGRESS_MIN_BYTES = 8 * 1024 * 1024   # a progress bar for transfers at least this large
BULK_FILES = 100                       # small files per POST /bulk
BULKS_IN_FLIGHT = 2                    # POST /bulk requests a pass keeps in flight
TRANSFERS_IN_FLIGHT = 8                # single uploads or downloads a pass keeps in flight
BATCH_SECONDS = 5.0                    # a pass commits the client's state this often
BULK_FILE_LIMIT = 256 * 1024           # files up to this size go through /bulk
RESUMABLE_MIN_SIZE = 8 * 1024 * 1024   # files this large go through tus (--resumable-min-size)
TUS_CHUNK = 32 * 1024 * 1024           # bytes per PATCH: each one fsynced and acknowledged
RESUME_ATTEMPTS = 5                    # tries in a row that gain no byte before a pass gives up
RESUME_DELAY = 0.5                     # seconds before the first retry; doubled each time
WATCH_DEBOUNCE_MS = 300
RECONNECT_MAX_DELAY = 60.0
EXIT_CLIENT_FAILED = 1
TOKEN_VARIABLE = "SYNCD_TOKEN"          # the device token, when no flag gives one


class ClientError(Exception):
    """A pass cannot go on: the server refused us, or sent what we cannot use (retried)."""


class AuthRefused(Exception):
    """The server refused our key or token (401), or what it lets us do (403): only the
    user can mend that, so the client stops (exit 2) instead of retrying."""


def auth_refusal(status: int, body: Any) -> AuthRefused:
    """The one line a 401 or 403 stops the client with."""
    detail = body.get("message") if isinstance(body, dict) else None
    if status == 401:
        return AuthRefused(f"the server refused the API key or device token (401): "
                           f"{detail or 'unauthorized'}")
    return AuthRefused(f"the server forbids it (403): {detail or 'forbidden'}")


class UploadInterrupted(Exception):
    """A resumable upload must ask the server where it stands, and go on from there."""


class UploadRefused(Exception):
    """The server refused to begin a resumable upload; (status, body) as /upload's."""

    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"{status}")
        self.status, self.body = status, body


TUS_REQUEST = {"Tus-Resumable": "1.0.0"}


def tus_metadata(fields: Mapping[str, str]) -> str:
    """Upload-Metadata: "key base64(value)", comma-separated."""
    return ",".join(f"{key} {base64.b64encode(value.encode()).decode()}"
                    for key, value in fields.items())


def from_server(parse: Callable[[], T], what: str) -> T:
    """parse() of data the server sent; ClientError when it is malformed (a KeyError or
    ValueError anywhere else is a bug of ours, which the client does not retry)."""
    try:
        return parse()
    except (KeyError, IndexError, ValueError, TypeError, AttributeError) as exc:
        raise ClientError(f"malformed {what} from the server ({type(exc).__name__}: {exc})") \
            from None


def server_path(raw: Any) -> str:
    """A path the server sent, checked with the server's own rules (a hostile or broken
    server, or anyone on a plain-HTTP path, must not make us write outside the folder)."""
    if isinstance(raw, str) and is_stored_form(raw):
        return raw
    raise ClientError(f"invalid path from the server, refused: {raw!r}")


@dataclass(frozen=True, slots=True)
class LocalFile:
    """A file in the synced folder, as last scanned."""

    path: str
    checksum: str
    size: int
    mtime_ns: int

    @property
    def modified_time(self) -> float:
        """The mtime in Unix seconds."""
        return self.mtime_ns / 1e9

    def entry(self, base: LocalFile | None) -> ClientEntry:
        """This file as a /sync listing names it (base "": it never came from the server)."""
        return ClientEntry(self.path, self.checksum, self.size, self.modified_time,
                           base.checksum if base else "")


@dataclass(frozen=True, slots=True)
class RemoteChange:
    """A change announced by the server (from /changes or the WebSocket)."""

    seq: int
    type: str              # "upsert" or "delete"
    path: str
    checksum: str
    modified_time: float
    client_id: str

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RemoteChange:
        """From a /changes entry or a file_changed / file_deleted event."""
        kind = "upsert" if data.get("type") in ("upsert", "file_changed") else "delete"
        path = server_path(data.get("path"))
        return from_server(lambda: cls(
            int(data["seq"]), kind, path, str(data.get("checksum", "")),
            float(data.get("modified_time", 0.0)), str(data.get("client_id", ""))), "change")

    def server_record(self, base: LocalFile | None) -> FileRecord:
        """The server's state of the path after this change, as /sync planning takes it.
        Changes are applied in seq order, so a deletion removed what we hold as our base."""
        deleted = self.type == "delete"
        checksum = (base.checksum if base else "") if deleted else self.checksum
        return FileRecord(self.path, checksum, 0, self.modified_time, self.seq, deleted,
                          time.time(), self.client_id)


@dataclass
class PassReport:
    """What one pass did, for the one-line summary."""

    uploaded: int = 0
    downloaded: int = 0
    deleted_here: int = 0
    deleted_there: int = 0
    conflicts: int = 0
    moves: int = 0           # POST /move requests that succeeded
    moved: int = 0           # the files they moved
    copied_here: int = 0     # downloads made from content this folder had already
    failed: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line."""
        moved = f"{self.moves} moved ({self.moved} files), " if self.moves else ""
        copied = f" ({self.copied_here} from local copies)" if self.copied_here else ""
        return (f"sync pass: {moved}{self.uploaded} uploaded, {self.downloaded} downloaded"
                f"{copied}, {self.deleted_here} deleted here, {self.deleted_there} deleted on "
                f"the server, {self.conflicts} conflicts, {len(self.failed)} failed")


class ClientState:
    """DIR/.syncd-client/state.db: per path the base (the version last agreed with the
    server), the server's epoch and the last cursor seen."""

    def __init__(self, folder: Path) -> None:
        state_dir = folder / CLIENT_STATE_DIR
        (state_dir / "tmp").mkdir(parents=True, exist_ok=True)
        self.tmp_dir = state_dir / "tmp"
        for leftover in self.tmp_dir.iterdir():
            leftover.unlink(missing_ok=True)
        self.db = sqlite3.connect(state_dir / "state.db", isolation_level=None)
        self.db.execute("PRAGMA journal_mode = WAL")
        # NORMAL: a power cut may forget the last bases, never corrupt them; a file with
        # no base is compared with the server again (and is never deleted for it).
        self.db.execute("PRAGMA synchronous = NORMAL")
        self.db.executescript(CLIENT_SCHEMA)
        self._batch_since: float | None = None

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """A pass's changes of the state in few transactions (one commit a file cost more
        than the file's download): committed every BATCH_SECONDS and at the end, failed or
        not. A crash loses at most the last few seconds' bases: those files are compared
        with the server again, and nothing is deleted for a base that is missing."""
        self.db.execute("BEGIN")
        self._batch_since = time.monotonic()
        try:
            yield
        finally:
            self._batch_since = None
            self.db.execute("COMMIT")

    def _changed(self) -> None:
        """Commit a long batch now and then."""
        if self._batch_since is not None and time.monotonic() - self._batch_since > BATCH_SECONDS:
            self.commit()

    def commit(self) -> None:
        """Commit what the batch holds now (what must not be lost to a crash)."""
        if self._batch_since is not None:
            self.db.execute("COMMIT")
            self.db.execute("BEGIN")
            self._batch_since = time.monotonic()

    def close(self) -> None:
        """Close the database."""
        self.db.close()

    def get(self, key: str) -> str | None:
        """A meta value."""
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def put(self, key: str, value: str) -> None:
        """Set a meta value."""
        self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    @property
    def cursor(self) -> int:
        """The last server seq applied here."""
        return int(self.get("cursor") or 0)

    @cursor.setter
    def cursor(self, value: int) -> None:
        self.put("cursor", str(value))

    def bases(self) -> dict[str, LocalFile]:
        """Every base."""
        return {row[0]: LocalFile(*row) for row in
                self.db.execute("SELECT path, checksum, size, mtime_ns FROM base")}

    def base(self, path: str) -> LocalFile | None:
        """The base of one path."""
        row = self.db.execute("SELECT path, checksum, size, mtime_ns FROM base WHERE path = ?",
                              (path,)).fetchone()
        return LocalFile(*row) if row else None

    def with_checksum(self, checksum: str) -> list[LocalFile]:
        """The bases with this content."""
        return [LocalFile(*row) for row in self.db.execute(
            "SELECT path, checksum, size, mtime_ns FROM base WHERE checksum = ? ORDER BY path",
            (checksum,))]

    def set_base(self, local: LocalFile) -> None:
        """Record that the server and this folder agree on local."""
        self.db.execute("INSERT OR REPLACE INTO base (path, checksum, size, mtime_ns)"
                        " VALUES (?, ?, ?, ?)", (local.path, local.checksum, local.size,
                                                 local.mtime_ns))
        self._changed()

    def drop_base(self, path: str) -> None:
        """Forget a path's base."""
        self.db.execute("DELETE FROM base WHERE path = ?", (path,))
        self._changed()

    def resumable(self, path: str) -> tuple[str, str, int] | None:
        """The open resumable upload of a path: (its URL's path on the server, checksum,
        size) of what it uploads."""
        row = self.db.execute("SELECT url, checksum, size FROM resumable WHERE path = ?",
                              (path,)).fetchone()
        return (row[0], row[1], row[2]) if row else None

    def resumables(self) -> list[tuple[str, str, str, int]]:
        """Every open resumable upload: (path, URL, checksum, size)."""
        return list(self.db.execute("SELECT path, url, checksum, size FROM resumable"))

    def remember_upload(self, path: str, url: str, checksum: str, size: int) -> None:
        """A resumable upload begun, committed at once: a client killed a second later
        continues it instead of sending the file again."""
        self.db.execute("INSERT OR REPLACE INTO resumable (path, url, checksum, size)"
                        " VALUES (?, ?, ?, ?)", (path, url, checksum, size))
        self.commit()

    def forget_upload(self, path: str) -> None:
        """A resumable upload done or given up."""
        self.db.execute("DELETE FROM resumable WHERE path = ?", (path,))
        self._changed()

    def forget_history(self, epoch: str, cursor: int) -> None:
        """A reset or restored server: no base can be trusted any more (union resync)."""
        self.db.execute("DELETE FROM base")
        self.put("epoch", epoch)
        self.cursor = cursor


class IgnoreRules:
    """What is never synced: .syncd-client/, and the patterns in DIR/.syncignore.

    A pattern without "/" matches any file or folder name (`*.tmp`, `node_modules`);
    one with "/" matches the path from DIR (`build/*.o`); a trailing "/" means
    the folder and everything under it (`cache/`). "#" starts a comment.
    """

    def __init__(self, folder: Path) -> None:
        self.patterns: list[str] = []
        try:
            lines = (folder / IGNORE_FILE).read_text(encoding="utf-8").splitlines()
        except (FileNotFoundError, UnicodeDecodeError):
            lines = []
        self.patterns = [line.strip() for line in lines
                         if line.strip() and not line.strip().startswith("#")]

    def ignored(self, path: str) -> bool:
        """Whether path (or a folder on its way) is not to be synced."""
        parts = path.split("/")
        if parts[0] == CLIENT_STATE_DIR:
            return True
        for pattern in self.patterns:
            if pattern.endswith("/"):
                folder = pattern.rstrip("/")
                if any(fnmatch.fnmatchcase("/".join(parts[:depth]), folder)
                       for depth in range(1, len(parts))):
                    return True
            elif "/" in pattern:
                if fnmatch.fnmatchcase(path, pattern.lstrip("/")):
                    return True
            elif any(fnmatch.fnmatchcase(part, pattern) for part in parts):
                return True
        return False


def hash_local(path: Path) -> tuple[str, os.stat_result] | None:
    """hash_steady of a file in the client's folder; None too if it cannot be read."""
    try:
        return hash_steady(lambda: open(path, "rb"))
    except (IsADirectoryError, PermissionError):
        return None


def local_file(folder: Path, path: str, base: LocalFile | None,
               status: os.stat_result | None = None) -> LocalFile | None:
    """The current state of one local file (unread when size and mtime match its base);
    status: its lstat, when a scan has it already."""
    if status is None:
        try:
            status = os.lstat(folder / path)
        except (FileNotFoundError, NotADirectoryError):
            return None
    if not stat.S_ISREG(status.st_mode):
        return None
    if base is not None and (base.size, base.mtime_ns) == (status.st_size, status.st_mtime_ns):
        return base
    hashed = hash_local(folder / path)
    if hashed is None:
        return None
    checksum, status = hashed
    return LocalFile(path, checksum, status.st_size, status.st_mtime_ns)


def scan_folder(folder: Path, rules: IgnoreRules,
                bases: Mapping[str, LocalFile]) -> tuple[dict[str, LocalFile], TreeScan]:
    """Every syncable file in folder (rehashing only what changed), and the walk itself
    (what it skipped, what it could not read): the server's scan_tree, with the ignore rules."""
    scan = scan_tree(folder, rules.ignored)
    found: dict[str, LocalFile] = {}
    for path, status in scan.found.items():
        local = local_file(folder, path, bases.get(path), status)
        if local is not None:
            found[path] = local
    return found, scan


def find_moves(gone: Mapping[str, LocalFile],
               fresh: Mapping[str, LocalFile]) -> list[tuple[str, str]]:
    """(old, new) for each tracked file gone whose content (checksum and size) appeared
    at a new path: a rename. Among several candidates, one with the same name first."""
    by_content: dict[tuple[str, int], list[str]] = {}
    for path, found in sorted(fresh.items()):
        by_content.setdefault((found.checksum, found.size), []).append(path)
    pairs = []
    for old, base in sorted(gone.items()):
        candidates = by_content.get((base.checksum, base.size))
        if not candidates:
            continue
        name = old.rpartition("/")[2]
        pick = next((path for path in candidates if path.rpartition("/")[2] == name),
                    candidates[0])
        candidates.remove(pick)
        pairs.append((old, pick))
    return pairs


def renamed_folder(old: str, new: str) -> tuple[str, str] | None:
    """The folders a rename of old to new may belong to: what is left of both once the
    names they end with in common are taken off (photos/2023/a.jpg ->
    photos/archive-2023/a.jpg: photos/2023 -> photos/archive-2023); None if nothing is."""
    old_names, new_names = old.split("/"), new.split("/")
    common = 0
    while (common < min(len(old_names), len(new_names)) - 1
           and old_names[-1 - common] == new_names[-1 - common]):
        common += 1
    if common == 0:
        return None
    return "/".join(old_names[:-common]), "/".join(new_names[:-common])


def plan_moves(pairs: Sequence[tuple[str, str]],
               tracked: Iterable[str]) -> list[tuple[str, str, list[tuple[str, str]]]]:
    """The POST /move requests for these renames: (from, to, the renames it makes). A
    folder every tracked file of which moved the same way is one move; any other
    rename is a move of its own file."""
    tracked = list(tracked)
    groups: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for pair in pairs:
        folders = renamed_folder(*pair)
        if folders is not None:
            groups.setdefault(folders, []).append(pair)
    requests: list[tuple[str, str, list[tuple[str, str]]]] = []
    covered: set[str] = set()
    for (source, target), members in sorted(groups.items()):
        inside = sum(1 for path in tracked if path.startswith(source + "/"))
        if inside == len(members) and not target.startswith(source + "/"):
            requests.append((source, target, members))
            covered.update(old for old, _ in members)
    requests.extend((old, new, [(old, new)]) for old, new in pairs if old not in covered)
    return requests


def conflict_name(path: str, client_id: str, when: float, exists: Callable[[str], bool]) -> str:
    """NAME.sync-conflict-YYYYMMDD-HHMMSS-CLIENTID.EXT beside path, not yet taken."""
    folder, _, name = path.rpartition("/")
    stem, dot, extension = name.rpartition(".")
    if not stem:                     # no extension, or a dot file like ".bashrc"
        stem, dot, extension = name, "", ""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(when))
    for number in range(1000):
        extra = f"-{number}" if number else ""
        candidate = f"{stem}.sync-conflict-{stamp}-{client_id}{extra}{dot}{extension}"
        candidate = f"{folder}/{candidate}" if folder else candidate
        if not exists(candidate):
            return candidate
    raise ClientError(f"no free name for a conflict copy of {path}")


def default_client_id() -> str:
    """This machine's name, made a valid client id."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:128].lstrip("._-")
    return name or "client"


class SyncClient:
    """Keeps one folder in sync with one server, through the public API only."""

    def __init__(self, folder: Path, server: str, client_id: str, api_key: str | None,
                 state: ClientState, accept_deletions: bool = False,
                 resumable_min_size: int | None = RESUMABLE_MIN_SIZE) -> None:
        self.bulk_works = True          # until a server answers that it has no POST /bulk
        self.tus_works = True           # until a server answers that it has no /uploads/
        self.resumable_min_size = resumable_min_size   # None: never
        self.folder = folder
        self.server = server.rstrip("/")
        self.client_id = client_id
        self.accept_deletions = accept_deletions
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.state = state
        self.rules = IgnoreRules(folder)
        self.lock = asyncio.Lock()      # one operation on the folder at a time
        self.temp_names = itertools.count()   # tmp/ is emptied at every start
        self.server_cursor = 0          # as /health last said
        self.progress = sys.stdout.isatty()
        self.session: Any = None

    # -- HTTP -----------------------------------------------------------------------

    def url(self, route: str, path: str = "") -> Any:
        """A URL on the server; path is percent-encoded once."""
        return URL(self.server + route + quote(path, safe="/"), encoded=True)

    async def call(self, method: str, route: str, path: str = "", **kwargs: Any) -> tuple[int, Any]:
        """One request; (status, JSON body or None)."""
        status, body, _ = await self.request(method, self.url(route, path), **kwargs)
        return status, body

    async def request(self, method: str, url: Any, **kwargs: Any) -> tuple[int, Any, Any]:
        """One request to a URL of the server; (status, JSON body or None, headers)."""
        headers = {**self.headers, **kwargs.pop("headers", {})}
        async with self.session.request(method, url, headers=headers, **kwargs) as response:
            body = await response.json() if response.content_type == "application/json" else None
            if response.status in (401, 403):
                raise auth_refusal(response.status, body)
            return response.status, body, response.headers

    # -- one full pass ------------------------------------------------------------

    async def one_pass(self, full: bool) -> PassReport:
        """--once: from our cursor when we can (the journal since, and what changed here:
        no manifest), else, or when full, a full pass. A pass that left something
        undone makes the next one full: the journal would not bring those back."""
        async with self.lock:
            self.rules = IgnoreRules(self.folder)   # .syncignore may have changed since
        # Rules that changed may now take in server files the journal passed long ago.
        rules = "\n".join(self.rules.patterns)
        incremental = (not full and self.state.get("clean") == "1"
                       and self.state.get("rules") == rules and not await self.check_server()
                       and self.server_cursor - self.state.cursor <= INCREMENTAL_MAX_CHANGES)
        with self.state.batch():
            if incremental:
                client_log.info("pass=incremental since=%d", self.state.cursor)
                await self.register()
                report = await self.catch_up()
            else:
                client_log.info("pass=full")
                report = await self.full_pass()
        self.note_outcome(report)
        self.state.put("rules", rules)
        return report

    def note_outcome(self, report: PassReport) -> None:
        """Remember whether everything was done (one_pass trusts the journal only then)."""
        self.state.put("clean", "0" if report.failed else "1")

    async def register(self) -> None:
        """POST /register: who we are."""
        await self.call("POST", "/register", json={
            "client_id": self.client_id, "name": socket.gethostname(),
            "platform": sys.platform, "version": __version__})

    async def full_pass(self) -> PassReport:
        """Scan, push local deletions, /sync, and carry out the plan."""
        report = PassReport()
        async with self.lock:
            self.rules = IgnoreRules(self.folder)   # .syncignore may have changed since
            await self.check_server()       # a reset server: bases are forgotten, nothing deleted
            bases, local = await self.scan_and_push_removals(report)
            await self.register()
            entries = [f.entry(bases.get(f.path)).to_json() for f in local.values()]
            status, plan = await self.call("POST", "/sync", json={
                "client_id": self.client_id, "files": entries})
            if status != 200:
                raise ClientError(f"/sync answered {status}: {plan}")
            await self.carry_out(plan, local, bases, report)
            await self.drop_stale_uploads(local)
            self.state.cursor = max(self.state.cursor,
                                    from_server(lambda: int(plan["cursor"]), "/sync answer"))
        return report

    async def scan_and_push_removals(self, report: PassReport
                                     ) -> tuple[dict[str, LocalFile], dict[str, LocalFile]]:
        """Scan the folder, push its renames (as moves) and its deletions (MassVanish when
        most tracked files are gone); the bases after the renames, and the files found."""
        bases = self.state.bases()
        local, scan = await asyncio.to_thread(scan_folder, self.folder, self.rules, bases)
        for path in scan.skipped:
            client_log.warning("skip path=%s reason=not-a-regular-file-or-valid-path", path)
        bases, renamed = await self.push_renames(bases, local, scan, report)
        for path in self.vanished(bases, local, scan, renamed):
            await self.push_delete(bases[path], report)
        return bases, local

    async def carry_out(self, plan: Mapping[str, Any], local: Mapping[str, LocalFile],
                        bases: Mapping[str, LocalFile], report: PassReport) -> None:
        """Do what a plan (the contract's SyncResponse) says for the files listed in local;
        a listed file it leaves alone is in sync, and becomes its path's base."""
        planned: set[str] = set()
        uploads = self.planned(plan, "upload", report)
        planned.update(uploads)
        await self.push_files([local[path] for path in uploads if path in local], report)
        downloads = []
        for path, entry in self.planned(plan, "download", report):
            planned.add(path)
            modified_time = from_server(lambda: float(entry["modified_time"]), "/sync answer")
            checksum = entry.get("checksum")
            downloads.append(functools.partial(
                self.pull, path, modified_time, report, scanned=local.get(path),
                checksum=checksum if isinstance(checksum, str) else None))
        await in_flight(downloads, TRANSFERS_IN_FLIGHT)
        for path, _ in self.planned(plan, "delete", report):
            planned.add(path)
            self.delete_here(path, local.get(path), report)
        for path, _ in self.planned(plan, "conflicts", report):
            planned.add(path)
            await self.resolve_conflict(path, report)
        for path, in_sync in local.items():
            if path not in planned and bases.get(path) != in_sync:
                self.state.set_base(in_sync)

    def vanished(self, bases: Mapping[str, LocalFile], local: Mapping[str, LocalFile],
                 scan: TreeScan, reappeared: Iterable[str] = ()) -> list[str]:
        """Tracked paths gone from the folder; MassVanish when most are (and no
        --accept-deletions), not counting those whose content reappeared under another
        name (a rename the server refused to make a move). A tracked path that is now
        ignored is not gone: it is simply no longer synced, so its base is forgotten and
        nothing is deleted; one that could not be looked at (an unreadable folder) is not
        gone either."""
        for path in [path for path in bases if self.rules.ignored(path)]:
            self.state.drop_base(path)
        tracked = [path for path in bases if not self.rules.ignored(path)]
        missing = [path for path in tracked if path not in local and not scan.hides(path)]
        renamed = set(reappeared)
        guard_vanished(sum(1 for path in missing if path not in renamed), len(tracked),
                       self.accept_deletions, (
            "{missing} of the {known} tracked files are missing from "
            f"{self.folder} (an unmounted folder?): not pushing their deletion. If they "
            "were deleted on purpose, run once with --accept-deletions."))
        return missing

    async def push_renames(self, bases: dict[str, LocalFile], local: Mapping[str, LocalFile],
                           scan: TreeScan, report: PassReport
                           ) -> tuple[dict[str, LocalFile], set[str]]:
        """Renames made here while we were not looking, as POST /move (no bytes sent): a
        tracked file gone whose content is at an untracked path. The bases afterwards,
        and the old paths of the renames found (moved or not)."""
        gone = {path: base for path, base in bases.items()
                if path not in local and not scan.hides(path) and not self.rules.ignored(path)}
        fresh = {path: found for path, found in local.items() if path not in bases}
        if not gone or not fresh:
            return bases, set()
        renames = find_moves(gone, fresh)
        if await self.push_moves(renames, gone, fresh, bases, report):
            bases = self.state.bases()
        return bases, {old for old, _ in renames}

    async def push_moves(self, found: Sequence[tuple[str, str]], gone: Mapping[str, LocalFile],
                         fresh: Mapping[str, LocalFile], bases: Mapping[str, LocalFile],
                         report: PassReport) -> bool:
        """POST /move for these renames, (old, new) between gone and fresh (a whole folder at
        once when all its tracked files moved together); each moved file's base follows
        it. A folder move the server refuses (the new folder exists there) is tried file
        by file; a file move it refuses (changed there, taken) is left to the upload and
        delete that follow. Whether anything moved."""
        tracked = [path for path in bases if not self.rules.ignored(path)]
        moved_any = False
        work = plan_moves(found, tracked)
        while work:
            source, target, renames = work.pop(0)
            body: dict[str, Any] = {"client_id": self.client_id, "from": source, "to": target}
            alone = renames == [(source, target)]
            if alone:
                body["base_checksum"] = gone[source].checksum
            status, answer = await self.call("POST", "/move", json=body)
            if status != 200:
                client_log.info("move-refused from=%s to=%s status=%d: %s", source, target,
                                status, answer.get("message") if isinstance(answer, dict)
                                else answer)
                if not alone:
                    work[:0] = [(old, new, [(old, new)]) for old, new in renames]
                continue
            for old, new in renames:
                self.state.drop_base(old)
                self.state.set_base(fresh[new])
            report.moves += 1
            report.moved += len(renames)
            moved_any = True
            client_log.info("move-remote from=%s to=%s files=%d", source, target, len(renames))
        return moved_any

    def planned(self, plan: Mapping[str, Any], key: str, report: PassReport) -> list[Any]:
        """The entries of one list of a /sync plan whose path is valid and not ignored
        (upload: paths; the others: (path, entry)). A path that is not valid is refused
        loudly: it counts as a failure of the pass."""
        accepted: list[Any] = []
        for item in plan.get(key, []):
            raw = item if key == "upload" else item.get("path") if isinstance(item, dict) else item
            try:
                path = server_path(raw)
            except ClientError as exc:
                client_log.error("%s", exc)
                report.failed.append(f"{raw!r} (invalid path from the server)")
                continue
            if not self.rules.ignored(path):
                accepted.append(path if key == "upload" else (path, item))
        return accepted

    async def check_server(self) -> bool:
        """Compare the server's epoch and cursor with ours; True (and history forgotten)
        when it was reset or restored: resync as a union, delete nothing."""
        async with self.session.get(self.url("/health")) as response:
            health = await response.json()
        epoch, cursor = from_server(lambda: (str(health["epoch"]), int(health["cursor"])),
                                    "/health answer")
        self.server_cursor = cursor
        known = self.state.get("epoch")
        if known is None:
            self.state.put("epoch", epoch)
            return False
        if epoch != known or cursor < self.state.cursor:
            client_log.warning("the server was reset or restored (epoch %s, cursor %d; we had %s, "
                               "%d): resyncing as a union, deleting nothing", epoch, cursor, known,
                               self.state.cursor)
            self.state.forget_history(epoch, 0)
            return True
        return False

    # -- single operations ---------------------------------------------------------

    async def push_files(self, files: Sequence[LocalFile], report: PassReport) -> None:
        """Upload local files: small ones BULK_FILES at a time through POST /bulk (one
        request, one round trip), BULKS_IN_FLIGHT requests at a time, and beside them the
        others one by one, TRANSFERS_IN_FLIGHT at a time."""
        small = [local for local in files if local.size <= BULK_FILE_LIMIT]
        bulks = [functools.partial(self.push_bulk, small[start:start + BULK_FILES], report)
                 for start in range(0, len(small), BULK_FILES)]
        singles = [functools.partial(self.push_file, local.path, local, report)
                   for local in files if local.size > BULK_FILE_LIMIT]
        await in_flight([functools.partial(in_flight, bulks, BULKS_IN_FLIGHT),      # side by side
                         functools.partial(in_flight, singles, TRANSFERS_IN_FLIGHT)], 2)

    async def push_bulk(self, batch: Sequence[LocalFile], report: PassReport) -> None:
        """Upload a batch of small files in one POST /bulk, each conditional on its base;
        one by one when there is a single file or the server has no /bulk (an older one)."""
        batch = [local for local in batch if self.unchanged_since_scan(local)]
        if len(batch) < 2 or not self.bulk_works:
            for local in batch:
                await self.push_file(local.path, local, report)
            return
        contents = await asyncio.to_thread(
            lambda: [(self.folder / local.path).read_bytes() for local in batch])
        form = aiohttp.FormData()
        form.add_field("client_id", self.client_id)
        for local, content in zip(batch, contents, strict=True):
            form.add_field("meta", json.dumps(self.upload_fields(local)),
                           content_type="application/json")
            form.add_field("file", content, filename=local.path.rsplit("/", 1)[-1])
        status, body = await self.call("POST", "/bulk", data=form)
        if status != 200:       # no /bulk here (404, 405), or smaller limits (413)
            client_log.info("bulk-refused status=%d: uploading one by one", status)
            self.bulk_works = status not in (404, 405)
            for local in batch:
                await self.push_file(local.path, local, report)
            return
        results = from_server(lambda: list(body["results"]), "/bulk answer")
        if len(results) != len(batch):
            raise ClientError(f"/bulk answered {len(results)} results for {len(batch)} files")
        for local, result in zip(batch, results, strict=True):
            await self.uploaded(local, from_server(lambda: int(result["status"]), "/bulk answer"),
                                result, report)

    def unchanged_since_scan(self, local: LocalFile) -> bool:
        """Whether the file is still what the scan found (if not, the next pass takes it)."""
        current = local_file(self.folder, local.path, local)
        return current is not None and current.checksum == local.checksum

    def upload_fields(self, local: LocalFile) -> dict[str, str]:
        """The /upload (and /bulk meta) fields of a local file, conditional on its base."""
        base = self.state.base(local.path)
        return {"relative_path": local.path, "checksum": local.checksum,
                "modified_time": repr(local.modified_time),
                "base_checksum": base.checksum if base else ""}

    async def push_file(self, path: str, local: LocalFile, report: PassReport) -> None:
        """Upload a local file, conditional on its base; a 409 becomes a conflict copy."""
        if not self.unchanged_since_scan(local):
            return
        if self.resumable(local) and await self.push_resumable(local, report):
            return
        with open(self.folder / path, "rb") as handle:
            form = aiohttp.FormData()
            for name, value in self.upload_fields(local).items():
                form.add_field(name, value)
            form.add_field("client_id", self.client_id)
            form.add_field("file", self.progress_reader(handle, local.size, f"up {path}"),
                           filename=path.rsplit("/", 1)[-1])
            status, body = await self.call("POST", "/upload", data=form)
        await self.uploaded(local, status, body, report)

    async def uploaded(self, local: LocalFile, status: int, body: Any, report: PassReport) -> None:
        """Take the server's answer to one upload: a new base, a conflict copy, or a failure."""
        path = local.path
        if status == 200:
            self.state.set_base(local)
            report.uploaded += 1
            client_log.info("upload path=%s bytes=%d revision=%s", path, local.size,
                            from_server(lambda: body["revision"], "upload answer"))
        elif status == 409 and body and body.get("error") == "conflict" and body.get("server"):
            if body["server"].get("checksum") == local.checksum:
                # the server has this very content (a resumable upload whose last answer
                # was lost, or another device with the same bytes): nothing to keep apart
                self.state.set_base(local)
                client_log.info("upload path=%s already-there", path)
            else:
                await self.resolve_conflict(path, report)
        else:
            error = body.get("error") if body else status
            report.failed.append(f"{path} ({error})")
            client_log.warning("upload-failed path=%s error=%s", path, error)

    def progress_reader(self, handle: Any, size: int, label: str) -> Any:
        """The file itself, or a reader that draws a progress bar (large files, on a terminal)."""
        if not self.progress or size < PROGRESS_MIN_BYTES:
            return handle

        async def chunks() -> AsyncIterator[bytes]:
            sent = 0
            while chunk := handle.read(CHUNK_SIZE):
                sent += len(chunk)
                draw_progress(label, sent, size)
                yield chunk
            sys.stdout.write("\n")
        return chunks()

    # -- resumable uploads (tus 1.0.0) -------------------------------------------------

    def resumable(self, local: LocalFile) -> bool:
        """Whether a file goes through tus: a large one, where the server speaks it."""
        return (self.tus_works and self.resumable_min_size is not None
                and local.size >= self.resumable_min_size)

    async def push_resumable(self, local: LocalFile, report: PassReport) -> bool:
        """Upload a large file through tus, continuing a remembered upload of the same
        content from the server's Upload-Offset: a dropped connection or a restarted
        server costs the bytes after the last one stored, not the file. Tries that gain
        nothing RESUME_ATTEMPTS times in a row end the pass (the next one, or the next run,
        continues). False when the server will not take it this way (use /upload)."""
        failures, reached = 0, -1
        while True:
            try:
                position = await self.tus_position(local)
                if position is None:
                    return False
                url, offset = position
                if offset > reached:
                    failures, reached = 0, offset
                status, body = await self.tus_send(url, local, offset)
            except UploadRefused as refused:
                status, body = refused.status, refused.body
            except (aiohttp.ClientError, ConnectionError, asyncio.TimeoutError,
                    UploadInterrupted) as exc:
                failures += 1
                if failures >= RESUME_ATTEMPTS:
                    raise ClientError(f"the upload of {local.path} was cut {failures} times "
                                      f"without progress ({exc}); it continues next time") \
                        from None
                delay = RESUME_DELAY * 2 ** (failures - 1)
                client_log.warning("upload-interrupted path=%s error=%s: resuming in %g s",
                                   local.path, str(exc) or type(exc).__name__, delay)
                await asyncio.sleep(delay)
                continue
            await self.uploaded(local, status, body, report)
            return True

    async def tus_position(self, local: LocalFile) -> tuple[str, int] | None:
        """Where the upload of local stands: a remembered upload of this content and its
        offset on the server, or a new one at 0. None when tus is not to be used."""
        remembered = self.state.resumable(local.path)
        if remembered is not None:
            where, checksum, size = remembered
            url = str(self.same_server(where))
            if (checksum, size) == (local.checksum, local.size):
                status, _, headers = await self.request("HEAD", url, headers=TUS_REQUEST)
                if status == 200:
                    offset = from_server(lambda: int(headers["Upload-Offset"]), "tus offset")
                    if 0 <= offset <= local.size:
                        if offset:
                            client_log.info("upload-resume path=%s offset=%d size=%d",
                                            local.path, offset, local.size)
                        return url, offset
                elif status not in (404, 410):      # not expired, not completed: unknown
                    raise UploadInterrupted(f"HEAD of the upload answered {status}")
            else:                                   # the file changed since: start anew
                await self.request("DELETE", url, headers=TUS_REQUEST)
            self.state.forget_upload(local.path)
        return await self.tus_create(local)

    async def tus_create(self, local: LocalFile) -> tuple[str, int] | None:
        """POST /uploads/: a new upload of local (remembered); None when the server has
        no tus, or this client has too many uploads open there."""
        fields = {**self.upload_fields(local), "client_id": self.client_id}
        status, body, headers = await self.request("POST", self.url("/uploads/"), headers={
            **TUS_REQUEST, "Upload-Length": str(local.size),
            "Upload-Metadata": tus_metadata(fields)})
        if status == 201:
            url = self.same_server(from_server(lambda: str(headers["Location"]),
                                               "tus Location"))
            # its path only: the same server may be reached by another URL next time
            self.state.remember_upload(local.path, url.raw_path_qs, local.checksum, local.size)
            return str(url), 0
        if status in (404, 405):
            client_log.info("tus-unavailable status=%d: uploading in one request", status)
            self.tus_works = False
            return None
        if status == 429:
            client_log.warning("tus-refused path=%s error=too_many_uploads: uploading in one "
                               "request", local.path)
            return None
        raise UploadRefused(status, body)

    async def drop_stale_uploads(self, local: Mapping[str, LocalFile]) -> None:
        """Terminate the remembered uploads no longer wanted (the file changed, went, or is
        on the server already): they would hold space there until they expire."""
        for path, where, checksum, _ in self.state.resumables():
            found, base = local.get(path), self.state.base(path)
            if found is None or found.checksum != checksum or (base and base.checksum == checksum):
                await self.request("DELETE", self.same_server(where), headers=TUS_REQUEST)
                self.state.forget_upload(path)

    def same_server(self, location: str) -> Any:
        """An upload's URL (Location may be relative), which must be on our server: our
        key goes with every request."""
        url = URL(self.server).join(URL(location))
        if url.origin() != URL(self.server).origin():
            raise ClientError(f"the server sent an upload URL on another server: {location}")
        return url

    async def tus_send(self, url: str, local: LocalFile, offset: int) -> tuple[int, Any]:
        """PATCH the file from offset in TUS_CHUNK pieces; the answer to the last byte as
        /upload would give it. UploadInterrupted when the server's offset is not ours."""
        with open(self.folder / local.path, "rb") as handle:
            while True:
                if os.fstat(handle.fileno()).st_size != local.size:
                    await self.request("DELETE", url, headers=TUS_REQUEST)
                    self.state.forget_upload(local.path)
                    return 0, {"error": "changed while it was uploaded"}
                length = min(TUS_CHUNK, local.size - offset)
                handle.seek(offset)
                status, body, headers = await self.request("PATCH", url, headers={
                    **TUS_REQUEST, "Upload-Offset": str(offset), "Content-Length": str(length),
                    "Content-Type": "application/offset+octet-stream"},
                    data=self.chunk_reader(handle, offset, length, local))
                if status == 409 and isinstance(body, dict) and "server" not in body:
                    raise UploadInterrupted(f"the server's offset moved ({body.get('message')})")
                if status != 204:
                    if status < 500:        # refused for good: the server dropped it
                        self.state.forget_upload(local.path)
                    if status == 404 or status == 410:
                        raise UploadInterrupted(f"the upload is gone ({status})")
                    return status, body
                offset = from_server(lambda: int(headers["Upload-Offset"]), "tus offset")
                if offset >= local.size:
                    self.state.forget_upload(local.path)
                    return 200, {"revision": headers.get("X-Revision")}

    def chunk_reader(self, handle: Any, offset: int, length: int, local: LocalFile) -> Any:
        """length bytes of the file from offset, drawing the progress bar from where the
        upload stands (a resumed upload shows its resumed position)."""
        progress = self.progress and local.size >= PROGRESS_MIN_BYTES

        async def chunks() -> AsyncIterator[bytes]:
            sent = 0
            while sent < length:
                chunk = handle.read(min(CHUNK_SIZE, length - sent))
                if not chunk:
                    raise UploadInterrupted(f"{local.path} became shorter while it was sent")
                sent += len(chunk)
                if progress:
                    draw_progress(f"up {local.path}", offset + sent, local.size)
                yield chunk
            if progress and offset + sent >= local.size:
                sys.stdout.write("\n")
        return chunks()

    async def push_delete(self, base: LocalFile, report: PassReport) -> None:
        """Delete on the server a file deleted here, if it is still the version we had."""
        status, _ = await self.call("DELETE", "/files/", base.path, params={
            "client_id": self.client_id, "base_checksum": base.checksum})
        if status in (200, 404):
            report.deleted_there += status == 200
            client_log.info("delete-remote path=%s status=%d", base.path, status)
        else:   # 409: changed on the server since; the next plan downloads it
            client_log.info("delete-remote-skipped path=%s status=%d", base.path, status)
        self.state.drop_base(base.path)

    async def download(self, path: str) -> tuple[Path | bytes, str, int] | None:
        """The server's current file, verified against its ETag: a small one in memory, a
        large one into tmp/; None if gone."""
        temp = self.state.tmp_dir / f"down-{uuid.uuid4().hex}"
        async with self.session.get(self.url("/download/", path), headers=self.headers) as response:
            if response.status == 404:
                return None
            if response.status != 200:
                raise ClientError(f"download of {path} answered {response.status}")
            expected = response.headers.get("ETag", "").strip('"')
            size = response.content_length or 0
            if response.content_length is not None and size <= BULK_FILE_LIMIT:
                data = await response.read()
                if hashlib.sha256(data).hexdigest() != expected:
                    raise ClientError(f"download of {path} does not match its checksum")
                return data, expected, len(data)
            hasher = hashlib.sha256()
            received = 0
            # The file is made, written and fsynced in worker threads: each can wait for
            # the disk's journal, and the loop has other transfers to run meanwhile.
            out = await asyncio.to_thread(open, temp, "wb")
            try:
                try:
                    async for chunk in response.content.iter_chunked(CHUNK_SIZE):
                        hasher.update(chunk)
                        await asyncio.to_thread(out.write, chunk)
                        received += len(chunk)
                        if self.progress and size >= PROGRESS_MIN_BYTES:
                            draw_progress(f"down {path}", received, size)
                    await asyncio.to_thread(sync_and_close, out)
                finally:
                    out.close()
            except BaseException:
                temp.unlink(missing_ok=True)
                raise
        if hasher.hexdigest() != expected:
            temp.unlink(missing_ok=True)
            raise ClientError(f"download of {path} does not match its checksum")
        return temp, expected, received

    def copy_local(self, source: LocalFile, checksum: str) -> tuple[Path, str, int] | None:
        """A copy of a tracked file into tmp/, if it is still its base's content and hashes
        to checksum (checked on the copy itself); None otherwise."""
        if local_file(self.folder, source.path, source) != source:
            return None                            # changed here since: not that content
        temp = self.state.tmp_dir / f"copy-{next(self.temp_names)}"
        hasher = hashlib.sha256()
        try:
            with open(self.folder / source.path, "rb") as original, open(temp, "wb") as out:
                while chunk := original.read(CHUNK_SIZE):
                    hasher.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
        except OSError:
            temp.unlink(missing_ok=True)
            return None
        if hasher.hexdigest() != checksum:
            temp.unlink(missing_ok=True)
            return None
        return temp, checksum, source.size

    async def place(self, temp: Path | bytes, path: str, checksum: str, size: int,
                    modified_time: float) -> None:
        """Put a verified download into the folder (a temp file, or the bytes of a small
        one: written, fsynced and renamed in one worker thread), with the server's mtime."""
        if isinstance(temp, bytes):
            data, temp = temp, self.state.tmp_dir / f"down-{next(self.temp_names)}"
            mtime_ns = await asyncio.to_thread(write_into_place, temp, data, self.folder / path,
                                               modified_time)
        else:
            mtime_ns = await asyncio.to_thread(move_into_place, temp, self.folder / path,
                                               modified_time)
        self.state.set_base(LocalFile(path, checksum, size, mtime_ns))

    async def pull(self, path: str, modified_time: float, report: PassReport,
                   scanned: LocalFile | None = None, checksum: str | None = None) -> None:
        """Download the server's version of path, unless this folder changed it meanwhile;
        when its checksum is that of a file this folder has (a move or a copy elsewhere),
        copy that file instead of downloading it."""
        base = self.state.base(path)
        current = local_file(self.folder, path, base)
        if current is not None and current != scanned and (base is None or current.checksum != base.checksum):
            await self.resolve_conflict(path, report)     # written here since the plan was made
            return
        fetched: tuple[Path | bytes, str, int] | None = None
        for source in self.state.with_checksum(checksum) if checksum else []:
            fetched = await asyncio.to_thread(self.copy_local, source, source.checksum)
            if fetched is not None:
                report.copied_here += 1
                client_log.info("copy-local path=%s from=%s", path, source.path)
                break
        if fetched is None:
            fetched = await self.download(path)
        if fetched is None:
            return
        temp, checksum, size = fetched
        try:
            await self.place(temp, path, checksum, size, modified_time)
        except OSError as exc:        # a folder where the file goes, or the other way round
            if isinstance(temp, Path):
                temp.unlink(missing_ok=True)
            report.failed.append(f"{path} ({exc.strerror})")
            client_log.warning("download-failed path=%s error=%s", path, exc.strerror)
            return
        report.downloaded += 1
        client_log.info("download path=%s bytes=%d", path, size)

    def delete_here(self, path: str, scanned: LocalFile | None, report: PassReport) -> None:
        """Delete a local file the server deleted, only if it is unchanged since we looked."""
        current = local_file(self.folder, path, self.state.base(path))
        if current is not None and (scanned is None or current.checksum == scanned.checksum):
            (self.folder / path).unlink()
            self.prune_folders(path)
            report.deleted_here += 1
            client_log.info("delete-local path=%s", path)
        self.state.drop_base(path)

    def prune_folders(self, path: str) -> None:
        """Remove folders a deletion left empty."""
        parent = (self.folder / path).parent
        while parent != self.folder:
            try:
                parent.rmdir()
            except OSError:
                return
            parent = parent.parent

    async def resolve_conflict(self, path: str, report: PassReport) -> None:
        """Keep the local version as a conflict copy (uploaded, so every device sees it) and
        take the server's version under the original name. No byte is lost."""
        copy = conflict_name(path, self.client_id, time.time(),
                             lambda name: (self.folder / name).exists())
        local_path = self.folder / path
        if local_path.exists():
            os.replace(local_path, self.folder / copy)
            client_log.warning("conflict path=%s kept-as=%s", path, copy)
        self.state.drop_base(path)
        fetched = await self.download(path)
        if fetched is not None:
            temp, checksum, size = fetched
            status, body = await self.call("GET", "/files", params={"prefix": path})
            entry = next((f for f in body["files"] if f["path"] == path), None) if body else None
            await self.place(temp, path, checksum, size,
                             entry["modified_time"] if entry else time.time())
            report.downloaded += 1
        report.conflicts += 1
        kept = local_file(self.folder, copy, None)
        if kept is not None:
            await self.push_file(copy, kept, report)

    # -- live -----------------------------------------------------------------------

    async def apply_remote(self, change: RemoteChange, report: PassReport) -> None:
        """Apply another client's change to this folder: by the contract's own /sync rules
        (plan_sync), with this folder's copy as the listing and the change as the server."""
        async with self.lock:
            if change.seq <= self.state.cursor:
                return
            if change.client_id != self.client_id and not self.rules.ignored(change.path):
                base = self.state.base(change.path)
                local = local_file(self.folder, change.path, base)
                listed = {} if local is None else {change.path: local}
                plan = plan_sync([f.entry(base) for f in listed.values()],
                                 {change.path: change.server_record(base)})
                await self.carry_out(plan.to_json("", change.seq), listed,
                                     {change.path: base} if base else {}, report)
                if local is None and change.type == "delete":
                    self.state.drop_base(change.path)
            self.state.cursor = change.seq

    async def push_paths(self, paths: Iterable[str], report: PassReport) -> None:
        """Push local changes of these paths (from the watcher); a folder stands for
        everything under it (a renamed folder is reported as the folder alone)."""
        wanted = set(paths)
        async with self.lock:
            if IGNORE_FILE in wanted:
                self.rules = IgnoreRules(self.folder)
            gone, fresh = await asyncio.to_thread(self.changed_under, wanted, self.state.bases())
            if gone and fresh:
                await self.push_moves(find_moves(gone, fresh), gone, fresh, self.state.bases(),
                                      report)
            for path in sorted(wanted):
                if self.rules.ignored(path):
                    continue
                target = self.folder / path
                if target.is_dir() and not target.is_symlink():
                    below, _ = await asyncio.to_thread(scan_folder, target, IgnoreRules(target), {})
                    for child in sorted(below):
                        await self.push_one(f"{path}/{child}", report)
                else:
                    await self.push_one(path, report)
                for child, child_base in self.state.bases().items():
                    if (child.startswith(path + "/") and not self.rules.ignored(child)
                            and not (self.folder / child).exists()):
                        await self.push_delete(child_base, report)

    def changed_under(self, paths: Iterable[str], bases: Mapping[str, LocalFile]
                      ) -> tuple[dict[str, LocalFile], dict[str, LocalFile]]:
        """Under these paths (files, or folders with everything in them): the tracked files
        gone from disk, and the files not tracked yet (hashed): a rename's two halves. In a
        worker thread (it hashes): bases come from the caller, the state is not touched."""
        gone: dict[str, LocalFile] = {}
        fresh: dict[str, LocalFile] = {}
        for path in sorted(set(paths)):
            if self.rules.ignored(path):
                continue
            for tracked, base in bases.items():
                if ((tracked == path or tracked.startswith(path + "/"))
                        and not self.rules.ignored(tracked) and not os.path.lexists(self.folder / tracked)):
                    gone[tracked] = base
            target = self.folder / path
            if target.is_dir() and not target.is_symlink():
                below, _ = scan_folder(target, IgnoreRules(target), {})
                for child, inside in below.items():
                    full = f"{path}/{child}"
                    if full not in bases and not self.rules.ignored(full):
                        fresh[full] = LocalFile(full, inside.checksum, inside.size, inside.mtime_ns)
            elif path not in bases:
                found = local_file(self.folder, path, None)
                if found is not None:
                    fresh[path] = found
        return gone, fresh

    async def push_one(self, path: str, report: PassReport) -> None:
        """Upload path if it differs from its base; delete it there if it is gone here."""
        if self.rules.ignored(path):
            return
        base = self.state.base(path)
        local = local_file(self.folder, path, base)
        if local is not None:
            if base is None or local.checksum != base.checksum:
                await self.push_file(path, local, report)
        elif base is not None and not (self.folder / path).exists():
            await self.push_delete(base, report)

    async def catch_up(self) -> PassReport:
        """Apply the journal from our cursor (/changes), then push what changed here offline."""
        report = PassReport()
        while True:
            status, page = await self.call("GET", "/changes", params={
                "since": str(self.state.cursor), "limit": "1000"})
            if status != 200:
                raise ClientError(f"/changes answered {status}")
            entries, has_more = from_server(
                lambda: (list(page["changes"]), bool(page["has_more"])), "/changes answer")
            for entry in entries:
                change = self.remote_change(entry, report)
                if change is not None:
                    await self.apply_remote(change, report)
            if not has_more:
                break
        async with self.lock:
            bases, local = await self.scan_and_push_removals(report)
            await self.push_files([f for path, f in sorted(local.items())
                                   if path not in bases or bases[path].checksum != f.checksum],
                                  report)
        return report

    @staticmethod
    def remote_change(entry: Mapping[str, Any], report: PassReport) -> RemoteChange | None:
        """A change from /changes or the WebSocket; None (refused loudly) when its path is bad."""
        try:
            return RemoteChange.from_json(entry)
        except ClientError as exc:
            client_log.error("%s", exc)
            path = entry.get("path") if isinstance(entry, Mapping) else entry
            report.failed.append(f"{path!r} ({exc})")
            return None

    async def listen(self, ws: Any) -> None:
        """Apply events from the WebSocket until it closes."""
        report = PassReport()
        async for message in ws:
            if message.type != WSMsgType.TEXT:
                continue
            event = from_server(lambda: dict(json.loads(message.data)), "WebSocket event")
            if event.get("type") in ("file_changed", "file_deleted"):
                change = self.remote_change(event, report)
                if change is not None:
                    await self.apply_remote(change, report)
                if report.failed:
                    client_log.warning("failed: %s", ", ".join(report.failed))
                    self.note_outcome(report)
                    report.failed.clear()

    async def watch(self) -> None:
        """Push local changes as they happen (debounced by watchfiles)."""
        import watchfiles
        state_dir = str(self.folder / CLIENT_STATE_DIR)
        async for changes in watchfiles.awatch(
                self.folder, debounce=WATCH_DEBOUNCE_MS, recursive=True,
                watch_filter=lambda _, name: not name.startswith(state_dir)):
            paths = []
            for _, name in changes:
                relative = os.path.relpath(name, self.folder)
                if not relative.startswith(".."):
                    paths.append(relative.replace(os.sep, "/"))
            report = PassReport()
            try:
                await self.push_paths(paths, report)
            except (aiohttp.ClientError, ConnectionError, asyncio.TimeoutError, ClientError,
                    OSError) as exc:
                # The server is away: the catch-up after the reconnect pushes these.
                client_log.warning("push-failed error=%s", exc or type(exc).__name__)
                continue
            if report.failed:
                self.note_outcome(report)
            if report.uploaded or report.deleted_there or report.moves or report.failed:
                print(report.summary(), flush=True)

    async def run_live(self) -> None:
        """Sync, then stay connected: apply remote events, push local ones; reconnect with
        exponential back-off and catch up with /changes each time."""
        delay = 1.0
        first = True
        watcher: asyncio.Task[None] | None = None
        main = asyncio.current_task()
        failures: list[BaseException] = []

        def watcher_done(task: asyncio.Task[None]) -> None:
            # A bug in the watcher would otherwise leave a client that no longer pushes
            # anything, silently: it stops the client as a bug anywhere else does.
            if not task.cancelled() and task.exception() is not None and main is not None:
                failures.append(task.exception())     # type: ignore[arg-type]
                main.cancel()
        try:
            while True:
                try:
                    ws_url = self.url("/ws/", self.client_id)
                    async with self.session.ws_connect(ws_url, headers=self.headers,
                                                       heartbeat=30.0) as ws:
                        hello = await ws.receive(timeout=30)
                        epoch = from_server(lambda: str(json.loads(hello.data)["epoch"]),
                                            "WebSocket hello")
                        # Armed before the pass (which takes self.lock before the watcher
                        # first runs): a file changed while a long first pass runs is pushed
                        # after it, not left until the next reconnection.
                        if watcher is None or watcher.done():
                            watcher = asyncio.ensure_future(self.watch())
                            watcher.add_done_callback(watcher_done)
                        with self.state.batch():
                            if first or epoch != self.state.get("epoch"):
                                report = await self.full_pass()
                                first = False
                            else:
                                report = await self.catch_up()
                        self.note_outcome(report)
                        print(report.summary(), flush=True)
                        delay = 1.0
                        client_log.info("live server=%s cursor=%d", self.server, self.state.cursor)
                        await self.listen(ws)
                except aiohttp.WSServerHandshakeError as exc:
                    if exc.status in (401, 403):
                        # a handshake's refusal has no body: a request brings the reason
                        await self.call("GET", "/changes", params={"since": "0", "limit": "1"})
                        raise auth_refusal(exc.status, {
                            "message": f"the WebSocket of client id {self.client_id} was "
                                       "refused"}) from None
                    client_log.warning("disconnected: %s; retrying in %.0f s", exc, delay)
                except (aiohttp.ClientError, ConnectionError, asyncio.TimeoutError,
                        ClientError) as exc:   # anything else is a bug: run_client stops
                    client_log.warning("disconnected: %s; retrying in %.0f s", exc or type(exc).__name__, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX_DELAY)
        except asyncio.CancelledError:
            if failures:
                raise failures[0] from None
            raise
        finally:
            if watcher is not None:
                watcher.cancel()


def sync_and_close(out: Any) -> None:
    """Flush, fsync and close a file written for a download."""
    out.flush()
    os.fsync(out.fileno())
    out.close()


def write_into_place(temp: Path, data: bytes, target: Path, modified_time: float) -> int:
    """A small download: write it to temp, fsync, and move_into_place."""
    try:
        with open(temp, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        return move_into_place(temp, target, modified_time)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def move_into_place(temp: Path, target: Path, modified_time: float) -> int:
    """Give a downloaded temp file its mtime and rename it to target (folders made);
    its st_mtime_ns."""
    target.parent.mkdir(parents=True, exist_ok=True)
    os.utime(temp, (modified_time, modified_time))
    os.replace(temp, target)
    return os.stat(target).st_mtime_ns


async def in_flight(jobs: Sequence[Callable[[], Awaitable[None]]], limit: int) -> None:
    """Run the jobs, at most limit at a time (each a request or two: a pass's round trips
    overlap); the first failure cancels the others and is raised."""
    if len(jobs) <= 1 or limit <= 1:
        for job in jobs:
            await job()
        return
    semaphore = asyncio.Semaphore(limit)

    async def run(job: Callable[[], Awaitable[None]]) -> None:
        async with semaphore:
            await job()
    tasks = [asyncio.ensure_future(run(job)) for job in jobs]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def draw_progress(label: str, done: int, total: int) -> None:
    """A one-line progress bar on a terminal."""
    width = 30
    filled = int(width * done / total) if total else width
    sys.stdout.write(f"\r{label[:40]:40} [{'#' * filled}{'.' * (width - filled)}] "
                     f"{100 * done // max(total, 1):3d}%")
    sys.stdout.flush()


def add_credential_flags(parser: argparse.ArgumentParser) -> None:
    """How the client and the admin commands authenticate, and whom they trust."""
    keys = parser.add_mutually_exclusive_group()
    keys.add_argument("--api-key", metavar="KEY", help="the server's API key (default: none)")
    keys.add_argument("--api-key-file", metavar="PATH",
                      help="a file holding only the server's API key")
    keys.add_argument("--token-file", metavar="PATH",
                      help=f"a file holding only this device's token (default: "
                           f"${TOKEN_VARIABLE}, if set)")
    parser.add_argument("--ca-file", metavar="PATH",
                        help="trust the server's certificate if this CA (PEM) signed it, "
                             "for a private CA (default: the system's CAs)")


def read_credential(args: argparse.Namespace, environ: Mapping[str, str]) -> str | None:
    """The key or token to present: --token-file, --api-key-file, --api-key, else the
    environment's SYNCD_TOKEN; ConfigError when a file cannot be read."""
    if args.token_file:
        return read_api_key_file(args.token_file)
    if args.api_key_file:
        return read_api_key_file(args.api_key_file)
    return args.api_key or environ.get(TOKEN_VARIABLE) or None


def client_session(args: argparse.Namespace, timeout: aiohttp.ClientTimeout
                   ) -> aiohttp.ClientSession:
    """An HTTP session that verifies https:// servers (against --ca-file when given)."""
    context = ssl.create_default_context(cafile=args.ca_file) if args.ca_file else None
    return aiohttp.ClientSession(timeout=timeout,
                                 connector=aiohttp.TCPConnector(ssl=context or True))


def add_client_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of `python syncd.py client`."""
    parser.add_argument("folder", help="the folder to sync (created if missing)")
    parser.add_argument("--server", required=True, metavar="URL",
                        help="the server, e.g. http://192.0.2.10:8000")
    parser.add_argument("--client-id", metavar="ID",
                        help="this device's id, kept in FOLDER/.syncd-client/ "
                             "(default: the one kept there, else the host name)")
    add_credential_flags(parser)
    parser.add_argument("--once", action="store_true",
                        help="one pass, then exit: 0, 1 if anything failed, 3 if most "
                             "tracked files are gone (default: stay connected and live). "
                             "It starts from the last pass (the server's journal since, and "
                             "what changed here) when that one did everything")
    parser.add_argument("--full", action="store_true",
                        help="with --once: a full pass (every file compared with the server) "
                             "even when an incremental one would do")
    parser.add_argument("--accept-deletions", action="store_true",
                        help="push deletions even when most tracked files are gone "
                             "(default: refuse, exit 3)")
    parser.add_argument("--resumable-min-size", default=RESUMABLE_MIN_SIZE, metavar="SIZE",
                        type=resumable_size,
                        help="upload files at least this large resumably (tus), so that a "
                             "dropped connection costs only what was not yet stored; e.g. "
                             "8MiB, 1GiB, or 'off' (default: 8MiB)")
    parser.add_argument("--log-level", default="info", type=str.lower, choices=LOG_LEVELS,
                        help="how much to log (default: info)")


def resumable_size(text: str) -> int | None:
    """--resumable-min-size: a size, or off."""
    if text.strip().lower() == "off":
        return None
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


async def run_client(args: argparse.Namespace, api_key: str | None) -> int:
    """Run the client as the flags say; the exit code."""
    folder = Path(args.folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    state = ClientState(folder)
    client_id = args.client_id or state.get("client_id") or default_client_id()
    state.put("client_id", client_id)
    client = SyncClient(folder, args.server, client_id, api_key, state, args.accept_deletions,
                        args.resumable_min_size)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=300)
    try:
        async with client_session(args, timeout) as session:
            client.session = session
            if args.once:
                report = await client.one_pass(full=args.full)
                print(report.summary(), flush=True)
                for failure in report.failed:
                    print(f"failed: {failure}", flush=True)
                return EXIT_CLIENT_FAILED if report.failed else 0
            await client.run_live()
            return 0
    except MassVanish as exc:
        client_log.error("%s", exc)
        return EXIT_MASS_VANISH
    except AuthRefused as exc:
        client_log.error("%s", exc)
        return EXIT_CONFIG
    except (ClientError, aiohttp.ClientError, OSError) as exc:
        client_log.error("sync failed: %s", exc)
        return EXIT_CLIENT_FAILED
    except Exception:      # a bug of ours: retrying would only repeat it
        client_log.exception("the client stopped on an internal error")
        return EXIT_CLIENT_FAILED
    finally:
        client.state.close()


def client_main(args: argparse.Namespace) -> int:
    """`python syncd.py client ...`."""
    client_id = args.client_id
    if client_id is not None and not CLIENT_ID_RE.fullmatch(client_id):
        print("syncd client: --client-id must match ^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$",
              file=sys.stderr)
        return EXIT_CONFIG
    try:
        api_key = read_credential(args, os.environ)
        if args.ca_file:
            ssl.create_default_context(cafile=args.ca_file)
    except (ConfigError, OSError, ssl.SSLError) as exc:
        print(f"syncd client: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    setup_logging(args.log_level, os.environ)
    try:
        return asyncio.run(run_client(args, api_key))
    except KeyboardInterrupt:
        return 0


# ===========================================================================
# Admin commands: versions, trash, restore (against a running server, by its API)
# ===========================================================================

class AdminError(Exception):
    """The server refused an admin command, or could not be reached: one line for the user."""


def format_size(size: int) -> str:
    """Bytes as people read them: 512 B, 4.0 KiB, 1.5 GiB."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


def format_time(seconds: float) -> str:
    """Unix seconds as local time."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


def table(headers: Sequence[str], lines: Sequence[Sequence[str]]) -> str:
    """Columns aligned to their widest cell."""
    widths = [max([len(header), *(len(line[i]) for line in lines)])
              for i, header in enumerate(headers)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip()
                     for line in [headers, *lines])


class Admin:
    """One admin command's calls to the server."""

    def __init__(self, session: aiohttp.ClientSession, server: str, api_key: str | None) -> None:
        self.session = session
        self.server = server.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    async def call(self, method: str, route: str, path: str = "", **kwargs: Any) -> Any:
        """The JSON answer of a request; AdminError with the server's message otherwise."""
        url = URL(self.server + route + quote(path, safe="/"), encoded=True)
        try:
            async with self.session.request(method, url, headers=self.headers,
                                            **kwargs) as response:
                body = await response.json(content_type=None)
        except (aiohttp.ClientError, ValueError, OSError) as exc:
            raise AdminError(f"cannot reach {self.server}: {exc or type(exc).__name__}") from None
        if response.status >= 400:
            detail = body.get("message") if isinstance(body, dict) else None
            raise AdminError(f"{response.status} {body.get('error') if isinstance(body, dict) else ''}:"
                             f" {detail or 'no details'}")
        return body

    async def seq_at_time(self, moment: float) -> int:
        """The last change's seq at moment (0: none yet), from /changes."""
        since, found = 0, 0
        while True:
            page = await self.call("GET", "/changes", params={"since": str(since),
                                                             "limit": str(CHANGES_MAX_LIMIT)})
            for change in page["changes"]:
                if change["time"] > moment:
                    return found
                found = change["seq"]
            if not page["has_more"]:
                return found
            since = page["changes"][-1]["seq"]


async def run_admin(args: argparse.Namespace, api_key: str | None) -> str:
    """Carry out one admin command; what to print."""
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=600)
    async with client_session(args, timeout) as session:
        admin = Admin(session, args.server, api_key)
        if args.command == "versions":
            body = await admin.call("GET", "/versions/", args.path)
            return json.dumps(body, indent=2) if args.json else versions_table(body)
        if args.command == "trash":
            body = await admin.call("GET", "/trash", params={"prefix": args.prefix})
            return json.dumps(body, indent=2) if args.json else trash_table(body["files"])
        if args.command == "devices":
            return await run_devices(admin, args)
        return await run_restore(admin, args)


async def run_devices(admin: Admin, args: argparse.Namespace) -> str:
    """`devices add NAME [--scope S]`, `devices list`, `devices revoke NAME`."""
    if args.action == "add":
        body = await admin.call("POST", "/devices", json={"name": args.name,
                                                          "scope": args.scope})
        if args.json:
            return json.dumps(body, indent=2)
        return (f"device {body['device']} enrolled with the scope {body['scope']}; its token "
                f"(shown this once, keep it secret):\n{body['token']}")
    if args.action == "revoke":
        body = await admin.call("DELETE", "/devices/", args.name)
        return json.dumps(body, indent=2) if args.json else f"device {body['device']} revoked"
    body = await admin.call("GET", "/devices")
    return json.dumps(body, indent=2) if args.json else devices_table(body["devices"])


def devices_table(devices: Sequence[Mapping[str, Any]]) -> str:
    """GET /devices as a table."""
    if not devices:
        return "no devices enrolled"
    return table(["DEVICE", "SCOPE", "ENROLLED", "LAST SEEN", "STATE"], [
        [d["device"], d["scope"], format_time(d["created"]),
         format_time(d["last_seen"]) if d["last_seen"] else "never",
         "revoked" if d["revoked"] else "active"] for d in devices])


async def run_restore(admin: Admin, args: argparse.Namespace) -> str:
    """`restore PATH [--revision N]` or `restore --prefix P --at SEQ|--at-time T`."""
    client_id = args.client_id or default_client_id()
    if args.prefix is not None:
        at = args.at if args.at is not None else await admin.seq_at_time(args.at_time)
        body = await admin.call("POST", "/restore", json={
            "client_id": client_id, "prefix": args.prefix, "at": at,
            "delete_newer": args.delete_newer})
        if args.json:
            return json.dumps(body, indent=2)
        lines = [f"{args.prefix or 'the whole tree'} as it was at seq {at}: "
                 f"{body['restored']} restored, {body['deleted']} deleted"]
        lines += [f"not kept any more: {path}" for path in body["unavailable"]]
        lines += [f"changed meanwhile or in the way, left as it is: {path}"
                  for path in body.get("blocked", [])]
        return "\n".join(lines)
    revision = args.revision
    if revision is None:
        kept = (await admin.call("GET", "/versions/", args.path))["versions"]
        if not kept:
            raise AdminError(f"no kept version of {args.path}")
        revision = kept[0]["revision"]
    body = await admin.call("POST", "/restore", json={
        "client_id": client_id, "path": args.path, "revision": revision,
        **({"base_checksum": args.base_checksum} if args.base_checksum is not None else {})})
    return json.dumps(body, indent=2) if args.json else (
        f"restored {args.path} to revision {revision} ({format_size(body['size'])}); "
        f"it is revision {body['revision']} now")


def versions_table(body: Mapping[str, Any]) -> str:
    """GET /versions as a table."""
    current = body["current"]
    lines = [[f"{current['revision']} (live)", format_time(current["modified_time"]),
              format_size(current["size"]), "", "", "", current["checksum"][:12]]] if current else []
    lines += [[str(v["revision"]), format_time(v["modified_time"]), format_size(v["size"]),
               f"{v['reason']} {format_time(v['time'])}", v["replaced_by"],
               str(v["replaced_at"]), v["checksum"][:12]] for v in body["versions"]]
    return f"{body['path']}\n" + table(
        ["REVISION", "MODIFIED", "SIZE", "REPLACED", "BY", "AT SEQ", "CHECKSUM"], lines)


def trash_table(files: Sequence[Mapping[str, Any]]) -> str:
    """GET /trash as a table."""
    if not files:
        return "the trash is empty"
    return table(["PATH", "SIZE", "DELETED", "BY", "REVISION"], [
        [f["path"], format_size(f["size"]), format_time(f["time"]), f["deleted_by"],
         str(f["revision"])] for f in files])


def add_admin_flags(parser: argparse.ArgumentParser) -> None:
    """The flags every admin command shares."""
    parser.add_argument("--server", default="http://127.0.0.1:8000", metavar="URL",
                        help="the running server (default: http://127.0.0.1:8000)")
    add_credential_flags(parser)
    parser.add_argument("--json", action="store_true",
                        help="print the server's JSON answer (default: a table for people)")


def parse_local_time(text: str) -> float:
    """Unix seconds of "2026-12-01 10:00" (local time unless it names a zone), for --at-time."""
    try:
        moment = datetime.datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f'expected a time like "2026-12-01 10:00", got {text!r}') from None
    return moment.timestamp()


def add_admin_commands(commands: Any) -> None:
    """versions, trash, restore and devices."""
    versions = commands.add_parser(
        "versions", help="list the kept versions of a path",
        description="List the live file at PATH and its kept versions, newest first.")
    versions.add_argument("path", help="the file's path on the server")
    add_admin_flags(versions)
    trash = commands.add_parser(
        "trash", help="list deleted files whose content is kept",
        description="List the deleted files whose last content is kept (restore them with "
                    "`restore PATH`).")
    trash.add_argument("prefix", nargs="?", default="",
                       help="only paths starting with this (default: all)")
    add_admin_flags(trash)
    restore = commands.add_parser(
        "restore", help="bring back a file, a folder or the whole tree",
        description="Restore PATH to a kept revision (default: its newest kept version), or, "
                    "with --prefix, a folder or the whole tree to how it was at a moment. "
                    "Each restored file is an ordinary change that every device receives.")
    restore.add_argument("path", nargs="?", help="the file to restore")
    restore.add_argument("--revision", type=int, metavar="N",
                         help="the revision to restore (see `versions PATH`)")
    restore.add_argument("--base-checksum", metavar="SHA256",
                         help="only if the live file is still this one (\"\" : only if none)")
    restore.add_argument("--prefix", metavar="FOLDER",
                         help='the folder to take back in time ("" : the whole tree)')
    moment = restore.add_mutually_exclusive_group()
    moment.add_argument("--at", type=int, metavar="SEQ",
                        help="the state just after this change (a seq; see GET /changes)")
    moment.add_argument("--at-time", type=parse_local_time, metavar="TIME",
                        help='the state at this local time, like "2026-12-01 10:00"')
    restore.add_argument("--delete-newer", action="store_true",
                         help="with --prefix: also delete files created since (default: keep)")
    restore.add_argument("--client-id", metavar="ID",
                         help="who restores, as other devices see it (default: the host name)")
    add_admin_flags(restore)
    devices = commands.add_parser(
        "devices", help="enrol, list and revoke devices (each with a token of its own)",
        description="Manage the devices of a running server (needs the admin API key). A "
                    "device's token lets it act only as the client id of its name.")
    actions = devices.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = actions.add_parser("add", help="enrol a device and print its token (once)")
    add.add_argument("name", help="the device's name: its client id")
    add.add_argument("--scope", choices=DEVICE_SCOPES, default="write",
                     help="read: only download and sync; write: also change files "
                          "(default); admin: everything")
    add_admin_flags(add)
    listing = actions.add_parser("list", help="list the devices")
    add_admin_flags(listing)
    revoke = actions.add_parser("revoke", help="refuse a device's token from now on")
    revoke.add_argument("name", help="the device's name")
    add_admin_flags(revoke)


def admin_main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """`python syncd.py versions|trash|restore ...`: 0, 1 when the server refused, 2 on
    bad arguments."""
    if args.command == "restore":
        if (args.prefix is None) == (args.path is None):
            parser.error("restore: give PATH, or --prefix with --at or --at-time")
        if args.prefix is not None and args.at is None and args.at_time is None:
            parser.error("restore --prefix: give --at SEQ or --at-time TIME")
    try:
        api_key = read_credential(args, os.environ)
        if args.ca_file:
            ssl.create_default_context(cafile=args.ca_file)
    except (ConfigError, OSError, ssl.SSLError) as exc:
        print(f"syncd {args.command}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        print(asyncio.run(run_admin(args, api_key)))
    except AdminError as exc:
        print(f"syncd {args.command}: {exc}", file=sys.stderr)
        return EXIT_CLIENT_FAILED
    return 0


# ===========================================================================
# CLI
# ===========================================================================

FLAG_METAVARS = {"host": "ADDRESS", "sync_directory": "PATH", "api_key": "KEY",
                 "api_key_file": "PATH"}
PARSER_METAVARS = {parse_port: "PORT", parse_size: "SIZE", parse_seconds: "SECONDS",
                   parse_days: "DAYS",
                   parse_positive_whole: "N", parse_extensions: "LIST", parse_origins: "LIST",
                   parse_hosts: "LIST", parse_log_level: "LEVEL"}


def toml_value(value: Any) -> str:
    """A setting's value as syncd.toml spells it."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return json.dumps(list(value))
    return json.dumps(value)


def add_serve_flags(parser: argparse.ArgumentParser, default: Any) -> None:
    """The flags of `python syncd.py [serve]`: one per setting, each overriding syncd.toml
    and SYNCD_*; default is None on the top parser, SUPPRESS on `serve`'s own (so that
    neither parser unsets what the other was given)."""
    parser.add_argument("--config", metavar="PATH", default=default,
                        help="the TOML file to read (default: $SYNCD_CONFIG, else ./syncd.toml "
                             "if present)")
    parser.add_argument("--check-config", action="store_true", default=default,
                        help="validate the configuration, print the effective settings, "
                             "exit 0 (or 2 when it is bad)")
    parser.add_argument("--accept-deletions", action="store_true", default=default,
                        help="at start-up, record as deleted the files missing from the tree, "
                             "even if most are (default: refuse to start, exit 3)")
    group = parser.add_argument_group(
        "settings", "Each flag overrides its key in syncd.toml and SYNCD_<KEY> (e.g. "
        "SYNCD_PORT). Lists are comma-separated; sizes like 100MB or 1GiB.")
    for setting in fields(Config):
        flag = "--" + setting.name.replace("_", "-")
        text = (f"{setting.metadata['help']} (syncd.toml: {setting.name}; "
                f"default: {toml_value(setting.default)})").replace("%", "%%")
        if SETTING_PARSERS[setting.name] is parse_bool:
            group.add_argument(flag, dest=setting.name, action=argparse.BooleanOptionalAction,
                               default=default, help=text)
        else:
            metavar = (FLAG_METAVARS.get(setting.name)
                       or PARSER_METAVARS.get(SETTING_PARSERS[setting.name], "VALUE"))
            group.add_argument(flag, dest=setting.name, metavar=metavar, default=default,
                               help=text)


def main_parser() -> argparse.ArgumentParser:
    """`python syncd.py`: serve (the default) or another command, each with its flags."""
    parser = argparse.ArgumentParser(
        prog="syncd.py", description="syncd: a self-hosted file synchronization server. With "
        "no command it serves, with the flags below.",
        epilog="`syncd.py COMMAND --help` shows a command's own flags.")
    parser.add_argument("--version", action="version", version=f"syncd {__version__}")
    add_serve_flags(parser, None)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    serve = commands.add_parser("serve", help="run the server (the default command)",
                                description="Run the syncd server.")
    add_serve_flags(serve, argparse.SUPPRESS)
    client = commands.add_parser(
        "client", help="keep a folder in sync with a syncd server",
        description="Keep a folder in sync with a syncd server, through its public API.")
    add_client_flags(client)
    add_admin_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run the command the arguments name (serve by default)."""
    parser = main_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.command == "client":
        return client_main(args)
    if args.command in ("versions", "trash", "restore", "devices"):
        return admin_main(args, parser)
    return serve_main(args)


def serve_main(args: argparse.Namespace) -> int:
    """`python syncd.py [serve]`: load the config (exit 2 on a bad one) and serve."""
    flags = {setting.name: getattr(args, setting.name) for setting in fields(Config)}

    def load() -> Config:
        return load_config(args.config, os.environ, flags)
    try:
        config = load()
    except ConfigError as exc:
        print(f"syncd: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.check_config:
        if warning := key_file_warning(config):
            print(f"syncd: warning: {warning}", file=sys.stderr)
        print(describe_config(config))
        return 0
    setup_logging(config.log_level, os.environ)
    if warning := key_file_warning(config):
        log.warning("%s", warning)
    try:
        with asyncio.Runner(loop_factory=loop_factory(config)) as runner:
            return runner.run(run_daemon(config, load, accept_deletions=bool(args.accept_deletions)))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
