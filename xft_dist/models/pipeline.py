"""Models as pipeline stages for DeepSpeed's ``PipelineModule`` (``parallel.pp > 1``).

The model is built whole, exactly as at ``pp = 1`` (same seed, same weights), and cut into a
sequence of pipe layers:

- the decoder LM: its embedding, one pipe layer per block, the head with its loss;
- the encoder-decoder: the encoder's embedding, its blocks and its final norm (the first half of
  the stages), then the decoder's embedding, its blocks and the head (the second half).

Each stage keeps its share. ``uniform``: an equal number of blocks per stage (within each tower),
the embedding on a tower's first stage, the head on the last; ``parameters``: balanced by
parameter count within each tower.

What travels between stages is the hidden state ``[b, n, dim]`` only (this rank's sequence chunk
under sequence parallelism) and, in the decoder tower, the encoder's output with it (every decoder
stage cross-attends; its gradient comes back summed over the stages that used it). Everything else
a stage needs of a micro-batch (document layout, positions, masks, labels) it reads from its own
copy of the step's batch: every stage of a DP rank loads the same batch (``MicroBatchFeed``), and
the 1F1B schedule runs each stage's forwards in micro-batch order, so the feed advances once per
stage forward and never has to be told which micro-batch comes. The last stage returns the
micro-batch's loss sum scaled by the step's global-token factor (the same ``dp x accumulation / N``
as at ``pp = 1``), which the engine backpropagates as its loss; the raw sums are kept for the
step's numbers.

The token embedding's weight, where several stages hold it (a tied head; the encoder-decoder's
shared embedding), has its gradient summed over those stages (``tie`` group per (DP, TP) place)
before the DP reduction, counted once (on the first of them) in the gradient norm.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn

from ..data.batch import Batch
from ..nn import document_positions
from ..parallel import ParallelGroups
from .encdec import EncoderDecoder
from .wrappers import AutoregressiveWrapper


class MicroBatchFeed:
    """The step's micro-batches as this stage reads them, one per stage forward, in order."""

    def __init__(self):
        self.micro: list[Batch] = []
        self.scale: torch.Tensor | None = None
        self.sums: list[torch.Tensor] = []
        self._next = -1
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

    def layer_inputs(self, stack, role: str) -> dict:
        """The stack's per-call inputs for the current micro-batch (``role``: ``lm``, ``enc`` or
        ``dec``), made once per stage forward."""
        key = id(stack)
        if key not in self._inputs:
            b = self.batch
            if role == "enc":
                kw = dict(mask=b.src_mask)
                rows, n, device = b.src.shape[0], b.src.shape[1], b.src.device
            elif role == "dec":
                kw = dict(mask=b.mask, context_mask=b.src_mask)
                rows, n, device = b.rows, b.input_ids.shape[1], b.input_ids.device
            else:  # as AutoregressiveWrapper.loss_sums: documents, no key-padding mask
                kw = dict(mask=None if b.doc_ids is not None else b.mask, doc_ids=b.doc_ids, positions=b.positions,
                          doc_layout=b.layout)
                rows, n, device = b.rows, b.input_ids.shape[1], b.input_ids.device
            self._inputs[key] = stack.layer_inputs(rows, n, device, **kw)
        return self._inputs[key]


class _Pipe(nn.Module):
    """A pipe layer: the modules it trains are submodules; the stack and wrapper it calls into are
    plain references (the rest of the model is not this stage's)."""

    def __init__(self, feed: MicroBatchFeed, role: str, stack):
        super().__init__()
        self.feed, self.role = feed, role
        object.__setattr__(self, "_stack", stack)

    def inputs(self, context: torch.Tensor | None = None) -> dict:
        kw = self.feed.layer_inputs(self._stack, self.role)
        return kw if context is None else {**kw, "context": context}


class EmbedPipe(_Pipe):
    """A tower's first layer: the token (and learned position) embedding of the current micro-batch.
    The decoder tower of an encoder-decoder takes the encoder's output and passes it on."""

    def __init__(self, net, feed: MicroBatchFeed, role: str):
        super().__init__(feed, role, net.attn_layers)
        self.token_emb, self.pos_emb, self.project_emb = net.token_emb, net.pos_emb, net.project_emb
        object.__setattr__(self, "_net", net)

    def forward(self, x):
        b = self.feed.batch
        if self.role == "enc":
            h = self._net.embed(b.src)
        else:
            positions = b.positions if b.positions is not None or b.doc_ids is None else document_positions(b.doc_ids)
            h = self._net.embed(b.input_ids, positions=positions)
        h = self._stack.enter(h, self.inputs())
        return (h, x) if self.role == "dec" else h


