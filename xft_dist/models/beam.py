"""Beam search (``AutoregressiveWrapper.beam_search``, x-transformers' signature).

Every step each live beam is extended by every token; the ``beams`` highest total log-probabilities
(a beam's score: the sum of its tokens' log-softmax) survive, the key/value caches following their
parents. The first step starts the beams from each prompt's top tokens. Prompts are a ``[b, n]``
tensor, a ``[n]`` tensor, or right-padded rows with ``prompt_lens`` (moved left, masked, as
``generate`` does with lists)."""

from __future__ import annotations

import torch

from .cache import LayerIntermediates
from .generate import left_pad, next_logits


def reorder_cache(cache: LayerIntermediates, index: torch.Tensor) -> None:
    """Every cached key and value (and hidden state) of ``cache`` taken at rows ``index``, in place."""
    for block in cache.attn_cache or []:
        for kv in (block.self_attn, block.cross_attn):
            if kv is not None and kv.k is not None:
                kv.k, kv.v = kv.k[index], kv.v[index]
    if cache.hiddens is not None:
        cache.hiddens = [h[index] for h in cache.hiddens]
    if cache.last_hidden is not None:
        cache.last_hidden = cache.last_hidden[index]


def _prompts(prompts, prompt_lens, pad_value: int):
    if prompt_lens is None:
        return left_pad(prompts, pad_value)
    rows = [row[: int(n)] for row, n in zip(prompts, prompt_lens.tolist())]
    return left_pad(rows, pad_value)


@torch.no_grad()
def beam_search_tokens(net, prompts, seq_len: int, *, beams: int = 4, return_beams_and_scores: bool = False,
                       pad_value: int = 0, prompt_lens: torch.Tensor | None = None, cache_kv: bool = True,
                       **net_kwargs):
    """``[b, seq_len]`` (the best beam per prompt), or ``([beams, b, seq_len], scores [beams, b])``
    with ``return_beams_and_scores``; a 1-D prompt gives results without the batch dimension."""
    squeeze = isinstance(prompts, torch.Tensor) and prompts.ndim == 1
    tokens, mask = _prompts(prompts, prompt_lens, pad_value)
    b, t = tokens.shape
    if net.pos_emb is not None and t + seq_len > net.max_seq_len:
        raise ValueError(f"prompt ({t}) + seq_len ({seq_len}) exceeds max_seq_len={net.max_seq_len}, which "
                         "absolute positional embeddings cannot go past")
    was_training = net.training
    net.eval()
    cache, scores = None, None
    try:
        for _ in range(seq_len):
            logits, cache = next_logits(net, tokens, mask, cache, cache_kv=cache_kv, **net_kwargs)
            logp = logits.log_softmax(dim=-1)
            vocab = logp.shape[-1]
            if scores is None:  # the first step: each prompt's top tokens start its beams
                top = logp.topk(beams, dim=-1)
                parent = torch.arange(b, device=tokens.device).repeat_interleave(beams)
                scores, nxt = top.values.reshape(-1), top.indices.reshape(-1)
            else:
                total = (scores[:, None] + logp).view(b, beams * vocab)
                top = total.topk(beams, dim=-1)
                parent = (torch.arange(b, device=tokens.device)[:, None] * beams + top.indices // vocab).reshape(-1)
                scores, nxt = top.values.reshape(-1), (top.indices % vocab).reshape(-1)
            tokens, mask = tokens[parent], mask[parent]
            if cache is not None:
                reorder_cache(cache, parent)
            tokens = torch.cat([tokens, nxt[:, None]], dim=-1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
    finally:
        net.train(was_training)
    out = tokens[:, t:].view(b, beams, seq_len)
    scores = scores.view(b, beams)  # sorted, best first (topk)
    if not return_beams_and_scores:
        return out[0, 0] if squeeze else out[:, 0]
    out, scores = out.transpose(0, 1), scores.transpose(0, 1)
    return (out[:, 0], scores[:, 0]) if squeeze else (out, scores)
