"""Token embedding split over the vocabulary across TP ranks; shareable between towers and heads."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup

from ..parallel import copy_to_tp, gather_from_tp, group_rank, group_size, reduce_from_tp
from .sharding import InitMethod, normal_init, sharded_parameter


def padded_vocab_size(num_embeddings: int, tp_size: int, pad_to_multiple_of: int = 1) -> int:
    """Smallest size >= ``num_embeddings`` divisible by ``pad_to_multiple_of * tp_size``."""
    if num_embeddings < 1:
        raise ValueError(f"num_embeddings={num_embeddings}: expected a positive vocabulary size")
    if pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of={pad_to_multiple_of}: expected a positive integer")
    multiple = pad_to_multiple_of * tp_size
    return -(-num_embeddings // multiple) * multiple


class VocabParallelEmbedding(nn.Module):
    """``nn.Embedding`` whose rows (the vocabulary) are split over the TP group.

    The vocabulary is zero-padded to a multiple of ``pad_to_multiple_of * tp`` so every rank holds
    ``padded_num_embeddings / tp`` rows; rank ``r`` owns ids ``[vocab_start, vocab_end)``. Ids
    owned by another rank produce zeros here and the all-reduce sums in the owner's row. Padded rows
    are never looked up (an id >= ``num_embeddings`` is an error) and never reach the loss.

    One instance can be passed to several models (encoder, decoder, output head): they share its
    single ``weight``. ``logits(x)`` uses it as a tied output projection and returns this rank's
    vocab shard.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        group: ProcessGroup | None = None,
        pad_to_multiple_of: int = 1,
        init_method: InitMethod | None = None,
        check_ids: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        tp = group_size(group)
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padded_num_embeddings = padded_vocab_size(num_embeddings, tp, pad_to_multiple_of)
        self.num_embeddings_per_rank = self.padded_num_embeddings // tp
        self.vocab_start = group_rank(group) * self.num_embeddings_per_rank
        self.vocab_end = self.vocab_start + self.num_embeddings_per_rank
        self.group, self.check_ids = group, check_ids
        self.weight = sharded_parameter(
            (num_embeddings, embedding_dim), partition_dim=0, group=group,
            init_method=init_method or normal_init(), padded_size=self.padded_num_embeddings, split="vocab",
            dtype=dtype, device=device,
        )

    def _check(self, ids: torch.Tensor) -> None:
        if ids.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool):
            raise TypeError(f"token ids must be an integer tensor, got dtype {ids.dtype}")
        if ids.numel() == 0:
            return
        low, high = (int(v) for v in torch.aminmax(ids))
        if low < 0 or high >= self.num_embeddings:
            bad = high if high >= self.num_embeddings else low
            raise ValueError(
                f"token id {bad} is outside the vocabulary [0, {self.num_embeddings}) "
                f"of this VocabParallelEmbedding (num_embeddings={self.num_embeddings})"
            )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.check_ids:
            self._check(ids)
        ids = ids.long()
        if group_size(self.group) == 1:
            return F.embedding(ids, self.weight)
        in_shard = (ids >= self.vocab_start) & (ids < self.vocab_end)
        local_ids = torch.where(in_shard, ids - self.vocab_start, torch.zeros_like(ids))
        out = F.embedding(local_ids, self.weight)
        out = out.masked_fill(~in_shard.unsqueeze(-1), 0.0)
        return reduce_from_tp(out, self.group)

    def logits(self, x: torch.Tensor, *, gather: bool = False) -> torch.Tensor:
        """Tied output head: ``x [..., d] -> [..., padded_vocab / tp]`` (this rank's shard).

        With ``gather=True`` the full padded vocabulary is gathered (for generation or inspection;
        training should feed the shard to ``vocab_parallel_cross_entropy``).
        """
        out = F.linear(copy_to_tp(x, self.group), self.weight)
        return gather_from_tp(out, self.group, dim=-1) if gather else out

    def extra_repr(self) -> str:
        return (f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, "
                f"padded={self.padded_num_embeddings}, rank_range=[{self.vocab_start}, {self.vocab_end})")