class BlockPipe(_Pipe):
    """One block of a stack."""

    def __init__(self, stack, index: int, feed: MicroBatchFeed, role: str):
        super().__init__(feed, role, stack)
        self.block, self.index = stack.layers[index], index

    def forward(self, x):
        if self.role == "dec":
            h, context = x
            return self._stack.run_layer(self.index, h, self.inputs(context)), context
        return self._stack.run_layer(self.index, x, self.inputs())


class EncoderOutPipe(_Pipe):
    """The encoder's final norm (and its whole sequence again under sequence parallelism)."""

    def __init__(self, stack, feed: MicroBatchFeed):
        super().__init__(feed, "enc", stack)
        self.final_norm = stack.final_norm

    def forward(self, h):
        return self._stack.finish(h, self.inputs())


class HeadPipe(_Pipe):
    """Last stage: final norm, output head and loss; returns the scaled loss sum (the engine's loss)."""

    def __init__(self, model: AutoregressiveWrapper, feed: MicroBatchFeed, role: str):
        net = model.net
        super().__init__(feed, role, net.attn_layers)
        self.final_norm = net.attn_layers.final_norm
        if net.tie_embedding:
            self.token_emb = net.token_emb  # a copy of the first stage's: gradients summed over the tie group
        else:
            self.to_logits = net.to_logits
        object.__setattr__(self, "_model", model)

    def forward(self, x):
        h = x[0] if self.role == "dec" else x
        h = self._stack.finish(h, self.inputs())
        loss_sum, _ = self._model.hidden_loss_sums(h, self.feed.batch.labels)
        self.feed.sums.append(loss_sum.detach())
        return loss_sum * self.feed.scale.to(loss_sum.dtype) if self.feed.scale is not None else loss_sum


def pipe_towers(model: nn.Module, feed: MicroBatchFeed) -> list[list[nn.Module]]:
    """The pipe layers of a model, in order, per tower (one tower: the decoder LM; two: the
    encoder-decoder, whose stages split evenly between them)."""
    if isinstance(model, AutoregressiveWrapper):
        stack = model.net.attn_layers
        return [[EmbedPipe(model.net, feed, "lm"), *(BlockPipe(stack, i, feed, "lm") for i in range(stack.depth)),
                 HeadPipe(model, feed, "lm")]]
    if isinstance(model, EncoderDecoder):
        enc, dec = model.encoder.attn_layers, model.decoder.net.attn_layers
        return [[EmbedPipe(model.encoder, feed, "enc"), *(BlockPipe(enc, i, feed, "enc") for i in range(enc.depth)),
                 EncoderOutPipe(enc, feed)],
                [EmbedPipe(model.decoder.net, feed, "dec"),
                 *(BlockPipe(dec, i, feed, "dec") for i in range(dec.depth)), HeadPipe(model.decoder, feed, "dec")]]
    raise ValueError(f"parallel.pp > 1: no pipeline stages for {type(model).__name__}")


def tower_parts(towers: list[list[nn.Module]], num_stages: int, method: str = "uniform") -> list[int]:
    """Stage boundaries over the concatenated pipe layers: each tower over ``num_stages / towers``
    stages, by blocks (``uniform``) or by parameter count (``parameters``)."""
    from deepspeed.runtime import utils as ds_utils

    per_tower = num_stages // len(towers)
    parts, offset = [0], 0
    for layers in towers:
        if method == "parameters":
            weights = [sum(p.numel() for p in layer.parameters()) for layer in layers]
            local = ds_utils.partition_balanced(weights=weights, num_parts=per_tower)
        else:  # each stage starts at its first block; the leading embedding goes with the first
            blocks = [i for i, layer in enumerate(layers) if isinstance(layer, BlockPipe)]
            cuts = ds_utils.partition_uniform(num_items=len(blocks), num_parts=per_tower)
            local = [0, *(blocks[c] for c in cuts[1:-1]), len(layers)]
        parts += [offset + cut for cut in local[1:]]
        offset += len(layers)
    return parts


