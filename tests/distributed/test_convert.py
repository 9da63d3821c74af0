"""Consolidating a TP=2 checkpoint (ZeRO 1, 2 and 3, decoder and encoder-decoder): the TP=1 model
loaded from it, and the x-transformers model exported from it, give the logits the TP=2 model gave."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ..helpers import REPO
from .harness import CheckSet

CONVERT = CheckSet(world_size=2, timeout_s=400)


# Models x-transformers can express (bias-free LayerNorm, or RMSNorm without epsilon), trained at
# TP=2 under ZeRO-3: tied / untied head, rotary / absolute positions, GQA, SwiGLU, GELU, RMSNorm,
# LayerNorm, and an encoder-decoder whose encoder (the context) is wider than the decoder.
XT_VARIANTS = {
    "xt_tied": ("decoder", {"heads": 4, "kv_heads": 2, "ff_glu": True, "ff_swish": True, "use_rmsnorm": True,
                            "norm_eps": 0.0, "depth": 2}),
    "xt_untied": ("decoder", {"tie_embedding": False, "rotary_pos_emb": False, "norm_bias": False, "depth": 2}),
    "xt_encdec": ("encoder_decoder", {"heads": 4, "kv_heads": 2, "ff_glu": True, "ff_swish": True,
                                      "use_rmsnorm": True, "norm_eps": 0.0}),
}


def _train_save_and_probe(kind: str, zero: int, name: str | None = None, **model_overrides) -> None:
    import torch.distributed as dist

    from xft_dist.ckpt import CheckpointManager
    from xft_dist.config import dump_config
    from xft_dist.config.load import validate
    from xft_dist.train.setup import VocabFacts, build_run

    model_cfg = {"kind": kind, "dim": 32, "depth": 1, "heads": 4, "dim_head": 8, "enc_depth": 1, "enc_dim": 48}
    model_cfg |= model_overrides
    data = {"shards": "unused", "seq_len": 12, "enc_len": 16, "mode": "span" if kind != "decoder" else "packed"}
    cfg = validate({"model": model_cfg, "data": data, "parallel": {"tp": 2, "zero_stage": zero},
                    "train": {"global_batch": 2, "micro_batch": 2}})
    vocab = VocabFacts(num_tokens=61, pad_id=0, tokenizer_vocab=61, num_sentinels=0)
    engine = build_run(cfg, upto="engine", vocab=vocab).engine
    gen = torch.Generator().manual_seed(1)
    src, tgt = torch.randint(1, 61, (2, 16), generator=gen), torch.randint(1, 61, (2, 13), generator=gen)
    for _ in range(2):  # move the weights away from their initial values
        loss = engine(tgt) if kind == "decoder" else engine(src, tgt)
        engine.backward(loss)
        engine.step()
    root = Path(os.environ["XFT_CONVERT_DIR"]) / (name or f"{kind}-zero{zero}")
    CheckpointManager(root).save(engine, 2, rank_state={}, shared={"num_tokens": 61, "pad_id": 0},
                                 config_text=dump_config(cfg))
    with torch.no_grad():
        module = engine.module.eval()
        if kind == "decoder":
            tgt = tgt[:, :-1]  # the LM's inputs: seq_len (= learned positions) long
            logits = module.net(tgt, gather_logits=True)
        else:
            logits = module.decoder.net(tgt, context=module.encode(src), gather_logits=True)
    if dist.get_rank() == 0:
        torch.save({"src": src, "tgt": tgt, "logits": logits}, root / "probe.pt")


@CONVERT.check
def decoder_zero1():
    _train_save_and_probe("decoder", 1)


@CONVERT.check
def decoder_zero2():
    _train_save_and_probe("decoder", 2)


@CONVERT.check
def encoder_decoder_zero1():
    _train_save_and_probe("encoder_decoder", 1)


@CONVERT.check
def decoder_zero3():
    _train_save_and_probe("decoder", 3)


@CONVERT.check
def encoder_decoder_zero3():
    _train_save_and_probe("encoder_decoder", 3)


@CONVERT.check
def xt_variants_zero3():
    for name, (kind, overrides) in XT_VARIANTS.items():
        _train_save_and_probe(kind, 3, name, **overrides)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    os.environ["XFT_CONVERT_DIR"] = str(root)
    try:
        report = CONVERT.run()
    finally:
        os.environ.pop("XFT_CONVERT_DIR")
    for name in CONVERT.names():
        report.assert_passed(name)
    return root


def _assert_probe_logits(model, run_dir: Path) -> None:
    """The one-process model gives the logits the TP=2 model gave on the saved probe inputs."""
    probe = torch.load(run_dir / "probe.pt", weights_only=False)
    with torch.no_grad():
        if not hasattr(model, "encode"):
            logits = model.net(probe["tgt"])
        else:
            logits = model.decoder.net(probe["tgt"], context=model.encode(probe["src"]))
    torch.testing.assert_close(logits, probe["logits"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("run", ["decoder-zero1", "decoder-zero2", "encoder_decoder-zero1", "decoder-zero3",
                                 "encoder_decoder-zero3"])
def test_consolidated_tp1_model_reproduces_tp2_logits(trained, run):
    from xft_dist.ckpt.convert import load_consolidated

    ckpt = trained / run / "step-00000002"
    out = subprocess.run([sys.executable, str(REPO / "tools" / "convert_ckpt.py"), str(trained / run),
                          "--out", str(trained / f"{run}.pt")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert ckpt.exists()
    model = load_consolidated(trained / f"{run}.pt").eval()
    _assert_probe_logits(model, trained / run)


@pytest.mark.parametrize("run", ["decoder-zero3", "encoder_decoder-zero3", "decoder-zero1"])
def test_export_fp32_from_any_zero_stage_reproduces_tp2_logits(trained, run, tmp_path):
    from xft_dist.ckpt import load_exported

    out = tmp_path / f"{run}.pt"
    res = subprocess.run([sys.executable, str(REPO / "tools" / "export.py"), str(trained / run), "--to", "fp32",
                          "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert torch.load(out, weights_only=True)["format"] == "xft_dist-export/1"  # plain tensors and strings
    model = load_exported(out)
    assert next(model.parameters()).dtype == torch.float32
    _assert_probe_logits(model, trained / run)
    bf16 = subprocess.run([sys.executable, str(REPO / "tools" / "export.py"), str(trained / run), "--to", "fp32",
                           "--dtype", "bf16", "--out", str(tmp_path / "bf16.pt")], capture_output=True, text=True,
                          timeout=300)
    assert bf16.returncode == 0 and next(load_exported(tmp_path / "bf16.pt").parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize("run", sorted(XT_VARIANTS))
def test_export_to_xtransformers_reproduces_tp2_logits(trained, run, tmp_path):
    from xft_dist.ckpt import build_xtransformers

    out = tmp_path / "model.pt"
    res = subprocess.run([sys.executable, str(REPO / "tools" / "export.py"), str(trained / run), "--to",
                          "x-transformers", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "check: max |logit difference|" in res.stdout, res.stdout
    spec = json.loads((tmp_path / "model.json").read_text())
    kind = XT_VARIANTS[run][0]
    assert spec["class"] == ("TransformerWrapper" if kind == "decoder" else "XTransformer")
    if kind == "decoder":
        assert spec["kwargs"]["attn_layers"]["class"] == "Decoder"
    xt = build_xtransformers(tmp_path / "model.json").eval()
    xt.load_state_dict(torch.load(out, weights_only=True), strict=True)
    probe = torch.load(trained / run / "probe.pt", weights_only=False)
    with torch.no_grad():
        if kind == "decoder":
            logits = xt(probe["tgt"])
        else:
            logits = xt.decoder.net(probe["tgt"], context=xt.encoder(probe["src"], return_embeddings=True))
    torch.testing.assert_close(logits, probe["logits"], rtol=1e-5, atol=1e-5)


def test_the_default_architecture_exports_to_xtransformers(trained, tmp_path):
    """The config's defaults (bias-free LayerNorm, eps 1e-5, rotary, GELU, tied head) trained at TP=2
    under ZeRO-3 export to x-transformers with the TP=2 model's logits (and to Hugging Face: above)."""
    from xft_dist.ckpt import build_xtransformers

    out = tmp_path / "model.pt"
    res = subprocess.run([sys.executable, str(REPO / "tools" / "export.py"), str(trained / "decoder-zero3"), "--to",
                          "x-transformers", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    xt = build_xtransformers(tmp_path / "model.json").eval()
    xt.load_state_dict(torch.load(out, weights_only=True), strict=True)
    probe = torch.load(trained / "decoder-zero3" / "probe.pt", weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(xt(probe["tgt"]), probe["logits"], rtol=1e-5, atol=1e-5)


def test_export_refuses_incomplete_and_damaged_checkpoints(trained, tmp_path):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(trained / "decoder-zero1", run)
    ckpt = run / "step-00000002"
    (ckpt / "COMPLETE").rename(ckpt / "COMPLETE.off")
    cmd = [sys.executable, str(REPO / "tools" / "export.py"), str(ckpt), "--to", "fp32",
           "--out", str(tmp_path / "x.pt")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "no complete checkpoint" in res.stderr, res.stderr
    (ckpt / "COMPLETE.off").rename(ckpt / "COMPLETE")
    (ckpt / "config.yaml").unlink()  # the manifest lists it
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "config.yaml: missing" in res.stderr, res.stderr
    assert not (tmp_path / "x.pt").exists() and (ckpt / "mp_rank_00_model_states.pt").exists()  # nothing deleted


def test_incomplete_checkpoints_are_refused(tmp_path):
    from xft_dist.ckpt.convert import consolidate

    ckpt = tmp_path / "step-00000001"
    ckpt.mkdir()
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        consolidate(ckpt)


HF_CLASSES = {"decoder-zero3": "GPTNeoXForCausalLM", "xt_tied": "LlamaForCausalLM", "xt_untied": "GPT2LMHeadModel"}


@pytest.mark.parametrize("run", sorted(HF_CLASSES))
def test_export_to_hf_reproduces_tp2_zero3_logits_and_greedy_continuation(trained, run, tmp_path):
    """Our default architecture (GPT-NeoX), a Llama-style one (RMSNorm, SwiGLU, GQA) and learned
    positions (GPT-2), trained at TP=2 under ZeRO-3: AutoModelForCausalLM gives the TP=2 model's logits."""
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "hf"
    if run == "decoder-zero3":  # the command line once; the others in process (the same function)
        res = subprocess.run([sys.executable, str(REPO / "tools" / "export.py"), str(trained / run), "--to", "hf",
                              "--out", str(out)], capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        assert f"{HF_CLASSES[run]} (config.json, model.safetensors, generation_config.json" in res.stdout
        assert "greedy continuations equal" in res.stdout, res.stdout
    else:
        from xft_dist.ckpt.hf import export_hf

        info = export_hf(trained / run, out)
        assert info["class"] == HF_CLASSES[run] and info["greedy_equal"] and info["max_abs_diff"] < 1e-4, info
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert type(model).__name__ == HF_CLASSES[run]
    probe = torch.load(trained / run / "probe.pt", weights_only=False)
    with torch.no_grad():
        logits = model(probe["tgt"]).logits
    vocab = logits.shape[-1]
    torch.testing.assert_close(logits, probe["logits"][..., :vocab], rtol=1e-4, atol=1e-4)


def test_export_to_hf_refuses_the_encoder_decoder_by_name(trained, tmp_path):
    res = subprocess.run([sys.executable, str(REPO / "tools" / "export.py"), str(trained / "encoder_decoder-zero3"),
                          "--to", "hf", "--out", str(tmp_path / "hf")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "model.kind=encoder_decoder: no transformers class" in res.stderr, res.stderr
    assert not (tmp_path / "hf").exists()
