"""Pretraining through the real launchers on 2 CPU ranks: the deepspeed launcher trains (loss falls),
commits checkpoints, writes JSONL and an offline W&B run; a run stopped at step 6 and resumed under
torchrun gives bit-identical losses to an uninterrupted one; SIGUSR1 checkpoints and stops."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from ..helpers import REPO, cpu_rank_env, free_port, stdlib_shards
from ..wandb_file import history, run_ids

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    stdlib_shards(root / "shards", "json", "email", shard_tokens=40000)
    cfg = {
        "model": {"dim": 64, "depth": 2, "heads": 4},
        "data": {"shards": str(root / "shards"), "seq_len": 64, "num_streams": 4},
        "train": {"steps": 12, "global_batch": 8, "micro_batch": 2, "seed": 1},
        "optim": {"lr": 3e-3, "weight_decay": 0.01},
        "schedule": {"warmup_steps": 2},
        "checkpoint": {"every": 4, "keep": 2},
        "logging": {"every": 4, "wandb": "offline", "progress_bar": False},
        "run": {"out_dir": str(root / "runs")},
    }
    (root / "cfg.yaml").write_text(json.dumps(cfg))  # JSON is YAML
    return root


def _env():
    return cpu_rank_env()


def _deepspeed(work, *overrides):
    return [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
            str(REPO / "launch" / "pretrain.py"), "--config", str(work / "cfg.yaml"), *overrides]


def _torchrun(work, *overrides):
    return [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
            str(REPO / "launch" / "pretrain.py"), "--config", str(work / "cfg.yaml"), *overrides]


def _run(cmd):
    res = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=REPO, timeout=600)
    assert res.returncode == 0, f"{cmd[0]} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    return res


def _jsonl(work, name):
    return [json.loads(line) for line in (work / "runs" / name / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(work):
    return _run(_deepspeed(work, "run.name=straight"))


def test_deepspeed_launcher_run_trains_checkpoints_and_logs(work, straight):
    rows = _jsonl(work, "straight")
    assert [r["step"] for r in rows] == list(range(1, 13))
    losses = [r["loss"] for r in rows]
    assert losses[-1] < 0.8 * losses[0], f"loss did not fall: {losses}"
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "loss_tokens_per_s", "padding_fraction",
                "step_time_s", "memory_mib"):
        assert key in rows[-1], key
    ckpts = work / "runs" / "straight" / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step-00000012"
    kept = sorted(p.name for p in ckpts.iterdir() if p.is_dir())
    assert kept == ["step-00000008", "step-00000012"], kept  # keep=2
    assert (ckpts / "step-00000012" / "COMPLETE").exists()
    assert (work / "runs" / "straight" / "config.yaml").exists()
    wandb_files = list((work / "runs" / "straight" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(wandb_files) == 1
    logged = [h for h in history(wandb_files[0]) if "loss" in h]
    assert [h["loss"] for h in logged] == losses
    assert "checkpoint: " in straight.stdout and "W&B (offline)" in straight.stdout


def test_stop_and_resume_under_torchrun_is_bit_identical(work, straight):
    _run(_deepspeed(work, "run.name=resumed", "train.stop_after=6"))
    ckpts = work / "runs" / "resumed" / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step-00000006"
    _run(_torchrun(work, "run.name=resumed"))  # picks up the newest complete checkpoint by itself
    rows = _jsonl(work, "resumed")
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert [r["loss"] for r in rows] == [r["loss"] for r in _jsonl(work, "straight")]  # bit-identical
    files = sorted((work / "runs" / "resumed" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2 and len(set().union(*(run_ids(f) for f in files))) == 1  # same W&B run continues


def test_sigusr1_checkpoints_and_stops(work):
    proc = subprocess.Popen(_torchrun(work, "run.name=signal", "train.steps=400", "checkpoint.every=1000"),
                            env=_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = work / "runs" / "signal" / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 300
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
            assert proc.poll() is None and time.monotonic() < deadline, "run ended before it could be signalled"
            time.sleep(0.5)
        ranks = [p for p in psutil.Process(proc.pid).children(recursive=True) if "pretrain.py" in " ".join(p.cmdline())]
        assert len(ranks) == 2
        ranks[0].send_signal(signal.SIGUSR1)  # one rank told, as SLURM --signal does; all must stop together
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    step = len(metrics.read_text().splitlines())
    assert step < 400 and "stopped: signal" in out
    latest = (work / "runs" / "signal" / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step-{step:08d}"


def _tree(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", ["model.dim", "checkpoint.dir", "config"])
def test_bad_input_on_two_ranks_exits_2_with_one_line(work, straight, case):
    """The resume-time and path refusals through the real launcher: every rank exits 2 before a
    collective, one line names the culprit, the run's earlier checkpoints are byte-for-byte unchanged."""
    run = work / "runs" / "straight"
    cmd, words = {
        "model.dim": (_deepspeed(work, "run.name=straight", "model.dim=32"), "model.dim=64 in the checkpoint, 32 now"),
        "checkpoint.dir": (_deepspeed(work, "run.name=straight", f"checkpoint.dir={run / 'config.yaml'}"),
                           f"{run / 'config.yaml'} is a file, expected a directory"),
        "config": ([str(work) if a == str(work / "cfg.yaml") else a for a in _deepspeed(work)],
                   f"config file {work} is a directory"),
    }[case]
    before = _tree(run)
    res = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300)
    assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr[-3000:]
    lines = [line for line in res.stderr.splitlines() if line.startswith("pretrain: ")]
    assert len(lines) == 2 and all(words in line for line in lines), res.stderr[-3000:]  # one line per rank
    assert "exitcode  : 2" in res.stderr or "exit code 2" in res.stderr or res.returncode == 2, res.stderr[-2000:]
    assert _tree(run) == before


