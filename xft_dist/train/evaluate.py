"""Held-out evaluation: a fixed set of validation batches, the same at every TP x DP layout.

The batches are read once, up front, by every rank alike (one stream over the validation shards, in
order, no shuffling, no worker processes) and kept: evaluation never touches the training loader or
any RNG stream, and in eval mode the model draws nothing. Each DP rank takes its share of every
batch's rows, the loss sums and token counts are reduced over DP in float64, and the result is the
mean over every loss token of the set: the same number for any TP x DP split and any
``data.num_workers``.
"""

from __future__ import annotations

import math

import torch

from ..config import Config, ConfigError
from ..data import DataError, LoaderConfig, Manifest, StreamingLoader
from ..data.tokenizer import same_tokenizer
from ..parallel import ParallelGroups, all_reduce
from .step import split_micro_batches


def valid_manifest(cfg: Config, train: Manifest | None = None, shards: str | None = None) -> Manifest | None:
    """The validation shards' manifest (``shards`` or ``data.valid.shards``), checked against the
    training shards' tokenizer; None when there is no validation set."""
    path = shards or cfg.data.valid.shards
    if path is None:
        return None
    try:
        manifest = Manifest.load(path)
    except DataError as e:
        raise ConfigError(f"data.valid.shards={path!r}: {e}") from None
    if train is not None and not same_tokenizer(train.tokenizer, manifest.tokenizer):
        a, b = train.tokenizer, manifest.tokenizer
        raise ConfigError(f"data.valid.shards={path!r} was made with tokenizer {b.get('kind')}:{b.get('name')} "
                          f"(vocab {b.get('vocab_size')}), data.shards={cfg.data.primary_shards!r} with "
                          f"{a.get('kind')}:{a.get('name')} (vocab {a.get('vocab_size')}): they must match")
    return manifest


def validation_batches(cfg: Config, manifest: Manifest, vocab_size: int) -> list[dict]:
    """``data.valid.batches`` global batches of ``data.valid.batch_rows`` rows (host tensors)."""
    d, v = cfg.data, cfg.data.valid
    loader_cfg = LoaderConfig(seq_len=d.seq_len, global_rows=v.batch_rows or cfg.train.global_batch, num_streams=1,
                              mode=d.mode, seed=cfg.train.seed, shuffle=False, num_workers=0, skip_bad=d.skip_bad,
                              enc_len=d.enc_len, noise_density=d.noise_density, mean_span=d.mean_span)
    it = iter(StreamingLoader(manifest, loader_cfg, vocab_size=vocab_size))
    return [{k: t for k, t in next(it).items() if k != "stream"} for _ in range(v.batches)]


@torch.no_grad()
def evaluate(forward, model: torch.nn.Module, batches: list[dict], *, groups: ParallelGroups, micro_batch: int,
             device: torch.device, byte_tokenizer: bool) -> dict:
    """``valid/loss`` (mean over loss tokens), ``valid/ppl``, ``valid/tokens`` and, for the byte
    tokenizer, ``valid/bpb`` (bits per byte: every target is one byte, EOS counted as one).

    ``forward(micro_batch) -> (loss_sum, num_tokens)``: the engine or the wrapper itself; ``model``
    (the wrapper) is put in eval mode for the duration and gives ``prepare_batch``."""
    was_training = model.training
    model.eval()
    acc = torch.zeros(2, dtype=torch.float64, device=device)
    try:
        for batch in batches:
            share = {k: torch.tensor_split(t, groups.dp_size)[groups.dp_rank] for k, t in batch.items()}
            for mb in split_micro_batches(share, micro_batch, device, prepare=getattr(model, "prepare_batch", None)):
                loss_sum, num = forward(mb)
                acc += torch.stack([loss_sum.detach().to(torch.float64), num.detach().to(torch.float64)])
    finally:
        model.train(was_training)
    loss_sum, tokens = all_reduce(acc, groups.dp_group).tolist()
    if tokens == 0:
        raise ValueError("the validation batches hold no loss tokens")
    loss = loss_sum / tokens
    out = {"valid/loss": loss, "valid/ppl": math.exp(min(loss, 700.0)), "valid/tokens": tokens}
    if byte_tokenizer:
        out["valid/bpb"] = loss / math.log(2)
    return out
