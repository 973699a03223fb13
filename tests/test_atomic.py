"""ldct_lightning.atomic: a write either completes or leaves the old file, and never leaves a temporary file."""

from pathlib import Path

import pytest

from ldct_lightning.atomic import atomic_path, write_text_atomic


def test_write_replaces_the_file_and_leaves_nothing_else(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "report.md"
    write_text_atomic(target, "old")
    write_text_atomic(target, "new")
    assert target.read_text() == "new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["report.md"]


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_a_failed_write_keeps_the_old_file(tmp_path: Path, error: type[BaseException]) -> None:
    target = tmp_path / "summary.yaml"
    target.write_text("old")
    with pytest.raises(error), atomic_path(target, fsync=True) as tmp:
        tmp.write_text("half")
        raise error
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.yaml"]


def test_temporary_names_are_unique_and_hidden_beside_the_target(tmp_path: Path) -> None:
    target = tmp_path / "x.json"
    with atomic_path(target) as a, atomic_path(target) as b:
        assert a != b and a.parent == b.parent == tmp_path
        assert a.name.startswith(".x.json.") and a.name.endswith(".tmp")
        a.write_text("a")
        b.write_text("b")
    assert target.read_text() == "a"  # the outer block ends last
