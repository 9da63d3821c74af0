"""``build_run(cfg, env) -> Run``: the one wiring of a run, used by the training loop, the doctor
(its world stage), checkpoint conversion and export, the benchmark and the parity tests.

Stages, each including the ones before (``upto=``):

    "model"   vocabulary facts, RNG streams and the model (no process group needed for one process)
    "engine"  + the distributed world (CUDA device, process group, TP x DP groups) and DeepSpeed
    "train"   + the loader, the checkpoint manager (resumed from the newest complete checkpoint),
              the run directory and the metric sinks

Static checks (world size vs TP, batch arithmetic, precision, streams vs DP, shards present) run
before the process group exists, so a bad config exits every rank with the same message and nobody
waits on a collective.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..ckpt import CheckpointManager
from ..ckpt.init_from import check_init_shapes, load_init_weights, resolve_init_from
from ..config import Config, ConfigError, batch_split, check_precision, dump_config
from ..data import DataError, LoaderConfig, Manifest, Mixture, Source, StreamingLoader, num_sentinels
from ..models.compile import compile_blocks
from ..models.factory import build_model
from ..obs import MetricSinks
from ..parallel import ParallelGroups, RNGStreams, barrier, restore_rng_state, rng_state_from_tensors, seed_all
from ..runtime import DistEnv
from ..runtime.world import World, accelerator, init_world, matmul_precision, rank_device
from .resume import ResumePlan, check_paths, checkpoint_dir, newest_checkpoint, plan_resume, run_dir

log = logging.getLogger("xft_dist.train")
STAGES = ("model", "engine", "train")


@dataclass(frozen=True)
class VocabFacts:
    num_tokens: int       # the model's vocabulary: tokenizer + span sentinels, unless model.num_tokens
    pad_id: int
    tokenizer_vocab: int
    num_sentinels: int


def vocab_facts(cfg: Config, manifest: Manifest | Mixture) -> VocabFacts:
    tok = manifest.tokenizer
    sentinels = num_sentinels(LoaderConfig.from_config(cfg))
    num_tokens = cfg.model.num_tokens or tok["vocab_size"] + sentinels
    return VocabFacts(num_tokens=num_tokens, pad_id=tok["pad_id"], tokenizer_vocab=tok["vocab_size"],
                      num_sentinels=sentinels)


def static_checks(cfg: Config, env: DistEnv, device: str) -> tuple[int, Mixture]:
    """(data-parallel size, manifest), or a ``ConfigError`` naming the key."""
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    if env.world_size % pp:
        raise ConfigError(f"parallel.pp={pp} must divide the world size {env.world_size} (launcher: {env.launcher})")
    if (env.world_size // pp) % tp:
        raise ConfigError(f"parallel.tp={tp} must divide the world size {env.world_size} / parallel.pp={pp} "
                          f"(launcher: {env.launcher})")
    dp = env.world_size // (tp * pp)
    _, accum = batch_split(cfg, dp)
    if pp > 1 and accum < pp and env.rank == 0:
        log.warning("parallel.pp=%d with %d micro-batches per step (train.global_batch / (train.micro_batch x "
                    "DP %d)): fewer micro-batches than stages; the 1F1B bubble idles each stage %.0f %% of the step "
                    "((p - 1) / (m + p - 1)); use at least %d", pp, accum, dp, 100 * (pp - 1) / (accum + pp - 1), pp)
    check_precision(cfg, device)
    rows = cfg.data.valid.batch_rows or cfg.train.global_batch
    if pp > 1 and rows % (cfg.train.micro_batch * dp):
        raise ConfigError(f"data.valid.batch_rows={rows} with parallel.pp={pp}: the pipeline sends micro-batches "
                          f"of one shape, so it must be a multiple of train.micro_batch={cfg.train.micro_batch} x "
                          f"DP {dp}")
    if cfg.data.num_streams % dp:
        raise ConfigError(f"data.num_streams={cfg.data.num_streams} must be divisible by the data-parallel "
                          f"size {dp} (world {env.world_size} / (tp {tp} x pp {pp}))")
    if cfg.train.global_batch % cfg.data.num_streams:
        raise ConfigError(f"train.global_batch={cfg.train.global_batch} must be a multiple of "
                          f"data.num_streams={cfg.data.num_streams}")
    manifest = data_mixture(cfg)
    if cfg.model.num_tokens is not None:
        try:
            manifest.sources[0].manifest.check_vocab(cfg.model.num_tokens)
        except DataError as e:
            if cfg.model.init_from is None:
                raise
            raise ConfigError(f"model.init_from={cfg.model.init_from!r}: its vocabulary is too small for the "
                              f"shards: {e}") from None
    if cfg.model.init_from is not None and newest_checkpoint(cfg) is None:  # a resumed run never reads it
        check_init_shapes(cfg, cfg.model.num_tokens or manifest.tokenizer["vocab_size"])
    from .evaluate import valid_manifest

    valid_manifest(cfg, manifest)  # present, and made with the training shards' tokenizer
    return dp, manifest


@dataclass
class Run:
    cfg: Config
    env: DistEnv
    device: torch.device
    groups: ParallelGroups
    streams: RNGStreams | None
    vocab: VocabFacts
    model: torch.nn.Module
    world: World | None = None
    engine: object | None = None
    loader: StreamingLoader | None = None
    ckpt: CheckpointManager | None = None
    sinks: MetricSinks | None = None
    run_dir: Path | None = None
    config_text: str = ""
    step: int = 0                                   # the last completed step (at start: the one resumed from)
    resumed_from: Path | None = None
    valid_batches: list | None = None               # data.valid: the fixed validation batches (host)
    byte_tokenizer: bool = False
    watchdog: object | None = None                  # parallel.stall_timeout_s: this rank's Watchdog
    heartbeat: object | None = None                 # parallel.heartbeat_s: this rank's Heartbeat (lost peers)
    guard: object | None = None                     # train.spike: the SpikeGuard
    spike_state: dict | None = None                 # its state in the checkpoint resumed from
    skipped_batches: int = 0                        # global batches skipped (rollbacks, train.skip_data)

    @property
    def rank0(self) -> bool:
        return self.groups.rank == 0


def build_run(cfg: Config, env: DistEnv | None = None, *, upto: str = "train", vocab: VocabFacts | None = None,
              device: torch.device | str | None = None) -> Run:
    """Build the run up to stage ``upto`` (see the module doc).

    ``vocab`` replaces the facts read from the shards' manifest (conversion and benchmarks that have
    no shards). ``device`` places a one-process ``"model"`` stage (``"meta"``: no weights allocated);
    with a world, DeepSpeed puts the model on this rank's device.
    """
    if upto not in STAGES:
        raise ValueError(f"upto={upto!r}: expected one of {STAGES}")
    newest = newest_checkpoint(cfg) if upto == "train" else None
    # model.init_from: the source's architecture (refused where it conflicts); a resumed run's own
    cfg = resolve_init_from(cfg, newest)
    env = env or DistEnv.from_environ()
    kind = accelerator()
    manifest = None
    if upto == "train" or vocab is None:
        _, manifest = static_checks(cfg, env, kind)
    vocab = vocab or vocab_facts(cfg, manifest)
    plan, facts = None, {}
    if upto == "train":  # before the world exists: a refusal leaves every rank alone and the run untouched
        check_paths(cfg)
        facts = {"tokenizer": manifest.tokenizer, "num_tokens": vocab.num_tokens}
        plan = plan_resume(cfg, newest, world_size=env.world_size, **facts) if newest is not None else None
    world, groups, run_device = _join(cfg, env, kind, device, world_needed=upto != "model")
    matmul_precision(run_device, allow_tf32=cfg.parallel.allow_tf32)
    streams = seed_all(cfg.train.seed, tp_rank=groups.tp_rank)
    with torch.device(device) if device is not None and world is None else contextlib.nullcontext():
        model = build_model(cfg, groups, streams, num_tokens=vocab.num_tokens, pad_id=vocab.pad_id)
    if cfg.model.init_from is not None and upto != "model" and plan is None:  # a resumed run: its checkpoint
        load_init_weights(model, cfg, groups)
        if groups.rank == 0:
            log.info("model.init_from: weights of %s (step 0, fresh optimizer)", cfg.model.init_from)
    run = Run(cfg=cfg, env=env, device=run_device, groups=groups, streams=streams, vocab=vocab, model=model,
              world=world)
    if upto == "model":
        return run
    if cfg.train.compile:
        compile_blocks(model)
        if cfg.parallel.zero_stage == 3 and groups.rank == 0:
            log.warning("train.compile with ZeRO-3: DeepSpeed gathers each parameter in a module hook that "
                        "torch.compile does not trace, so every block compiles in pieces between them "
                        "(use ZeRO 1-2 for whole-block graphs)")
    from .engine import initialize

    resume = _pick_resume(cfg, groups, plan, **facts) if upto == "train" else None
    run.engine = initialize(cfg, model, groups, load_universal=resume is not None and resume.reshard)
    if upto == "engine":
        return run
    _attach_training(run, manifest, resume)
    return run


def _join(cfg: Config, env: DistEnv, kind: str, device, *, world_needed: bool):
    """``(world or None, groups, device)``: the distributed world (CUDA device, process group, PP x DP x
    TP groups), or for one process without one the single groups and ``device`` (the CPU by default)."""
    if world_needed or env.world_size > 1:
        p = cfg.parallel
        world = init_world(env, tp=p.tp, pp=p.pp, backend=p.backend, timeout_s=p.timeout_s,
                           device=rank_device(env, kind))
        groups = world.groups
        if groups.rank == 0:
            log.info("layout: pp %d x dp %d x tp %d; ranks: %s", groups.pp_size, groups.dp_size, groups.tp_size,
                     "; ".join(f"{r} {r.host}" for r in world.table))
        return world, groups, world.device
    if cfg.parallel.tp != 1 or cfg.parallel.pp != 1:
        key, n = ("parallel.tp", cfg.parallel.tp) if cfg.parallel.tp != 1 else ("parallel.pp", cfg.parallel.pp)
        raise ConfigError(f"{key}={n} needs {n} ranks; one process builds TP=1, PP=1")
    return None, ParallelGroups.single(), torch.device(device or "cpu")


def data_mixture(cfg: Config) -> Mixture:
    """The training corpora: ``data.shards`` (one source) or the weighted ``data.sources``."""
    if cfg.data.shards is not None:
        specs = [("data.shards", "main", cfg.data.shards, 1.0)]
    else:
        specs = [(f"data.sources[{i}].shards", s.label, s.shards, s.weight) for i, s in enumerate(cfg.data.sources)]
    sources = []
    for key, name, path, weight in specs:
        try:
            sources.append(Source(name, Manifest.load(path), weight))
        except DataError as e:
            raise ConfigError(f"{key}={path!r}: {e}") from None
    try:
        return Mixture(sources)
    except DataError as e:
        raise ConfigError(str(e)) from None


def layout(cfg: Config, groups: ParallelGroups) -> dict:
    """What a checkpoint's shards depend on: PP, TP and DP sizes and the ZeRO stage."""
    return {"tp": groups.tp_size, "pp": groups.pp_size, "dp": groups.dp_size, "zero_stage": cfg.parallel.zero_stage}


