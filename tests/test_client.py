"""The reference client end to end: a real daemon, two or three client folders."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from conftest import Clients, ROOT, sqlite_only, tree, wait_until, write


def converged(clients: Clients, *names: str) -> bool:
    trees = [tree(clients.folder(name)) for name in names]
    return all(t == trees[0] for t in trees)


# -- one pass at a time ------------------------------------------------------------

def test_create_modify_delete_rename_nested_empty_and_large(clients: Clients) -> None:
    a, b = clients.folder("A"), clients.folder("B")
    big = os.urandom(12 * 1024 * 1024 + 7)
    for path, data in {"top.txt": b"top", "deep/er/still/x.md": b"x", "empty": b"",
                       "big.bin": big, "caf\u00e9 \u00e0 la carte.txt": b"unicode"}.items():
        write(a, path, data)
    clients.once("A")
    clients.once("B")
    assert tree(b) == tree(a) and tree(b)["big.bin"] == big
    write(b, "top.txt", b"modified on B")
    (b / "deep/er/still/x.md").unlink()
    (b / "empty").rename(b / "renamed-empty")
    clients.once("B")
    clients.once("A")
    assert tree(a) == tree(b)
    assert tree(a)["top.txt"] == b"modified on B" and "renamed-empty" in tree(a)
    assert not (a / "deep").exists()                 # emptied folders go too


def test_concurrent_edits_keep_both_versions_on_both_sides(clients: Clients) -> None:
    a, b = clients.folder("A"), clients.folder("B")
    write(a, "notes/plan.txt", b"v1")
    clients.once("A")
    clients.once("B")
    write(a, "notes/plan.txt", b"edited on A")
    write(b, "notes/plan.txt", b"edited on B")
    clients.once("A")
    output = clients.once("B")
    assert "1 conflicts" in output
    clients.once("A")
    assert tree(a) == tree(b)
    files = tree(a)
    assert sorted(files.values()) == [b"edited on A", b"edited on B"]
    copy = next(path for path in files if path != "notes/plan.txt")
    assert copy.startswith("notes/plan.sync-conflict-") and copy.endswith("-device-b.txt")


def test_offline_edits_on_both_sides_merge(clients: Clients) -> None:
    a, b = clients.folder("A"), clients.folder("B")
    write(a, "shared.txt", b"s")
    clients.once("A")
    clients.once("B")
    write(a, "from-a.txt", b"a")
    write(b, "from-b.txt", b"b")
    write(b, "shared.txt", b"b changed it")
    clients.once("A")
    clients.once("B")
    clients.once("A")
    assert tree(a) == tree(b) == {"shared.txt": b"b changed it", "from-a.txt": b"a",
                                  "from-b.txt": b"b"}


def test_an_edit_beats_a_deletion_elsewhere(clients: Clients) -> None:
    a, b = clients.folder("A"), clients.folder("B")
    write(a, "doc.txt", b"v1")
    write(a, "other.txt", b"o")
    write(a, "third.txt", b"t")
    clients.once("A")
    clients.once("B")
    (a / "doc.txt").unlink()
    write(b, "doc.txt", b"v2 edited while A deleted it")
    clients.once("A")
    clients.once("B")
    clients.once("A")
    assert tree(a) == tree(b)
    assert tree(a)["doc.txt"] == b"v2 edited while A deleted it"


def test_emptied_folder_deletes_nothing_on_the_server(clients: Clients) -> None:
    a, c = clients.folder("A"), clients.folder("C")
    for index in range(5):
        write(a, f"f{index}.txt", b"%d" % index)
    clients.once("A")
    for path in tree(a):
        (a / path).unlink()                          # the folder's disk is gone; its state stayed
    output = clients.once("A", expect=3)
    assert "not pushing their deletion" in output
    clients.once("C")
    assert len(tree(c)) == 5                         # the server lost nothing
    shutil.rmtree(a)                                 # unmounted for real: state gone too
    a.mkdir()
    clients.once("A")
    assert tree(a) == tree(c)


@sqlite_only       # a reset server is its folder deleted, database included
def test_reset_server_is_a_union_resync(clients: Clients, daemon: Any) -> None:
    a, b = clients.folder("A"), clients.folder("B")
    write(a, "kept.txt", b"k")
    write(a, "also.txt", b"a")
    clients.once("A")
    clients.once("B")
    clients.server.stop()
    shutil.rmtree(clients.server.data)               # a new server: new epoch, no history
    clients.server = daemon()
    clients.once("A")                                # A repopulates the new server
    (b / "also.txt").unlink()                        # with a trusted base: a deletion to push
    output = clients.once("B")
    assert "reset or restored" in output and "0 deleted on the server" in output
    clients.once("A")
    assert tree(a) == tree(b) == {"kept.txt": b"k", "also.txt": b"a"}


def test_syncignore_and_client_state_are_never_synced(clients: Clients) -> None:
    a, b = clients.folder("A"), clients.folder("B")
    write(a, ".syncignore", b"*.tmp\ncache/\n# a comment\nbuild/*.o\n")
    write(a, "keep.txt", b"k")
    write(a, "scratch.tmp", b"t")
    write(a, "deep/also.tmp", b"t")
    write(a, "cache/blob", b"c")
    write(a, "build/x.o", b"o")
    write(a, "build/x.c", b"c")
    clients.once("A")
    clients.once("B")
    assert sorted(tree(b)) == [".syncignore", "build/x.c", "keep.txt"]
    listed = clients.server.data
    assert not (listed / ".syncd-client").exists()


def test_once_reports_failures_with_exit_1(tmp_path: Path, daemon: Any) -> None:
    group = Clients(tmp_path, daemon("--allowed-extensions", ".txt"))
    write(group.folder("A"), "ok.txt", b"fine")
    write(group.folder("A"), "tool.exe", b"refused")
    output = group.once("A", expect=1)
    assert "1 uploaded" in output and "failed: tool.exe (extension_not_allowed)" in output


def test_bad_client_id_is_a_usage_error(clients: Clients) -> None:
    result = subprocess.run([sys.executable, str(ROOT / "syncd.py"), "client",
                             str(clients.folder("A")), "--server", clients.server.url,
                             "--client-id", "bad id", "--once"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2 and "client-id" in result.stderr


def test_wrong_api_key_fails_clearly(tmp_path: Path, daemon: Any) -> None:
    group = Clients(tmp_path, daemon("--api-key", "right"))
    output = group.once("A", "--api-key", "wrong", expect=2)      # exit 2: not retried
    errors = [line for line in output.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "refused the API key or device token (401)" in errors[0]
    write(group.folder("A"), "a.txt", b"a")
    assert "1 uploaded" in group.once("A", "--api-key", "right")
    live = subprocess.run(group.command("A", "--api-key", "wrong"), capture_output=True,
                          text=True, timeout=60)                 # live: no retry loop either
    assert live.returncode == 2 and "(401)" in live.stderr


# -- live ---------------------------------------------------------------------------

def test_live_changes_flow_both_ways(clients: Clients) -> None:
    a, b = clients.folder("A"), clients.folder("B")
    write(a, "before.txt", b"synced at start")
    clients.start("A")
    clients.start("B")
    wait_until(lambda: tree(b).get("before.txt") == b"synced at start", "the initial pass")
    write(a, "live/new.txt", b"from A")
    wait_until(lambda: tree(b).get("live/new.txt") == b"from A", "a create to reach B")
    write(b, "live/new.txt", b"modified on B")
    wait_until(lambda: tree(a).get("live/new.txt") == b"modified on B", "a modify to reach A")
    (a / "before.txt").rename(a / "after.txt")
    wait_until(lambda: "after.txt" in tree(b) and "before.txt" not in tree(b), "a rename")
    (b / "live" / "new.txt").unlink()
    wait_until(lambda: "live/new.txt" not in tree(a), "a delete to reach A")
    (a / "folder").mkdir()
    write(a, "folder/one", b"1")
    write(a, "folder/two", b"2")
    wait_until(lambda: converged(clients, "A", "B") and "folder/two" in tree(b), "a new folder")


def test_live_clients_survive_a_server_restart(clients: Clients, daemon: Any) -> None:
    a, b = clients.folder("A"), clients.folder("B")
    clients.start("A")
    clients.start("B")
    write(a, "one.txt", b"1")
    wait_until(lambda: "one.txt" in tree(b), "the first file")
    port = clients.server.port
    clients.server.stop()
    write(a, "while-down.txt", b"offline edit")           # pushed after the reconnect
    clients.server = daemon(port=port)
    wait_until(lambda: tree(b).get("while-down.txt") == b"offline edit",
               "the edit made while the server was down", timeout=60)
    write(b, "after.txt", b"after restart")
    wait_until(lambda: "after.txt" in tree(a), "a change after the restart", timeout=30)
    write(a, "later.txt", b"A's watcher still works")    # its push failed while the server was down
    wait_until(lambda: "later.txt" in tree(b), "a live change from A after the restart", timeout=30)
    assert converged(clients, "A", "B")


def test_progress_bar_only_on_a_terminal(clients: Clients) -> None:
    import pty
    a = clients.folder("A")
    write(a, "big.bin", os.urandom(9 * 1024 * 1024))
    master, slave = pty.openpty()
    process = subprocess.Popen(clients.command("A", "--once"), stdout=slave,
                               stderr=subprocess.DEVNULL)
    os.close(slave)
    output = b""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            chunk = os.read(master, 4096)
        except OSError:          # EIO: the other end closed
            break
        if not chunk:
            break
        output += chunk
    os.close(master)
    assert process.wait(timeout=30) == 0
    assert b"up big.bin" in output and b"100%" in output and b"[####" in output
    write(clients.folder("B"), "small.txt", b"s")
    piped = clients.once("B")                        # not a terminal: plain lines only
    assert "down big.bin" not in piped and "%" not in piped
    assert "download path=big.bin" in piped


def test_small_files_go_up_a_hundred_at_a_time(clients: Clients) -> None:
    a, b = clients.folder("A"), clients.folder("B")
    for index in range(150):
        write(a, f"notes/{index:03d}.txt", b"note %d" % index)
    write(a, "big.bin", os.urandom(300 * 1024))             # over the /bulk size: alone
    clients.once("A")
    log = clients.server.log()
    assert log.count("POST /bulk 200") == 2 and log.count("POST /upload 200") == 1
    clients.once("B")
    assert tree(b) == tree(a)


def syncs(clients: Clients) -> int:
    """How many POST /sync the server has answered (its access log)."""
    return clients.server.log().count("POST /sync ")


def test_once_after_a_clean_pass_reads_the_journal_not_the_whole_manifest(clients: Clients) -> None:
    a, b = clients.folder("A"), clients.folder("B")
    for index in range(20):
        write(a, f"d/{index}.txt", b"%d" % index)
    clients.once("A")
    clients.once("B")
    assert syncs(clients) == 2                            # first passes: full
    write(a, "d/3.txt", b"edited on A")
    (a / "d" / "4.txt").unlink()
    write(b, "new-on-b.txt", b"b")
    assert "1 uploaded" in clients.once("A")
    clients.once("B")
    clients.once("A")
    assert syncs(clients) == 2                            # incremental: the journal only
    assert tree(a) == tree(b) and tree(b)["d/3.txt"] == b"edited on A" and "d/4.txt" not in tree(b)
    assert tree(a)["new-on-b.txt"] == b"b"
    clients.once("B", "--full")
    assert syncs(clients) == 3


def test_a_pass_that_left_something_undone_makes_the_next_one_full(clients: Clients) -> None:
    a, b = clients.folder("A"), clients.folder("B")
    write(a, "first.txt", b"1")
    clients.once("A")
    clients.once("B")
    write(a, "blocked.txt", b"cannot land on B yet")
    clients.once("A")
    write(b, "blocked.txt/inside", b"a folder where B must write the file")
    output = clients.once("B", expect=1)
    assert "blocked.txt" in output
    (b / "blocked.txt" / "inside").unlink()
    (b / "blocked.txt").rmdir()
    before = syncs(clients)
    clients.once("B")                 # full: the journal has moved past blocked.txt
    assert syncs(clients) == before + 1 and tree(b)["blocked.txt"] == b"cannot land on B yet"


def test_changed_ignore_rules_make_the_next_pass_full(clients: Clients) -> None:
    a, b = clients.folder("A"), clients.folder("B")
    write(a, "keep.txt", b"k")
    write(a, "cache/big.bin", b"cached")
    write(b, ".syncignore", b"cache/\n")
    clients.once("A")
    clients.once("B")
    assert "cache/big.bin" not in tree(b)
    (b / ".syncignore").write_bytes(b"# nothing ignored now\n")
    clients.once("B")
    assert tree(b)["cache/big.bin"] == b"cached"
