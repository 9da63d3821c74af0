"""Resuming at another TP x DP layout (checkpoint.reshard: auto, DeepSpeed's universal checkpoint),
through the deepspeed launcher on CPU ranks: saved at TP2xDP2 under ZeRO 1, 2 and 3, resumed at
TP2xDP1 (ZeRO 1 and 3), TP1xDP4 (ZeRO 3; the encoder-decoder under ZeRO 1) and TP1xDP2 (ZeRO 2,
through the conversion tool), the next steps' losses equal the uninterrupted run's (fp32, 1e-5
relative); into and out of pipeline stages; reshard=off,
ZeRO 0 and a change into or out of ZeRO-3 are refused with exit status 2 and the layouts named. The
vocabulary (259) is padded at TP=2, so the re-padding of vocab-parallel tensors is exercised. A
bf16 ZeRO-1 run (DeepSpeed's BF16_Optimizer) saved at TP=1 exports its fp32 masters and resumes
at TP=2."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ..helpers import REPO, cpu_rank_env, free_port, stdlib_shards

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]
BIN = Path(sys.executable).parent
SAVED, STEPS = 6, 12  # the 6 steps after the resume are compared


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("reshard")
    stdlib_shards(root / "shards", "json", shard_tokens=8000)
    base = {
        "model": {"dim": 32, "depth": 2, "heads": 4, "dim_head": 8, "enc_depth": 1},
        "data": {"shards": str(root / "shards"), "seq_len": 32, "enc_len": 48, "num_streams": 4},
        "train": {"steps": STEPS, "global_batch": 8, "micro_batch": 2, "seed": 3},
        "optim": {"lr": 3e-3},
        "checkpoint": {"every": SAVED, "keep": 3},  # steps 6 and 12
        "logging": {"every": 8, "wandb": "disabled", "progress_bar": False},
        "run": {"out_dir": str(root / "runs")},
    }
    (root / "decoder.yaml").write_text(json.dumps(base))
    encdec = {**base, "model": {**base["model"], "kind": "encoder_decoder"}, "data": {**base["data"], "mode": "span"}}
    (root / "encdec.yaml").write_text(json.dumps(encdec))
    return root


def _train(work, config, name, nproc, *overrides, ok=True):
    cmd = [str(BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(free_port()),
           str(REPO / "launch" / "pretrain.py"), "--config", str(work / config), f"run.name={name}", *overrides]
    res = subprocess.run(cmd, capture_output=True, text=True, env=cpu_rank_env(), cwd=REPO, timeout=600)
    if ok:
        assert res.returncode == 0, f"{name}:\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    return res


def _losses(work, name):
    rows = (work / "runs" / name / "metrics.jsonl").read_text().splitlines()
    return [json.loads(r)["loss"] for r in rows if '"loss"' in r]


def _fork(work, base, name):
    """A run that holds ``base``'s checkpoint at step SAVED (and its metrics up to there) only."""
    (work / "runs" / name / "checkpoints").mkdir(parents=True)
    shutil.copytree(work / "runs" / base / "checkpoints" / f"step-{SAVED:08d}",
                    work / "runs" / name / "checkpoints" / f"step-{SAVED:08d}")
    rows = (work / "runs" / base / "metrics.jsonl").read_text().splitlines()[:SAVED]
    (work / "runs" / name / "metrics.jsonl").write_text("\n".join(rows) + "\n")


TARGETS = [("tp1dp2", 2, "parallel.tp=1"), ("tp2dp1", 2, "parallel.tp=2"), ("tp1dp4", 4, "parallel.tp=1")]
# ZeRO 1 and 2 share one code path (ZeRO-2 is covered by the conversion tool's test, TP 2 -> 1);
# ZeRO-3 has its own (xft_dist/ckpt/universal.py: prepare_zero3_universal_load).
# The decoder changes DP under ZeRO-1 and ZeRO-3 and TP and DP together under ZeRO-3; the
# encoder-decoder changes TP and DP together under ZeRO-1.
CASES = [("decoder.yaml", 1, TARGETS[1]), ("decoder.yaml", 3, TARGETS[1]), ("decoder.yaml", 3, TARGETS[2]),
         ("encdec.yaml", 1, TARGETS[2])]