def test_pipeline_run_matches_data_parallel_and_resumes_bit_identically(work, straight):
    """PP=2 on the same 2 ranks (DP 1, 4 micro-batches in flight): the losses of the DP=2 run; stopped
    at step 6 and resumed, bit-identical to its own uninterrupted run; its checkpoint at PP=1 with
    resharding off refused naming the layouts (test_reshard resumes across PP sizes)."""
    import torch

    _run(_deepspeed(work, "run.name=pp", "parallel.pp=2"))
    _run(_deepspeed(work, "run.name=pp-resumed", "parallel.pp=2", "train.stop_after=6"))
    _run(_torchrun(work, "run.name=pp-resumed", "parallel.pp=2"))
    pp, resumed, dp = (_jsonl(work, name) for name in ("pp", "pp-resumed", "straight"))
    assert [r["step"] for r in resumed] == list(range(1, 13))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in pp]  # bit-identical
    torch.testing.assert_close(torch.tensor([r["loss"] for r in pp], dtype=torch.float64),
                               torch.tensor([r["loss"] for r in dp], dtype=torch.float64), rtol=1e-5, atol=0)
    refused = subprocess.run(_torchrun(work, "run.name=pp", "train.steps=14", "checkpoint.reshard=off"),
                             capture_output=True, text=True, env=_env(), cwd=REPO, timeout=600)
    assert refused.returncode != 0, refused.stderr[-3000:]  # each rank exits 2 (torchrun reports 1)
    assert "another layout (pp 2 -> 1, dp 1 -> 2) and checkpoint.reshard=off" in refused.stderr + refused.stdout


def _fork(work, base: str, name: str, step: int) -> None:
    """A run directory holding ``base``'s checkpoint of ``step`` and its metrics up to there only."""
    import shutil

    src, dst = work / "runs" / base, work / "runs" / name
    tag = f"step-{step:08d}"
    shutil.copytree(src / "checkpoints" / tag, dst / "checkpoints" / tag)
    (dst / "checkpoints" / "latest").write_text(tag + "\n")
    rows = [line for line in (src / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= step]
    (dst / "metrics.jsonl").write_text("\n".join(rows) + "\n")


def test_encoder_mlm_run_trains_validates_resumes_and_exports(work, tmp_path):
    """``model.kind=encoder data.mode=mlm`` from the command line on 2 ranks: the masked-token loss
    falls, validation reports the loss and ``valid/mlm_acc`` (``tools/evaluate.py`` prints the same),
    a resume under torchrun from its checkpoint of step 8 is bit-identical, and the export to
    x-transformers' ``TransformerWrapper(Encoder)`` gives our logits."""
    import importlib.util

    import torch

    from xft_dist.ckpt.xtransformers import build_xtransformers, export_xtransformers

    mlm = ["model.kind=encoder", "data.mode=mlm", f"data.valid.shards={work / 'shards'}", "data.valid.batches=2",
           "data.valid.batch_rows=8", "data.valid.every=6", "logging.wandb=disabled"]
    straight = _run(_deepspeed(work, "run.name=mlm", *mlm))
    _fork(work, "mlm", "mlm-resumed", 8)  # the run as it stood at its checkpoint of step 8
    _run(_torchrun(work, "run.name=mlm-resumed", *mlm))
    rows, resumed = _jsonl(work, "mlm"), _jsonl(work, "mlm-resumed")
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 13))
    losses = [r["loss"] for r in train]
    assert losses[-1] < 0.8 * losses[0], f"masked-token loss did not fall: {losses}"
    assert [r["loss"] for r in resumed if "loss" in r] == losses  # bit-identical
    valid = [r for r in rows if "valid/loss" in r]
    assert [r["step"] for r in valid] == [6, 12] and all(0 < r["valid/mlm_acc"] < 1 for r in valid)
    assert valid[1]["valid/mlm_acc"] > valid[0]["valid/mlm_acc"] and "masked-token accuracy" in straight.stdout
    assert [r for r in resumed if "valid/loss" in r][1]["valid/loss"] == valid[1]["valid/loss"]

    spec = importlib.util.spec_from_file_location("evaluate_tool", REPO / "tools" / "evaluate.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert tool.main([str(work / "runs" / "mlm")]) == 0
    assert f"validation loss {valid[1]['valid/loss']:.4f}" in out.getvalue(), out.getvalue()
    assert f"masked-token accuracy {valid[1]['valid/mlm_acc']:.4f}" in out.getvalue(), out.getvalue()

    info = export_xtransformers(work / "runs" / "mlm", tmp_path / "mlm.pt")
    assert info["spec"]["kwargs"]["attn_layers"]["class"] == "Encoder"
    assert info["max_abs_diff"] is not None and info["max_abs_diff"] < 1e-4, info["max_abs_diff"]
    xt = build_xtransformers(tmp_path / "mlm.json").eval()
    xt.load_state_dict(torch.load(tmp_path / "mlm.pt"), strict=True)
    ids = torch.randint(3, 259, (2, 64))
    ids[:, ::5] = 259  # the mask id
    from xft_dist.ckpt.convert import load_checkpoint_model

    ours = load_checkpoint_model(work / "runs" / "mlm", device=torch.device("cpu"))[0].eval()
    with torch.no_grad():
        torch.testing.assert_close(xt(ids), ours.net(ids, gather_logits=True), rtol=1e-4, atol=1e-4)
