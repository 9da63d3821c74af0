"""Typed run configuration. Unknown keys are errors; every field says what it means.

Sections: ``run``, ``model``, ``parallel``, ``data``, ``train`` (batch, steps, precision, seed),
``optim``, ``schedule``, ``loss``, ``checkpoint``, ``logging``, and an optional raw ``deepspeed`` section
merged into the generated DeepSpeed config (a key that conflicts with ours is an error).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .choices import DEFAULT_INIT


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunSection(Section):
    name: str = Field("run", description="run name; the run directory is out_dir/name")
    out_dir: str = Field("runs", description="parent of run directories")


class ModelSection(Section):
    kind: Literal["decoder", "encoder", "encoder_decoder"] = Field(
        "decoder", description="decoder LM, encoder-only masked LM (BERT-style; data.mode=mlm) or T5-style "
                               "encoder-decoder (data.mode=span)")
    num_tokens: int | None = Field(
        None, ge=2, description="vocabulary; default: the shards' tokenizer (+ span sentinels or the mlm mask id)")
    dim: int = Field(256, ge=1, description="model width (the decoder's, for encoder_decoder)")
    depth: int = Field(4, ge=1, description="decoder layers (the LM's layers)")
    heads: int = Field(8, ge=1, description="attention heads; split over TP ranks")
    dim_head: int | None = Field(None, ge=1, description="default dim // heads")
    kv_heads: int | None = Field(None, ge=1, description="grouped-query attention; default heads")
    ff_mult: float = Field(4.0, gt=0, description="feed-forward width / dim")
    ff_glu: bool = Field(False, description="gated feed-forward (GEGLU; SwiGLU with ff_swish)")
    ff_swish: bool = Field(False, description="SiLU instead of GELU")
    use_rmsnorm: bool = Field(False, description="RMSNorm instead of LayerNorm")
    norm_bias: bool = Field(False, description="LayerNorm with a bias (GPT-NeoX's, GPT-2's); false (default): "
                                               "bias-free, as x-transformers': the default exports everywhere")
    norm_eps: float = Field(1e-5, ge=0, description="LayerNorm / RMSNorm epsilon (x-transformers' RMSNorm has none: 0)")
    rotary_pos_emb: bool = Field(True, description="rotary positions; false: learned absolute")
    rotary_theta: float = Field(10000.0, gt=0, description="rotary base (Llama 3: 500000)")
    ff_bias: bool = Field(True, description="feed-forward projections with biases (Llama: false)")
    init_from: str | None = Field(
        None, description="start from these weights: a Hugging Face directory (Llama, GPT-NeoX, GPT-2, --to hf "
                          "output) or a tools/export.py --to fp32 file; unset model keys take its values")
    attn_dropout: float = Field(0.0, ge=0, lt=1, description="dropout on attention probabilities")
    ff_dropout: float = Field(0.0, ge=0, lt=1, description="dropout on feed-forward hidden units")
    tie_embedding: bool = Field(True, description="output head reuses the token embedding (decoder, encoder)")
    pad_vocab_to_multiple_of: int = Field(1, ge=1, description="vocab padded to a multiple of this x tp")
    activation_checkpointing: Annotated[int, Field(ge=0)] | Literal["full", "selective"] = Field(
        0, description="0 off, 1 or full: every layer, k: every k-th layer, selective: attention cores only")
    enc_depth: int = Field(4, ge=1, description="encoder_decoder: encoder layers")
    enc_dim: int | None = Field(None, ge=1, description="encoder_decoder: encoder width (default dim)")
    fused_loss: bool = Field(True, description="output head + loss fused, chunk by chunk: never the full logits")
    loss_chunk_tokens: int | None = Field(None, ge=1, description="fused_loss: tokens per chunk (default ~128M logits)")
    init: Literal["normal", "small_init", "xtransformers"] = Field(  # choices.INIT_SCHEMES
        DEFAULT_INIT, description="initialisation scheme (xft_dist/nn/init.py; default measured in docs/perf.md)")
    init_std: float = Field(0.02, gt=0, description="init=normal: std of every matrix (outputs: / sqrt(2 layers))")
    emb_init_std: float | None = Field(None, gt=0, description="token embedding ~ N(0, this); default: the scheme's")
    head_init_std: float | None = Field(None, gt=0, description="untied head ~ N(0, this); default: the scheme's")

    @property
    def head_dim(self) -> int:
        return self.dim_head or self.dim // self.heads


class ParallelSection(Section):
    tp: int = Field(1, ge=1, description="tensor-parallel size; DP = world size / (pp x tp)")
    pp: int = Field(1, ge=1, description="pipeline stages (DeepSpeed's pipeline engine, 1F1B; ZeRO 0-1 only); "
                                         "micro-batches per step = gradient accumulation steps")
    pp_partition: Literal["uniform", "parameters"] = Field(
        "uniform", description="pp > 1: layers per stage equal (uniform) or balanced by parameter count")
    zero_stage: Literal[0, 1, 2, 3] = Field(1, description="DeepSpeed ZeRO stage")
    backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="auto: nccl on GPUs, gloo on CPU")
    timeout_s: float = Field(600, gt=0, description="collective timeout")
    sequence_parallel: bool = Field(
        False, description="tp > 1: split the activations between TP regions along the sequence (Megatron's)")
    stall_timeout_s: float = Field(
        1800, ge=0, description="a rank without progress this long dumps its stacks, status.json says stalled, "
                                "every rank exits (status 4); 0 disables")
    heartbeat_s: float = Field(
        5, ge=0, description="every rank beats on the rendezvous store this often; a peer silent for "
                             "parallel.heartbeat_lost_s ends the run with exit status 3 (on GPUs before NCCL's "
                             "watchdog would abort it); 0 disables")
    heartbeat_lost_s: float = Field(60, gt=0, description="a peer without a heartbeat this long is lost")
    overlap_comm: bool | None = Field(
        None, description="ZeRO 1-3: overlap gradient reduction with the backward; default on, except with "
                          "train.nonfinite=skip")
    contiguous_gradients: bool = Field(True, description="ZeRO 2-3: copy gradients into one buffer as produced")
    reduce_bucket_size: int | None = Field(
        None, ge=1, description="elements per gradient-reduction bucket; default max(dim^2, 2^22)")
    allgather_bucket_size: int | None = Field(
        None, ge=1, description="ZeRO 1-2: elements per parameter all-gather bucket; default max(dim^2, 2^22)")
    prefetch_bucket_size: int | None = Field(
        None, ge=1, description="ZeRO-3: elements prefetched ahead of use; default max(0.9 dim^2, 2^21)")
    param_persistence_threshold: int | None = Field(
        None, ge=0, description="ZeRO-3: parameters this small stay gathered; default 10 dim")
    allow_tf32: bool = Field(True, description="GPU ranks: fp32 matmuls on TF32 tensor cores (off: exact fp32)")
    grad_reduce_dtype: Literal["fp32", "bf16"] | None = Field(
        None, description="train.precision=bf16: dtype in which micro-batch gradients accumulate and are reduced "
                          "over DP; default fp32 (ZeRO 1-3; DeepSpeed has no fp32 accumulation without ZeRO, so "
                          "ZeRO-0 uses bf16)")


class ValidSection(Section):
    shards: str | None = Field(None, description="held-out shards (make_shards --valid-fraction writes OUT/valid)")
    every: int = Field(0, ge=0, description="evaluate every N steps; 0: only at the end of the run")
    batches: int = Field(4, ge=1, description="validation batches per evaluation (the same ones every time)")
    batch_rows: int | None = Field(None, ge=1, description="rows per validation batch (default train.global_batch)")


class SourceSection(Section):
    shards: str = Field(..., description="directory holding this corpus's manifest.json")
    weight: float = Field(1.0, gt=0, description="share of the training tokens (normalised over the sources)")
    name: str | None = Field(None, description="logged as data/<name>/tokens and /epoch; default: the directory name")

    @property
    def label(self) -> str:
        return self.name or (self.shards.rstrip("/").rsplit("/", 1)[-1] or self.shards)


class DataSection(Section):
    shards: str | None = Field(None, description="directory holding manifest.json (one corpus; or data.sources)")
    sources: list[SourceSection] | None = Field(
        None, description="a weighted mixture of corpora: [{shards, weight, name}, ...] (instead of data.shards)")
    valid: ValidSection = Field(ValidSection(), description="held-out evaluation")
    mode: Literal["packed", "padded", "span", "mlm"] = Field(
        "packed", description="packed causal LM rows, one padded document per row, T5 span corruption, or "
                              "masked-LM rows for model.kind=encoder")
    seq_len: int = Field(256, ge=2, description="tokens per row (decoder length in span mode)")
    enc_len: int = Field(512, ge=4, description="span mode: encoder length")
    num_streams: int = Field(8, ge=1, description="fixed for the run; every DP size must divide it")
    shuffle: bool = Field(True, description="shuffle shards per epoch and documents within a shard (buffer shuffle)")
    shuffle_buffer: int = Field(1024, ge=1, description="documents a stream holds for the within-shard shuffle")
    num_workers: int = Field(0, ge=0, description="DataLoader workers (never change the batches)")
    skip_bad: bool = Field(False, description="skip, count and log bad shards/documents instead of failing")
    noise_density: float = Field(0.15, gt=0, lt=1, description="span mode: fraction of tokens masked")
    mean_span: float = Field(3.0, gt=0, description="span mode: mean noise span length")
    mlm_probability: float = Field(
        0.15, description="mlm mode: fraction of real tokens chosen for prediction, in (0, 1)")
    mlm_replace: tuple[float, float, float] = Field(
        (0.8, 0.1, 0.1), description="mlm mode: of the chosen tokens, the fractions that become the mask id, a random "
                                     "id, and stay themselves (sum 1)")
    mlm_rows: Literal["packed", "padded"] = Field(
        "packed", description="mlm mode: several documents per row, each attending only to itself (packed), or one "
                              "padded document per row")

    @field_validator("mlm_probability")
    @classmethod
    def _mlm_probability(cls, v):
        if not 0 < v < 1:
            raise ValueError(f"data.mlm_probability={v}: expected a fraction strictly between 0 and 1")
        return v

    @field_validator("mlm_replace")
    @classmethod
    def _mlm_replace(cls, v):
        if min(v) < 0 or abs(sum(v) - 1) > 1e-6:
            raise ValueError(f"data.mlm_replace={list(v)}: expected three non-negative fractions [mask, random, keep] "
                             f"summing to 1 (they sum to {sum(v):g})")
        return v

    @model_validator(mode="after")
    def _one_corpus_or_a_mixture(self):
        if (self.shards is None) == (self.sources is None):
            raise ValueError("set exactly one of data.shards (one corpus) and data.sources (a mixture)")
        if self.sources is not None:
            if not self.sources:
                raise ValueError("data.sources is empty: list at least one {shards, weight}")
            labels = [s.label for s in self.sources]
            if len(set(labels)) != len(labels):
                raise ValueError(f"data.sources: names must be unique, got {labels} (set name: for each)")
        return self

    @property
    def primary_shards(self) -> str:
        """The corpus whose manifest names the tokenizer (every source shares it)."""
        return self.shards if self.shards is not None else self.sources[0].shards


class SpikeSection(Section):
    action: Literal["log", "skip", "rollback"] = Field(
        "log", description="on a loss / grad-norm spike: log it, skip the update (loss spikes; counted), or reload "
                           "the last checkpoint and skip data")
    zscore: float = Field(6.0, gt=0, description="a value this many standard deviations above the window's mean")
    ratio: float | None = Field(None, gt=1, description="or above this many times the window's mean")
    window: int = Field(100, ge=2, description="accepted steps the mean and deviation are taken over")
    warmup: int = Field(20, ge=2, description="steps of history before the guard judges")
    grad_norm: bool = Field(True, description="judge the gradient norm too")
    skip_batches: int = Field(1, ge=0, description="rollback: global batches of data skipped after the checkpoint")
    max_rollbacks: int = Field(3, ge=0, description="rollback: then stop the run instead")

    @model_validator(mode="after")
    def _warmup_fits(self):
        if self.warmup > self.window:
            raise ValueError(f"train.spike.warmup={self.warmup} must be <= train.spike.window={self.window}")
        return self


class TrainSection(Section):
    steps: int = Field(100, ge=1, description="optimizer steps in the whole run")
    global_batch: int = Field(8, ge=1, description="sequences per optimizer step, all DP ranks")
    micro_batch: int = Field(1, ge=1, description="sequences per forward pass on one rank")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="fp16 is GPU-only")
    seed: int = Field(0, description="weights, data order and dropout derive from it")
    nonfinite: Literal["stop", "skip"] = Field(
        "stop", description="on a non-finite loss: stop, or skip that micro-batch")
    spike: SpikeSection = Field(SpikeSection(), description="loss-spike guard")
    skip_data: list[tuple[int, int]] = Field(
        [], description="[[step, n], ...]: after completing step, skip n global batches (what a rollback does)")
    stop_after: int | None = Field(None, ge=1, description="checkpoint and exit after this step (time-limited jobs)")
    compile: bool = Field(False, description="compile every transformer block with torch.compile (inductor)")


class OptimSection(Section):
    lr: float = Field(3e-4, gt=0, description="peak learning rate (AdamW)")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon")
    weight_decay: float = Field(0.1, ge=0, description="decoupled weight decay")
    grad_clip: float = Field(1.0, ge=0, description="global grad-norm clip; 0 disables")
    decay_norms_and_biases: bool = Field(False, description="weight decay on norm gains and biases too "
                                                            "(default: matrices only)")
    decay_embeddings: bool = Field(False, description="weight decay on token / position embeddings (and a tied head)")


class ScheduleSection(Section):
    warmup_steps: int = Field(10, ge=0, description="linear warmup, then cosine to min_lr_ratio at train.steps")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine floor as a fraction of lr")


class LossSection(Section):
    label_smoothing: float = Field(
        0.0, ge=0, le=1, description="label smoothing of the cross-entropy (as F.cross_entropy)")
    z_loss: float = Field(
        0.0, ge=0, description="PaLM z-loss coefficient: adds z_loss * logsumexp(logits)**2 per token")
    ignore_index: int = Field(-100, description="target id that never counts in the loss (padding is masked anyway)")


class CheckpointSection(Section):
    dir: str | None = Field(None, description="default: <run dir>/checkpoints")
    every: int = Field(50, ge=1, description="save every N steps (and at the end, and on SIGTERM/SIGUSR1)")
    keep: int = Field(2, ge=2, description="complete checkpoints kept")
    resume: bool = Field(True, description="resume from the newest complete checkpoint if any")
    async_save: bool = Field(
        False, description="stage the state in host memory and write, fsync and hash it in a background thread "
                           "per rank while training goes on; committed (COMPLETE) once every rank has written")
    reshard: Literal["auto", "off"] = Field(
        "auto", description="auto: a checkpoint of another TP x DP layout or ZeRO stage is converted to DeepSpeed's "
                            "universal format (once, rank 0) and loaded; off: refuse it")
    reshard_timeout_s: float = Field(
        7200, gt=0, description="how long the other ranks wait for rank 0's universal conversion (its own "
                                "timeout: a large checkpoint's conversion outlasts parallel.timeout_s)")

    @field_validator("reshard", mode="before")
    @classmethod
    def _yaml_off(cls, v):
        return "off" if v is False else v  # YAML 1.1 reads a bare `off` as false


class LoggingSection(Section):
    every: int = Field(10, ge=1, description="console line every N steps")
    wandb: Literal["auto", "online", "offline", "disabled"] = Field(
        "auto", description="auto: online when WANDB_API_KEY is set, offline otherwise")
    project: str = Field("xft_dist", description="W&B project")
    progress_bar: bool = Field(True, description="tqdm bar on rank 0")
    peak_tflops: float | None = Field(None, gt=0, description="per device, for MFU (default: known GPUs)")
    sample_every: int = Field(0, ge=0, description="print and log sample continuations every N steps; 0: at the end "
                                                   "only, when sample_prompts are given")
    sample_prompts: list[str] = Field(default_factory=list, description="prompts for the samples (decoder LM)")
    sample_tokens: int = Field(64, ge=1, description="new tokens per sample")
    sample_tokenizer: str | None = Field(None, description="tokenizer file for samples (the byte tokenizer needs none)")


class Config(Section):
    run: RunSection = RunSection()
    model: ModelSection = ModelSection()
    parallel: ParallelSection = ParallelSection()
    data: DataSection
    train: TrainSection = TrainSection()
    optim: OptimSection = OptimSection()
    schedule: ScheduleSection = ScheduleSection()
    loss: LossSection = LossSection()
    checkpoint: CheckpointSection = CheckpointSection()
    logging: LoggingSection = LoggingSection()
    deepspeed: dict[str, Any] = Field(default_factory=dict, description="raw DeepSpeed keys merged in")

    @model_validator(mode="after")
    def _static_checks(self):
        m, tp = self.model, self.parallel.tp
        if m.dim_head is None and m.dim % m.heads:
            raise ValueError(f"model.dim={m.dim} must be divisible by model.heads={m.heads} "
                             "(or set model.dim_head)")
        kv = m.kv_heads or m.heads
        if m.heads % kv:
            raise ValueError(f"model.kv_heads={kv} must divide model.heads={m.heads}")
        if m.heads % tp:
            raise ValueError(f"model.heads={m.heads} must be divisible by parallel.tp={tp}")
        if kv % tp:
            raise ValueError(f"model.kv_heads={kv} must be divisible by parallel.tp={tp}")
        if self.train.nonfinite == "skip" and self.parallel.overlap_comm:
            raise ValueError("train.nonfinite='skip' with parallel.overlap_comm=true: a skipped micro-batch's "
                             "zero-gradient backward trips DeepSpeed's overlapped reduction; leave overlap_comm unset")
        if self.train.nonfinite == "skip" and self.parallel.zero_stage == 3:
            raise ValueError("train.nonfinite='skip' is not supported with parallel.zero_stage=3 "
                             "(use 'stop', or ZeRO 0-2)")
        if self.parallel.sequence_parallel and tp > 1:
            lengths = {"data.seq_len": self.data.seq_len}
            if m.kind == "encoder_decoder":
                lengths["data.enc_len"] = self.data.enc_len
            for key, n in lengths.items():
                if n % tp:
                    raise ValueError(f"parallel.sequence_parallel splits the sequence over parallel.tp={tp} ranks: "
                                     f"{key}={n} must be a multiple of {tp}")
        if self.train.spike.action == "skip" and self.parallel.zero_stage == 0:
            raise ValueError("train.spike.action='skip' discards updates through the ZeRO optimizer's overflow check: "
                             "use parallel.zero_stage 1-3 (or action 'log' / 'rollback')")
        p = self.parallel
        if p.heartbeat_s and p.heartbeat_lost_s <= 2 * p.heartbeat_s:
            raise ValueError(f"parallel.heartbeat_lost_s={p.heartbeat_lost_s:g} must exceed two heartbeats "
                             f"(parallel.heartbeat_s={p.heartbeat_s:g})")
        dropout = [k for k in ("attn_dropout", "ff_dropout") if getattr(m, k)]
        if self.train.compile and dropout:
            raise ValueError(f"train.compile=true with model.{dropout[0]}={getattr(m, dropout[0])}: dropout draws "
                             "from the tensor-parallel RNG streams, which torch.compile cannot trace; set it to 0 "
                             "or leave train.compile off")
        reduce_dtype, precision = self.parallel.grad_reduce_dtype, self.train.precision
        if reduce_dtype is not None and precision != "bf16":
            raise ValueError(f"parallel.grad_reduce_dtype={reduce_dtype} applies to train.precision=bf16 only "
                             f"(train.precision={precision} accumulates and reduces in its own dtype): remove it")
        if reduce_dtype == "fp32" and self.parallel.zero_stage == 0:
            raise ValueError("parallel.grad_reduce_dtype=fp32 needs parallel.zero_stage 1-3: without ZeRO DeepSpeed "
                             "accumulates bf16 gradients in bf16 (set zero_stage, or grad_reduce_dtype=bf16)")
        self._pipeline_checks()
        self._objective_checks()
        if self.train.global_batch % self.train.micro_batch:
            raise ValueError(f"train.global_batch={self.train.global_batch} must be a multiple of "
                             f"train.micro_batch={self.train.micro_batch}")
        return self

    def _objective_checks(self) -> None:
        kind, mode = self.model.kind, self.data.mode
        if mode == "span" and kind != "encoder_decoder":
            raise ValueError("data.mode='span' produces encoder-decoder batches: set model.kind=encoder_decoder")
        if mode == "mlm" and kind != "encoder":
            raise ValueError(f"data.mode='mlm' (masked LM) trains a bidirectional encoder: set model.kind=encoder "
                             f"(model.kind={kind} has no masked-LM objective)")
        if kind == "encoder_decoder" and mode != "span":
            raise ValueError(f"model.kind=encoder_decoder needs data.mode='span', got {mode!r}")
        if kind == "encoder" and mode != "mlm":
            raise ValueError(f"model.kind=encoder needs data.mode='mlm' (the masked-LM objective), got {mode!r}")
        if kind == "encoder" and self.parallel.pp > 1:
            raise ValueError(f"model.kind=encoder with parallel.pp={self.parallel.pp}: pipeline stages are built for "
                             "the decoder and the encoder-decoder; use TP x DP (pp=1)")

    def _pipeline_checks(self) -> None:
        p, m = self.parallel, self.model
        if p.pp == 1:
            return
        if p.zero_stage >= 2:
            raise ValueError(f"parallel.pp={p.pp} with parallel.zero_stage={p.zero_stage}: DeepSpeed's pipeline engine "
                             "supports ZeRO 0-1 only (use zero_stage 1)")
        towers = {"model.depth": (m.depth, p.pp)}
        if m.kind == "encoder_decoder":  # the first half of the stages encode, the second half decode
            if p.pp % 2:
                raise ValueError(f"parallel.pp={p.pp} with model.kind=encoder_decoder: the stages split evenly "
                                 "between encoder and decoder, so pp must be even")
            towers = {"model.enc_depth": (m.enc_depth, p.pp // 2), "model.depth": (m.depth, p.pp // 2)}
        for key, (layers, stages) in towers.items():
            if layers < stages:
                raise ValueError(f"{key}={layers}: fewer layers than the {stages} pipeline stages that hold them "
                                 f"(parallel.pp={p.pp}); every stage needs at least one layer")
        if self.train.nonfinite == "skip":
            raise ValueError(f"train.nonfinite='skip' with parallel.pp={p.pp}: the pipeline schedule runs every "
                             "micro-batch's backward; use 'stop'")
        if self.train.compile:
            raise ValueError(f"train.compile=true with parallel.pp={p.pp}: not supported yet (compile runs at pp=1)")
