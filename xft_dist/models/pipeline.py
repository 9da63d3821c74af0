"""The decoder LM as pipeline stages for DeepSpeed's ``PipelineModule`` (``parallel.pp > 1``).

The model is built whole, exactly as at ``pp = 1`` (same seed, same weights), and cut into a
sequence of pipe layers: the embedding, one pipe layer per block, and the head with its loss.
DeepSpeed's partition keeps this stage's share (``uniform``: an equal number of blocks per stage,
the embedding on the first and the head on the last; ``parameters``: balanced by parameter count).

What travels between stages is the hidden state ``[b, n, dim]`` only (this rank's sequence chunk
under sequence parallelism). Everything else a stage needs of a micro-batch (the document layout,
positions, labels) it reads from its own copy of the step's batch: every stage of a DP rank loads
the same batch (``MicroBatchFeed``), and the 1F1B schedule runs each stage's forwards in
micro-batch order, so the feed advances once per stage forward and never has to be told which
micro-batch comes. The last stage returns the micro-batch's loss sum scaled by the step's
global-token factor (the same ``dp x accumulation / N`` as at ``pp = 1``), which the engine
backpropagates as the loss; the raw sums are kept for the step's numbers.

A tied head is the token embedding's weight held by the first and the last stage: their gradients
are summed over a two-rank group per (DP, TP) place (``tie_group``) before the DP reduction, the
copy on the last stage counted once in the gradient norm.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn

from ..data.batch import Batch
from ..nn import document_positions
from ..parallel import ParallelGroups
from .wrappers import AutoregressiveWrapper


class MicroBatchFeed:
    """The step's micro-batches as this stage reads them, one per stage forward, in order."""

    def __init__(self):
        self.micro: list[Batch] = []
        self.scale: torch.Tensor | None = None
        self.sums: list[torch.Tensor] = []
        self._next = 0
        self._inputs: dict[int, dict] = {}

    def start(self, micro: list[Batch], scale: torch.Tensor | None) -> None:
        """A new step (or evaluation) over ``micro``; ``scale`` multiplies each loss sum."""
        self.micro, self.scale, self.sums, self._next, self._inputs = list(micro), scale, [], -1, {}

    def advance(self) -> None:
        self._next += 1
        if self._next >= len(self.micro):
            raise RuntimeError(f"pipeline stage ran forward {self._next + 1} times for {len(self.micro)} micro-batches")
        self._inputs = {}  # one micro-batch in flight per forward: the tables of the last one are done with

    @property
    def batch(self) -> Batch:
        return self.micro[self._next]

    def layer_inputs(self, stack) -> dict:
        """The stack's per-call inputs for the current micro-batch, made once per stage forward."""
        key = id(stack)
        if key not in self._inputs:
            b = self.batch
            mask = None if b.doc_ids is not None else b.mask  # as AutoregressiveWrapper.loss_sums
            self._inputs[key] = stack.layer_inputs(b.rows, b.input_ids.shape[1], b.input_ids.device, mask=mask,
                                                   doc_ids=b.doc_ids, positions=b.positions, doc_layout=b.layout)
        return self._inputs[key]


class EmbedPipe(nn.Module):
    """First stage: token (and learned position) embedding of the current micro-batch."""

    def __init__(self, model: AutoregressiveWrapper, feed: MicroBatchFeed):
        super().__init__()
        net = model.net
        self.token_emb, self.pos_emb, self.project_emb = net.token_emb, net.pos_emb, net.project_emb
        object.__setattr__(self, "_net", net)  # not a submodule: only the parts above are this stage's
        self.feed = feed

    def forward(self, _placeholder: torch.Tensor) -> torch.Tensor:
        b = self.feed.batch
        positions = b.positions if b.positions is not None or b.doc_ids is None else document_positions(b.doc_ids)
        h = self._net.embed(b.input_ids, positions=positions)
        stack = self._net.attn_layers
        return stack.enter(h, self.feed.layer_inputs(stack))


class BlockPipe(nn.Module):
    """One block of the stack."""

    def __init__(self, stack, index: int, feed: MicroBatchFeed):
        super().__init__()
        self.block, self.index, self.feed = stack.layers[index], index, feed
        object.__setattr__(self, "_stack", stack)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self._stack.run_layer(self.index, h, self.feed.layer_inputs(self._stack))


class HeadPipe(nn.Module):
    """Last stage: final norm, output head and loss; returns the scaled loss sum (the engine's loss)."""

    def __init__(self, model: AutoregressiveWrapper, feed: MicroBatchFeed):
        super().__init__()
        net = model.net
        self.final_norm = net.attn_layers.final_norm
        if net.tie_embedding:
            self.token_emb = net.token_emb  # the tied copy: its gradient is summed with the first stage's
        else:
            self.to_logits = net.to_logits
        object.__setattr__(self, "_model", model)
        self.feed = feed

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        stack = self._model.net.attn_layers
        h = stack.finish(h, self.feed.layer_inputs(stack))
        loss_sum, _ = self._model.hidden_loss_sums(h, self.feed.batch.labels)
        self.feed.sums.append(loss_sum.detach())
        return loss_sum * self.feed.scale.to(loss_sum.dtype) if self.feed.scale is not None else loss_sum


