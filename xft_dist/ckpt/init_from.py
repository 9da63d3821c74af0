"""``model.init_from``: a run that starts from existing weights.

The source is a Hugging Face directory (``config.json`` + ``model.safetensors`` or
``pytorch_model.bin``: Llama, GPT-NeoX, GPT-2, and ``tools/export.py --to hf`` output) or a
``tools/export.py --to fp32`` file. ``resolve_init_from(cfg)`` reads its architecture: each model key
the run's config leaves unset takes the source's value, a key set to another value is refused by
name, and what our model cannot express (attention biases, a parallel residual, partial rotary,
GPT-2's tanh GELU, scaled rotary) is refused naming the source's file and key.
``load_init_weights(model, ...)`` then copies the source's weights into a freshly built model at any
TP size (each rank its slice; a vocabulary padded as the model pads it), before DeepSpeed wraps it
(any ZeRO stage). The step starts at 0 with a fresh optimizer; a run that has its own checkpoint
resumes from that instead.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import ConfigError

ARCH_KEYS = ("kind", "num_tokens", "dim", "depth", "heads", "dim_head", "kv_heads", "ff_mult", "ff_glu", "ff_swish",
             "ff_bias", "use_rmsnorm", "norm_bias", "norm_eps", "rotary_pos_emb", "rotary_theta", "tie_embedding",
             "enc_depth", "enc_dim")


def _bad(source: str, key: str, why: str) -> ConfigError:
    return ConfigError(f"model.init_from: {source}: {key}: {why}")


def _rope_theta(c: dict, src: str) -> float:
    rope = c.get("rope_parameters")
    if rope is None:
        if c.get("rope_scaling"):
            raise _bad(src, "rope_scaling", f"{c['rope_scaling']}: only unscaled rotary is supported")
        return float(c.get("rope_theta", 10000.0))
    if (rope.get("rope_type") or "default") != "default":
        raise _bad(src, "rope_parameters.rope_type", f"{rope.get('rope_type')!r}: only unscaled rotary is supported")
    return float(rope.get("rope_theta", 10000.0))


def _ff_mult(inner: int, dim: int, src: str, key: str) -> float:
    mult = inner / dim
    if int(dim * mult) != inner:
        raise _bad(src, key, f"{inner} is not int(hidden_size x ff_mult) for any ff_mult")
    return mult


def hf_model_keys(c: dict, src: str) -> dict:
    """Our model keys for a Hugging Face ``config.json`` (as a dict)."""
    kind = c.get("model_type")
    common = {"kind": "decoder", "num_tokens": c["vocab_size"], "tie_embedding": bool(c.get("tie_word_embeddings"))}
    if kind == "llama":
        if c.get("attention_bias"):
            raise _bad(src, "attention_bias", "true: xft_dist attention projections have no bias")
        if c.get("hidden_act", "silu") != "silu":
            raise _bad(src, "hidden_act", f"{c['hidden_act']!r}: Llama-style models here are SwiGLU (silu)")
        d, heads = c["hidden_size"], c["num_attention_heads"]
        return {**common, "dim": d, "depth": c["num_hidden_layers"], "heads": heads,
                "kv_heads": c.get("num_key_value_heads") or heads, "dim_head": c.get("head_dim") or d // heads,
                "ff_mult": _ff_mult(c["intermediate_size"], d, src, "intermediate_size"), "ff_glu": True,
                "ff_swish": True, "ff_bias": bool(c.get("mlp_bias", False)), "use_rmsnorm": True,
                "norm_eps": c.get("rms_norm_eps", 1e-6), "rotary_pos_emb": True, "rotary_theta": _rope_theta(c, src)}
    if kind == "gpt_neox":
        for key, want in (("use_parallel_residual", False), ("attention_bias", False)):
            if bool(c.get(key, True)) != want:
                raise _bad(src, key, f"{c.get(key, True)}: xft_dist blocks have sequential residuals and no "
                                     "attention biases (false)")
        rope = c.get("rope_parameters") or {}
        partial = rope.get("partial_rotary_factor", c.get("rotary_pct", 1.0))
        if partial != 1.0:
            raise _bad(src, "rope_parameters.partial_rotary_factor", f"{partial}: xft_dist rotates whole heads (1.0)")
        if c.get("hidden_act", "gelu") != "gelu":
            raise _bad(src, "hidden_act", f"{c['hidden_act']!r}: xft_dist's GELU is the exact one ('gelu')")
        d = c["hidden_size"]
        return {**common, "dim": d, "depth": c["num_hidden_layers"], "heads": c["num_attention_heads"],
                "kv_heads": None, "dim_head": d // c["num_attention_heads"],
                "ff_mult": _ff_mult(c["intermediate_size"], d, src, "intermediate_size"), "ff_glu": False,
                "ff_swish": False, "ff_bias": True, "use_rmsnorm": False, "norm_bias": True,
                "norm_eps": c.get("layer_norm_eps", 1e-5), "rotary_pos_emb": True, "rotary_theta": _rope_theta(c, src)}
    if kind == "gpt2":
        if c.get("activation_function", "gelu_new") != "gelu":
            raise _bad(src, "activation_function", f"{c.get('activation_function', 'gelu_new')!r}: xft_dist's "
                                                   "GELU is the exact one ('gelu'), not GPT-2's tanh approximation")
        d = c["n_embd"]
        return {**common, "dim": d, "depth": c["n_layer"], "heads": c["n_head"], "kv_heads": None,
                "dim_head": d // c["n_head"], "ff_mult": _ff_mult(c.get("n_inner") or 4 * d, d, src, "n_inner"),
                "ff_glu": False, "ff_swish": False, "ff_bias": True, "use_rmsnorm": False, "norm_bias": True,
                "norm_eps": c.get("layer_norm_epsilon", 1e-5), "rotary_pos_emb": False,
                "tie_embedding": bool(c.get("tie_word_embeddings", True))}
    raise _bad(src, "model_type", f"{kind!r} ({', '.join(c.get('architectures') or [])}): expected a Llama, GPT-NeoX "
                                  "or GPT-2 causal LM")


def source_model_keys(path: str) -> tuple[dict, str]:
    """``(model keys, what was read)`` of an ``init_from`` source."""
    p = Path(path)
    if p.is_dir():
        cfg_file = p / "config.json"
        if not cfg_file.is_file():
            raise ConfigError(f"model.init_from={path!r}: no config.json in that directory (a Hugging Face "
                              "save_pretrained directory, or a tools/export.py --to fp32 file, is expected)")
        return hf_model_keys(json.loads(cfg_file.read_text()), str(cfg_file)), str(cfg_file)
    if not p.is_file():
        raise ConfigError(f"model.init_from={path!r}: no such file or directory")
    import yaml

    from .convert import _read_export

    try:
        data = _read_export(p)
    except Exception as e:  # noqa: BLE001 - any unreadable file: say which
        raise ConfigError(f"model.init_from={path!r}: not a Hugging Face directory or an xft_dist export "
                          f"({e})") from None
    model = (yaml.safe_load(data["config"]) or {}).get("model", {})
    keys = {k: model[k] for k in ARCH_KEYS if k in model}
    keys["num_tokens"] = int(data["num_tokens"])
    return keys, str(p)


def resolve_init_from(cfg, checkpoint: Path | None = None):
    """``cfg`` with the source's architecture filled in; a conflicting key refused by name. A run
    that resumes (``checkpoint``) takes the architecture its checkpoint was written with and never
    reads the source again (it may be gone)."""
    m = cfg.model
    if m.init_from is None:
        return cfg
    if checkpoint is not None:
        import yaml

        saved = (yaml.safe_load((Path(checkpoint) / "config.yaml").read_text()) or {}).get("model", {})
        keys, src = {k: saved[k] for k in ARCH_KEYS if k in saved}, str(Path(checkpoint) / "config.yaml")
    else:
        keys, src = source_model_keys(m.init_from)
    set_by_run = m.model_fields_set
    update, conflicts = {}, []
    for key, value in keys.items():
        if key in set_by_run and getattr(m, key) != value:
            conflicts.append(f"model.{key}={getattr(m, key)!r} in the run's config, {value!r} in {src}")
        elif key not in set_by_run:
            update[key] = value
    if conflicts:
        raise ConfigError("model.init_from: the run's config disagrees with the source's architecture: "
                          + "; ".join(conflicts) + " (leave those keys unset to take the source's)")
    from ..config.load import validate

    data = cfg.model_dump(mode="json")
    data["model"].update(update)
    return validate(data, f"model.init_from={m.init_from!r}")


def _hf_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face directory (safetensors, sharded or not, or pytorch_model.bin)."""
    files = sorted(directory.glob("*.safetensors"))
    if files:
        from safetensors.torch import load_file

        out = {}
        for f in files:
            out.update(load_file(str(f)))
        return out
    binary = directory / "pytorch_model.bin"
    if binary.is_file():
        return torch.load(binary, map_location="cpu", weights_only=True)
    raise ConfigError(f"model.init_from={str(directory)!r}: no *.safetensors or pytorch_model.bin weights")


