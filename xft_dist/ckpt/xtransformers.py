"""Export to x-transformers: its parameter names, its constructor call, the same logits.

``xtransformers_spec(cfg, ...)`` gives the constructor call of the x-transformers model that computes
what our model computes, as JSON-able data: ``{"class": "TransformerWrapper", "kwargs": {...,
"attn_layers": {"class": "Decoder", "kwargs": {...}}}}`` for the decoder LM (``"Encoder"`` for the
encoder-only masked LM: its logits over every position), ``{"class":
"XTransformer", "kwargs": {...}}`` for the encoder-decoder. x-transformers' ``XTransformer`` gives
both towers one width; where our encoder is wider than the decoder (``model.enc_dim``), the spec
also holds ``"encoder"``: the encoder ``TransformerWrapper`` (token embedding of the decoder's width
projected up, as ours) that replaces ``XTransformer.encoder``, and the token embedding is re-tied.
``build_xtransformers(spec)`` builds the model from such a spec (or from the ``.json`` file).

``xtransformers_state_dict(ours, cfg, ...)`` renames and reshapes a consolidated (TP=1) state dict
of ours into the state dict that model loads with ``strict=True``:

- layers: x-transformers numbers sublayers, ``layers.{j}.0.0`` the pre-norm (``g`` for RMSNorm,
  ``gamma`` for LayerNorm) and ``layers.{j}.1`` the attention or feed-forward, ``j`` running over
  (self-attention, [cross-attention,] feed-forward) per block;
- norms: x-transformers' default ``norm_add_unit_offset`` stores each norm's scale minus one;
- rotary: ours rotates the two halves of each head's rotary features (rotate-half), x-transformers
  adjacent pairs; the rows of ``to_q`` / ``to_k`` are permuted within each head to match (the
  scores are unchanged: queries and keys get the same permutation);
- grouped-query attention: x-transformers pairs query head ``i`` with key/value head ``i %
  kv_heads``, ours with ``i // (heads / kv_heads)``: query heads (rows of ``to_q``, columns of
  ``to_out``) are reordered;
- gated feed-forward: x-transformers' ``proj`` is our ``up`` and ``gate`` concatenated;
- learned absolute positions: x-transformers scales them by ``dim ** -0.5``, so they are exported
  times ``sqrt(dim)``;
- a tied head: x-transformers scales its logits by ``dim ** -0.5`` unless ``tie_embedding_scale``
  says otherwise; the spec sets it to 1;
- the encoder-decoder's decoder head in ``XTransformer`` is a separate ``to_logits``: it gets a copy
  of the shared embedding.

What x-transformers cannot express is refused by ``unsupported_options`` with the config key named:
LayerNorm with a bias (``model.norm_bias``), and an epsilon other than x-transformers' (RMSNorm has
none: ``model.norm_eps: 0``; LayerNorm 1e-5).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

XT_LAYERNORM_EPS = 1e-5  # torch's nn.LayerNorm default, which x-transformers' LayerNorm uses


class NotExportable(ValueError):
    """The model has an option x-transformers has no equivalent of."""


def unsupported_options(cfg) -> list[str]:
    """Each option of ``cfg.model`` that x-transformers cannot reproduce, as ``key=value: why``."""
    m, problems = cfg.model, []
    if m.rotary_pos_emb and m.rotary_theta != 10000.0:
        problems.append(f"model.rotary_theta={m.rotary_theta:g}: x-transformers' rotary base is 10000")
    if m.use_rmsnorm and m.norm_eps != 0:
        problems.append(f"model.norm_eps={m.norm_eps}: x-transformers' RMSNorm has no epsilon "
                        "(a model trained with model.norm_eps: 0 exports exactly)")
    if not m.use_rmsnorm:
        if m.norm_bias:
            problems.append("model.norm_bias=true: x-transformers' LayerNorm has no bias (train with "
                            "model.norm_bias: false, or model.use_rmsnorm: true and model.norm_eps: 0)")
        if m.norm_eps != XT_LAYERNORM_EPS:
            problems.append(f"model.norm_eps={m.norm_eps}: x-transformers' LayerNorm uses {XT_LAYERNORM_EPS}")
    return problems


def _layer_kwargs(m, dim: int, depth: int, *, cross: bool = False) -> dict:
    kw = {"dim": dim, "depth": depth, "heads": m.heads, "attn_dim_head": m.head_dim, "ff_mult": m.ff_mult,
          "ff_glu": m.ff_glu, "ff_swish": m.ff_swish, "use_rmsnorm": m.use_rmsnorm,
          "attn_dropout": m.attn_dropout, "ff_dropout": m.ff_dropout, "rotary_pos_emb": m.rotary_pos_emb}
    if m.kv_heads and m.kv_heads != m.heads:
        kw["attn_kv_heads"] = m.kv_heads
        if cross:  # our cross-attention has every head for keys and values; x-transformers' follows attn_
            kw["cross_attn_kv_heads"] = m.heads
    if m.rotary_pos_emb:
        kw["rotary_emb_dim"] = m.head_dim  # ours rotates whole heads; x-transformers' default is half
    if not m.ff_bias:
        kw["ff_no_bias"] = True
    return kw


def xtransformers_spec(cfg, *, num_tokens: int, pad_id: int) -> dict:
    """The x-transformers constructor call (JSON-able) of the model ``cfg`` describes."""
    problems = unsupported_options(cfg)
    if problems:
        raise NotExportable("no x-transformers equivalent for: " + "; ".join(problems))
    m, d = cfg.model, cfg.data
    abs_pos = not m.rotary_pos_emb
    if m.kind in ("decoder", "encoder"):
        return {"class": "TransformerWrapper", "kwargs": {
            "num_tokens": num_tokens, "max_seq_len": d.seq_len, "tie_embedding": m.tie_embedding,
            **({"tie_embedding_scale": 1.0} if m.tie_embedding else {}), "use_abs_pos_emb": abs_pos,
            "attn_layers": {"class": m.kind.capitalize(), "kwargs": _layer_kwargs(m, m.dim, m.depth)}}}
    enc_dim = m.enc_dim or m.dim
    enc_layers = _layer_kwargs(m, m.dim, m.enc_depth)
    dec_layers = _layer_kwargs(m, m.dim, m.depth, cross=True)
    kwargs = {"dim": m.dim, "tie_token_emb": True, "pad_value": pad_id, "ignore_index": pad_id,
              "enc_num_tokens": num_tokens, "enc_max_seq_len": d.enc_len, "enc_use_abs_pos_emb": abs_pos,
              "dec_num_tokens": num_tokens, "dec_max_seq_len": d.seq_len + 1, "dec_use_abs_pos_emb": abs_pos}
    kwargs |= {f"enc_{k}": v for k, v in enc_layers.items() if k != "dim"}
    kwargs |= {f"dec_{k}": v for k, v in dec_layers.items() if k != "dim"}
    spec = {"class": "XTransformer", "kwargs": kwargs}
    if enc_dim != m.dim:
        kwargs["dec_cross_attn_dim_context"] = enc_dim
        spec["encoder"] = {"class": "TransformerWrapper", "kwargs": {
            "num_tokens": num_tokens, "max_seq_len": d.enc_len, "emb_dim": m.dim, "return_only_embed": True,
            "use_abs_pos_emb": abs_pos,
            "attn_layers": {"class": "Encoder", "kwargs": _layer_kwargs(m, enc_dim, m.enc_depth)}}}
    return spec


def build_xtransformers(spec: dict | str | Path) -> torch.nn.Module:
    """The x-transformers model of a spec (or of the ``.json`` file ``tools/export.py`` wrote)."""
    try:
        import x_transformers
    except ImportError as e:  # a dev dependency: the export itself does not need it
        raise ImportError("building the exported model needs x-transformers: pip install x-transformers") from e
    if not isinstance(spec, dict):
        spec = json.loads(Path(spec).read_text())

    def build(node):
        if isinstance(node, dict) and "class" in node:
            kwargs = {k: build(v) for k, v in node["kwargs"].items()}
            return getattr(x_transformers, node["class"])(**kwargs)
        return node

    model = build({"class": spec["class"], "kwargs": spec["kwargs"]})
    if "encoder" in spec:  # a wider encoder than XTransformer's one width
        model.encoder = build(spec["encoder"])
        if spec["kwargs"].get("tie_token_emb"):
            model.decoder.net.token_emb = model.encoder.token_emb
    return model


def _rotary_rows(w: torch.Tensor, heads: int, dim_head: int, rot: int) -> torch.Tensor:
    """Rows of a q / k projection ``[heads * dim_head, in]`` reordered from rotate-half to
    x-transformers' adjacent pairs within each head's first ``rot`` features."""
    half = rot // 2
    within = torch.stack([torch.arange(half), torch.arange(half) + half], dim=-1).flatten()
    order = torch.cat([within, torch.arange(rot, dim_head)])
    idx = (torch.arange(heads)[:, None] * dim_head + order[None]).flatten()
    return w[idx]


def _head_order(heads: int, kv_heads: int, dim_head: int) -> torch.Tensor:
    """Feature indices of ours in x-transformers' query-head order. Ours gives query head ``i`` the
    key/value head ``i // (heads / kv_heads)``, x-transformers ``i % kv_heads``: x-transformers'
    head ``r * kv_heads + g`` is our head ``g * (heads / kv_heads) + r``."""
    group = heads // kv_heads
    ours = torch.tensor([g * group + r for r in range(group) for g in range(kv_heads)])
    return (ours[:, None] * dim_head + torch.arange(dim_head)[None]).flatten()


def _stack(ours: dict, src: str, dst: str, m, *, depth: int, cross: bool) -> dict:
    """x-transformers names of one ``AttentionLayers`` (ours under ``src``, theirs under ``dst``)."""
    out, g = {}, "g" if m.use_rmsnorm else "gamma"
    per = 3 if cross else 2
    rot = m.head_dim if m.rotary_pos_emb else 0
    kv = m.kv_heads or m.heads
    for i in range(depth):
        b, j = f"{src}layers.{i}.", per * i
        subs = [("attn", "attn_norm", True)] + ([("cross_attn", "cross_norm", False)] if cross else [])
        for k, (attn, norm, is_self) in enumerate(subs):
            t = f"{dst}layers.{j + k}."
            out[f"{t}0.0.{g}"] = ours[f"{b}{norm}.weight"] - 1
            q, key = ours[f"{b}{attn}.to_q.weight"], ours[f"{b}{attn}.to_k.weight"]
            o = ours[f"{b}{attn}.to_out.weight"]
            if is_self and rot:
                q, key = _rotary_rows(q, m.heads, m.head_dim, rot), _rotary_rows(key, kv, m.head_dim, rot)
            if is_self and kv != m.heads:  # grouped-query self-attention (ours: cross-attention has every head)
                order = _head_order(m.heads, kv, m.head_dim)
                q, o = q[order], o[:, order]
            out[f"{t}1.to_q.weight"], out[f"{t}1.to_k.weight"] = q, key
            out[f"{t}1.to_v.weight"] = ours[f"{b}{attn}.to_v.weight"]
            out[f"{t}1.to_out.weight"] = o
        t = f"{dst}layers.{j + per - 1}."
        out[f"{t}0.0.{g}"] = ours[f"{b}ff_norm.weight"] - 1
        if m.ff_glu:
            out[f"{t}1.ff.0.proj.weight"] = torch.cat([ours[f"{b}ff.up.weight"], ours[f"{b}ff.gate.weight"]])
            out[f"{t}1.ff.0.proj.bias"] = torch.cat([ours[f"{b}ff.up.bias"], ours[f"{b}ff.gate.bias"]])
        else:
            out[f"{t}1.ff.0.0.weight"], out[f"{t}1.ff.0.0.bias"] = ours[f"{b}ff.up.weight"], ours[f"{b}ff.up.bias"]
        out[f"{t}1.ff.2.weight"], out[f"{t}1.ff.2.bias"] = ours[f"{b}ff.down.weight"], ours[f"{b}ff.down.bias"]
    out[f"{dst}final_norm.{g}"] = ours[f"{src}final_norm.weight"] - 1
    if rot:
        out[f"{dst}rotary_pos_emb.inv_freq"] = 1.0 / (10000 ** (torch.arange(0, rot, 2).float() / rot))
    return out


def _wrapper(ours: dict, src: str, dst: str, m, *, depth: int, cross: bool, emb_dim: int) -> dict:
    out = {f"{dst}token_emb.emb.weight": ours[f"{src}token_emb.weight"]}
    if f"{src}pos_emb.emb.weight" in ours:
        out[f"{dst}pos_emb.emb.weight"] = ours[f"{src}pos_emb.emb.weight"] * math.sqrt(emb_dim)
    if f"{src}project_emb.weight" in ours:
        w = ours[f"{src}project_emb.weight"]
        out[f"{dst}project_emb.weight"], out[f"{dst}project_emb.bias"] = w, w.new_zeros(w.shape[0])
    return out | _stack(ours, f"{src}attn_layers.", f"{dst}attn_layers.", m, depth=depth, cross=cross)


def xtransformers_state_dict(ours: dict, cfg) -> dict:
    """Our consolidated (TP=1, vocabulary padding stripped) state dict in x-transformers' names,
    for the model of ``xtransformers_spec(cfg)``. Shared tensors are cloned."""
    problems = unsupported_options(cfg)
    if problems:
        raise NotExportable("no x-transformers equivalent for: " + "; ".join(problems))
    m = cfg.model
    if m.kind in ("decoder", "encoder"):
        out = _wrapper(ours, "net.", "", m, depth=m.depth, cross=False, emb_dim=m.dim)
        if not m.tie_embedding:
            out["to_logits.weight"] = ours["net.to_logits.weight"]
    else:
        emb = {"token_emb.weight": ours["token_emb.weight"]}
        enc = {k.removeprefix("encoder."): v for k, v in ours.items() if k.startswith("encoder.")} | emb
        dec = {k.removeprefix("decoder.net."): v for k, v in ours.items() if k.startswith("decoder.net.")} | emb
        out = _wrapper(enc, "", "encoder.", m, depth=m.enc_depth, cross=False, emb_dim=m.dim)
        out |= _wrapper(dec, "", "decoder.net.", m, depth=m.depth, cross=True, emb_dim=m.dim)
        out["decoder.net.to_logits.weight"] = ours["token_emb.weight"]
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def spec_path(out: str | Path) -> Path:
    """Where the constructor call of an export to ``out`` goes: ``out`` with the suffix ``.json``."""
    out = Path(out)
    if out.suffix == ".json":
        raise ValueError(f"--out {out}: the constructor call goes to FILE with the suffix .json; pick another "
                         "name for the weights (e.g. model.pt)")
    return out.with_suffix(".json")


def _probe_difference(ours_model, xt_model, cfg, num_tokens: int) -> float:
    """Largest |logit difference| between our model and the exported one on a fixed probe batch."""
    gen = torch.Generator().manual_seed(0)
    n = min(cfg.data.seq_len, 16)
    tgt = torch.randint(0, num_tokens, (2, n), generator=gen)
    with torch.no_grad():
        if cfg.model.kind in ("decoder", "encoder"):
            a, b = ours_model.net(tgt, gather_logits=True), xt_model(tgt)
        else:
            src = torch.randint(0, num_tokens, (2, min(cfg.data.enc_len, 16)), generator=gen)
            a = ours_model.decoder.net(tgt, context=ours_model.encode(src), gather_logits=True)
            b = xt_model.decoder.net(tgt, context=xt_model.encoder(src, return_embeddings=True))
    return float((a.float() - b.float()).abs().max())


def export_xtransformers(path: str | Path, out: str | Path, *, dtype: torch.dtype = torch.float32,
                         verify: bool = True) -> dict:
    """Write the newest complete checkpoint of a run (any TP size, any ZeRO stage) as an
    x-transformers state dict to ``out`` and its constructor call to ``spec_path(out)``.

    With ``verify`` and x-transformers installed, the model the call builds loads the weights with
    ``strict=True`` and its logits on a probe batch are compared with ours (fp32):
    ``max_abs_diff`` in the result. Nothing is written when the model is not exportable."""
    from ..models.factory import build_model
    from ..parallel import ParallelGroups
    from .convert import _read, at_tp1, consolidate, resolve_checkpoint

    ckpt = resolve_checkpoint(path)
    cfg, shared = _read(ckpt)
    num_tokens, pad_id = shared["num_tokens"], shared["pad_id"]
    spec = xtransformers_spec(cfg, num_tokens=num_tokens, pad_id=pad_id)  # refuses before any work
    json_out = spec_path(out)
    full = consolidate(ckpt)["model"]
    state = xtransformers_state_dict(full, cfg)
    info = {"checkpoint": str(ckpt), "step": shared["step"], "spec": spec, "json": str(json_out)}
    if verify:
        try:
            xt = build_xtransformers(spec).eval()
        except ImportError:
            info["max_abs_diff"] = None
        else:
            xt.load_state_dict(state, strict=True)
            ours = build_model(at_tp1(cfg), ParallelGroups.single(), None, num_tokens=num_tokens, pad_id=pad_id)
            ours.load_state_dict(full)
            info["max_abs_diff"] = _probe_difference(ours.eval(), xt, cfg, num_tokens)
    out = Path(out)
    for target, write in ((out, lambda f: torch.save({k: v.to(dtype) for k, v in state.items()}, f)),
                          (json_out, lambda f: f.write_text(json.dumps(spec, indent=2) + "\n"))):
        tmp = target.with_name(target.name + ".tmp")
        write(tmp)
        tmp.replace(target)
    return info