def pipe_layers(model: nn.Module, feed: MicroBatchFeed) -> list[nn.Module]:
    """The pipe layers of a model, in order (the decoder LM)."""
    if not isinstance(model, AutoregressiveWrapper):
        raise ValueError(f"parallel.pp > 1 builds the decoder LM in stages; got {type(model).__name__} "
                         "(model.kind=encoder_decoder has no pipeline stages yet)")
    stack = model.net.attn_layers
    return [EmbedPipe(model, feed), *(BlockPipe(stack, i, feed) for i in range(stack.depth)), HeadPipe(model, feed)]


def build_pipeline(model: nn.Module, groups: ParallelGroups, *, partition: str = "uniform"):
    """DeepSpeed's ``PipelineModule`` over ``model``'s pipe layers, on the grid of ``groups``
    (collective: every rank calls it)."""
    import deepspeed
    import torch.distributed as dist
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    # PipelineModule asks DeepSpeed's communication layer for ranks: let it adopt the world
    deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)
    feed = MicroBatchFeed()
    layers = pipe_layers(model, feed)
    topology = PipeModelDataParallelTopology(num_pp=groups.pp_size, num_mp=groups.tp_size, num_dp=groups.dp_size)
    method = "type:BlockPipe" if partition == "uniform" else "parameters"
    tied = getattr(getattr(model, "net", None), "tie_embedding", False)
    tie = groups.stage_pair_group(0, groups.pp_size - 1) if tied else None
    return StagedModel(layers, topology=topology, partition_method=method, feed=feed, tie=tie, groups=groups)


@functools.cache
def _staged_model_class():
    from deepspeed.pipe import PipelineModule

    class _StagedModel(PipelineModule):
        """``PipelineModule`` whose forward advances the micro-batch feed, with our own tie of the
        embedding between first and last stage."""

        def __init__(self, layers, *, feed, tie, groups, **kwargs):
            super().__init__(layers, **kwargs)
            self.feed, self.groups = feed, groups
            object.__setattr__(self, "_tie", tie)
            self._tied = [m.token_emb.weight for m in self.forward_funcs
                          if isinstance(m, (EmbedPipe, HeadPipe)) and getattr(m, "token_emb", None) is not None]
            if tie is not None and not groups.first_stage:
                for p in self._tied:
                    p.ds_pipe_replicated = True  # counted once (on the first stage) in the gradient norm

        def forward(self, x):
            self.feed.advance()
            return super().forward(x)

        def get_tied_weights_and_groups(self):
            if self._tie is None:
                return []
            return [(p, self._tie) for p in self._tied]

        def allreduce_tied_weight_gradients(self):
            from ..parallel import all_reduce

            for p, group in self.get_tied_weights_and_groups():
                all_reduce(p.grad, group)

    return _StagedModel


def StagedModel(layers, **kwargs):  # noqa: N802 - a class made on first use (DeepSpeed imports late)
    return _staged_model_class()(layers, **kwargs)


def reference_name(pipe_name: str, depth: int) -> str:
    """The name a pipe-layer parameter has in the whole decoder LM (``AutoregressiveWrapper``):
    ``"3.block.attn.to_q.weight"`` -> ``"net.attn_layers.layers.2.attn.to_q.weight"``."""
    index, rest = pipe_name.split(".", 1)
    if rest.startswith("block."):
        return f"net.attn_layers.layers.{int(index) - 1}.{rest[len('block.'):]}"
    if rest.startswith("final_norm."):
        return f"net.attn_layers.{rest}"
    return f"net.{rest}"


def stage_owners(pipe) -> dict[str, int]:
    """Each parameter of the whole model, by its name there, and the stage that trains it (a tied
    embedding: the first stage)."""
    owners: dict[str, int] = {}
    depth = sum(isinstance(layer, BlockPipe) for layer in pipe._layer_specs)
    for stage in range(pipe.num_stages):
        for index in range(pipe.parts[stage], pipe.parts[stage + 1]):
            for name, _ in pipe._layer_specs[index].named_parameters():
                owners.setdefault(reference_name(f"{index}.{name}", depth), stage)
    return owners


@contextlib.contextmanager
def whole_model(pipe, model: nn.Module, groups: ParallelGroups, device):
    """``model`` with every stage's current weights, on ``device``, for the duration (generation on
    a pipeline run: each stage broadcasts its parameters to the other stages of its (DP, TP) place;
    afterwards the parameters of other stages go back where they were). Collective over the stages."""
    from ..parallel import broadcast

    owners = stage_owners(pipe)
    moved = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            stage = owners[name]
            if stage != groups.pp_rank:
                moved.append((p, p.data))
                p.data = p.data.to(device)
            p.data.copy_(broadcast(p.data, groups.pp_group, src=groups.stage_rank(stage)))
    try:
        yield model
    finally:
        for p, data in moved:
            p.data = data
