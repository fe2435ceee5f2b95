"""Configuration: syncd.toml, then SYNCD_* variables, then flags; bad values exit 2."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import syncd
from conftest import ROOT


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_defaults_without_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = syncd.load_config(None, {}, {})
    assert config == syncd.Config()
    assert (config.host, config.port, config.max_file_size) == ("127.0.0.1", 8000, 100_000_000)


def test_repo_syncd_toml_is_the_defaults() -> None:
    assert syncd.load_config(str(ROOT / "syncd.toml"), {}, {}) == syncd.Config()


def test_file_then_env_then_flags(tmp_path: Path) -> None:
    path = write(tmp_path / "s.toml", 'port = 9000\nhost = "0.0.0.0"\nlog_level = "debug"\n')
    config = syncd.load_config(path, {"SYNCD_PORT": "9001", "SYNCD_HOST": "127.0.0.2"},
                               {"port": "9002"})
    assert (config.port, config.host, config.log_level) == (9002, "127.0.0.2", "debug")


def test_syncd_toml_in_working_directory_is_read(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "syncd.toml", "port = 9123\n")
    monkeypatch.chdir(tmp_path)
    assert syncd.load_config(None, {}, {}).port == 9123


@pytest.mark.parametrize("text,size", [
    ("100", 100), ("1KB", 1000), ("1kb", 1000), ("2 MB", 2_000_000), ("1GB", 10**9),
    ("1KiB", 1024), ("3MiB", 3 * 2**20), ("1GiB", 2**30),
])
def test_size_syntax(text: str, size: int) -> None:
    assert syncd.parse_size(text) == size


def test_size_as_toml_integer(tmp_path: Path) -> None:
    path = write(tmp_path / "s.toml", "max_file_size = 4096\n")
    assert syncd.load_config(path, {}, {}).max_file_size == 4096


def test_extensions_from_toml_and_env(tmp_path: Path) -> None:
    path = write(tmp_path / "s.toml", 'allowed_extensions = [".TXT", ".md"]\n')
    assert syncd.load_config(path, {}, {}).allowed_extensions == (".txt", ".md")
    config = syncd.load_config(None, {"SYNCD_ALLOWED_EXTENSIONS": ".a, .b"}, {})
    assert config.allowed_extensions == (".a", ".b")


def test_api_key_file(tmp_path: Path) -> None:
    key = write(tmp_path / "key", "s3cr\u00e9t\n")
    assert syncd.load_config(None, {"SYNCD_API_KEY_FILE": key}, {}).api_key == "s3cr\u00e9t"


@pytest.mark.parametrize("toml,key", [
    ("port = 0", "port"),
    ("port = 70000", "port"),
    ('port = "eighty"', "port"),
    ('max_file_size = "12 parsecs"', "max_file_size"),
    ("max_file_size = -1", "max_file_size"),
    ("allow_case_clash = 3", "allow_case_clash"),
    ('allowed_extensions = ["txt"]', "allowed_extensions"),
    ("heartbeat_interval = -5", "heartbeat_interval"),
    ('shutdown_timeout = "nan"', "shutdown_timeout"),
    ('log_level = "loud"', "log_level"),
    ('api_key = ""', "api_key"),
    ("colour = 1", "colour"),
    ("heartbeat_interval = 60\nheartbeat_timeout = 10", "heartbeat_timeout"),
    ('api_key = "a"\napi_key_file = "/x"', "api_key"),
    ('api_key_file = "/nonexistent/key"', "api_key_file"),
])
def test_bad_value_names_the_key(tmp_path: Path, toml: str, key: str) -> None:
    path = write(tmp_path / "s.toml", toml + "\n")
    with pytest.raises(syncd.ConfigError) as info:
        syncd.load_config(path, {}, {})
    assert str(info.value).startswith(key + ":")


def test_bad_env_value_names_the_variable() -> None:
    with pytest.raises(syncd.ConfigError) as info:
        syncd.load_config(None, {"SYNCD_PORT": "x"}, {})
    assert "SYNCD_PORT" in str(info.value)


def test_invalid_toml_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(syncd.ConfigError):
        syncd.load_config(write(tmp_path / "s.toml", "port = = 3\n"), {}, {})


def test_missing_explicit_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(syncd.ConfigError):
        syncd.load_config(str(tmp_path / "missing.toml"), {}, {})


def test_bad_config_exits_2_with_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "syncd.py"), "--max-file-size", "lots"],
        cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "max_file_size" in lines[0]
    assert not (tmp_path / "sync_data").exists()


def test_journal_formatter_prefixes_every_line() -> None:
    import logging
    formatter = syncd.JournalFormatter("%(message)s")
    record = logging.LogRecord("syncd", logging.WARNING, "f", 1, "one\ntwo", None, None)
    assert formatter.format(record) == "<4>one\n<4>two"


def test_stderr_is_journal_compares_device_and_inode() -> None:
    import os
    status = os.fstat(sys.stderr.fileno())
    assert syncd.stderr_is_journal({"JOURNAL_STREAM": f"{status.st_dev}:{status.st_ino}"})
    assert not syncd.stderr_is_journal({"JOURNAL_STREAM": f"{status.st_dev}:{status.st_ino + 1}"})
    assert not syncd.stderr_is_journal({})


def test_a_fifo_as_api_key_file_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "key"
    os.mkfifo(fifo)
    started = time.monotonic()
    with pytest.raises(syncd.ConfigError, match="api_key_file.*not a regular file"):
        syncd.load_config(None, {"SYNCD_API_KEY_FILE": str(fifo)}, {})
    assert time.monotonic() - started < 5


def test_a_fifo_as_config_file_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "syncd.toml"
    os.mkfifo(fifo)
    with pytest.raises(syncd.ConfigError, match="cannot be read"):
        syncd.load_config(str(fifo), {}, {})


def run_check_config(tmp_path: Path, key_mode: int) -> subprocess.CompletedProcess[str]:
    key = tmp_path / "api_key"
    key.write_text("secret\n")
    os.chmod(key, key_mode)
    return subprocess.run([sys.executable, str(ROOT / "syncd.py"), "--check-config",
                           "--api-key-file", str(key)], capture_output=True, text=True,
                          timeout=30, cwd=tmp_path)


def test_a_world_readable_key_file_gets_a_warning(tmp_path: Path) -> None:
    result = run_check_config(tmp_path, 0o644)
    assert result.returncode == 0
    assert "can be read by other users (mode 0644); chmod 600" in result.stderr
    assert "secret" not in result.stdout + result.stderr
    assert "warning" not in run_check_config(tmp_path, 0o600).stderr
