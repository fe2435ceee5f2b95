"""GET /metrics: Prometheus text, behind the key unless metrics_public."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from conftest import db_query, put


def labels_of(text: str) -> dict[str, str]:
    """The labels of a sample, in any order."""
    return dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', text))


def sample(text: str, name: str, labels: str = "") -> float:
    """The value of one sample line (its labels in any order)."""
    wanted = labels_of(labels)
    for line in text.splitlines():
        match = re.fullmatch(r"([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})? (\S+)", line)
        if match and match.group(1) == name and labels_of(match.group(2) or "") == wanted:
            return float(match.group(3))
    raise AssertionError(f"{name}{{{labels}}} not in:\n{text}")


async def test_metrics_count_requests_bytes_and_state(client: Any) -> None:
    await put(client, "a.txt", b"12345")
    await put(client, "b.txt", b"xy")
    await (await client.get("/download/a.txt")).read()
    await client.get("/download/missing")
    await client.delete("/files/b.txt", params={"client_id": "x"})
    async with client.ws_connect("/ws/desk") as ws:
        await ws.receive_json(timeout=5)
        response = await client.get("/metrics")
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = await response.text()
    assert sample(text, "syncd_http_requests_total",
                  'route="/files/{path}",method="PUT",status="201"') == 2
    assert sample(text, "syncd_http_requests_total",
                  'route="/download/{path}",method="GET",status="404"') == 1
    assert sample(text, "syncd_http_request_duration_seconds_count", 'route="/files/{path}"') == 3
    assert sample(text, "syncd_http_request_duration_seconds_bucket",
                  'route="/files/{path}",le="+Inf"') == 3
    assert sample(text, "syncd_received_bytes_total") == 7
    assert sample(text, "syncd_sent_bytes_total") == 5
    assert sample(text, "syncd_uploads_total") == 2
    assert sample(text, "syncd_deletes_total") == 1
    assert sample(text, "syncd_websocket_clients") == 1
    assert sample(text, "syncd_files") == 1
    assert sample(text, "syncd_stored_bytes") == 5
    assert sample(text, "syncd_cursor") == 3
    assert "# TYPE syncd_http_request_duration_seconds histogram" in text


async def test_unmatched_routes_share_one_label(client: Any) -> None:
    for index in range(5):
        await client.get(f"/random-{index}")
    text = await (await client.get("/metrics")).text()
    assert sample(text, "syncd_http_requests_total", 'route="unmatched",method="GET",status="404"') == 5
    assert "random-" not in text


async def test_metrics_need_the_key(app_client: Any) -> None:
    client = await app_client(api_key="k")
    assert (await client.get("/metrics")).status == 401
    assert (await client.get("/metrics", headers={"X-API-Key": "k"})).status == 200


async def test_metrics_public_serves_without_the_key(app_client: Any) -> None:
    client = await app_client(api_key="k", metrics_public=True)
    assert (await client.get("/metrics")).status == 200
    assert (await client.get("/files")).status == 401


async def test_metrics_print_big_numbers_exactly(app_client: Any, data_dir: Path) -> None:
    client = await app_client()
    await put(client, "a.txt", b"1")
    await client.close()
    db_query(data_dir, "INSERT INTO changes (seq, type, path, checksum, size, modified_time,"
                       " client_id, time) VALUES (16777216, 'delete', 'gone', '', 0, 0, 'x', 0)")
    client = await app_client()
    assert (await (await put(client, "b.txt", b"2")).json())["revision"] == 16_777_217
    text = await (await client.get("/metrics")).text()
    assert sample(text, "syncd_cursor") == 16_777_217       # "{:g}" printed 1.67772e+07


async def test_metrics_include_the_process(client: Any) -> None:
    text = await (await client.get("/metrics")).text()
    assert sample(text, "process_resident_memory_bytes") > 1_000_000
    assert sample(text, "process_open_fds") >= 3
    assert sample(text, "process_cpu_seconds_total") > 0


async def test_two_apps_keep_their_own_counts(app_client: Any, tmp_path: Path) -> None:
    first = await app_client()
    second = await app_client(sync_directory=str(tmp_path / "other"))
    await put(first, "a.txt", b"12345")
    text = await (await second.get("/metrics")).text()
    assert sample(text, "syncd_uploads_total") == 0
    assert sample(text, "syncd_received_bytes_total") == 0
