"""Token-level models around an ``AttentionLayers`` stack.

``TransformerWrapper`` embeds tokens (or takes precomputed embeddings), runs the stack and returns
this rank's vocab shard of the logits. ``AutoregressiveWrapper`` owns the next-token loss.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..data.batch import IGNORE_INDEX, Batch, DocLayout
from ..nn import (
    AbsolutePositionalEmbedding,
    ReplicatedLinear,
    VocabParallelEmbedding,
    document_positions,
    fused_head_cross_entropy,
    masked_loss_sum,
    vocab_parallel_cross_entropy,
)
from ..nn.init import InitScheme
from ..parallel import group_size
from .cache import LayerIntermediates
from .layers import AttentionLayers, reject_unsupported
from .xt_options import AUTOREGRESSIVE as XT_AUTOREGRESSIVE
from .xt_options import WRAPPER as XT_WRAPPER

IGNORE = IGNORE_INDEX  # the ignore index of targets that must not count (a Batch's labels use it)


class TransformerWrapper(nn.Module):
    """Embeddings -> ``attn_layers`` -> vocab-parallel logits.

    ``token_emb``: a prebuilt ``VocabParallelEmbedding`` to share with other wrappers (its vocab
    size and TP group must match). ``tie_embedding``: the output head reuses the token embedding.
    ``emb_dim`` differing from the stack's width adds a projection (e.g. a wider encoder fed from
    an embedding shared with a narrower decoder). ``return_only_embed``: no output head at all.
    ``init``: the scheme for the token embedding, positions, projection and untied head (default:
    the stack's ``attn_layers.init``; see ``xft_dist.nn.init``).
    """

    def __init__(
        self,
        *,
        num_tokens: int,
        max_seq_len: int,
        attn_layers: AttentionLayers,
        token_emb: nn.Module | None = None,
        tie_embedding: bool = False,
        emb_dim: int | None = None,
        emb_dropout: float = 0.0,
        use_abs_pos_emb: bool | None = None,
        pad_to_multiple_of: int = 1,
        return_only_embed: bool = False,
        init: str | InitScheme | None = None,
        to_logits: nn.Module | None = None,
        **unsupported,
    ):
        super().__init__()
        reject_unsupported("TransformerWrapper", unsupported, XT_WRAPPER)
        init = InitScheme.of(init) if init is not None else attn_layers.init
        self.attn_layers = attn_layers
        self.groups = attn_layers.groups
        group = self.groups.tp_group
        dim = attn_layers.dim
        self.num_tokens, self.max_seq_len = num_tokens, max_seq_len
        tp = group_size(group)
        plain_emb = token_emb is not None and not isinstance(token_emb, VocabParallelEmbedding)
        if (plain_emb or to_logits is not None) and tp > 1:
            what = "token_emb" if plain_emb else "to_logits"
            raise ValueError(f"{what}={type(token_emb if plain_emb else to_logits).__name__}: a module of your own "
                             f"works at tensor-parallel size 1 only (this stack has TP={tp}); leave it out to get "
                             "the vocab-parallel VocabParallelEmbedding")
        if plain_emb:
            emb_dim = emb_dim or getattr(token_emb, "embedding_dim", None) or dim
        elif token_emb is not None:
            if token_emb.num_embeddings != num_tokens:
                raise ValueError(f"token_emb has {token_emb.num_embeddings} tokens, num_tokens={num_tokens}")
            if token_emb.group is not group:
                raise ValueError("token_emb was built for another tensor-parallel group than attn_layers")
            if emb_dim is not None and emb_dim != token_emb.embedding_dim:
                raise ValueError(f"emb_dim={emb_dim} but token_emb.embedding_dim={token_emb.embedding_dim}")
            emb_dim = token_emb.embedding_dim
        emb_dim = emb_dim or dim
        self.emb_dim = emb_dim
        self.token_emb = token_emb or VocabParallelEmbedding(num_tokens, emb_dim, group=group,
                                                             pad_to_multiple_of=pad_to_multiple_of,
                                                             init_method=init.embedding(emb_dim))
        if use_abs_pos_emb is None:
            use_abs_pos_emb = attn_layers.rotary is None
        self.pos_emb = (AbsolutePositionalEmbedding(emb_dim, max_seq_len, std=init.position_std(emb_dim))
                        if use_abs_pos_emb else None)
        self.emb_dropout = emb_dropout
        # Replicated over TP ranks (group=None): the same full weights on every rank.
        self.project_emb = (ReplicatedLinear(emb_dim, dim, init_method=init.matrix(emb_dim, dim=dim))
                            if emb_dim != dim else None)
        self.tie_embedding = tie_embedding
        if return_only_embed:
            self.to_logits = None
        elif to_logits is not None:
            if tie_embedding:
                raise ValueError("to_logits= and tie_embedding=True both set the output head: pick one")
            self.to_logits = to_logits
        elif tie_embedding:
            if emb_dim != dim:
                raise ValueError(f"tie_embedding needs emb_dim ({emb_dim}) == attn_layers.dim ({dim})")
            if plain_emb and getattr(token_emb, "weight", None) is None:
                raise ValueError(f"tie_embedding with token_emb={type(token_emb).__name__}: the module needs a "
                                 "weight [num_tokens, dim] to tie the output head to")
            self.to_logits = None
        else:
            self.to_logits = VocabParallelEmbedding(num_tokens, dim, group=group, init_method=init.head(dim),
                                                    pad_to_multiple_of=pad_to_multiple_of)
        self.return_only_embed = return_only_embed

    @property
    def head(self) -> VocabParallelEmbedding | None:
        """The vocab-parallel output head (the fused loss reads its weight); None for a head of
        the user's own (``to_logits=``, or tied to a plain ``token_emb``) or no head at all."""
        if self.return_only_embed:
            return None
        head = self.token_emb if self.tie_embedding else self.to_logits
        return head if isinstance(head, VocabParallelEmbedding) else None

    def logits(self, h: torch.Tensor, *, gather: bool = False, **to_logits_kwargs) -> torch.Tensor:
        """This rank's logits shard of ``h`` (all of them with ``gather=True``, cut to num_tokens)."""
        if self.return_only_embed:
            raise ValueError("this TransformerWrapper was built with return_only_embed=True: it has no output head")
        if self.head is not None:
            logits = self.head.logits(h, gather=gather, **to_logits_kwargs)
            return logits[..., : self.num_tokens] if gather else logits
        if self.tie_embedding:  # a plain embedding module of the user's, TP=1
            return F.linear(h, self.token_emb.weight, **to_logits_kwargs)
        return self.to_logits(h, **to_logits_kwargs)

    def embed(self, x: torch.Tensor, *, positions: torch.Tensor | None = None,
              token_emb_kwargs: dict | None = None) -> torch.Tensor:
        """The stack's input ``[b, n, dim]``: token ids embedded (or embeddings taken as they are),
        learned positions added, dropout, and the projection to the stack's width."""
        if x.is_floating_point() and (x.ndim != 3 or x.shape[-1] != self.emb_dim):
            x = x.long()  # token ids in a float tensor (x-transformers takes them): not [b, n, emb_dim] embeddings
        h = x if x.is_floating_point() else self.token_emb(x, **(token_emb_kwargs or {}))
        if self.pos_emb is not None:
            p = positions if positions is not None else torch.arange(h.shape[1], device=h.device)[None]
            h = h + self.pos_emb(p)
        if self.emb_dropout > 0:
            h = F.dropout(h, self.emb_dropout, training=self.training)  # replicated: default stream
        if self.project_emb is not None:
            h = self.project_emb(h)
        return h

    def forward(
        self,
        x: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        doc_layout: DocLayout | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        return_embeddings: bool = False,
        gather_logits: bool = False,
        pos: torch.Tensor | None = None,
        context_pos: torch.Tensor | None = None,
        cache: LayerIntermediates | None = None,
        return_intermediates: bool = False,
        token_emb_kwargs: dict | None = None,
        to_logits_kwargs: dict | None = None,
        **unsupported,
    ):
        """``x``: token ids ``[b, n]`` or precomputed input embeddings ``[b, n, emb_dim]``.

        Returns this rank's logits shard ``[b, n, padded_vocab / tp]`` (padded columns included;
        pass ``vocab_size=num_tokens`` to the loss), the full ``[b, n, num_tokens]`` with
        ``gather_logits=True``, or the final embeddings ``[b, n, dim]``.

        ``return_intermediates=True``: ``(out, LayerIntermediates)``, whose key/value caches a later
        call continues from with ``cache=``: ``x`` (and ``mask``, ``positions``) are then the whole
        sequence so far, and ``out`` covers the positions after ``cache.cache_length`` only.
        ``pos`` is x-transformers' name for ``positions``; ``token_emb_kwargs`` / ``to_logits_kwargs``
        go to the embedding and head modules.
        """
        reject_unsupported("TransformerWrapper.forward", unsupported)
        if pos is not None:
            if positions is not None:
                raise ValueError("pass positions= or pos=, not both")
            positions = pos
        if positions is None and doc_ids is not None:
            positions = document_positions(doc_ids)
        h = self.embed(x, positions=positions, token_emb_kwargs=token_emb_kwargs)
        caching = cache is not None or return_intermediates
        h = self.attn_layers(h, mask, context=context, context_mask=context_mask, doc_ids=doc_ids,
                             positions=positions, doc_layout=doc_layout, context_pos=context_pos, cache=cache,
                             return_hiddens=caching)
        inter = None
        if caching:
            h, inter = h
        out = h if return_embeddings or self.return_only_embed else self.logits(h, gather=gather_logits,
                                                                                  **(to_logits_kwargs or {}))
        return (out, inter) if return_intermediates else out


class TokenLossWrapper(nn.Module):
    """The output head and the loss over a ``TransformerWrapper``'s final embeddings, shared by the
    causal LM (``AutoregressiveWrapper``) and the masked LM (``MaskedLMWrapper``).

    ``label_smoothing`` and ``z_loss`` are those of ``vocab_parallel_cross_entropy``.
    ``fused_loss=True`` computes the head and the loss together, chunk by chunk, without the full
    logits (``fused_head_cross_entropy``, ``loss_chunk_tokens`` tokens a chunk): same loss and
    gradients. ``check_ids=False`` skips the host-synchronising id checks of the embedding and the
    loss (the trainer's loader has checked the ids already).
    """

    def __init__(self, net: TransformerWrapper, *, pad_value: int | None = 0, ignore_index: int = -100,
                 label_smoothing: float = 0.0, z_loss: float = 0.0, fused_loss: bool = False,
                 loss_chunk_tokens: int | None = None, check_ids: bool = True):
        super().__init__()
        if net.return_only_embed:
            raise ValueError(f"{type(self).__name__} needs a net with an output head (not return_only_embed)")
        self.net, self.pad_value, self.ignore_index = net, pad_value, ignore_index
        self.label_smoothing, self.z_loss = label_smoothing, z_loss
        self.fused_loss, self.loss_chunk_tokens, self.check_ids = fused_loss, loss_chunk_tokens, check_ids
        for emb in {id(m): m for m in (net.token_emb, net.head) if isinstance(m, VocabParallelEmbedding)}.values():
            emb.check_ids = emb.check_ids and check_ids

    def target_loss_sums(self, inp: torch.Tensor, target: torch.Tensor, loss_mask: torch.Tensor | None = None,
                         **net_kwargs):
        """``(loss_sum, num_tokens)`` of the net on ``inp`` against ``target`` (IGNORE never counts);
        ``loss_mask`` weighs each token's loss."""
        return self.hidden_loss_sums(self.net(inp, return_embeddings=True, **net_kwargs), target, loss_mask)

    def loss_kwargs(self) -> dict:
        """What the vocab-parallel loss takes besides logits and targets."""
        return dict(group=self.net.groups.tp_group, vocab_size=self.net.num_tokens, ignore_index=IGNORE,
                    label_smoothing=self.label_smoothing, z_loss=self.z_loss, check_ids=self.check_ids)

    def hidden_loss_sums(self, h: torch.Tensor, target: torch.Tensor, loss_mask: torch.Tensor | None = None):
        """``(loss_sum, num_tokens)`` from the stack's output ``h [b, n, dim]``: the head and the
        loss (fused, chunk by chunk, where the head is ours)."""
        if loss_mask is not None:
            target = target.masked_fill(loss_mask == 0, IGNORE)  # dropped targets are ignored outright
        kw = self.loss_kwargs()
        if self.fused_loss and self.net.head is not None:  # a head of the user's own: unfused
            # Without weights, every counted token's loss has the same upstream gradient: the fused
            # backward then only scales what its forward computed (no check, no recompute).
            losses = fused_head_cross_entropy(h, self.net.head.weight, target, chunk_tokens=self.loss_chunk_tokens,
                                              uniform_grad=loss_mask is None, **kw)
        else:
            losses = vocab_parallel_cross_entropy(self.net.logits(h), target, **kw)
        return masked_loss_sum(losses, target, ignore_index=IGNORE, loss_mask=loss_mask)

    def loss_sums(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The trainer's contract (``models.LossModel``): ``(loss_sum, num_loss_tokens)`` of a packed
        or padded ``Batch``, whose labels say which targets count."""
        # The loader gives padding a document of its own: with document ids, no real token can see
        # padding, and the key-padding mask (which would force a dense [b, n, n] mask) is not needed.
        mask = None if batch.doc_ids is not None else batch.mask
        return self.target_loss_sums(batch.input_ids, batch.labels, mask=mask, doc_ids=batch.doc_ids,
                                     positions=batch.positions, doc_layout=batch.layout)


class AutoregressiveWrapper(TokenLossWrapper):
    """Next-token loss over a ``TransformerWrapper``, equal to the manual path:

        logits = net(x[:, :-1]); F.cross_entropy(logits, x[:, 1:], ignore_index=pad_value)

    Targets equal to ``pad_value`` or ``ignore_index``, or where ``mask[:, 1:]`` is False, never
    count; the mean is over the remaining (real) tokens. ``mask_pad=False`` trains on pad tokens
    (when pad doubles as a real token such as EOS); a one-time warning says so when it happens.
    The loss options are ``TokenLossWrapper``'s.

    The trainer's path: ``loss_sums(batch)`` (or ``model(batch)``, as an engine calls it) with a
    packed or padded ``data.Batch`` returns ``(loss_sum, num_loss_tokens)``; the count equals the
    batch's own ``num_loss_tokens``.
    """

    def __init__(self, net: TransformerWrapper, *, pad_value: int | None = 0, ignore_index: int = -100,
                 mask_pad: bool = True, label_smoothing: float = 0.0, z_loss: float = 0.0,
                 fused_loss: bool = False, loss_chunk_tokens: int | None = None, check_ids: bool = True,
                 **unsupported):
        reject_unsupported("AutoregressiveWrapper", unsupported, XT_AUTOREGRESSIVE)
        super().__init__(net, pad_value=pad_value, ignore_index=ignore_index, label_smoothing=label_smoothing,
                         z_loss=z_loss, fused_loss=fused_loss, loss_chunk_tokens=loss_chunk_tokens,
                         check_ids=check_ids)
        self.mask_pad = mask_pad
        self._warned = False

    def targets(self, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``target`` with every position that must not count set to the internal ignore index."""
        drop = target == self.ignore_index
        if self.pad_value is not None:
            is_pad = target == self.pad_value
            if self.mask_pad:
                drop = drop | is_pad
            elif not self._warned and bool(is_pad.any()):
                self._warned = True
                warnings.warn(f"pad tokens (id {self.pad_value}) appear among the targets and count in "
                              "the loss because mask_pad=False", stacklevel=3)
        if mask is not None:
            drop = drop | ~mask.bool()
        return target.masked_fill(drop, IGNORE)

    def forward(self, x: torch.Tensor | Batch, *, mask: torch.Tensor | None = None,
                doc_ids: torch.Tensor | None = None, loss_mask: torch.Tensor | None = None,
                return_sums: bool = False, **kwargs):
        """Mean next-token loss over real tokens, or ``(loss_sum, num_tokens)`` with ``return_sums``
        (sum those over micro-batches and DP ranks, then divide once). ``kwargs`` go to the net
        (``context=``, ``context_mask=``, ``positions=``). A ``Batch`` (the trainer's, through its
        engine) is ``loss_sums(batch)``."""
        if isinstance(x, Batch):
            return self.loss_sums(x)
        if x.is_floating_point() and x.ndim == 2:
            x = x.long()  # token ids in a float tensor, as x-transformers takes them
        inp, target = x[:, :-1], x[:, 1:]
        inp_mask = mask[:, :-1] if mask is not None else None
        doc = doc_ids[:, :-1] if doc_ids is not None else None
        if doc_ids is not None:
            # A target from the next document is not predictable from this one.
            same_doc = doc_ids[:, 1:] == doc_ids[:, :-1]
            mask = same_doc if mask is None else mask[:, 1:] & same_doc
        else:
            mask = mask[:, 1:] if mask is not None else None
        if "positions" in kwargs and kwargs["positions"] is not None:
            kwargs["positions"] = kwargs["positions"][:, :-1]
        loss_sum, num_tokens = self.target_loss_sums(inp, self.targets(target, mask),
                                                     loss_mask[:, 1:] if loss_mask is not None else None,
                                                     mask=inp_mask, doc_ids=doc, **kwargs)
        if return_sums:
            return loss_sum, num_tokens
        return loss_sum / num_tokens.clamp(min=1.0)

    def beam_search(self, prompts, seq_len: int, beams: int = 4, return_beams_and_scores: bool = False,
                    eos_token: int | None = None, temperature: float = 1.0, stochastic: bool = False,
                    prompt_lens: torch.Tensor | None = None, filter_logits_fn=None,
                    restrict_to_max_seq_len: bool = True, filter_kwargs: dict | None = None, cache_kv: bool = True,
                    **net_kwargs):
        """``seq_len`` tokens after ``prompts`` by beam search over ``beams`` beams (x-transformers'
        signature; see ``models/beam.py``): the best beam ``[b, seq_len]``, or ``(beams [beams, b,
        seq_len], scores [beams, b])`` with ``return_beams_and_scores``. Deterministic beam search
        only: ``eos_token`` (x-transformers has none either) and ``stochastic=True`` are refused;
        ``temperature`` and the filters act only in stochastic search, so they are accepted and unused."""
        from .beam import beam_search_tokens

        if eos_token is not None:
            raise ValueError("beam_search: eos_token is not supported (nor in x-transformers' beam search)")
        if stochastic:
            raise ValueError("beam_search: stochastic=True (Gumbel top-k sampling of beams) is not supported")
        del temperature, filter_logits_fn, filter_kwargs, restrict_to_max_seq_len
        pad = self.pad_value if self.pad_value is not None else 0
        return beam_search_tokens(self.net, prompts, seq_len, beams=beams, pad_value=pad, prompt_lens=prompt_lens,
                                  return_beams_and_scores=return_beams_and_scores, cache_kv=cache_kv, **net_kwargs)

    def generate(self, prompts, seq_len: int, eos_token: int | None = None, temperature: float = 1.0, *,
                 filter_logits_fn=None, filter_kwargs: dict | None = None, top_k: int | None = None,
                 top_p: float | None = None, min_p: float | None = None, cache_kv: bool = True,
                 seed: int | None = None, **net_kwargs) -> torch.Tensor:
        """``seq_len`` new tokens ``[b, seq_len]`` after ``prompts`` (a ``[b, n]`` tensor, or a
        list of 1-D tensors of different lengths, left-padded and masked internally).

        ``temperature=0`` is greedy. Filters: ``top_k=`` / ``top_p=`` / ``min_p=``, or
        ``filter_logits_fn`` (``"top_k"``, ``"top_p"``, ``"min_p"`` or a function) with
        ``filter_kwargs``; by default x-transformers' top_k over 10 % of the vocabulary. A row stops
        at ``eos_token``: what follows it is ``pad_value``. ``cache_kv``: keys and values are cached
        through the layers (the same tokens as without). ``seed``: the sampling generator's (the
        same on every TP rank; none: drawn from torch's default generator). ``net_kwargs`` go to the
        net each step (``context=``, ``context_mask=`` for cross-attention)."""
        from .generate import sample_tokens

        pad = self.pad_value if self.pad_value is not None else 0
        return sample_tokens(self.net, prompts, seq_len, pad_value=pad, temperature=temperature,
                             filter_logits_fn=filter_logits_fn, filter_kwargs=filter_kwargs, top_k=top_k,
                             top_p=top_p, min_p=min_p, eos_token=eos_token, cache_kv=cache_kv, seed=seed,
                             **net_kwargs)

