"""Export to Hugging Face ``transformers``: a ``save_pretrained`` directory of the class that
computes exactly what our decoder LM computes.

``hf_architecture(cfg)`` picks the class from the model's options, or refuses naming each option
no class expresses (``NotExportable``); nothing is approximated:

- ``llama`` (``LlamaForCausalLM``): rotary, RMSNorm (its epsilon inside the square root, as ours),
  a SwiGLU feed-forward (``model.ff_glu`` + ``model.ff_swish``; ``model.ff_bias`` as
  ``mlp_bias``), any ``dim_head``, grouped-query attention and rotary base (``model.rotary_theta``),
  tied or untied head;
- ``gpt_neox`` (``GPTNeoXForCausalLM``, our default architecture): rotary over whole heads
  (``partial_rotary_factor`` 1), LayerNorm (a bias-free one exported with zero biases), GELU,
  sequential residuals (``use_parallel_residual: false``), no attention biases, ``dim_head = dim /
  heads``, no grouped-query attention;
- ``gpt2`` (``GPT2LMHeadModel``): learned absolute positions, LayerNorm, GELU (exact, not GPT-2's
  tanh approximation: ``activation_function: gelu``), zero attention biases, ``dim_head = dim /
  heads``.

The encoder-decoder has no ``transformers`` class that computes it (T5 and BART have no rotary
positions and no pre-norm rotary cross-attention): refused by name.

``export_hf(run, out)`` consolidates the newest complete checkpoint (any TP x PP x ZeRO layout,
verified first), writes ``config.json``, ``model.safetensors``, ``generation_config.json`` and,
when the run's tokenizer is a Hugging Face ``tokenizer.json``, the tokenizer files; then loads the
directory with ``AutoModelForCausalLM`` and reports the largest logit difference from ours on a
probe batch and whether the greedy continuations agree.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .xtransformers import NotExportable

ARCHITECTURES = {"llama": "LlamaForCausalLM", "gpt_neox": "GPTNeoXForCausalLM", "gpt2": "GPT2LMHeadModel"}


def _common_problems(m) -> list[str]:
    problems = []
    if m.kind == "encoder_decoder":
        problems.append(f"model.kind={m.kind}: no transformers class computes our encoder-decoder (T5 and BART "
                        "have no rotary positions); export it with --to x-transformers or --to fp32")
    elif m.kind == "encoder":
        problems.append(f"model.kind={m.kind}: no transformers masked-LM class computes our encoder (BERT and "
                        "RoBERTa are post-norm with a dense + GELU + norm prediction head, ModernBERT has that head "
                        "too); export it with --to x-transformers or --to fp32")
    return problems


def _llama_problems(m) -> list[str]:
    p = []
    if not m.use_rmsnorm:
        p.append("model.use_rmsnorm=false: Llama's norms are RMSNorm")
    if not (m.ff_glu and m.ff_swish):
        p.append("model.ff_glu / model.ff_swish: Llama's feed-forward is SwiGLU (both true)")
    return p


def _neox_problems(m) -> list[str]:
    p = []
    if m.use_rmsnorm:
        p.append("model.use_rmsnorm=true: GPT-NeoX's and GPT-2's norms are LayerNorm (Llama has RMSNorm)")
    if m.ff_glu or m.ff_swish:
        p.append("model.ff_glu / model.ff_swish: GPT-NeoX and GPT-2 have a plain GELU feed-forward")
    if m.head_dim * m.heads != m.dim:
        p.append(f"model.dim_head={m.head_dim}: GPT-NeoX and GPT-2 need dim / heads = {m.dim // m.heads}")
    if (m.kv_heads or m.heads) != m.heads:
        p.append(f"model.kv_heads={m.kv_heads}: GPT-NeoX and GPT-2 have no grouped-query attention")
    return p


def hf_architecture(cfg) -> str:
    """``llama``, ``gpt_neox`` or ``gpt2`` for this model, or ``NotExportable`` naming every option
    in the way of the closest class."""
    m = cfg.model
    problems = _common_problems(m)
    if problems:
        raise NotExportable("no transformers equivalent for: " + "; ".join(problems))
    if m.use_rmsnorm or m.ff_glu:
        arch, problems = "llama", _llama_problems(m)
        if not m.rotary_pos_emb:
            problems.append("model.rotary_pos_emb=false: Llama's positions are rotary")
    else:
        arch, problems = ("gpt_neox" if m.rotary_pos_emb else "gpt2"), _neox_problems(m)
    if problems:
        raise NotExportable(f"no transformers equivalent ({ARCHITECTURES[arch]}, the closest) for: "
                            + "; ".join(problems))
    return arch


def hf_config(cfg, arch: str, *, num_tokens: int, eos_id: int | None, pad_id: int | None):
    import transformers

    m = cfg.model
    inner = int(m.dim * m.ff_mult)
    ids = {"bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": pad_id}
    if arch == "llama":
        return transformers.LlamaConfig(
            vocab_size=num_tokens, hidden_size=m.dim, intermediate_size=inner, num_hidden_layers=m.depth,
            num_attention_heads=m.heads, num_key_value_heads=m.kv_heads or m.heads, head_dim=m.head_dim,
            hidden_act="silu", max_position_embeddings=cfg.data.seq_len, rms_norm_eps=m.norm_eps,
            tie_word_embeddings=m.tie_embedding, attention_bias=False, mlp_bias=m.ff_bias, attention_dropout=0.0,
            rope_parameters={"rope_type": "default", "rope_theta": m.rotary_theta}, **ids)
    if arch == "gpt_neox":
        return transformers.GPTNeoXConfig(
            vocab_size=num_tokens, hidden_size=m.dim, intermediate_size=inner, num_hidden_layers=m.depth,
            num_attention_heads=m.heads, hidden_act="gelu", max_position_embeddings=cfg.data.seq_len,
            layer_norm_eps=m.norm_eps, use_parallel_residual=False, attention_bias=False,
            tie_word_embeddings=m.tie_embedding, attention_dropout=0.0, hidden_dropout=0.0,
            rope_parameters={"rope_type": "default", "rope_theta": m.rotary_theta, "partial_rotary_factor": 1.0},
            **ids)
    return transformers.GPT2Config(
        vocab_size=num_tokens, n_positions=cfg.data.seq_len, n_embd=m.dim, n_layer=m.depth, n_head=m.heads,
        n_inner=inner, activation_function="gelu", layer_norm_epsilon=m.norm_eps, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, tie_word_embeddings=m.tie_embedding, **ids)


def _bias(ours: dict, key: str, dim: int) -> torch.Tensor:
    """A feed-forward bias, zeros where the model has none (the same function)."""
    return ours.get(key, torch.zeros(dim))


def _norm(ours: dict, key: str, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A LayerNorm's weight and bias (zeros for a bias-free one: the same function)."""
    w = ours[f"{key}.weight"]
    return w, ours.get(f"{key}.bias", torch.zeros(dim, dtype=w.dtype))


