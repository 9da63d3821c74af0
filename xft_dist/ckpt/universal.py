"""Resuming at another TP x DP layout through DeepSpeed's universal checkpoint.

Every checkpoint records, in DeepSpeed's client state, how each parameter is split over the TP
ranks (``universal_checkpoint_info``): column-parallel weights and biases along dim 0 (DeepSpeed's
default), row-parallel weights along dim 1, vocab-parallel embeddings and heads along dim 0 with
their padding stripped back to the real vocabulary, everything else replicated. ``to_universal``
runs DeepSpeed's ``ds_to_universal`` on a checkpoint (once: the result, ``<checkpoint>/universal``,
is committed with its own marker) and an engine configured with ``checkpoint.load_universal``
then loads the weights and optimizer state of its own slice at any layout.
"""

from __future__ import annotations

import contextlib
import io
import re
import shutil
import sys
from pathlib import Path

from torch import nn

UNIVERSAL_DIR = "universal"
DONE = "UNIVERSAL_COMPLETE"


def universal_checkpoint_info(model: nn.Module, num_tokens: int) -> dict:
    """DeepSpeed's ``universal_checkpoint_info`` for our layers (parameter names as the engine's)."""
    from deepspeed.checkpoint import constants as c

    from ..nn import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

    replicated, row, vocab = [], [], []
    for mname, m in model.named_modules():
        for pname, _ in m.named_parameters(recurse=False):
            pattern = "^" + re.escape(f"{mname}.{pname}" if mname else pname) + "$"
            if isinstance(m, VocabParallelEmbedding):
                vocab.append(pattern)
            elif isinstance(m, ColumnParallelLinear) and m.group is not None:
                continue  # split along dim 0: DeepSpeed's default
            elif isinstance(m, RowParallelLinear) and m.group is not None and pname == "weight":
                row.append(pattern)
            else:
                replicated.append(pattern)
    return {c.UNIVERSAL_CHECKPOINT_VERSION_KEY: 0.2, c.TP_REPLICATED_PARAMETER_PATTERNS: replicated,
            c.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: row, c.VOCABULARY_PARAMETER_PATTERNS: vocab,
            c.ORIGINAL_VOCAB_SIZE: num_tokens}


def universal_client_state(model: nn.Module, num_tokens: int) -> dict:
    """What a save passes to DeepSpeed's client state for ``ds_to_universal``."""
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO

    return {UNIVERSAL_CHECKPOINT_INFO: universal_checkpoint_info(model, num_tokens)}


def to_universal(ckpt: Path) -> Path:
    """``<ckpt>/universal`` (DeepSpeed's universal format), made once from ``ckpt``. One process."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal
    from deepspeed.checkpoint.ds_to_universal import parse_arguments

    out = ckpt / UNIVERSAL_DIR
    if (out / DONE).exists():
        return out
    if out.exists():
        shutil.rmtree(out)  # a conversion that did not finish
    argv = sys.argv
    try:
        sys.argv = ["ds_to_universal", "--input_folder", str(ckpt), "--output_folder", str(out),
                    "--num_extract_workers", "1", "--num_merge_workers", "1"]
        with contextlib.redirect_stdout(io.StringIO()):
            ds_to_universal(parse_arguments())
    finally:
        sys.argv = argv
    for f in ckpt.glob("*mp_rank_*_model_states.pt"):  # DeepSpeed reads its metadata from these
        shutil.copy(f, out / f.name)
    (out / DONE).write_text("ok\n")
    return out
