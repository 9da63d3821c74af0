"""``XTransformer``: x-transformers' encoder-decoder class, with its constructor and calls.

``XTransformer(dim=..., enc_num_tokens=..., enc_depth=..., enc_heads=..., enc_max_seq_len=...,
dec_num_tokens=..., dec_depth=..., dec_heads=..., dec_max_seq_len=..., tie_token_emb=...)``:
``enc_*`` / ``dec_*`` keyword arguments go to each side's ``TransformerWrapper`` (``num_tokens``,
``max_seq_len``, ``emb_dropout``, ``use_abs_pos_emb``) or layer stack (everything else).

It is a front of ``EncoderDecoder`` (the trainer's encoder-decoder): only the constructor, the
forward's argument names and ``generate``'s ``mask=`` differ; encoding, ``loss_sums(batch)`` and
generation are ``EncoderDecoder``'s. Its state-dict names are x-transformers' (``encoder.*``,
``decoder.net.*``; a tied embedding is stored once, under the encoder).
"""

from __future__ import annotations

import torch
from torch import nn

from ..parallel import ParallelGroups, RNGStreams
from .encdec import EncoderDecoder
from .layers import Decoder, Encoder, reject_unsupported
from .wrappers import AutoregressiveWrapper, TransformerWrapper
from .xt_options import LAYERS as XT_LAYERS

_WRAPPER_KEYS = ("num_tokens", "max_seq_len", "emb_dropout", "use_abs_pos_emb", "emb_dim", "tie_embedding")


def _split(prefix: str, kwargs: dict) -> dict:
    return {k[len(prefix):]: kwargs.pop(k) for k in [k for k in kwargs if k.startswith(prefix)]}


class XTransformer(EncoderDecoder):
    def __init__(self, *, dim: int, tie_token_emb: bool = False, ignore_index: int = -100, pad_value: int = 0,
                 groups: ParallelGroups | None = None, rng: RNGStreams | None = None, **kwargs):
        nn.Module.__init__(self)  # EncoderDecoder's parts, built from x-transformers' arguments
        enc, dec = _split("enc_", kwargs), _split("dec_", kwargs)
        reject_unsupported("XTransformer", kwargs, XT_LAYERS)
        for side, kw in (("enc_", enc), ("dec_", dec)):
            if "dim" in kw:
                raise ValueError(f"{side}dim: XTransformer takes one width for both sides, dim={dim}")
            for key in ("num_tokens", "max_seq_len"):
                if key not in kw:
                    raise TypeError(f"XTransformer: missing {side}{key}")
        enc_wrap = {k: enc.pop(k) for k in _WRAPPER_KEYS if k in enc}
        dec_wrap = {k: dec.pop(k) for k in _WRAPPER_KEYS if k in dec}
        self.pad_value = pad_value
        self.encoder = TransformerWrapper(**enc_wrap, return_only_embed=True,
                                          attn_layers=Encoder(dim=dim, groups=groups, rng=rng, **enc))
        shared = {}
        if tie_token_emb:
            if enc_wrap["num_tokens"] != dec_wrap["num_tokens"]:
                raise ValueError(f"tie_token_emb needs enc_num_tokens ({enc_wrap['num_tokens']}) == "
                                 f"dec_num_tokens ({dec_wrap['num_tokens']})")
            shared["token_emb"] = self.encoder.token_emb
        decoder = TransformerWrapper(**dec_wrap, **shared,
                                     attn_layers=Decoder(dim=dim, cross_attend=True, groups=groups, rng=rng, **dec))
        self.decoder = AutoregressiveWrapper(decoder, ignore_index=ignore_index, pad_value=pad_value)

    def generate(self, seq_in: torch.Tensor, seq_out_start: torch.Tensor, seq_len: int,
                 mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """``seq_len`` decoder tokens after ``seq_out_start`` given the source ``seq_in`` (``mask``:
        True for its real tokens; none: every source token counts, as in x-transformers).
        ``kwargs``: those of ``AutoregressiveWrapper.generate``."""
        return super().generate(seq_in, seq_out_start, seq_len, src_mask=mask, **kwargs)

    def source_mask(self, src: torch.Tensor, src_mask: torch.Tensor | None) -> torch.Tensor | None:
        return src_mask  # x-transformers: without a mask every source token is attended to

    def forward(self, src: torch.Tensor, tgt: torch.Tensor | None = None, mask: torch.Tensor | None = None):
        """Mean next-token loss of ``tgt`` given ``src`` (``mask``: True for its real tokens);
        padding never counts (see docs/xtransformers.md). A ``Batch`` is ``loss_sums(batch)``."""
        if tgt is None:
            return self.loss_sums(src)
        enc = self.encode(src, mask)
        return self.decoder(tgt, context=enc, context_mask=mask)