def hf_state_dict(ours: dict, cfg, arch: str) -> dict[str, torch.Tensor]:
    """Our consolidated (TP=1) decoder LM state dict under the class's names."""
    m, out = cfg.model, {}
    d, h, dh, inner = m.dim, m.heads, m.head_dim, int(m.dim * m.ff_mult)
    head = ours["net.token_emb.weight"] if m.tie_embedding else ours["net.to_logits.weight"]
    for i in range(m.depth):
        p = f"net.attn_layers.layers.{i}."
        q, k, v, o = (ours[p + f"attn.{n}.weight"] for n in ("to_q", "to_k", "to_v", "to_out"))
        if arch == "llama":
            t = f"model.layers.{i}."
            out |= {t + "self_attn.q_proj.weight": q, t + "self_attn.k_proj.weight": k,
                    t + "self_attn.v_proj.weight": v, t + "self_attn.o_proj.weight": o,
                    t + "input_layernorm.weight": ours[p + "attn_norm.weight"],
                    t + "post_attention_layernorm.weight": ours[p + "ff_norm.weight"]}
            for theirs, mine in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
                out[t + f"mlp.{theirs}.weight"] = ours[p + f"ff.{mine}.weight"]
                if m.ff_bias:
                    out[t + f"mlp.{theirs}.bias"] = ours[p + f"ff.{mine}.bias"]
            continue
        ln1, ln2 = _norm(ours, p + "attn_norm", d), _norm(ours, p + "ff_norm", d)
        if arch == "gpt_neox":
            t = f"gpt_neox.layers.{i}."
            qkv = torch.stack([x.view(h, dh, d) for x in (q, k, v)], dim=1).reshape(3 * h * dh, d)  # per head: q k v
            out |= {t + "attention.query_key_value.weight": qkv, t + "attention.dense.weight": o,
                    t + "input_layernorm.weight": ln1[0], t + "input_layernorm.bias": ln1[1],
                    t + "post_attention_layernorm.weight": ln2[0], t + "post_attention_layernorm.bias": ln2[1],
                    t + "mlp.dense_h_to_4h.weight": ours[p + "ff.up.weight"],
                    t + "mlp.dense_h_to_4h.bias": _bias(ours, p + "ff.up.bias", inner),
                    t + "mlp.dense_4h_to_h.weight": ours[p + "ff.down.weight"],
                    t + "mlp.dense_4h_to_h.bias": _bias(ours, p + "ff.down.bias", d)}
            continue
        t = f"transformer.h.{i}."  # GPT-2: Conv1D weights are [in, out]
        out |= {t + "ln_1.weight": ln1[0], t + "ln_1.bias": ln1[1], t + "ln_2.weight": ln2[0], t + "ln_2.bias": ln2[1],
                t + "attn.c_attn.weight": torch.cat([q, k, v]).t(), t + "attn.c_attn.bias": torch.zeros(3 * d),
                t + "attn.c_proj.weight": o.t(), t + "attn.c_proj.bias": torch.zeros(d),
                t + "mlp.c_fc.weight": ours[p + "ff.up.weight"].t(),
                t + "mlp.c_fc.bias": _bias(ours, p + "ff.up.bias", inner),
                t + "mlp.c_proj.weight": ours[p + "ff.down.weight"].t(),
                t + "mlp.c_proj.bias": _bias(ours, p + "ff.down.bias", d)}
    final = _norm(ours, "net.attn_layers.final_norm", d)
    if arch == "llama":
        out |= {"model.embed_tokens.weight": ours["net.token_emb.weight"], "model.norm.weight": final[0],
                "lm_head.weight": head}
    elif arch == "gpt_neox":
        out |= {"gpt_neox.embed_in.weight": ours["net.token_emb.weight"], "gpt_neox.final_layer_norm.weight": final[0],
                "gpt_neox.final_layer_norm.bias": final[1], "lm_head.weight": head}
    else:
        out |= {"transformer.wte.weight": ours["net.token_emb.weight"], "transformer.wpe.weight":
                ours["net.pos_emb.emb.weight"], "transformer.ln_f.weight": final[0], "transformer.ln_f.bias": final[1],
                "lm_head.weight": head}
    if m.tie_embedding:  # tied in config.json: one tensor in the file
        out.pop("lm_head.weight")
    return {k: v.contiguous() for k, v in out.items()}