@pytest.fixture(scope="module")
def bases(work):
    out = {}
    for config, zero in sorted({(c, z) for c, z, _ in CASES} | {("decoder.yaml", 2)}):
        name = f"{config.split('.')[0]}-z{zero}"
        _train(work, config, name, 4, "parallel.tp=2", f"parallel.zero_stage={zero}")
        out[(config, zero)] = name
    return out


@pytest.mark.parametrize("config, zero, target", CASES, ids=lambda v: v if isinstance(v, (str, int)) else v[0])
def test_resume_at_another_layout_continues_exactly(work, bases, config, zero, target):
    base = bases[(config, zero)]
    label, nproc, tp = target
    name = f"{base}-{label}"
    _fork(work, base, name)
    res = _train(work, config, name, nproc, tp, f"parallel.zero_stage={zero}")
    assert "through DeepSpeed's universal checkpoint" in res.stdout + res.stderr
    want, got = _losses(work, base), _losses(work, name)
    assert len(got) == STEPS and got[:SAVED] == want[:SAVED]
    for step, (a, b) in enumerate(zip(got[SAVED:], want[SAVED:]), SAVED + 1):
        assert a == pytest.approx(b, rel=1e-5), (step, got[SAVED:], want[SAVED:])
    ckpt = work / "runs" / name / "checkpoints"
    assert (ckpt / f"step-{SAVED:08d}" / "universal" / "UNIVERSAL_COMPLETE").exists()
    assert (ckpt / f"step-{STEPS:08d}" / "COMPLETE").exists()


PIPELINE = [("pp2tp2", 4, ("parallel.pp=2", "parallel.tp=2"), [("pp1tp1dp2", 2, ("parallel.pp=1", "parallel.tp=1"))]),
            (None, None, None, [("pp2tp1dp2", 4, ("parallel.pp=2", "parallel.tp=1"))])]


@pytest.mark.parametrize("base_label, nproc, layout, targets", PIPELINE, ids=["from-pp2tp2", "from-tp2dp2-into-pp2"])
def test_resume_into_and_out_of_pipeline_stages_continues_exactly(work, bases, base_label, nproc, layout, targets):
    """PP2 x TP2 saved, resumed at PP1 x TP1 x DP2; a TP2 x DP2 checkpoint resumed at
    PP2 x DP2: the universal folder answers to both the model's and the pipe layers' names."""
    base = bases[("decoder.yaml", 1)]
    if base_label is not None:
        base = f"decoder-{base_label}"
        _train(work, "decoder.yaml", base, nproc, *layout, "parallel.zero_stage=1")
        assert _losses(work, base) == pytest.approx(_losses(work, bases[("decoder.yaml", 1)]), rel=1e-5)
    for label, n, target in targets:
        name = f"{base}-{label}"
        _fork(work, base, name)
        res = _train(work, "decoder.yaml", name, n, *target, "parallel.zero_stage=1")
        assert "through DeepSpeed's universal checkpoint" in res.stdout + res.stderr
        want, got = _losses(work, base), _losses(work, name)
        assert len(got) == STEPS and got[:SAVED] == want[:SAVED]
        assert got[SAVED:] == pytest.approx(want[SAVED:], rel=1e-5), (label, got[SAVED:], want[SAVED:])


