"""The masked-LM objective over a bidirectional ``TransformerWrapper`` (BERT's, RoBERTa's).

Only the chosen positions have targets, about 15 % of the tokens: the head and the loss run on
those rows of the final embeddings alone, gathered by index. Their number is the batch's
``num_loss_tokens``, a host integer counted by the loader, so the gather has a static size and
no device sync (``torch.nonzero_static``).
"""

from __future__ import annotations

import torch

from ..data.batch import IGNORE_INDEX, Batch
from ..nn import masked_loss_sum, vocab_parallel_correct, vocab_parallel_cross_entropy
from .wrappers import TokenLossWrapper, TransformerWrapper


class MaskedLMWrapper(TokenLossWrapper):
    """Masked-token loss over a ``TransformerWrapper`` whose stack is an ``Encoder``: the mean
    cross-entropy over the positions whose ``labels`` are not ``ignore_index``, equal to

        logits = net(x, mask=mask); F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100)

    The trainer's path: ``loss_sums(batch)`` with an ``mlm`` ``data.Batch`` returns ``(loss_sum,
    num_loss_tokens)``; in eval mode a third sum, the correctly predicted targets (``valid/mlm_acc``).
    The loss options are ``TokenLossWrapper``'s.
    """

    eval_sums = ("mlm_acc",)  # what a Batch's third (eval-mode) sum means, per loss token

    def __init__(self, net: TransformerWrapper, *, pad_value: int | None = 0, ignore_index: int = -100,
                 label_smoothing: float = 0.0, z_loss: float = 0.0, fused_loss: bool = False,
                 loss_chunk_tokens: int | None = None, check_ids: bool = True):
        if net.attn_layers.causal:
            raise ValueError("MaskedLMWrapper needs a bidirectional stack (an Encoder): a causal Decoder cannot "
                             "see the context after a masked token")
        super().__init__(net, pad_value=pad_value, ignore_index=ignore_index, label_smoothing=label_smoothing,
                         z_loss=z_loss, fused_loss=fused_loss, loss_chunk_tokens=loss_chunk_tokens,
                         check_ids=check_ids)

    @staticmethod
    def chosen(h: torch.Tensor, labels: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``count`` rows of ``h [b, n, d]`` whose labels count, as ``[1, count, d]``, and their labels."""
        flat = labels.reshape(-1)
        idx = torch.nonzero_static(flat != IGNORE_INDEX, size=count).squeeze(1)
        return h.reshape(-1, h.shape[-1]).index_select(0, idx)[None], flat.index_select(0, idx)[None]

    def loss_sums(self, batch: Batch):
        """``(loss_sum, num_loss_tokens)`` of an ``mlm`` batch; in eval mode also the number of
        targets that are the argmax of their logits."""
        mask = None if batch.doc_ids is not None else batch.mask
        h = self.net(batch.input_ids, mask=mask, doc_ids=batch.doc_ids, positions=batch.positions,
                     doc_layout=batch.layout, return_embeddings=True)
        target = batch.labels
        if batch.num_loss_tokens:
            h, target = self.chosen(h, target, batch.num_loss_tokens)
        if self.training:
            return self.hidden_loss_sums(h, target)
        logits = self.net.logits(h)  # eval: one head for the loss and the accuracy
        kw = self.loss_kwargs()
        loss_sum, count = masked_loss_sum(vocab_parallel_cross_entropy(logits, target, **kw), target,
                                          ignore_index=IGNORE_INDEX)
        correct = vocab_parallel_correct(logits, target, group=kw["group"], vocab_size=kw["vocab_size"],
                                         ignore_index=IGNORE_INDEX)
        return loss_sum, count, correct.float().sum()

    def forward(self, x: torch.Tensor | Batch, labels: torch.Tensor | None = None, *,
                mask: torch.Tensor | None = None, return_sums: bool = False, **net_kwargs):
        """A ``Batch``: ``loss_sums(batch)``. Token ids ``x [b, n]`` with ``labels [b, n]`` (the
        original ids where a prediction counts, ``ignore_index`` elsewhere): the mean masked-token
        loss, or ``(loss_sum, num_tokens)`` with ``return_sums``. Without ``labels``: the logits."""
        if isinstance(x, Batch):
            return self.loss_sums(x)
        if labels is None:
            return self.net(x, mask=mask, **net_kwargs)
        target = labels.masked_fill(labels == self.ignore_index, IGNORE_INDEX)
        loss_sum, num = self.target_loss_sums(x, target, mask=mask, **net_kwargs)
        return (loss_sum, num) if return_sums else loss_sum / num.clamp(min=1.0)