def _take(theirs: dict, key: str, src: str) -> torch.Tensor:
    if key not in theirs:
        raise _bad(src, key, "missing from the weights (config.json and the weights disagree?)")
    return theirs[key]


def _zero_bias(theirs: dict, key: str, src: str) -> None:
    t = theirs.get(key)
    if t is not None and not t.is_meta and bool(t.ne(0).any()):
        raise _bad(src, key, "a nonzero attention bias: xft_dist attention projections have none")


def hf_to_ours(theirs: dict, m, model_type: str, src: str) -> dict[str, torch.Tensor]:
    """A Hugging Face state dict under our (TP=1) names: the inverse of ``hf.hf_state_dict``."""
    theirs = {("transformer." + k if model_type == "gpt2" and k.split(".")[0] in ("h", "wte", "wpe", "ln_f") else k): v
              for k, v in theirs.items()}
    take = lambda key: _take(theirs, key, src)  # noqa: E731
    out, d, h, dh = {}, m.dim, m.heads, m.head_dim
    for i in range(m.depth):
        p = f"net.attn_layers.layers.{i}."
        if model_type == "llama":
            t = f"model.layers.{i}."
            for mine, hf in (("to_q", "q_proj"), ("to_k", "k_proj"), ("to_v", "v_proj"), ("to_out", "o_proj")):
                out[p + f"attn.{mine}.weight"] = take(t + f"self_attn.{hf}.weight")
            out[p + "attn_norm.weight"] = take(t + "input_layernorm.weight")
            out[p + "ff_norm.weight"] = take(t + "post_attention_layernorm.weight")
            for mine, hf in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
                out[p + f"ff.{mine}.weight"] = take(t + f"mlp.{hf}.weight")
                if m.ff_bias:
                    out[p + f"ff.{mine}.bias"] = take(t + f"mlp.{hf}.bias")
            continue
        if model_type == "gpt_neox":
            t = f"gpt_neox.layers.{i}."
            qkv = take(t + "attention.query_key_value.weight")
            if qkv.shape != (3 * h * dh, d):
                raise _bad(src, t + "attention.query_key_value.weight", f"shape {tuple(qkv.shape)}, the config "
                                                                        f"says {(3 * h * dh, d)}")
            q, k, v = qkv.view(h, 3, dh, d).unbind(1)
            names = {"attn_norm": "input_layernorm", "ff_norm": "post_attention_layernorm",
                     "ff.up": "mlp.dense_h_to_4h", "ff.down": "mlp.dense_4h_to_h"}
            out |= {p + "attn.to_q.weight": q.reshape(h * dh, d), p + "attn.to_k.weight": k.reshape(h * dh, d),
                    p + "attn.to_v.weight": v.reshape(h * dh, d),
                    p + "attn.to_out.weight": take(t + "attention.dense.weight")}
        else:
            t = f"transformer.h.{i}."
            for key in ("attn.c_attn.bias", "attn.c_proj.bias"):
                _zero_bias(theirs, t + key, src)
            q, k, v = take(t + "attn.c_attn.weight").t().split(d)
            out |= {p + "attn.to_q.weight": q, p + "attn.to_k.weight": k, p + "attn.to_v.weight": v,
                    p + "attn.to_out.weight": take(t + "attn.c_proj.weight").t()}
            names = {"attn_norm": "ln_1", "ff_norm": "ln_2", "ff.up": "mlp.c_fc", "ff.down": "mlp.c_proj"}
        for mine, hf in names.items():
            for part in ("weight", "bias"):
                w = take(t + f"{hf}.{part}")
                out[p + f"{mine}.{part}"] = w.t() if model_type == "gpt2" and part == "weight" and "ff" in mine else w
    final = {"llama": "model.norm", "gpt_neox": "gpt_neox.final_layer_norm", "gpt2": "transformer.ln_f"}[model_type]
    emb = {"llama": "model.embed_tokens", "gpt_neox": "gpt_neox.embed_in", "gpt2": "transformer.wte"}[model_type]
    out["net.attn_layers.final_norm.weight"] = take(final + ".weight")
    if model_type != "llama":
        out["net.attn_layers.final_norm.bias"] = take(final + ".bias")
    out["net.token_emb.weight"] = take(emb + ".weight")
    if model_type == "gpt2":
        out["net.pos_emb.emb.weight"] = take("transformer.wpe.weight")
    if not m.tie_embedding:
        head = "embed_out.weight" if "embed_out.weight" in theirs else "lm_head.weight"
        out["net.to_logits.weight"] = take(head)
    return out


