"""Renames are moves: the reference client finds them (offline and live), sends POST /move
instead of the bytes, and another client copies what it has instead of downloading."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from conftest import Clients, CountingProxy, tree, wait_until, write


@pytest.fixture
def proxy(clients: Clients) -> Iterator[CountingProxy]:
    counting = CountingProxy(clients.server.port)
    yield counting
    counting.close()


def once(clients: Clients, proxy: CountingProxy, name: str, *extra: str, expect: int = 0) -> str:
    import subprocess
    import sys
    from conftest import ROOT
    result = subprocess.run(
        [sys.executable, str(ROOT / "syncd.py"), "client", str(clients.folder(name)), "--server",
         proxy.url, "--client-id", f"device-{name.lower()}", "--once", *extra],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == expect, result.stdout + result.stderr
    return result.stdout + result.stderr


def test_an_offline_folder_rename_is_one_move_and_no_bytes(clients: Clients,
                                                            proxy: CountingProxy) -> None:
    """The user's report: 3 of 4 tracked files renamed with the client stopped was a
    mass-vanish refusal (exit 3), and would have sent every byte again."""
    a, b = clients.folder("A"), clients.folder("B")
    photos = {f"photos/2023/{index}.jpg": os.urandom(22 << 20) for index in range(3)}
    for path, data in photos.items():
        write(a, path, data)
    write(a, "photos/readme.txt", b"keep")
    once(clients, proxy, "A")
    once(clients, proxy, "B")
    (a / "photos" / "2023").rename(a / "photos" / "archive-2023")
    before = proxy.bytes
    output = once(clients, proxy, "A")
    assert "1 moved (3 files)" in output and "0 uploaded" in output
    output = once(clients, proxy, "B")
    assert "3 from local copies" in output
    assert proxy.bytes - before < 1 << 20, f"{proxy.bytes - before} bytes for a 66 MiB rename"
    expected = {path.replace("2023", "archive-2023"): data for path, data in photos.items()}
    assert tree(b) == {**expected, "photos/readme.txt": b"keep"} == tree(a)
    assert not (b / "photos" / "2023").exists()


def test_a_live_folder_rename_is_one_move(clients: Clients, proxy: CountingProxy) -> None:
    """Live: the watcher's delete and create of one rename (the clients talk to the server
    directly here: its own counters tell the file bytes)."""
    a, b = clients.folder("A"), clients.folder("B")
    files = {f"docs/{index}.txt": os.urandom(1 << 20) for index in range(4)}
    for path, data in files.items():
        write(a, path, data)
    once(clients, proxy, "A")
    once(clients, proxy, "B")
    clients.start("A")
    clients.start("B")
    write(a, "armed.txt", b"the watcher is up")
    wait_until(lambda: tree(b).get("armed.txt") == b"the watcher is up", "a first change")
    before = file_bytes(clients)
    (a / "docs").rename(a / "papers")
    expected = {path.replace("docs/", "papers/"): data for path, data in files.items()}
    expected["armed.txt"] = b"the watcher is up"
    try:
        wait_until(lambda: tree(b) == expected, "B to have the folder under its new name")
    except AssertionError:
        raise AssertionError(f"{sorted(tree(b))}\nA: {clients.log('A')}\nB: {clients.log('B')}") from None
    assert "move-remote from=docs to=papers files=4" in clients.log("A")
    assert "copy-local path=papers/0.txt from=docs/0.txt" in clients.log("B")
    assert file_bytes(clients) == before          # no file byte went up or down


def file_bytes(clients: Clients) -> float:
    """File bytes the server received and sent (its /metrics counters)."""
    from conftest import http_request
    text = http_request(clients.server.port, "GET", "/metrics")[2].decode()
    return sum(float(line.split()[1]) for line in text.splitlines()
               if line.startswith(("syncd_received_bytes_total ", "syncd_sent_bytes_total ")))


def test_a_rename_and_an_edit_of_the_same_file_sends_it_once(clients: Clients) -> None:
    a, b = clients.folder("A"), clients.folder("B")
    write(a, "draft.txt", b"version 1")
    clients.once("A")
    clients.once("B")
    (a / "draft.txt").rename(a / "final.txt")
    write(a, "final.txt", b"version 2")            # not the same content: no move
    output = clients.once("A")
    assert "moved" not in output and "1 uploaded" in output
    clients.once("B")
    assert tree(b) == {"final.txt": b"version 2"}


def test_a_rename_on_a_while_b_edits_the_old_path_loses_nothing(clients: Clients) -> None:
    a, b = clients.folder("A"), clients.folder("B")
    write(a, "plan.txt", b"first")
    clients.once("A")
    clients.once("B")
    (a / "plan.txt").rename(a / "plan-2027.txt")
    write(b, "plan.txt", b"edited on B")
    assert "1 moved (1 files)" in clients.once("A")
    clients.once("B")
    clients.once("A")
    assert tree(a) == tree(b) == {"plan-2027.txt": b"first", "plan.txt": b"edited on B"}


def test_b_edits_first_then_a_renames_loses_nothing(clients: Clients) -> None:
    a, b = clients.folder("A"), clients.folder("B")
    write(a, "plan.txt", b"first")
    clients.once("A")
    clients.once("B")
    write(b, "plan.txt", b"edited on B")
    clients.once("B")
    (a / "plan.txt").rename(a / "plan-2027.txt")
    output = clients.once("A")                      # the move is refused: stale
    assert "moved" not in output
    clients.once("B")
    clients.once("A")
    assert tree(a) == tree(b) == {"plan-2027.txt": b"first", "plan.txt": b"edited on B"}


def test_a_file_renamed_back_and_forth(clients: Clients) -> None:
    a, b = clients.folder("A"), clients.folder("B")
    write(a, "x/a.txt", b"content")
    clients.once("A")
    clients.once("B")
    for source, target in (("x/a.txt", "y/b.txt"), ("y/b.txt", "x/a.txt"), ("x/a.txt", "x/c.txt")):
        (a / target).parent.mkdir(parents=True, exist_ok=True)
        (a / source).rename(a / target)
        assert "1 moved" in clients.once("A")
        clients.once("B")
        assert tree(b) == {target: b"content"}


def test_a_refused_folder_move_goes_file_by_file_and_is_no_mass_vanish(clients: Clients) -> None:
    """The new folder exists on the server already: the folder cannot move, its files can;
    and what cannot move is uploaded again, never taken for a vanished tree (exit 3)."""
    a, b = clients.folder("A"), clients.folder("B")
    for index in range(3):
        write(a, f"photos/2023/{index}.jpg", b"photo %d" % index)
    write(a, "photos/readme.txt", b"keep")
    clients.once("A")
    clients.once("B")
    write(b, "photos/archive-2023/from-b.txt", b"B was first")
    write(b, "photos/archive-2023/2.jpg", b"taken by B")
    clients.once("B")
    (a / "photos" / "2023").rename(a / "photos" / "archive-2023")
    output = clients.once("A")
    assert "2 moved (2 files)" in output
    clients.once("B")
    clients.once("A")
    assert tree(a) == tree(b)
    assert tree(b)["photos/archive-2023/0.jpg"] == b"photo 0" and "photos/2023/0.jpg" not in tree(b)
    kept = [data for path, data in tree(b).items() if path.startswith("photos/archive-2023/2")]
    assert sorted(kept) == [b"photo 2", b"taken by B"]      # a conflict copy: nothing lost
