import pytest

from moslora.atomic import atomic_directory


def test_creates_a_new_directory(tmp_path):
    with atomic_directory(tmp_path / "d") as tmp:
        (tmp / "a.txt").write_text("new")
    assert (tmp_path / "d" / "a.txt").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["d"]


def test_replaces_and_carries_over_other_entries(tmp_path):
    target = tmp_path / "d"
    (target / "sub").mkdir(parents=True)
    (target / "a.txt").write_text("old")
    (target / "keep.txt").write_text("mine")
    (target / "sub" / "x").write_text("nested")
    with atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("new")
    assert (target / "a.txt").read_text() == "new"
    assert (target / "keep.txt").read_text() == "mine"
    assert (target / "sub" / "x").read_text() == "nested"
    assert [p.name for p in tmp_path.iterdir()] == ["d"]


def test_an_error_leaves_the_target_untouched(tmp_path):
    target = tmp_path / "d"
    target.mkdir()
    (target / "a.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("crash")
    assert (target / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["d"]


def test_refuses_a_file_target(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError):
        with atomic_directory(tmp_path / "f"):
            pass