def export_hf(path, out, *, dtype: torch.dtype = torch.float32) -> dict:
    """The Hugging Face directory ``out`` of a run's newest complete checkpoint (see the module doc)."""
    try:
        from safetensors.torch import save_file
        from transformers import GenerationConfig
    except ImportError as e:
        raise ValueError(f"--to hf needs transformers and safetensors: pip install 'xft_dist[hf]' ({e})") from None
    from .convert import _read, consolidate, resolve_checkpoint

    ckpt = resolve_checkpoint(path)
    cfg, shared = _read(ckpt)
    arch = hf_architecture(cfg)  # refuse before any heavy work
    data = consolidate(ckpt)
    tok = shared.get("tokenizer") or {}
    eos = tok.get("eos_id")
    config = hf_config(cfg, arch, num_tokens=shared["num_tokens"], eos_id=eos, pad_id=shared["pad_id"])
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config.architectures = [ARCHITECTURES[arch]]
    config.torch_dtype = str(dtype).removeprefix("torch.")
    config.save_pretrained(tmp)
    GenerationConfig(bos_token_id=eos, eos_token_id=eos, pad_token_id=shared["pad_id"]).save_pretrained(tmp)
    weights = {k: v.to(dtype) for k, v in hf_state_dict(data["model"], cfg, arch).items()}
    save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    tokenizer_files = _write_tokenizer(tok, cfg, tmp)
    (tmp / "xft_dist_export.json").write_text(json.dumps({"checkpoint": str(ckpt), "step": data["step"],
                                                          "config": data["config"]}, indent=1))
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)
    check = check_hf(out, ckpt)
    return {"checkpoint": str(ckpt), "step": data["step"], "class": ARCHITECTURES[arch],
            "tokenizer": tokenizer_files, **check}


