"""``train.compile``: every transformer block goes through ``torch.compile``.

Blocks, not the whole model: the embedding's id check and the loss's bookkeeping stay eager (host
syncs and data-dependent checks outside the traced region), while everything a block does is
traced, its TP and sequence-parallel collectives included (torch's compiler rewrites the
``torch.distributed`` calls of ``parallel/comm.py`` into functional collectives inside the
autograd pairs). Each block is compiled in place (``nn.Module.compile``), so parameter and
state-dict names do not change, and the blocks of a stack share one compiled graph.

Under ZeRO-3, DeepSpeed gathers each parameter in a forward hook of its module, wrapped in
``torch.compiler.disable``: the blocks still compile, in pieces between those hooks (graph breaks
that are DeepSpeed's), and compute what eager computes.

Under compilation: attention over packed documents uses the varlen kernel where one runs (CUDA,
fp16 / bf16) and the dense document mask elsewhere (the CPU twin's per-document loop reads host
offsets); sequence parallelism's re-gather of the regions' inputs is left to the compiler (saved-
tensor hooks do not trace).
"""

from __future__ import annotations

from torch import nn

from .layers import AttentionLayers


def compile_blocks(model: nn.Module, **options) -> int:
    """Compile every block of every layer stack of ``model`` in place; returns how many.
    ``options`` go to ``torch.compile`` (e.g. ``backend="aot_eager"``)."""
    count = 0
    for stack in model.modules():
        if isinstance(stack, AttentionLayers):
            for block in stack.layers:
                block.compile(**options)
                count += 1
    return count