def _pick_resume(cfg: Config, groups: ParallelGroups, plan: ResumePlan | None, **facts) -> ResumePlan | None:
    """Collective: the plan for the newest verified checkpoint (``plan`` was made for the newest
    complete one before the world existed), or None. A checkpoint of another layout is converted to
    DeepSpeed's universal format by rank 0 (once)."""
    if plan is None:
        return None
    latest = CheckpointManager(checkpoint_dir(cfg), keep=cfg.checkpoint.keep).latest_verified()
    if latest is None:
        return None
    if latest != plan.path:  # the newest failed verification: every rank checks the older one alike
        plan = plan_resume(cfg, latest, world_size=groups.world_size, **facts)
    if groups.rank == 0 and plan.changes:
        log.info("resuming %s with changed settings: %s", latest, "; ".join(str(c) for c in plan.changes))
    if plan.reshard:
        if groups.rank == 0:
            from ..ckpt.universal import to_universal

            log.info("resharding %s (%s) through DeepSpeed's universal checkpoint", latest, plan.layout_change)
            to_universal(latest)
        barrier(timeout_s=cfg.checkpoint.reshard_timeout_s)  # not parallel.timeout_s: a conversion takes long
    return plan


def restore_checkpoint(run: Run, path: Path, *, universal: bool = False) -> dict:
    """Collective: ``path`` into the run (engine, step, loader position, RNG streams, the spike
    guard's saved state); returns the checkpoint's shared state. ``universal``: from its universal
    conversion (another layout): the RNG streams are then re-derived from the seed and the step."""
    rank_state, shared = run.ckpt.load(run.engine, path, universal=universal)
    run.step, run.spike_state = shared["step"], shared.get("spike")
    run.loader.load_state_dict(shared["loader"])
    if rank_state is not None:
        restore_rng_state(rng_state_from_tensors(rank_state["rng"]), run.streams)
    else:  # another layout: the RNG streams are re-derived from the seed and the step (docs)
        fresh = seed_all(run.cfg.train.seed * 1_000_003 + run.step, tp_rank=run.groups.tp_rank)
        run.streams.set_states(fresh.get_states())
    return shared


