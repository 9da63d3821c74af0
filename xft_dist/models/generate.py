"""Sampling from a ``TransformerWrapper``: logit filters and the decoding loop behind
``AutoregressiveWrapper.generate`` (and the encoder-decoders' ``generate``).

At tensor-parallel size > 1 every rank gathers the full logits and samples with a generator seeded
alike on every rank of the TP group, so all of them append the same token.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..parallel.comm import all_reduce


def top_k(logits: torch.Tensor, frac_num_tokens: float = 0.1, k: int | None = None) -> torch.Tensor:
    """Keep the ``k`` largest logits (default: ``ceil(frac_num_tokens * vocab)``), the rest -inf."""
    k = min(k if k is not None else math.ceil(frac_num_tokens * logits.shape[-1]), logits.shape[-1])
    if k < 1:
        raise ValueError(f"top_k: k={k}: expected at least 1")
    val, ind = torch.topk(logits, k)
    return torch.full_like(logits, float("-inf")).scatter_(-1, ind, val)


def top_p(logits: torch.Tensor, thres: float = 0.9) -> torch.Tensor:
    """Nucleus filter: the smallest set of tokens whose probability reaches ``thres``."""
    if not 0.0 < thres <= 1.0:
        raise ValueError(f"top_p={thres}: expected a probability in (0, 1]")
    sorted_logits, idx = torch.sort(logits, descending=True)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop = F.pad(cum > thres, (1, -1), value=False)  # keep the token that crosses thres
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)


def min_p(logits: torch.Tensor, min_p: float = 0.1) -> torch.Tensor:
    """Keep tokens whose probability is at least ``min_p`` times the largest one's."""
    if not 0.0 <= min_p <= 1.0:
        raise ValueError(f"min_p={min_p}: expected a fraction in [0, 1]")
    probs = logits.softmax(dim=-1)
    return logits.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))


FILTER_LOGITS_FN: dict[str, Callable] = {"top_k": top_k, "top_p": top_p, "min_p": min_p}


def pick_filter(filter_logits_fn, filter_kwargs, top_k_, top_p_, min_p_):
    """``(fn, kwargs)``: a named or given filter, or one built from top_k / top_p / min_p (one of
    them), or x-transformers' default (top_k keeping 10 % of the vocabulary)."""
    chosen = [(n, v) for n, v in (("top_k", top_k_), ("top_p", top_p_), ("min_p", min_p_)) if v is not None]
    if chosen and filter_logits_fn is not None:
        raise ValueError("pass filter_logits_fn= or one of top_k= / top_p= / min_p=, not both")
    if len(chosen) > 1:
        raise ValueError(f"pass one of top_k= / top_p= / min_p=, got {[n for n, _ in chosen]}")
    if chosen:
        name, value = chosen[0]
        if name == "top_p" and not 0.0 < value <= 1.0:
            raise ValueError(f"top_p={value}: expected a probability in (0, 1]")
        key = {"top_k": "k", "top_p": "thres", "min_p": "min_p"}[name]
        return FILTER_LOGITS_FN[name], {key: value}
    fn = filter_logits_fn if filter_logits_fn is not None else "top_k"
    if isinstance(fn, str):
        if fn not in FILTER_LOGITS_FN:
            raise ValueError(f"filter_logits_fn={fn!r}: expected one of {sorted(FILTER_LOGITS_FN)} or a function")
        fn = FILTER_LOGITS_FN[fn]
    return fn, dict(filter_kwargs or {})


