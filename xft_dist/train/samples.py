"""Sample continuations during training (``logging.sample_prompts``), decoder LMs only.

Every rank runs the same ``generate`` (a collective at TP > 1) with a generator seeded from
``train.seed`` and the step: the samples are reproducible and the training RNG streams untouched.
At ``parallel.pp > 1`` every rank samples from the whole model, each stage's weights broadcast to
the others for the duration (``models.pipeline.whole_model``): the whole model must fit one device.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from ..data.tokenizer import tokenizer_from_identity

log = logging.getLogger("xft_dist.train")


def decode_row(tok, ids: list[int]) -> str:
    """The text of generated ids, up to the first EOS."""
    if tok.eos_id in ids:
        ids = ids[: ids.index(tok.eos_id)]
    return tok.decode(ids)


def sample_continuations(r, step: int) -> list[dict] | None:
    cfg = r.cfg
    if cfg.model.kind != "decoder":
        if r.rank0:
            log.info("logging.sample_prompts: samples are for decoder LMs; model.kind=%s does not generate",
                     cfg.model.kind)
        return None
    tok = tokenizer_from_identity(r.loader.manifest.tokenizer, cfg.logging.sample_tokenizer,
                                  what="logging.sample_tokenizer")
    prompts = []
    for text in cfg.logging.sample_prompts:
        ids = tok.encode(text) or [tok.eos_id]  # an empty prompt starts a document
        prompts.append(torch.tensor(ids[-r.model.net.max_seq_len:], dtype=torch.long, device=r.device))
    whole = contextlib.nullcontext(r.model)
    if r.groups.pp_size > 1:  # every stage's current weights, gathered for the duration
        from ..models.pipeline import whole_model

        whole = whole_model(r.engine.module, r.model, r.groups, r.device)
    with whole as model:
        out = model.generate(prompts, cfg.logging.sample_tokens, temperature=1.0, top_p=0.9, eos_token=tok.eos_id,
                             seed=cfg.train.seed * 1_000_003 + step)
    return [{"prompt": text, "continuation": decode_row(tok, row)}
            for text, row in zip(cfg.logging.sample_prompts, out.tolist())]
