"""What may change between a checkpoint's resolved config and the config that resumes from it.

A resumed run continues the saved parameters, optimizer state and data stream. Keys that change
the parameters' shapes or meaning (``REFUSED_SECTIONS`` less ``RUNTIME_MODEL_KEYS``) or the data
stream's order (``STREAM_KEYS``) are refused on resume; every other key may change (steps, learning
rate, schedule, logging, checkpoint cadence, data sources' weights, the parallel layout, which
``checkpoint.reshard`` decides) and is listed once in the log.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError

REFUSED_SECTIONS = ("model",)
# model keys that change how a step is computed, not what the parameters are
RUNTIME_MODEL_KEYS = frozenset({
    "model.activation_checkpointing", "model.fused_loss", "model.loss_chunk_tokens", "model.attn_dropout",
    "model.ff_dropout", "model.init", "model.init_std", "model.emb_init_std", "model.head_init_std",
})
# the data stream continues exactly only with the settings it was cut with
STREAM_KEYS = frozenset({
    "data.mode", "data.seq_len", "data.enc_len", "data.num_streams", "data.shuffle", "data.shuffle_buffer",
    "data.noise_density", "data.mean_span", "data.mlm_probability", "data.mlm_replace", "data.mlm_rows",
    "train.global_batch", "train.seed",
})


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """``{"model": {"dim": 8}}`` -> ``{"model.dim": 8}`` (lists stay values)."""
    out: dict[str, object] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def refused(key: str) -> bool:
    return (key.split(".", 1)[0] in REFUSED_SECTIONS and key not in RUNTIME_MODEL_KEYS) or key in STREAM_KEYS


@dataclass(frozen=True)
class Change:
    key: str
    saved: object
    now: object

    def __str__(self) -> str:
        return f"{self.key}: {self.saved!r} -> {self.now!r}"


def _defaults() -> dict[str, object]:
    from .schema import Config

    return flatten(Config(data={"shards": ""}).model_dump(mode="json"))


def config_changes(saved: dict, now: dict) -> list[Change]:
    """Every key whose value differs (a key only one side has counts, with None on the other). A key
    the saved config predates is no change while it holds its default (what the older run did)."""
    a, b = flatten(saved), flatten(now)
    defaults = _defaults()
    return [Change(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and not (k not in a and k in defaults and b[k] == defaults[k])]


def check_resume(saved: dict, now: dict, *, where: str) -> list[Change]:
    """The allowed changes from ``saved`` (the checkpoint's resolved config) to ``now``; a
    ``ConfigError`` naming every refused key with both values and the ways out."""
    changes = config_changes(saved, now)
    bad = [c for c in changes if refused(c.key)]
    if bad:
        listed = "; ".join(f"{c.key}={c.saved!r} in the checkpoint, {c.now!r} now" for c in bad)
        raise ConfigError(f"cannot resume {where}: {listed}. These keys fix the parameters' shapes or the data "
                          "stream: set them back, or start a fresh run with run.name=<new> (tools/export.py "
                          "carries the weights out of this one)")
    return [c for c in changes if not refused(c.key)]
