"""Configuration: composition, overrides, the DeepSpeed config, and every kind of bad input giving
a message that names the key, the value and what was expected, with a non-zero exit."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from xft_dist.config import ConfigError, deepspeed_config, load_config

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("pretrain_entry", REPO / "launch" / "pretrain.py")
pretrain = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pretrain)


@pytest.fixture()
def shards(tmp_path):
    from ..helpers import make_corpus

    make_corpus(tmp_path / "shards", num_docs=40, shard_tokens=300)
    return tmp_path / "shards"


def _write(tmp_path, data, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_presets_compose_and_validate():
    for preset in ("tiny", "gpt_125m", "gpt_1_3b", "gpt_1_3b_zero3", "gpt_1_3b_pp2_tp2", "t5_base", "bert_base",
                   "bert_tiny"):
        cfg = load_config(REPO / "configs" / f"{preset}.yaml")
        assert cfg.run.name
    cfg = load_config(REPO / "configs" / "gpt_1_3b.yaml", ["model.depth=4", "optim.betas=[0.9, 0.99]"])
    assert cfg.model.depth == 4 and cfg.model.ff_glu and cfg.parallel.tp == 2 and cfg.optim.betas == (0.9, 0.99)
    assert load_config(REPO / "configs" / "t5_base.yaml").model.kind == "encoder_decoder"
    bert = load_config(REPO / "configs" / "bert_base.yaml")
    assert (bert.model.kind, bert.model.dim, bert.model.depth, bert.model.heads, bert.data.mode, bert.data.seq_len,
            bert.data.mlm_probability, bert.data.mlm_replace) == ("encoder", 768, 12, 12, "mlm", 512, 0.15,
                                                                   (0.8, 0.1, 0.1))
    pp = load_config(REPO / "configs" / "gpt_1_3b_pp2_tp2.yaml")
    assert (pp.parallel.pp, pp.parallel.tp, pp.parallel.zero_stage) == (2, 2, 1)
    ds = deepspeed_config(pp, dp_size=2)  # 8 GPUs: 32 micro-batches in flight
    assert ds["gradient_accumulation_steps"] == 32 and ds["pipeline"] == {"pipe_partitioned": False,
                                                                          "grad_partitioned": False}


def test_deepspeed_config_is_derived_and_raw_section_cannot_conflict():
    cfg = load_config(REPO / "configs" / "gpt_125m.yaml")
    ds = deepspeed_config(cfg, dp_size=8)
    split = (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"])
    assert split == (16, 4, 512)
    assert ds["zero_optimization"]["stage"] == 2 and ds["bf16"]["enabled"] and ds["optimizer"]["params"]["torch_adam"]
    assert ds["scheduler"]["params"]["total_num_steps"] == 20000
    ok = load_config(REPO / "configs" / "gpt_125m.yaml",
                     ["deepspeed={zero_optimization: {round_robin_gradients: true}}"])
    zero = deepspeed_config(ok, 8)["zero_optimization"]
    assert zero["stage"] == 2 and zero["round_robin_gradients"] is True
    assert zero["overlap_comm"] and zero["contiguous_gradients"] and zero["reduce_bucket_size"] == max(768**2, 2**22)
    owned = load_config(REPO / "configs" / "gpt_125m.yaml", ["deepspeed={zero_optimization: {overlap_comm: false}}"])
    with pytest.raises(ConfigError, match="zero_optimization.overlap_comm: set by xft_dist .*parallel.overlap_comm"):
        deepspeed_config(owned, 8)
    bad = load_config(REPO / "configs" / "gpt_125m.yaml", ["deepspeed={zero_optimization: {stage: 3}}"])
    with pytest.raises(ConfigError, match="deepspeed.zero_optimization.stage: set by xft_dist"):
        deepspeed_config(bad, 8)


def test_bf16_accumulates_and_reduces_gradients_in_fp32_by_default():
    cfg = load_config(REPO / "configs" / "gpt_125m.yaml")  # bf16, ZeRO-2
    ds = deepspeed_config(cfg, dp_size=8)
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"} and ds["communication_data_type"] == "fp32"
    low = load_config(REPO / "configs" / "gpt_125m.yaml", ["parallel.grad_reduce_dtype=bf16"])
    ds = deepspeed_config(low, dp_size=8)
    assert ds["data_types"] == {"grad_accum_dtype": "bf16"} and ds["communication_data_type"] == "bf16"
    for off in (["train.precision=fp32"], ["parallel.zero_stage=0"]):  # fp32 training; DeepSpeed has none at ZeRO-0
        ds = deepspeed_config(load_config(REPO / "configs" / "gpt_125m.yaml", off), dp_size=8)
        assert "data_types" not in ds and "communication_data_type" not in ds
    raw = load_config(REPO / "configs" / "gpt_125m.yaml", ["deepspeed={communication_data_type: bf16}"])
    with pytest.raises(ConfigError, match="communication_data_type: set by xft_dist .*parallel.grad_reduce_dtype"):
        deepspeed_config(raw, 8)


# Bad input through the entry point (every case the README promises): tests/unit/test_bad_input.py


def test_yaml_defaults_and_override_errors(tmp_path, shards):
    (tmp_path / "configs" / "model").mkdir(parents=True)
    (tmp_path / "configs" / "model" / "small.yaml").write_text("model: {dim: 64, heads: 4}\n")
    cfg_path = tmp_path / "configs" / "run.yaml"
    cfg_path.write_text(f"defaults: [model/small]\ndata: {{shards: {shards}}}\nmodel: {{depth: 3}}\n")
    cfg = load_config(cfg_path, ["train.steps=7"])
    assert (cfg.model.dim, cfg.model.depth, cfg.train.steps) == (64, 3, 7)
    cfg_path.write_text(f"defaults: [model/smal]\ndata: {{shards: {shards}}}\n")
    with pytest.raises(ConfigError, match="defaults entry 'model/smal'.*did you mean 'small'"):
        load_config(cfg_path)
    with pytest.raises(ConfigError, match="expected key.path=value"):
        load_config(REPO / "configs" / "tiny.yaml", ["model.depth"])
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(tmp_path / "list.yaml")


def test_real_process_exits_nonzero_with_the_message(tmp_path, shards):
    path = _write(tmp_path, {"data": {"shards": str(shards)}, "model": {"hedas": 4}})
    res = subprocess.run([sys.executable, str(REPO / "launch" / "pretrain.py"), "--config", str(path)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "model.hedas: unknown key (did you mean 'heads'?)" in res.stderr


def test_config_reference_is_up_to_date():
    res = subprocess.run([sys.executable, str(REPO / "tools" / "config_reference.py"), "--check"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


def test_resume_checks_keys_a_saved_config_predates_by_their_defaults():
    """A checkpoint written before a key existed resumes while the key keeps its default (what the
    older run did); set to anything else, a refused key is refused naming both values."""
    from xft_dist.config.load import validate
    from xft_dist.config.resume import check_resume

    now = validate({"data": {"shards": "x"}}).model_dump(mode="json")
    saved = validate({"data": {"shards": "x"}}).model_dump(mode="json")
    for key in ("mlm_probability", "mlm_replace", "mlm_rows"):
        del saved["data"][key]
    del saved["model"]["rotary_theta"]
    assert check_resume(saved, now, where="ckpt") == []
    changed = validate({"data": {"shards": "x", "mlm_probability": 0.2}}).model_dump(mode="json")
    with pytest.raises(ConfigError, match=r"data.mlm_probability=None in the checkpoint, 0.2 now"):
        check_resume(saved, changed, where="ckpt")
