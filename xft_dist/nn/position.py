"""Positions: rotary embeddings (default), learned absolute, and per-document positions for packing.

Legend: b batch, n sequence, h heads, d head dim.
"""

from __future__ import annotations

import torch
from torch import nn


def document_starts(doc_ids: torch.Tensor) -> torch.Tensor:
    """``doc_ids [b, n]`` -> bool ``[b, n]``, True where a document begins (every row starts one)."""
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return starts


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """``doc_ids [b, n]`` (documents contiguous within a row) -> positions restarting at 0 per document."""
    b, n = doc_ids.shape
    idx = torch.arange(n, device=doc_ids.device).expand(b, n)
    starts = document_starts(doc_ids)
    start_of_doc = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - start_of_doc


class RotaryEmbedding(nn.Module):
    """RoPE over the first ``dim`` features of each head (``dim`` even), rotate-half layout.

    The angles are made in fp32 from the integer positions on every call, so ``model.to(bf16)``
    cannot round them: no frequency table is kept as a buffer, which ``.to(dtype)`` would cast
    (a bf16 table turns position 1001 into 1000)."""

    def __init__(self, dim: int, *, theta: float = 10000.0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"rotary dim={dim}: expected an even number")
        self.dim, self.theta = dim, float(theta)

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        """``[dim / 2]`` fp32 inverse frequencies, made on ``device`` (a few elements: no copy)."""
        return 1.0 / self.theta ** (torch.arange(0, self.dim, 2, dtype=torch.float32, device=device) / self.dim)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``positions [b, n]`` -> ``(cos, sin)``, each ``[b, 1, n, dim]`` in fp32."""
        freqs = positions.to(torch.float32).unsqueeze(-1) * self.inv_freq(positions.device)  # [b, n, dim/2]
        freqs = torch.cat([freqs, freqs], dim=-1).unsqueeze(1)
        return freqs.cos(), freqs.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate the first ``rotary dim`` features of ``x [b, h, n, d]``; the rest pass through."""
    cos, sin = rotary
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    work = torch.promote_types(x.dtype, torch.float32)  # fp32 for half inputs, fp64 stays fp64
    x_rot = x_rot.to(work)
    out = (x_rot * cos.to(work) + _rotate_half(x_rot) * sin.to(work)).to(x.dtype)
    return torch.cat([out, x_pass], dim=-1) if x_pass.shape[-1] else out


class AbsolutePositionalEmbedding(nn.Module):
    """Learned absolute positions (replicated over TP ranks): ``positions [b, n] -> [b, n, dim]``."""

    def __init__(self, dim: int, max_seq_len: int, *, std: float = 0.02):
        super().__init__()
        self.max_seq_len = max_seq_len
        self.emb = nn.Embedding(max_seq_len, dim)
        nn.init.normal_(self.emb.weight, std=std)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        if positions.numel() and int(positions.max()) >= self.max_seq_len:
            raise ValueError(f"position {int(positions.max())} >= max_seq_len={self.max_seq_len}")
        return self.emb(positions)
