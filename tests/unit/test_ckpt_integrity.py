"""Checkpoint file manifests: written before COMPLETE, verified before a resume; a checkpoint
with a flipped byte, a truncated or a missing file is named file by file and skipped for the
previous one, never deleted (a later save at its step moves it aside)."""

from __future__ import annotations

import json

import pytest

from xft_dist.ckpt import CheckpointManager, integrity


def _fake(root, step, files):
    path = root / CheckpointManager.tag(step)
    path.mkdir(parents=True)
    for name, data in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    described = integrity.describe(path, integrity.listing(path))
    (path / integrity.FILES).write_text(json.dumps({"format": 1, "files": described}))
    (path / integrity.MARKER).write_text(f"{step}\n")
    return path


FILES = {"mp_rank_00_model_states.pt": b"weights" * 100, "xft_rank00000.pt": b"rng" * 10, "sub/part.bin": b"x" * 7}


@pytest.mark.parametrize("damage, expect", [
    (lambda p: p.write_bytes(b"Xeights" + p.read_bytes()[7:]),
     "mp_rank_00_model_states.pt: sha256 differs from the manifest"),
    (lambda p: p.write_bytes(p.read_bytes()[:-1]), "mp_rank_00_model_states.pt: 699 bytes, the manifest says 700"),
    (lambda p: p.unlink(), "mp_rank_00_model_states.pt: missing"),
])
def test_a_damaged_newest_checkpoint_is_named_and_skipped(tmp_path, caplog, damage, expect):
    older = _fake(tmp_path, 4, FILES)
    newest = _fake(tmp_path, 8, FILES)
    mgr = CheckpointManager(tmp_path)
    assert mgr.verify(newest) == [] and mgr.latest_verified() == newest
    damage(newest / "mp_rank_00_model_states.pt")
    assert mgr.verify(newest) == [expect]
    with caplog.at_level("ERROR"):
        assert mgr.latest_verified() == older
    assert expect in caplog.text and str(newest) in caplog.text
    assert newest.exists() and (newest / integrity.FAILED).read_text().strip() == expect  # reported, kept
    assert mgr.latest() == older  # marked: no longer a candidate
    mgr._clear(newest)  # the next save at that step moves it aside, still not deleted
    assert not newest.exists() and (tmp_path / "step-00000008.failed-1" / "xft_rank00000.pt").exists()


def test_files_beside_the_manifest_and_old_checkpoints(tmp_path):
    path = _fake(tmp_path, 4, FILES)
    assert set(json.loads((path / integrity.FILES).read_text())["files"]) == set(FILES)
    (path / "extra.txt").write_text("not listed")  # an unlisted file is not an error
    assert CheckpointManager(tmp_path).verify(path) == []
    (path / integrity.FILES).unlink()  # written before manifests: accepted as it is
    assert CheckpointManager(tmp_path).verify(path) == []
    (path / integrity.FILES).write_text("{}")
    assert "not a checkpoint file manifest" in CheckpointManager(tmp_path).verify(path)[0]


def test_the_resume_plan_passes_over_a_checkpoint_whose_state_is_damaged(tmp_path):
    from xft_dist.config import Config
    from xft_dist.train.resume import newest_checkpoint

    files = {**FILES, "xft_state.json": b'{"step": 8}', "config.yaml": b"model: {dim: 8}\n"}
    older, newest = _fake(tmp_path, 4, files), _fake(tmp_path, 8, files)
    cfg = Config.model_validate({"data": {"shards": str(tmp_path)}, "checkpoint": {"dir": str(tmp_path)}})
    assert newest_checkpoint(cfg) == newest
    (newest / "xft_state.json").write_bytes(b'{"step": \x8d}')  # a flipped byte: not even UTF-8
    assert newest_checkpoint(cfg) == older  # planned from the previous one; verification marks this one
    (older / "config.yaml").write_text("model: {dim: 9}\n")
    assert newest_checkpoint(cfg) is None


def test_staging_copies_every_tensor_and_keeps_the_containers():
    """What an asynchronous save writes is the state at the moment it was staged: later in-place
    updates (the optimizer's) do not reach it; containers, sizes and named tuples come back as such."""
    from collections import OrderedDict, namedtuple

    import torch

    from xft_dist.ckpt.staging import stage

    Pair = namedtuple("Pair", "a b")
    w = torch.arange(6.0).view(2, 3)
    state = OrderedDict(w=w, view=w[1], shape=w.shape, pair=Pair(w, 3), groups=[{"lr": 0.1, "params": [0, 1]}])
    staged = stage(state)
    w.add_(100.0)
    state["groups"][0]["lr"] = 9.0
    assert type(staged) is OrderedDict and isinstance(staged["pair"], Pair) and staged["shape"] == torch.Size([2, 3])
    assert staged["w"].tolist() == [[0, 1, 2], [3, 4, 5]] and staged["view"].tolist() == [3, 4, 5]
    assert staged["pair"].a.tolist() == [[0, 1, 2], [3, 4, 5]] and staged["groups"][0]["lr"] == 0.1
