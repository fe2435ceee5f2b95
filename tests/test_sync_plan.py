"""plan_sync: the contract's rules 1 to 6, one by one, as a pure function."""

from __future__ import annotations

import syncd

A, B, C = "a" * 64, "b" * 64, "c" * 64


def live(path: str, checksum: str, modified_time: float = 100.0, revision: int = 1) -> syncd.FileRecord:
    return syncd.FileRecord(path, checksum, 1, modified_time, revision, False, 0.0, "srv")


def tomb(path: str, checksum: str, revision: int = 2) -> syncd.FileRecord:
    return syncd.FileRecord(path, checksum, 1, 100.0, revision, True, 0.0, "srv")


def entry(path: str, checksum: str, base: str | None = None,
          modified_time: float = 100.0) -> syncd.ClientEntry:
    return syncd.ClientEntry(path, checksum, 1, modified_time, base)


def plan(entries: list[syncd.ClientEntry], *records: syncd.FileRecord) -> syncd.SyncPlan:
    return syncd.plan_sync(entries, {record.path: record for record in records})


def test_rule1_same_checksum_does_nothing() -> None:
    result = plan([entry("x", A, base=B)], live("x", A))
    assert result == syncd.SyncPlan()


def test_rule2_unknown_to_server_uploads() -> None:
    assert plan([entry("x", A)]).upload == ["x"]


def test_rule3_server_only_downloads_sorted() -> None:
    result = plan([], live("b", A), live("a", B), tomb("c", C))
    assert [record.path for record in result.download] == ["a", "b"]


def test_rule4_base_equals_server_uploads() -> None:
    assert plan([entry("x", A, base=B)], live("x", B)).upload == ["x"]


def test_rule4_base_equals_client_downloads() -> None:
    result = plan([entry("x", A, base=A)], live("x", B))
    assert result.download == [live("x", B)]


def test_rule4_both_changed_is_a_conflict() -> None:
    result = plan([entry("x", A, base=C)], live("x", B))
    assert [(c.entry.path, c.reason) for c in result.conflicts] == [("x", "both_modified")]


def test_rule4_base_empty_against_live_file_is_a_conflict() -> None:
    result = plan([entry("x", A, base="")], live("x", B))
    assert [c.reason for c in result.conflicts] == ["both_modified"]


def test_rule5_unchanged_copy_of_deleted_file_is_deleted() -> None:
    result = plan([entry("x", A, base=A)], tomb("x", A, revision=7))
    assert [(r.path, r.revision) for r in result.delete] == [("x", 7)]


def test_rule5_stateless_client_with_deleted_content_deletes() -> None:
    assert [r.path for r in plan([entry("x", A)], tomb("x", A)).delete] == ["x"]


def test_rule5_modified_copy_of_deleted_file_uploads() -> None:
    result = plan([entry("x", B, base=A)], tomb("x", A))
    assert result.upload == ["x"] and result.delete == []


def test_rule5_client_without_history_never_causes_a_delete() -> None:
    result = plan([entry("x", A, base="")], tomb("x", A))
    assert result.upload == ["x"] and result.delete == []


def test_rule6_no_base_client_newer_uploads() -> None:
    assert plan([entry("x", A, modified_time=200)], live("x", B, 100)).upload == ["x"]


def test_rule6_no_base_server_newer_or_equal_is_a_conflict() -> None:
    for when in (100.0, 50.0):
        result = plan([entry("x", A, modified_time=when)], live("x", B, 100))
        assert [c.reason for c in result.conflicts] == ["server_newer"]


def test_conflict_json_carries_both_sides() -> None:
    result = plan([entry("x", A, base=C)], live("x", B))
    data = result.to_json("epoch", 9)
    assert data["conflicts"] == [{
        "path": "x", "reason": "both_modified",
        "client": {"path": "x", "checksum": A, "size": 1, "modified_time": 100.0,
                   "base_checksum": C},
        "server": {"path": "x", "checksum": B, "size": 1, "modified_time": 100.0,
                   "revision": 1}}]
    assert (data["epoch"], data["cursor"]) == ("epoch", 9)
