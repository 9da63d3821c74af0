"""Encoder-decoder sharing one vocab-parallel token embedding, with a tied output head."""

from __future__ import annotations

import torch
from torch import nn

from ..data.batch import Batch
from ..nn import VocabParallelEmbedding
from ..nn.init import InitScheme
from ..parallel import ParallelGroups, RNGStreams
from .layers import Decoder, Encoder
from .wrappers import AutoregressiveWrapper, TransformerWrapper


class EncoderDecoder(nn.Module):
    """Encoder (width ``enc_dim``, default ``dim``) and causal decoder (width ``dim``) with
    cross-attention over the encoder output. One ``VocabParallelEmbedding`` of width ``dim`` feeds
    both towers (projected up/down when ``enc_dim`` differs) and is the decoder's output head.

    ``init`` (a scheme name or ``InitScheme``) covers both stacks, cross-attention included, and the
    shared embedding. ``layer_kwargs`` go to both stacks (e.g. ``ff_glu``, ``attn_dropout``,
    ``activation_checkpointing``); ``loss_kwargs`` to the decoder's ``AutoregressiveWrapper``
    (``label_smoothing``, ``z_loss``, ``ignore_index``).

    The trainer's path: ``loss_sums(batch)`` with a span-corruption ``data.Batch`` returns
    ``(loss_sum, num_loss_tokens)``, the count equal to the batch's own.
    """

    def __init__(
        self,
        *,
        num_tokens: int,
        dim: int,
        enc_depth: int,
        dec_depth: int,
        heads: int = 8,
        enc_dim: int | None = None,
        enc_heads: int | None = None,
        enc_max_seq_len: int = 512,
        dec_max_seq_len: int = 512,
        pad_value: int = 0,
        pad_to_multiple_of: int = 1,
        groups: ParallelGroups | None = None,
        rng: RNGStreams | None = None,
        loss_kwargs: dict | None = None,
        init: str | InitScheme | None = None,
        **layer_kwargs,
    ):
        super().__init__()
        groups = groups or ParallelGroups.single()
        enc_dim = enc_dim or dim
        self.pad_value = pad_value
        init = InitScheme.of(init)
        self.token_emb = VocabParallelEmbedding(num_tokens, dim, group=groups.tp_group, init_method=init.embedding(dim),
                                                pad_to_multiple_of=pad_to_multiple_of)
        self.encoder = TransformerWrapper(
            num_tokens=num_tokens, max_seq_len=enc_max_seq_len, token_emb=self.token_emb,
            return_only_embed=True,
            attn_layers=Encoder(enc_dim, enc_depth, enc_heads or heads, groups=groups, rng=rng, init=init,
                                **layer_kwargs),
        )
        decoder = TransformerWrapper(
            num_tokens=num_tokens, max_seq_len=dec_max_seq_len, token_emb=self.token_emb,
            tie_embedding=True,
            attn_layers=Decoder(dim, dec_depth, heads, cross_attend=True, cross_attn_dim_context=enc_dim,
                                groups=groups, rng=rng, init=init, **layer_kwargs),
        )
        self.decoder = AutoregressiveWrapper(decoder, pad_value=pad_value, **(loss_kwargs or {}))

    def source_mask(self, src: torch.Tensor, src_mask: torch.Tensor | None) -> torch.Tensor | None:
        """The source's mask when none is given: ``src != pad_value``."""
        return src != self.pad_value if src_mask is None else src_mask

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.encoder(src, mask=src_mask, return_embeddings=True)

    def loss_sums(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The trainer's contract (``models.LossModel``): ``(loss_sum, num_loss_tokens)`` of a span
        ``Batch`` (``src``, ``src_mask`` and the decoder's shifted ``input_ids`` / ``labels``)."""
        enc = self.encode(batch.src, batch.src_mask)
        return self.decoder.target_loss_sums(batch.input_ids, batch.labels, mask=batch.mask, context=enc,
                                             context_mask=batch.src_mask)

    def forward(self, src: torch.Tensor | Batch, tgt: torch.Tensor | None = None, *,
                src_mask: torch.Tensor | None = None, tgt_mask: torch.Tensor | None = None,
                return_sums: bool = False):
        """Next-token loss of ``tgt`` given ``src``; masks default to ``token != pad_value``.
        A ``Batch`` (the trainer's, through its engine) is ``loss_sums(batch)``."""
        if isinstance(src, Batch):
            return self.loss_sums(src)
        if src_mask is None:
            src_mask = src != self.pad_value
        if tgt_mask is None:
            tgt_mask = tgt != self.pad_value
        enc = self.encode(src, src_mask)
        return self.decoder(tgt, mask=tgt_mask, context=enc, context_mask=src_mask, return_sums=return_sums)

    @torch.no_grad()
    def generate(self, src: torch.Tensor, start: torch.Tensor, seq_len: int, *, src_mask: torch.Tensor | None = None,
                 **kwargs) -> torch.Tensor:
        """``seq_len`` decoder tokens after ``start`` (``[b, n]`` or a list), given ``src``; the
        encoder runs once and cross-attention keys and values are cached with ``cache_kv``.
        ``kwargs``: those of ``AutoregressiveWrapper.generate``."""
        src_mask = self.source_mask(src, src_mask)
        was_training = self.training
        self.eval()
        try:
            enc = self.encode(src, src_mask)
            return self.decoder.generate(start, seq_len, context=enc, context_mask=src_mask, **kwargs)
        finally:
            self.train(was_training)