def left_pad(prompts, pad_value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens [b, t], mask [b, t])`` from a ``[b, t]`` tensor or a list of 1-D tensors, the
    shorter ones left-padded with ``pad_value`` (mask False there)."""
    if isinstance(prompts, torch.Tensor):
        if prompts.ndim == 1:
            prompts = prompts[None]
        if prompts.ndim != 2 or prompts.shape[0] == 0 or prompts.shape[1] == 0:
            raise ValueError(f"prompts {tuple(prompts.shape)}: expected a non-empty [b, n] tensor of token ids")
        return prompts.long(), torch.ones_like(prompts, dtype=torch.bool)
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts: an empty list; expected at least one prompt")
    for i, p in enumerate(prompts):
        if p.ndim != 1 or p.numel() == 0:
            raise ValueError(f"prompts[{i}] {tuple(p.shape)}: expected a non-empty 1-D tensor of token ids")
    t = max(p.numel() for p in prompts)
    out = torch.full((len(prompts), t), pad_value, dtype=torch.long, device=prompts[0].device)
    mask = torch.zeros(len(prompts), t, dtype=torch.bool, device=prompts[0].device)
    for i, p in enumerate(prompts):
        out[i, t - p.numel():] = p
        mask[i, t - p.numel():] = True
    return out, mask


def next_logits(net, tokens: torch.Tensor, mask: torch.Tensor, cache, *, cache_kv: bool = True, **net_kwargs):
    """``(fp32 logits of the next token [b, vocab], the cache)``: one decoding step over left-padded
    ``tokens`` (each row's positions from its first real token), through the key/value cache."""
    positions = (mask.long().cumsum(dim=-1) - 1).clamp(min=0)
    kw = dict(mask=mask, positions=positions, gather_logits=True, **net_kwargs)
    if cache_kv:
        logits, cache = net(tokens, cache=cache, return_intermediates=True, **kw)
    else:
        logits = net(tokens, **kw)
    return logits[:, -1].float(), cache


def shared_generator(seed: int | None, device: torch.device, group) -> torch.Generator:
    """A generator seeded alike on every rank of the TP ``group`` (``seed=None``: drawn from
    torch's default generator, the largest draw across the group)."""
    if seed is None:
        draw = torch.randint(0, 2**62, (1,), dtype=torch.long)
        seed = int(all_reduce(draw, group, op="max").item())
    return torch.Generator(device=device).manual_seed(int(seed))


@torch.no_grad()
def sample_tokens(
    net,
    prompts,
    seq_len: int,
    *,
    pad_value: int,
    temperature: float = 1.0,
    filter_logits_fn=None,
    filter_kwargs: dict | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    eos_token: int | None = None,
    cache_kv: bool = True,
    seed: int | None = None,
    **net_kwargs,
) -> torch.Tensor:
    """``[b, seq_len]`` new tokens after ``prompts`` (see ``AutoregressiveWrapper.generate``)."""
    tokens, mask = left_pad(prompts, pad_value)
    b, t = tokens.shape
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len}: expected the number of new tokens to generate (>= 1)")
    if t > net.max_seq_len:
        raise ValueError(f"prompt of {t} tokens is longer than max_seq_len={net.max_seq_len}")
    if net.pos_emb is not None and t + seq_len > net.max_seq_len:
        raise ValueError(f"prompt ({t}) + seq_len ({seq_len}) exceeds max_seq_len={net.max_seq_len}, which "
                         "absolute positional embeddings cannot go past")
    if temperature < 0:
        raise ValueError(f"temperature={temperature}: expected >= 0 (0 is greedy)")
    greedy = temperature == 0
    fn, fkw = pick_filter(filter_logits_fn, filter_kwargs, top_k, top_p, min_p)
    group = net.groups.tp_group
    gen = None if greedy else shared_generator(seed, tokens.device, group)
    was_training = net.training
    net.eval()
    cache, done = None, torch.zeros(b, dtype=torch.bool, device=tokens.device)
    try:
        for _ in range(seq_len):
            logits, cache = next_logits(net, tokens, mask, cache, cache_kv=cache_kv, **net_kwargs)
            if greedy:
                nxt = logits.argmax(dim=-1)
            else:
                probs = (fn(logits, **fkw) / temperature).softmax(dim=-1)
                nxt = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
            if eos_token is not None:
                nxt = nxt.masked_fill(done, pad_value)
                done = done | (nxt == eos_token)
            tokens = torch.cat([tokens, nxt[:, None]], dim=-1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
            if eos_token is not None and bool(done.all()):
                break
    finally:
        net.train(was_training)
    out = tokens[:, t:]
    if out.shape[1] < seq_len:  # every row stopped early: pad to the asked length
        out = F.pad(out, (0, seq_len - out.shape[1]), value=pad_value)
    return out