def build_pipeline(model: nn.Module, groups: ParallelGroups, *, partition: str = "uniform"):
    """DeepSpeed's ``PipelineModule`` over ``model``'s pipe layers, on the grid of ``groups``
    (collective: every rank calls it)."""
    import deepspeed
    import torch.distributed as dist
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    # PipelineModule asks DeepSpeed's communication layer for ranks: let it adopt the world
    deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)
    feed = MicroBatchFeed()
    towers = pipe_towers(model, feed)
    layers = [layer for tower in towers for layer in tower]
    parts = tower_parts(towers, groups.pp_size, partition)
    holders = sorted({s for s in range(groups.pp_size) for layer in layers[parts[s]:parts[s + 1]]
                      if _token_emb(layer) is not None})
    tie = groups.stages_group(holders) if len(holders) > 1 else None
    topology = PipeModelDataParallelTopology(num_pp=groups.pp_size, num_mp=groups.tp_size, num_dp=groups.dp_size)
    return _staged_model_class()(layers, parts=parts, model=model, feed=feed, tie=tie, groups=groups,
                                 topology=topology)


def _token_emb(layer: nn.Module) -> nn.Module | None:
    return getattr(layer, "token_emb", None) if isinstance(layer, (EmbedPipe, HeadPipe)) else None


@functools.cache
def _staged_model_class():
    from deepspeed.pipe import PipelineModule

    class StagedModel(PipelineModule):
        """``PipelineModule`` cut at our tower boundaries, whose forward advances the micro-batch
        feed, with our own tie of the token embedding between the stages that hold it."""

        def __init__(self, layers, *, parts, model, feed, tie, groups, **kwargs):
            object.__setattr__(self, "_parts", parts)
            super().__init__(layers, **kwargs)
            self.feed, self.groups = feed, groups
            object.__setattr__(self, "_tie", tie)
            object.__setattr__(self, "_model", model)
            self._tied = list({id(e.weight): e.weight for e in map(_token_emb, self.forward_funcs)
                               if e is not None}.values())
            if tie is not None and groups.pp_rank != min(self.stages_holding_embedding()):
                for p in self._tied:
                    p.ds_pipe_replicated = True  # counted once (on the first holder) in the gradient norm

        def _partition_layers(self, method="uniform"):
            self.parts = list(self._parts)
            stage = self._topo.get_coord(self.global_rank).pipe
            self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])

        def stages_holding_embedding(self) -> list[int]:
            specs, parts = self._layer_specs, self.parts
            return [s for s in range(self.num_stages)
                    if any(_token_emb(layer) is not None for layer in specs[parts[s]:parts[s + 1]])]

        def forward(self, x):
            self.feed.advance()
            return super().forward(x)

        def get_tied_weights_and_groups(self):
            return [] if self._tie is None else [(p, self._tie) for p in self._tied]

        def allreduce_tied_weight_gradients(self):
            from ..parallel import all_reduce_

            for p, group in self.get_tied_weights_and_groups():
                all_reduce_(p.grad, group)

        def all_parameters(self) -> dict[str, nn.Parameter]:
            """Every stage's parameters by their names on their stage's engine (a tied embedding
            under each stage's name)."""
            return {f"{i}.{n}": p for i, layer in enumerate(self._layer_specs) for n, p in layer.named_parameters()}

        def model_names(self) -> dict[str, str]:
            """Each pipe-layer parameter name (``"3.block.attn.to_q.weight"``) and the name of that
            parameter in the whole model, for every stage."""
            return model_names(self._layer_specs, self._model)

    return StagedModel


def stage_owners(pipe) -> dict[str, int]:
    """Each parameter of the whole model, by its name there, and the first stage holding it."""
    names, owners = pipe.model_names(), {}
    for stage in range(pipe.num_stages):
        for index in range(pipe.parts[stage], pipe.parts[stage + 1]):
            for name, _ in pipe._layer_specs[index].named_parameters():
                owners.setdefault(names[f"{index}.{name}"], stage)
    return owners


def model_names(layers: list[nn.Module], model: nn.Module) -> dict[str, str]:
    """``"<layer index>.<name in the pipe layer>"`` -> the parameter's name in ``model``."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    return {f"{i}.{n}": by_id[id(p)] for i, layer in enumerate(layers) for n, p in layer.named_parameters()}


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