def _write_tokenizer(tok: dict, cfg, out: Path) -> list[str]:
    """The run's ``tokenizer.json`` (and a ``tokenizer_config.json``) when it is a Hugging Face one
    that the run names (``logging.sample_tokenizer``, checked against the shards' identity)."""
    if tok.get("kind") != "hf" or not cfg.logging.sample_tokenizer:
        return []
    from ..data.tokenizer import tokenizer_from_identity

    tokenizer_from_identity(tok, cfg.logging.sample_tokenizer, what="logging.sample_tokenizer")  # same file
    shutil.copy(cfg.logging.sample_tokenizer, out / "tokenizer.json")
    special = {k: tok.get(k) for k in ("eos_id", "pad_id")}
    (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                           "xft_dist_special_ids": special}, indent=1))
    return ["tokenizer.json", "tokenizer_config.json"]


@torch.no_grad()
def check_hf(directory: Path, ckpt: Path, *, seed: int = 0) -> dict:
    """Our model and ``AutoModelForCausalLM.from_pretrained(directory)`` on a probe batch: the largest
    logit difference and whether greedy continuations of up to 8 tokens agree (``greedy_agrees``)."""
    from transformers import AutoModelForCausalLM

    from .convert import load_checkpoint_model

    ours, cfg, shared, _ = load_checkpoint_model(ckpt)
    theirs = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(seed)
    n = min(16, cfg.data.seq_len // 2)
    ids = torch.randint(0, shared["num_tokens"], (2, n), generator=g)
    diff = (ours.net(ids, gather_logits=True).float() - theirs(ids).logits.float()).abs().max().item()
    new = min(8, cfg.data.seq_len - n)  # learned positions end at the run's sequence length
    return {"max_abs_diff": diff, "greedy_equal": greedy_agrees(ours, theirs, ids, new=new)}


def greedy_agrees(ours, theirs, ids: torch.Tensor, *, new: int = 8, tie: float = 1e-4) -> bool:
    """Whether greedy decoding (a full forward per token, on both sides) gives the same tokens: at each
    step ``theirs``' pick is our argmax up to logits within ``tie`` of the maximum (a random model's
    logits lie close together; cached decoding is held to the full forward by our own tests)."""
    seq = ids
    for _ in range(new):
        mine = ours.net(seq, gather_logits=True)[:, -1].float()
        pick = theirs(seq).logits[:, -1].argmax(-1)
        if not bool((mine.max(-1).values - mine.gather(-1, pick[:, None]).squeeze(-1) <= tie).all()):
            return False
        seq = torch.cat([seq, pick[:, None]], dim=1)
    return True