def source_state_dict(cfg) -> tuple[dict[str, torch.Tensor], str]:
    """The ``init_from`` source's weights under our (TP=1) names, and what was read."""
    p = Path(cfg.model.init_from)
    if p.is_dir():
        model_type = json.loads((p / "config.json").read_text()).get("model_type")
        return hf_to_ours(_hf_tensors(p), cfg.model, model_type, str(p)), str(p)
    from .convert import _read_export

    return _read_export(p)["model"], str(p)


@torch.no_grad()
def load_init_weights(model: torch.nn.Module, cfg, groups) -> None:
    """Copy the ``init_from`` weights into ``model`` (built at this rank's TP size): each parameter
    takes its slice of the full tensor (a vocabulary padded with zero rows first)."""
    from ..nn.sharding import active_tp_split

    full, src = source_state_dict(cfg)
    for name, p in model.named_parameters():
        if name not in full:
            raise _bad(src, name, "no such weights in the source (another architecture?)")
        t = full[name].to(p.dtype)
        kind, dim = active_tp_split(p)
        if kind == "vocab" and t.shape[0] < p.shape[0] * groups.tp_size:
            t = torch.cat([t, t.new_zeros(p.shape[0] * groups.tp_size - t.shape[0], *t.shape[1:])])
        if name == "net.pos_emb.emb.weight" and t.shape[0] >= p.shape[0]:
            t = t[: p.shape[0]]  # learned positions: the run's sequence length of them
        if dim is not None and kind != "replicated":
            local = p.shape[dim]
            if t.shape[dim] != local * groups.tp_size:
                raise _bad(src, name, f"shape {tuple(full[name].shape)} does not fit the model's "
                                      f"{tuple(p.shape)} x TP {groups.tp_size} along dim {dim}")
            t = t.narrow(dim, groups.tp_rank * local, local)
        if t.shape != p.shape:
            raise _bad(src, name, f"shape {tuple(full[name].shape)}, the model's is {tuple(p.shape)} "
                                  "(config.json and the weights disagree?)")
        p.copy_(t)


