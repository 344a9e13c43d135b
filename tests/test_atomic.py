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


def test_without_keep_others_the_old_directory_goes_whole(tmp_path):
    target = tmp_path / "d"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    with atomic_directory(target, keep_others=False) as tmp:
        (tmp / "a.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"]


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


def _mode(path) -> int:
    import stat

    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_files_get_the_umask_mode_even_when_written_private(tmp_path, umask):
    """safetensors writes 0600 files; a published file is readable as the umask allows."""
    import os

    from moslora.atomic import atomic_file

    old = os.umask(umask)
    try:
        with atomic_directory(tmp_path / "d") as tmp:
            (tmp / "weights").write_bytes(b"w")
            os.chmod(tmp / "weights", 0o600)
            (tmp / "config").write_text("{}")
        with atomic_file(tmp_path / "f") as staging:
            staging.write_text("x")
            os.chmod(staging, 0o600)
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    assert _mode(tmp_path / "d" / "weights") == _mode(tmp_path / "d" / "config") == want
    assert _mode(tmp_path / "f") == want


def test_a_saved_adapters_weights_are_readable_like_its_config(tmp_path):
    from conftest import tiny_llama

    from moslora import MoSConfig, get_mos_model
    from moslora.checkpoint import CONFIG_NAME, WEIGHTS_NAME

    get_mos_model(tiny_llama(), MoSConfig(rank=3, budget_rank=2)).save_pretrained(tmp_path / "a")
    assert _mode(tmp_path / "a" / WEIGHTS_NAME) == _mode(tmp_path / "a" / CONFIG_NAME)
