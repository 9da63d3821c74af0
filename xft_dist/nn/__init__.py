"""Tensor-parallel building blocks. Process groups are passed in; nothing is read from globals."""

from .embedding import VocabParallelEmbedding, padded_vocab_size
from .fused_loss import fused_head_cross_entropy
from .linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear
from .loss import masked_loss_sum, vocab_parallel_correct, vocab_parallel_cross_entropy
from .sharding import is_tensor_parallel, mark_tensor_parallel, normal_init, tp_split

__all__ = [
    "ColumnParallelLinear", "RowParallelLinear", "ReplicatedLinear", "tp_split", "VocabParallelEmbedding",
    "padded_vocab_size",
    "vocab_parallel_cross_entropy", "vocab_parallel_correct", "masked_loss_sum", "fused_head_cross_entropy",
    "mark_tensor_parallel", "is_tensor_parallel", "normal_init",
]

from .attention import Attention, attention_mask  # noqa: E402
from .checkpoint import checkpoint  # noqa: E402
from .mlp import FeedForward  # noqa: E402
from .norm import make_norm  # noqa: E402
from .position import AbsolutePositionalEmbedding, RotaryEmbedding, apply_rotary, document_positions  # noqa: E402

__all__ += ["Attention", "attention_mask", "checkpoint", "FeedForward", "make_norm",
            "AbsolutePositionalEmbedding", "RotaryEmbedding", "apply_rotary", "document_positions"]
