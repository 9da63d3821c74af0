"""Held-out evaluation: a fixed set of validation batches, the same at every TP x DP layout.

The batches are read once, up front, by every rank alike (one stream over the validation shards, in
order, no shuffling, no worker processes) and kept: evaluation never touches the training loader or
any RNG stream, and in eval mode the model draws nothing. Each DP rank takes its share of every
batch's rows, the loss sums and token counts are reduced over DP in float64, and the result is the
mean over every loss token of the set: the same number for any TP x DP split and any
``data.num_workers``. A model with ``eval_sums`` (the masked LM's ``("mlm_acc",)``) returns one more
sum per name in eval mode; each is reported as ``valid/<name>``, per loss token.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from ..config import Config, ConfigError
from ..data import Batch, DataError, LoaderConfig, Manifest, StreamingLoader
from ..data.tokenizer import same_tokenizer
from ..parallel import ParallelGroups, all_reduce
from .step import _world, host_numbers, split_micro_batches


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


def validation_batches(cfg: Config, manifest: Manifest, vocab_size: int) -> list[Batch]:
    """``data.valid.batches`` global batches of ``data.valid.batch_rows`` rows (on the host)."""
    loader_cfg = LoaderConfig.from_config(cfg, validation=True)
    it = iter(StreamingLoader(manifest, loader_cfg, vocab_size=vocab_size))
    return [replace(next(it), stream=None) for _ in range(cfg.data.valid.batches)]


@torch.no_grad()
def pipeline_loss_sum(engine, micro: list[Batch], groups: ParallelGroups) -> torch.Tensor:
    """This rank's share of the loss sum of ``micro`` through the pipeline (DeepSpeed's inference
    schedule): the last stage's TP rank 0 holds it, every other rank zero."""
    feed = engine.module.feed
    feed.start(micro, None)
    placeholder = torch.zeros(1)
    engine.eval_batch(iter([(placeholder, placeholder)] * len(micro)), num_micro_batches=len(micro), bcast_loss=False)
    own = torch.zeros((), dtype=torch.float64, device=engine.device)
    if groups.last_stage and groups.tp_rank == 0:
        own = torch.stack(feed.sums).to(torch.float64).sum()
    return own


def evaluate(forward, model: torch.nn.Module, batches: list[Batch], *, groups: ParallelGroups, micro_batch: int,
             device: torch.device, byte_tokenizer: bool) -> dict:
    """``valid/loss`` (mean over loss tokens), ``valid/ppl``, ``valid/tokens``, for the byte
    tokenizer ``valid/bpb`` (bits per byte: every target is one byte, EOS counted as one), and the
    model's ``eval_sums`` per loss token (``valid/mlm_acc``).

    ``forward(micro_batch) -> (loss_sum, num_loss_tokens, *eval_sums)``: the engine or the model
    itself; ``model`` is put in eval mode for the duration. The token count is the batches' own."""
    names = tuple(getattr(model, "eval_sums", ()))
    was_training = model.training
    model.eval()
    sums, tokens = torch.zeros(1 + len(names), dtype=torch.float64, device=device), 0
    try:
        for batch in batches:
            micro = split_micro_batches(batch.shard(groups.dp_rank, groups.dp_size), micro_batch, device)
            if groups.pp_size > 1:
                sums[0] += pipeline_loss_sum(forward, micro, groups)
            else:
                for mb in micro:
                    out = forward(mb)
                    sums += torch.stack([out[0], *out[2:]]).detach().to(torch.float64)
            tokens += sum(mb.num_loss_tokens for mb in micro)
    finally:
        model.train(was_training)
    acc = torch.cat([sums, host_numbers([float(tokens)], device)])
    if groups.pp_size > 1:  # the sums live on the last stage (its TP rank 0); the counts, from every
        # rank alike, are taken once per DP rank (the first stage's TP rank 0)
        own_count = float(groups.pp_rank == 0 and groups.tp_rank == 0)
        acc = all_reduce(acc * host_numbers([1.0] * len(sums) + [own_count], device), _world(groups))
    else:
        acc = all_reduce(acc, groups.dp_group)
    *totals, tokens = acc.tolist()
    if tokens == 0:
        raise ValueError("the validation batches hold no loss tokens")
    loss = totals[0] / tokens
    out = {"valid/loss": loss, "valid/ppl": math.exp(min(loss, 700.0)), "valid/tokens": tokens}
    out |= {f"valid/{name}": total / tokens for name, total in zip(names, totals[1:])}
    if byte_tokenizer and not names:  # a masked LM's loss is over masked bytes: not the corpus' bits per byte
        out["valid/bpb"] = loss / math.log(2)
    return out
