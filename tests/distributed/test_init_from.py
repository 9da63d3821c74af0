"""``model.init_from`` through the deepspeed launcher on 2 CPU ranks: a random ``LlamaForCausalLM``
(GQA, untied head, no feed-forward bias, rotary base 500000) saved with ``save_pretrained`` starts a
TP=2 ZeRO-3 run; after one step at learning rate 0 (the warmup's first), ``--to hf`` gives back a
directory whose weights equal the original's and whose logits agree. The architecture comes from
config.json (the run sets no model keys); a run that has its own checkpoint resumes from it even
when the source is gone. (GPT-NeoX and GPT-2 sources: tests/unit/test_export_hf.py.)"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ..helpers import REPO, cpu_rank_env, free_port, make_corpus

transformers = pytest.importorskip("transformers")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
BIN = Path(sys.executable).parent


def _llama(out: Path) -> Path:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
                                   tie_word_embeddings=False, max_position_embeddings=64,
                                   rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    transformers.LlamaForCausalLM(cfg).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("init_from")
    make_corpus(root / "shards", num_docs=100, shard_tokens=600)
    cfg = {"data": {"shards": str(root / "shards"), "seq_len": 32, "num_streams": 2},
           "train": {"steps": 1, "global_batch": 4, "micro_batch": 2},
           "schedule": {"warmup_steps": 5},  # step 1 runs at learning rate 0
           "checkpoint": {"every": 1}, "logging": {"wandb": "disabled", "progress_bar": False},
           "run": {"out_dir": str(root / "runs")}}
    (root / "cfg.yaml").write_text(json.dumps(cfg))
    return root


def _train(work, name, source, *overrides):
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           str(REPO / "launch" / "pretrain.py"), "--config", str(work / "cfg.yaml"), f"run.name={name}",
           f"model.init_from={source}", *overrides]
    res = subprocess.run(cmd, capture_output=True, text=True, env=cpu_rank_env(), cwd=REPO, timeout=600)
    assert res.returncode == 0, f"{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    return res


def _export(work, name, out):
    res = subprocess.run([sys.executable, str(REPO / "tools" / "export.py"), str(work / "runs" / name), "--to", "hf",
                          "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "greedy continuations equal" in res.stdout, res.stdout


def _same_model(original: Path, exported: Path):
    from safetensors.torch import load_file

    want, got = load_file(str(original / "model.safetensors")), load_file(str(exported / "model.safetensors"))
    assert set(got) == set(want), set(got) ^ set(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6, msg=lambda m: f"{key}\n{m}")
    a = transformers.AutoModelForCausalLM.from_pretrained(str(original), dtype=torch.float32).eval()
    b = transformers.AutoModelForCausalLM.from_pretrained(str(exported), dtype=torch.float32).eval()
    ids = torch.randint(0, 250, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(b(ids).logits, a(ids).logits, rtol=1e-5, atol=1e-5)


def test_llama_round_trip_through_a_tp2_run(work):
    original = _llama(work / "llama")
    res = _train(work, "llama", original, "parallel.tp=2", "parallel.zero_stage=3")
    assert "model.init_from: weights of" in res.stdout + res.stderr
    resolved = (work / "runs" / "llama" / "config.yaml").read_text()
    for key in ("dim: 64", "kv_heads: 2", "dim_head: 16", "use_rmsnorm: true", "ff_bias: false",
                "rotary_theta: 500000.0", "tie_embedding: false", "num_tokens: 320"):
        assert key in resolved, (key, resolved)
    _export(work, "llama", work / "llama-back")
    _same_model(original, work / "llama-back")
    shutil.rmtree(original)  # a run with its own checkpoint resumes from it and never reads the source again
    res = _train(work, "llama", original, "parallel.tp=2", "parallel.zero_stage=3", "train.steps=2")
    assert "resumed from" in res.stdout + res.stderr and "model.init_from: weights of" not in res.stdout + res.stderr