def test_reshard_off_zero0_and_zero3_changes_are_refused(work, bases):
    base = bases[("decoder.yaml", 1)]
    _fork(work, base, "refuse")
    res = _train(work, "decoder.yaml", "refuse", 2, "parallel.tp=1", "checkpoint.reshard=off", ok=False)
    assert res.returncode == 2 and "tp 2 -> 1" in res.stderr and "checkpoint.reshard=off" in res.stderr, res.stderr
    _fork(work, base, "z3")
    res = _train(work, "decoder.yaml", "z3", 2, "parallel.tp=1", "parallel.zero_stage=3", ok=False)
    assert res.returncode == 2 and "zero_stage 1 -> 3" in res.stderr and "ZeRO-3 checkpoints at ZeRO-3" in res.stderr
    _fork(work, base, "z0")
    res = _train(work, "decoder.yaml", "z0", 2, "parallel.tp=1", "parallel.zero_stage=0", ok=False)
    assert res.returncode == 2 and "needs ZeRO stage 1, 2 or 3" in res.stderr, res.stderr
    assert (work / "runs" / "z3" / "checkpoints" / f"step-{SAVED:08d}" / "COMPLETE").exists()  # nothing deleted
    assert not (work / "runs" / "z3" / "checkpoints" / f"step-{SAVED:08d}" / "universal").exists()


def test_convert_tool_makes_the_universal_conversion_a_resume_then_uses(work, bases):
    base = bases[("decoder.yaml", 2)]
    _fork(work, base, "tool")
    ckpt = work / "runs" / "tool" / "checkpoints" / f"step-{SAVED:08d}"
    res = subprocess.run([sys.executable, str(REPO / "tools" / "convert_ckpt.py"), str(work / "runs" / "tool"),
                          "--to", "universal"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert res.returncode == 0 and str(ckpt / "universal") in res.stdout, res.stderr
    made = (ckpt / "universal" / "UNIVERSAL_COMPLETE").stat().st_mtime
    _train(work, "decoder.yaml", "tool", 2, "parallel.tp=1", "parallel.zero_stage=2")
    assert (ckpt / "universal" / "UNIVERSAL_COMPLETE").stat().st_mtime == made  # reused, not redone
    got, want = _losses(work, "tool"), _losses(work, base)
    assert got[SAVED:] == pytest.approx(want[SAVED:], rel=1e-5)


def test_bf16_zero1_saved_at_tp1_exports_its_fp32_masters_and_resumes_at_tp2(work, tmp_path):
    """bf16 at ZeRO-1 accumulates gradients in fp32 through DeepSpeed's BF16_Optimizer, whose
    checkpoint files differ from ZeRO's: the export reads its fp32 master weights. Saved at TP=1
    (where no parameter is split), the checkpoint still says how each one splits, so it resumes at
    TP=2 (row-parallel weights cut along dim 1, the vocabulary re-padded) and continues the run
    (bf16 arithmetic at another TP split: 1e-3)."""
    import torch

    bf16 = ("train.precision=bf16", "parallel.zero_stage=1")
    _train(work, "decoder.yaml", "bf16-base", 2, "parallel.tp=1", *bf16)
    ckpt = work / "runs" / "bf16-base" / "checkpoints" / f"step-{STEPS:08d}"
    assert list(ckpt.glob("bf16_zero_pp_rank_*_optim_states.pt")), sorted(p.name for p in ckpt.iterdir())
    out = tmp_path / "bf16.pt"
    res = subprocess.run([sys.executable, str(REPO / "tools" / "export.py"), str(work / "runs" / "bf16-base"),
                          "--to", "fp32", "--out", str(out)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    exported = torch.load(out, map_location="cpu", weights_only=True)["model"]
    module = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    for name in ("net.attn_layers.layers.0.attn.to_out.weight", "net.token_emb.weight"):
        master, weight = exported[name], module[name]
        assert master.dtype == torch.float32 and weight.dtype == torch.bfloat16
        assert torch.equal(master.to(torch.bfloat16), weight) and not torch.equal(master, weight.float()), name
    _fork(work, "bf16-base", "bf16-tp2")
    _train(work, "decoder.yaml", "bf16-tp2", 2, "parallel.tp=2", *bf16)
    want, got = _losses(work, "bf16-base"), _losses(work, "bf16-tp2")
    assert got[:SAVED] == want[:SAVED] and got[SAVED:] == pytest.approx(want[SAVED:], rel=1e-3)
