"""What makes the client's passes quick stays careful: transfers in flight together,
the state committed in batches, small downloads verified in memory."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

import syncd


async def test_in_flight_keeps_to_its_limit_and_stops_at_the_first_failure() -> None:
    running, most, finished = 0, 0, []

    async def job(index: int) -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        try:
            await asyncio.sleep(0.01)
        finally:
            running -= 1
        if index == 5:
            raise ValueError("job 5 failed")
        finished.append(index)
    with pytest.raises(ValueError, match="job 5"):
        await syncd.in_flight([lambda index=index: job(index) for index in range(40)], 4)
    assert most == 4 and running == 0          # the others were cancelled, none left running
    assert len(finished) < 39
    finished.clear()
    await syncd.in_flight([lambda index=index: job(index + 100) for index in range(10)], 3)
    assert sorted(finished) == list(range(100, 110))


def test_a_pass_commits_its_bases_in_batches_even_when_it_fails(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = syncd.ClientState(tmp_path)
    other = sqlite3.connect(tmp_path / ".syncd-client" / "state.db")

    def seen() -> int:
        return other.execute("SELECT COUNT(*) FROM base").fetchone()[0]
    try:
        with pytest.raises(RuntimeError):
            with state.batch():
                state.set_base(syncd.LocalFile("a", "0" * 64, 1, 1))
                assert seen() == 0                     # not yet committed
                raise RuntimeError("the pass failed half-way")
        assert seen() == 1                             # what was done is kept
        monkeypatch.setattr(syncd, "BATCH_SECONDS", 0.0)
        with state.batch():
            state.set_base(syncd.LocalFile("b", "0" * 64, 1, 1))
            assert seen() == 2                         # a long pass commits as it goes
    finally:
        other.close()
        state.close()


@pytest.mark.parametrize("size", [100, syncd.BULK_FILE_LIMIT + 1])
async def test_a_download_that_does_not_match_its_etag_is_refused(
        aiohttp_server: Any, tmp_path: Path, size: int) -> None:
    """In memory (small) or through a temp file (large): never placed, nothing left."""
    async def tampered(request: web.Request) -> web.Response:
        return web.Response(body=b"x" * size,
                            headers={"ETag": f'"{hashlib.sha256(b"other").hexdigest()}"'})
    app = web.Application()
    app.router.add_get("/download/{path:.*}", tampered)
    server = await aiohttp_server(app)
    state = syncd.ClientState(tmp_path / "mine")
    client = syncd.SyncClient(tmp_path / "mine", str(server.make_url("")), "dev", None, state,
                              False)
    try:
        async with aiohttp.ClientSession() as session:
            client.session = session
            with pytest.raises(syncd.ClientError, match="does not match its checksum"):
                await client.download("a.bin")
        assert list(state.tmp_dir.iterdir()) == []
    finally:
        state.close()
