"""Validation during training, through the deepspeed launcher on 2 CPU ranks: the valid loss is
the same at TP1xDP2 and at TP2xDP1 with 2 loader workers; a run with evaluation and samples has the
training losses of a run without (with dropout: no RNG stream or loader state is touched);
``valid/*`` lands in metrics.jsonl and in the offline W&B run; samples are printed and logged;
tools/evaluate.py on the final checkpoint gives the final number."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ..helpers import REPO, cpu_rank_env, free_port, stdlib_shards
from ..wandb_file import history

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
BIN = Path(sys.executable).parent
STEPS = 40


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("valid")
    stdlib_shards(root / "shards", "json", "email", shard_tokens=40000)
    stdlib_shards(root / "valid", "html", shard_tokens=40000)  # a separate held-out input
    cfg = {
        "model": {"dim": 64, "depth": 2, "heads": 4},
        "data": {"shards": str(root / "shards"), "seq_len": 64, "num_streams": 4,
                 "valid": {"shards": str(root / "valid"), "every": 20, "batches": 3, "batch_rows": 6}},
        "train": {"steps": STEPS, "global_batch": 8, "micro_batch": 2, "seed": 1},
        "optim": {"lr": 3e-3, "weight_decay": 0.01},
        "schedule": {"warmup_steps": 2},
        "checkpoint": {"every": 20, "keep": 2},
        "logging": {"every": 10, "wandb": "offline", "progress_bar": False, "sample_prompts": ["def ", ""],
                    "sample_every": 20, "sample_tokens": 16},
        "run": {"out_dir": str(root / "runs")},
    }
    (root / "cfg.yaml").write_text(json.dumps(cfg))
    return root


def _train(work, name, *overrides):
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           str(REPO / "launch" / "pretrain.py"), "--config", str(work / "cfg.yaml"), f"run.name={name}", *overrides]
    res = subprocess.run(cmd, capture_output=True, text=True, env=cpu_rank_env(), cwd=REPO, timeout=600)
    assert res.returncode == 0, f"{name} failed:\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    rows = [json.loads(line) for line in (work / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    return res, rows


def _valid(rows):
    return {r["step"]: r["valid/loss"] for r in rows if "valid/loss" in r}


def _train_losses(rows):
    return [r["loss"] for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def runs(work):
    return {
        "tp1dp2": _train(work, "tp1dp2"),
        # another layout and loader workers: neither may change the held-out number
        "tp2dp1": _train(work, "tp2dp1", "parallel.tp=2", "data.num_workers=2"),
        # with dropout, so that a draw from a training RNG stream would show in the losses
        "dropout": _train(work, "dropout", "model.ff_dropout=0.2", "model.attn_dropout=0.1"),
        "dropout_no_valid": _train(work, "dropout_no_valid", "model.ff_dropout=0.2", "model.attn_dropout=0.1",
                                   "data.valid.shards=null", "logging.sample_prompts=[]"),
    }


def test_valid_loss_is_the_same_at_every_layout_and_worker_count(runs):
    ref = _valid(runs["tp1dp2"][1])
    assert sorted(ref) == [20, 40], ref
    assert ref[40] < ref[20]  # it learns
    for name in ("tp2dp1",):
        got = _valid(runs[name][1])
        assert sorted(got) == sorted(ref), (name, got)
        for step in ref:
            assert got[step] == pytest.approx(ref[step], rel=1e-6, abs=1e-6), (name, step, got, ref)


def test_evaluation_and_samples_do_not_change_training(runs):
    for a, b in (("dropout", "dropout_no_valid"),):
        with_eval, without = _train_losses(runs[a][1]), _train_losses(runs[b][1])
        assert len(with_eval) == STEPS and with_eval == without, a  # bit for bit: no RNG or loader state touched
        assert _valid(runs[b][1]) == {}
    assert _train_losses(runs["dropout"][1]) != _train_losses(runs["tp1dp2"][1])  # dropout was on


def test_valid_metrics_samples_and_wandb(work, runs):
    res, rows = runs["tp1dp2"]
    last = next(r for r in rows if r["step"] == STEPS and "valid/loss" in r)
    assert 0 < last["valid/tokens"] <= 3 * 6 * 64
    assert last["valid/ppl"] == pytest.approx(2.718281828 ** last["valid/loss"], rel=1e-9)
    assert "valid/bpb" in last  # byte tokenizer
    samples = [r["samples"] for r in rows if "samples" in r]
    assert len(samples) == 4 and {s["prompt"] for s in samples} == {"def ", ""}
    assert "validation loss" in res.stdout and "sample: 'def ' -> " in res.stdout, res.stdout[-2000:]
    wandb_files = list((work / "runs" / "tp1dp2" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(wandb_files) == 1
    logged = [row for row in history(wandb_files[0]) if "valid/loss" in row]
    assert [row["valid/loss"] for row in logged] == [_valid(rows)[20], _valid(rows)[40]]
    # the samples went to W&B as tables (one per sampling step), whose files hold the JSONL's rows
    tables = [{k.removeprefix("samples/"): v for k, v in row.items() if k.startswith("samples/")}
              for row in history(wandb_files[0]) if "samples/_type" in row]
    assert len(tables) == 2 and all(t["_type"] == "table-file" and t["nrows"] == 2 for t in tables), tables
    files = wandb_files[0].parent / "files"
    for table in tables:
        data = json.loads((files / table["path"]).read_text())
        assert data["columns"] == ["step", "prompt", "continuation"]
        assert {(r[1], r[2]) for r in data["data"]} <= {(s["prompt"], s["continuation"]) for s in samples}


def test_evaluate_tool_on_the_final_checkpoint_matches_the_run(work, runs):
    for name in ("tp1dp2", "tp2dp1"):  # a TP=2 checkpoint is consolidated to one process
        res = subprocess.run([sys.executable, str(REPO / "tools" / "evaluate.py"), str(work / "runs" / name),
                              "--device", "cpu"], capture_output=True, text=True, cwd=REPO, timeout=300)
        assert res.returncode == 0, res.stderr
        loss = float(res.stdout.split("validation loss ")[1].split(",")[0])
        assert loss == pytest.approx(_valid(runs[name][1])[STEPS], abs=1e-4), res.stdout
        gen = subprocess.run([sys.executable, str(REPO / "tools" / "generate.py"), str(work / "runs" / name),
                              "--prompt", "import ", "--tokens", "12", "--temperature", "0", "--device", "cpu"],
                             capture_output=True, text=True, cwd=REPO, timeout=300)
        assert gen.returncode == 0 and gen.stdout.startswith("import "), gen.stderr
