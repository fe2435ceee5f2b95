"""The metadata in PostgreSQL (database_url), with a real server started by the tests: state
across restarts, a second node that has no name of its own, a database that goes away and
comes back, and what a bad setting says. (SYNCD_TEST_DATABASE=postgres runs the
rest of the suite on PostgreSQL too.)"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg
import pytest

import syncd
from conftest import ROOT, Postgres, db_query_url, error_of, free_port, put, sha


async def test_everything_is_kept_across_a_restart(app_client: Any, postgres: Postgres,
                                                   data_dir: Path) -> None:
    url = postgres.new_database()
    client = await app_client(database_url=url)
    await put(client, "docs/a.txt", b"one")
    await put(client, "docs/a.txt", b"two")
    await client.delete("/files/docs/a.txt", params={"client_id": "laptop"})
    await put(client, "b.txt", b"bee")
    health = await (await client.get("/health")).json()
    await client.close()
    assert not (data_dir / ".syncd" / "syncd.db").exists()          # no SQLite at all
    client = await app_client(database_url=url)
    again = await (await client.get("/health")).json()
    assert (again["epoch"], again["cursor"], again["files"]) == (
        health["epoch"], health["cursor"], 1)
    trash = await (await client.get("/trash")).json()
    assert [entry["path"] for entry in trash["files"]] == ["docs/a.txt"]
    versions = await (await client.get("/versions/docs/a.txt")).json()
    assert [version["checksum"] for version in versions["versions"]] == [sha(b"two"), sha(b"one")]
    changes = await (await client.get("/changes", params={"since": "0"})).json()
    assert [change["seq"] for change in changes["changes"]] == [1, 2, 3, 4]


def test_a_second_node_with_the_default_name_is_refused(daemon: Any, postgres: Postgres,
                                                         tmp_path: Path) -> None:
    """Two nodes on one host, both named after it (node_name unset), would share a temp
    folder: the second is told to name itself. (tests/test_cluster.py: named nodes.)"""
    url = postgres.new_database()
    first = daemon("--database-url", url)
    second = subprocess.run(
        [sys.executable, str(ROOT / "syncd.py"), "--port", str(free_port()),
         "--sync-directory", str(tmp_path / "other"), "--database-url", url],
        capture_output=True, text=True, timeout=60)
    assert second.returncode == syncd.EXIT_STORAGE
    assert (f"another syncd node named {socket.gethostname()} uses this database: give each "
            "node its own node_name") in second.stderr
    assert first.process.poll() is None


async def test_a_database_that_goes_away_is_503_and_comes_back(
        app_client: Any, own_postgres: Postgres) -> None:
    client = await app_client(database_url=own_postgres.new_database())
    await put(client, "a.txt", b"before")
    own_postgres.stop()
    refused = await put(client, "b.txt", b"while away")
    assert (await error_of(refused, 503))["error"] == "storage_unavailable"
    health = await client.get("/health")
    assert health.status == 503 and (await health.json())["status"] == "error"
    assert await (await client.get("/download/a.txt")).read() == b"before"   # from the index
    own_postgres.start()
    statuses = []
    for _ in range(5):                          # the pool replaces its dead connections
        statuses.append((await put(client, "b.txt", b"after")).status)
        if statuses[-1] == 201:
            break
    assert statuses[-1] == 201, statuses
    assert (await client.get("/health")).status == 200
    assert await (await client.get("/download/b.txt")).read() == b"after"


async def test_a_connection_lost_on_its_way_back_to_the_pool_fails_no_commit(
        app_client: Any, postgres: Postgres, monkeypatch: pytest.MonkeyPatch) -> None:
    """Giving a connection back resets it; when the database went away just after the
    COMMIT, that reset fails. The upload was made: it is 201, not a 503 for a file that
    is in the tree and in the database (as was seen with PostgreSQL stopped under load)."""
    client = await app_client(database_url=postgres.new_database())
    original = asyncpg.pool.Pool.release

    async def release_then_fail(pool: Any, conn: Any, *args: Any) -> None:
        await original(pool, conn, *args)
        raise asyncpg.InterfaceError("cannot switch to state 15; another operation is in progress")
    monkeypatch.setattr(asyncpg.pool.Pool, "release", release_then_fail)
    assert (await put(client, "made.txt", b"made")).status == 201
    monkeypatch.undo()
    assert await (await client.get("/download/made.txt")).read() == b"made"
    assert db_query_pg(client, "SELECT path FROM files") == [("made.txt",)]


@pytest.mark.parametrize("lands", [True, False])
async def test_a_commit_whose_answer_is_lost_is_looked_up(
        app_client: Any, postgres: Postgres, monkeypatch: pytest.MonkeyPatch, lands: bool) -> None:
    """The link breaks after COMMIT was sent: made or not, the tree must agree with the
    database (undoing the rename of a commit that was made would leave a record whose bytes
    are gone). The node asks the journal on another connection."""
    client = await app_client(database_url=postgres.new_database())
    await put(client, "doc.txt", b"old")
    original = asyncpg.transaction.Transaction.commit

    async def lose_the_answer(self: Any) -> None:
        if lands:
            await original(self)
        else:
            await self.rollback()
        raise asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of "
                                                  "operation")
    monkeypatch.setattr(asyncpg.transaction.Transaction, "commit", lose_the_answer)
    answer = await put(client, "doc.txt", b"new")
    monkeypatch.undo()
    assert answer.status == (200 if lands else 503), await answer.text()
    expected = b"new" if lands else b"old"
    assert await (await client.get("/download/doc.txt")).read() == expected
    assert db_query_pg(client, "SELECT checksum FROM files") == [(sha(expected),)]
    assert (client.server.app[syncd.STATE].tree.files.root / "doc.txt").read_bytes() == expected


async def test_a_commit_nobody_can_say_was_made_is_taken_as_not_made(
        app_client: Any, postgres: Postgres, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """The answer to COMMIT is lost and the database does not answer the look-up either:
    the write is undone and refused (503), with an error that says what may be left."""
    client = await app_client(database_url=postgres.new_database())
    await put(client, "doc.txt", b"old")
    store = client.server.app[syncd.STATE].tree.store

    async def lose_the_answer(self: Any) -> None:
        await self.rollback()
        raise asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of "
                                                  "operation")

    async def unreachable(*args: Any) -> list[Any]:
        raise ConnectionRefusedError("the database is away")
    monkeypatch.setattr(asyncpg.transaction.Transaction, "commit", lose_the_answer)
    monkeypatch.setattr(store, "read", unreachable)
    monkeypatch.setattr(syncd, "PG_LANDED_TRIES", 2)
    answer = await put(client, "doc.txt", b"new")
    monkeypatch.undo()
    assert (await error_of(answer, 503))["error"] == "storage_unavailable"
    assert "the database cannot say whether it was made" in caplog.text
    assert (client.server.app[syncd.STATE].tree.files.root / "doc.txt").read_bytes() == b"old"
    assert db_query_pg(client, "SELECT checksum FROM files") == [(sha(b"old"),)]


def db_query_pg(client: Any, sql: str) -> list[tuple[Any, ...]]:
    """A query on the app's own PostgreSQL database (not the test's default one)."""
    return db_query_url(client.server.app[syncd.STATE].tree.store.url, sql)


@pytest.mark.parametrize("state, refusal", [
    ("53100", syncd.StorageFull), ("08006", syncd.StorageFailing),
    ("57P01", syncd.StorageFailing), ("25006", syncd.StorageFailing), ("23505", None)])
def test_postgresql_errors_of_the_server_are_the_contracts(state: str, refusal: Any) -> None:
    class Failure(Exception):
        sqlstate = state
    answer = syncd.postgres_failure(Failure())
    assert (answer is None) if refusal is None else isinstance(answer, refusal)
    assert isinstance(syncd.postgres_failure(ConnectionRefusedError()), syncd.StorageFailing)


def test_database_url_is_checked_and_its_password_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(syncd.ConfigError, match="database_url: expected a URL"):
        syncd.load_config(None, {}, {"database_url": "mysql://x"})
    config = syncd.load_config(None, {}, {"database_url": "postgresql://syncd:pw@db/syncd"})
    assert "postgresql://syncd:********@db/syncd" in syncd.describe_config(config)
    assert "pw@" not in syncd.describe_config(config)
    monkeypatch.setattr(syncd.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(syncd.ConfigError, match="needs asyncpg"):
        syncd.load_config(None, {}, {"database_url": "postgresql://syncd@db/syncd"})
