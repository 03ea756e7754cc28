"""One function decides completeness; half-written checkpoints are ignored, kept, then tidied."""

from __future__ import annotations

from launcher.rundir.checkpoints import (
    MARKER,
    checkpoints_in,
    is_complete,
    latest_complete_checkpoint,
    mark_complete,
    set_aside_incomplete,
    tidy,
)


def fabricate(folder, step: int, complete: bool):
    path = folder / f"checkpoint-{step}"
    (path / f"global_step{step}").mkdir(parents=True)
    (path / f"global_step{step}" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"x" * 10)
    if complete:
        mark_complete(path, {"step": step})
    return path


def test_only_marked_checkpoints_count(tmp_path):
    fabricate(tmp_path, 5, True)
    fabricate(tmp_path, 10, True)
    half = fabricate(tmp_path, 15, False)  # killed mid-save: no marker
    assert not is_complete(half) and is_complete(tmp_path / "checkpoint-10")
    assert latest_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
    assert [p.name for p in checkpoints_in(tmp_path)] == ["checkpoint-5", "checkpoint-10", "checkpoint-15"]
    assert not list(tmp_path.glob("*/.*.tmp*")) and (tmp_path / "checkpoint-10" / MARKER).is_file()


def test_incomplete_newer_checkpoint_is_set_aside_then_removed_after_a_newer_complete_one(tmp_path):
    fabricate(tmp_path, 10, True)
    fabricate(tmp_path, 15, False)
    [aside] = set_aside_incomplete(tmp_path, after_step=10)
    assert aside.name.startswith("checkpoint-15-incomplete-") and aside.is_dir()
    assert tidy(tmp_path, keep=None) == []  # no newer complete checkpoint yet: kept
    fabricate(tmp_path, 15, True)
    assert tidy(tmp_path, keep=None) == [aside]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-15"]


def test_rotation_keeps_the_newest_complete_checkpoints(tmp_path):
    for step in (5, 10, 15, 20):
        fabricate(tmp_path, step, True)
    fabricate(tmp_path, 3, False)
    removed = tidy(tmp_path, keep=2)
    assert sorted(p.name for p in removed) == ["checkpoint-10", "checkpoint-3", "checkpoint-5"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-15", "checkpoint-20"]