def _attach_training(run: Run, manifest: Mixture, resume: ResumePlan | None) -> None:
    """Loader, run directory, checkpoints (resumed if any) and metric sinks."""
    cfg, groups = run.cfg, run.groups
    run.loader = StreamingLoader(manifest, LoaderConfig.from_config(cfg), dp_rank=groups.dp_rank,
                                 dp_size=groups.dp_size, vocab_size=run.vocab.num_tokens)
    from .evaluate import valid_manifest, validation_batches

    run.byte_tokenizer = manifest.tokenizer.get("kind") == "byte"
    valid = valid_manifest(cfg, manifest)
    if valid is not None:
        run.valid_batches = validation_batches(cfg, valid, run.vocab.num_tokens)
    run.run_dir = run_dir(cfg)
    run.config_text = dump_config(cfg)
    if run.rank0:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        (run.run_dir / "config.yaml").write_text(run.config_text)
    run.ckpt = CheckpointManager(checkpoint_dir(cfg), keep=cfg.checkpoint.keep)
    run_id = None
    if resume is not None:
        latest, universal = resume.path, resume.reshard
        shared = restore_checkpoint(run, latest, universal=universal)
        run_id, run.resumed_from = shared.get("wandb_run_id"), latest
        if run.rank0:
            log.info("resumed from %s at step %d%s", latest, run.step, " (resharded)" if universal else "")
    run.sinks = MetricSinks(run.run_dir, mode=cfg.logging.wandb, project=cfg.logging.project, name=cfg.run.name,
                            run_id=run_id, config=cfg.model_dump(mode="json"), enabled=run.rank0)
