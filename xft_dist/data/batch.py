"""The training batch: one typed object from the loader to the loss.

A ``Batch`` holds what a model learns from and what the step needs to know about it:

- ``input_ids [b, n]`` and ``labels [b, n]``: the (decoder's) inputs and next-token targets, the
  targets already ``IGNORE_INDEX`` wherever nothing is learnt (across a document boundary, on
  padding, on a span example's pad targets). A masked-LM batch (``mlm``) holds the corrupted
  inputs and, at the same positions, the original tokens of the chosen ones (the rest ignored). A model's ``loss_sums(batch)`` counts exactly the
  targets that are not ``IGNORE_INDEX``: ``num_loss_tokens``.
- ``mask [b, n]``: real input positions. ``doc_ids`` / ``positions`` / ``layout``: packed and padded
  rows' documents (padding is a document of its own), their positions, and the flattened documents'
  ``DocLayout``, built on the host where the boundaries are known (no device sync to find them).
- ``src`` / ``src_mask [b, m]``: span corruption's encoder input.
- ``num_tokens`` (positions processed), ``num_real_tokens`` (non-padding positions) and
  ``num_loss_tokens``: host integers, counted once where the tensors are made.

This module imports torch and NumPy only: the loader builds batches, models read them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np
import torch

IGNORE_INDEX = -100
MODES = ("packed", "padded", "span", "mlm")


@dataclass(frozen=True)
class DocLayout:
    """The packed documents of a ``[b, n]`` batch, flattened row-major (documents never span rows).

    ``cu_seqlens`` (int32 ``[docs + 1]``) are the kernels' cumulative offsets; ``bounds`` the same
    as Python ints when they were known on the host (the per-document CPU path reads them);
    ``max_len`` bounds the longest document (``n`` is a valid bound).
    """

    cu_seqlens: torch.Tensor
    bounds: tuple[int, ...] | None
    max_len: int
    shape: tuple[int, int]

    @classmethod
    def from_doc_ids(cls, doc_ids: torch.Tensor) -> "DocLayout":
        """From ``doc_ids [b, n]`` (non-decreasing within each row). On the CPU nothing waits for a
        device; from a CUDA tensor the offsets cost one host sync (the loader builds them on the
        host, in ``Batch``)."""
        if doc_ids.ndim != 2:
            raise ValueError(f"doc_ids must be [b, n], got {tuple(doc_ids.shape)}")
        b, n = doc_ids.shape
        if doc_ids.device.type == "cpu":
            ids = doc_ids.numpy()
            if n > 1 and (np.diff(ids, axis=1) < 0).any():
                row = int(np.nonzero((np.diff(ids, axis=1) < 0).any(axis=1))[0][0])
                raise ValueError(f"doc_ids row {row} decreases: document ids must be non-decreasing within a row "
                                 "(each document one contiguous run)")
            starts = np.ones((b, n), dtype=bool)
            starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
            bounds = tuple(int(i) for i in np.nonzero(starts.reshape(-1))[0]) + (b * n,)
            return cls(cu_seqlens=torch.tensor(bounds, dtype=torch.int32), bounds=bounds, max_len=n, shape=(b, n))
        if n > 1 and bool((doc_ids[:, 1:] < doc_ids[:, :-1]).any()):
            raise ValueError("doc_ids decrease within a row: document ids must be non-decreasing within a "
                             "row (each document one contiguous run)")
        starts = torch.ones_like(doc_ids, dtype=torch.bool)
        starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
        start_idx = torch.nonzero(starts.flatten(), as_tuple=False).flatten()
        cu = torch.cat([start_idx, start_idx.new_tensor([b * n])]).to(torch.int32)
        return cls(cu_seqlens=cu, bounds=None, max_len=n, shape=(b, n))

    def to(self, device, non_blocking: bool = False) -> "DocLayout":
        return DocLayout(self.cu_seqlens.to(device, non_blocking=non_blocking), self.bounds, self.max_len,
                         self.shape)

    def host_bounds(self) -> tuple[int, ...]:
        return self.bounds if self.bounds is not None else tuple(self.cu_seqlens.tolist())


def _count(flags: torch.Tensor) -> int:
    """True entries of a bool tensor: read on the host from CPU tensors (no device is involved),
    a device sync otherwise."""
    if flags.device.type == "cpu":
        return int(np.count_nonzero(flags.numpy()))
    return int(flags.sum())


_ROW_TENSORS = ("input_ids", "labels", "mask", "doc_ids", "positions")


@dataclass(frozen=True)
class Batch:
    """One batch (or micro-batch) of training rows; see the module doc. Build it with ``Batch.of``
    (which counts) or ``Batch.from_rows`` (the loader's arrays); the constructor checks shapes."""

    mode: str
    input_ids: torch.Tensor
    labels: torch.Tensor
    mask: torch.Tensor
    num_tokens: int
    num_real_tokens: int
    num_loss_tokens: int
    doc_ids: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    layout: DocLayout | None = None
    src: torch.Tensor | None = None
    src_mask: torch.Tensor | None = None
    stream: torch.Tensor | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"Batch mode={self.mode!r}: expected one of {MODES}")
        if self.input_ids.ndim != 2:
            raise ValueError(f"Batch input_ids must be [b, n], got {tuple(self.input_ids.shape)}")
        shape = tuple(self.input_ids.shape)
        for name in _ROW_TENSORS[1:]:
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != shape:
                raise ValueError(f"Batch {name} is {tuple(t.shape)}, input_ids {shape}: every row tensor is [b, n]")
        if (self.src is None) != (self.mode != "span") or (self.src is None) != (self.src_mask is None):
            raise ValueError(f"Batch mode={self.mode!r}: src and src_mask are given for span batches, and only then")
        if self.src is not None:
            if self.src.ndim != 2 or self.src.shape[0] != shape[0] or self.src_mask.shape != self.src.shape:
                raise ValueError(f"Batch src {tuple(self.src.shape)} / src_mask {tuple(self.src_mask.shape)}: "
                                 f"expected the same [b={shape[0]}, m]")
        if self.stream is not None and tuple(self.stream.shape) != shape[:1]:
            raise ValueError(f"Batch stream is {tuple(self.stream.shape)}, expected [b={shape[0]}]")
        if self.layout is not None:
            self._check_layout(shape)
        if not 0 <= self.num_loss_tokens <= self.num_real_tokens <= self.num_tokens:
            raise ValueError(f"Batch counts: loss tokens {self.num_loss_tokens}, real {self.num_real_tokens}, "
                             f"positions {self.num_tokens}: expected 0 <= loss <= real <= positions")

    def _check_layout(self, shape: tuple[int, int]) -> None:
        if self.doc_ids is None:
            raise ValueError("Batch layout without doc_ids: the layout describes the rows' documents")
        if tuple(self.layout.shape) != shape:
            raise ValueError(f"Batch layout covers rows {tuple(self.layout.shape)}, the batch is {shape}")
        if self.layout.bounds is not None:
            b, total = np.asarray(self.layout.bounds), shape[0] * shape[1]
            if b[0] != 0 or b[-1] != total or (np.diff(b) <= 0).any():
                raise ValueError(f"Batch layout bounds {tuple(b[:3])}...{tuple(b[-2:])} do not cover the "
                                 f"{shape[0]} x {shape[1]} positions in order")
            if (b[:-1] // shape[1] != (b[1:] - 1) // shape[1]).any():
                raise ValueError("Batch layout has a document that crosses a row boundary: documents are cut at rows")

    # ------------------------------------------------------------------------------ building
    @classmethod
    def of(cls, mode: str, input_ids, labels, mask=None, *, doc_ids=None, positions=None, src=None, src_mask=None,
           stream=None, layout: DocLayout | None = None) -> "Batch":
        """A batch from tensors, counted (from CPU tensors: no device sync). ``labels`` are final:
        every target that is not ``IGNORE_INDEX`` counts. ``mask`` defaults to all real; packed and
        padded rows with ``doc_ids`` on the CPU get their ``layout`` here."""
        mask = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask.bool()
        if layout is None and doc_ids is not None and doc_ids.device.type == "cpu":
            layout = DocLayout.from_doc_ids(doc_ids)
        return cls(mode=mode, input_ids=input_ids, labels=labels, mask=mask, doc_ids=doc_ids, positions=positions,
                   layout=layout, src=src, src_mask=src_mask, stream=stream, num_tokens=input_ids.numel(),
                   num_real_tokens=_count(mask), num_loss_tokens=_count(labels != IGNORE_INDEX))

    @classmethod
    def from_rows(cls, mode: str, rows: dict[str, np.ndarray], *, pad_id: int, stream=None,
                  ignore_index: int = IGNORE_INDEX) -> "Batch":
        """The loader's row arrays (see ``data.packing``) as a batch: packed / padded rows'
        ``loss_mask`` zeros, span targets past the end (or equal to ``pad_id``) and targets equal
        to ``ignore_index`` (``loss.ignore_index``) become ``IGNORE_INDEX``."""
        t = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in rows.items()}
        if mode == "span":
            tgt, tgt_mask = t["tgt"], t["tgt_mask"]
            target = tgt[:, 1:]
            labels = target.masked_fill(~tgt_mask[:, 1:] | (target == pad_id) | (target == ignore_index), IGNORE_INDEX)
            return cls.of(mode, tgt[:, :-1].contiguous(), labels, tgt_mask[:, :-1].contiguous(), src=t["src"],
                          src_mask=t["src_mask"], stream=stream)
        labels = t["labels"].masked_fill((t["loss_mask"] == 0) | (t["labels"] == ignore_index), IGNORE_INDEX)
        return cls.of(mode, t["input_ids"], labels, t["mask"], doc_ids=t["doc_ids"], positions=t["positions"],
                      stream=stream)

    # ------------------------------------------------------------------------------ using
    @property
    def rows(self) -> int:
        return self.input_ids.shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor the batch holds, by field name (the layout's offsets not included)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}

    def counts(self) -> tuple[int, int, int]:
        """``(num_tokens, num_real_tokens, num_loss_tokens)``."""
        return self.num_tokens, self.num_real_tokens, self.num_loss_tokens

    def select(self, start: int, stop: int) -> "Batch":
        """Rows ``[start, stop)``, recounted (a host batch: before it moves)."""
        cut = {k: t[start:stop] for k, t in self.tensors().items()}
        return Batch.of(self.mode, cut.pop("input_ids"), cut.pop("labels"), cut.pop("mask"), **cut)

    def split(self, micro_batch: int) -> list["Batch"]:
        """Micro-batches of ``micro_batch`` rows (the last may be shorter)."""
        if micro_batch < 1:
            raise ValueError(f"micro_batch={micro_batch}: expected at least 1 row")
        return [self.select(i, i + micro_batch) for i in range(0, self.rows, micro_batch)]

    def shard(self, rank: int, parts: int) -> "Batch":
        """This rank's contiguous share of the rows (``torch.tensor_split``'s: sizes differ by at most one)."""
        sizes = [len(r) for r in torch.arange(self.rows).tensor_split(parts)]
        start = sum(sizes[:rank])
        return self.select(start, start + sizes[rank])

    def pin_memory(self) -> "Batch":
        """The batch in pinned host memory (CUDA builds), so that ``to(cuda, non_blocking=True)``
        copies asynchronously. ``torch.utils.data.DataLoader(pin_memory=True)`` calls it too."""
        pinned = {k: t.pin_memory() for k, t in self.tensors().items()}
        layout = self.layout
        if layout is not None:
            layout = DocLayout(layout.cu_seqlens.pin_memory(), layout.bounds, layout.max_len, layout.shape)
        return replace(self, layout=layout, **pinned)

    def to(self, device, non_blocking: bool = False) -> "Batch":
        """The batch on ``device`` (the counts stay host integers; ``layout.bounds`` too)."""
        moved = {k: t.to(device, non_blocking=non_blocking) for k, t in self.tensors().items()}
        layout = self.layout.to(device, non_blocking=non_blocking) if self.layout is not None else None
        return replace(self, layout=layout, **moved)