def _hf_shapes(directory: Path) -> dict[str, torch.Tensor]:
    """A Hugging Face directory's tensors as meta tensors (their shapes and dtypes, nothing read)."""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        return {k: v.to("meta") for k, v in _hf_tensors(directory).items()}
    from safetensors import safe_open

    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for key in sf.keys():
                out[key] = torch.empty(sf.get_slice(key).get_shape(), device="meta")
    return out


def check_init_shapes(cfg, num_tokens: int) -> None:
    """Before any process group exists: every weight the run's model needs is in the source, with
    the shape config.json implies (a Hugging Face directory; our exports are consistent by
    construction). Raises ``ConfigError`` naming the file and tensor."""
    p = Path(cfg.model.init_from)
    if not p.is_dir():
        return
    from ..models.factory import build_model
    from ..parallel import ParallelGroups

    model_type = json.loads((p / "config.json").read_text()).get("model_type")
    full = hf_to_ours(_hf_shapes(p), cfg.model, model_type, str(p))
    at_tp1 = cfg.model_copy(update={"parallel": cfg.parallel.model_copy(update={"tp": 1, "pp": 1})})
    with torch.device("meta"):
        model = build_model(at_tp1, ParallelGroups.single(), None, num_tokens=num_tokens, pad_id=0)
    for name, param in model.named_parameters():
        if name not in full:
            raise _bad(str(p), name, "no such weights in the source (another architecture?)")
        got, want = tuple(full[name].shape), tuple(param.shape)
        if name in ("net.token_emb.weight", "net.to_logits.weight"):
            want = (num_tokens, *want[1:])  # the model pads the vocabulary itself
        if name == "net.pos_emb.emb.weight" and got[0] >= want[0]:
            got = want
        if got != want:
            raise _bad(str(p), name, f"shape {got}, but config.json makes the model's {want} "
                                     "(config.json and the weights disagree)")
