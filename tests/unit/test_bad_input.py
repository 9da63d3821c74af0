"""The catalogue of bad input the README promises to catch, each run through the entry point
(``launch/pretrain.py: main``): exit status 2, one message naming the culprit, no traceback, no
collective waited on (``MASTER_PORT=1``: one would fail), and an existing run left byte for byte.

The resume cases start from one real checkpoint written by a short training run (one process).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys

import pytest
import yaml

from ..helpers import REPO, cpu_rank_env, free_port, make_corpus

spec = importlib.util.spec_from_file_location("pretrain_entry", REPO / "launch" / "pretrain.py")
pretrain = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pretrain)

BASE = {"model": {"dim": 32, "depth": 1, "heads": 2}, "train": {"steps": 2, "global_batch": 4, "micro_batch": 2},
        "data": {"seq_len": 16, "num_streams": 2}, "checkpoint": {"every": 1},
        "logging": {"wandb": "disabled", "progress_bar": False}, "run": {"name": "r"}}

# (overrides, environment, the message's words); WORLD_SIZE defaults to 1
VALIDATION = {
    "unknown key + close match": (["model.deptth=3"], {}, "model.deptth: unknown key (did you mean 'depth'?)"),
    "unknown section": (["optimm.lr=1"], {}, "optimm: unknown key (did you mean 'optim'?)"),
    "wrong type": (["train.steps=ten"], {}, "train.steps='ten': Input should be a valid integer"),
    "heads % tp": (["model.heads=6", "model.dim=96", "parallel.tp=4"], {},
                   "model.heads=6 must be divisible by parallel.tp=4"),
    "kv heads": (["model.heads=8", "model.kv_heads=3"], {}, "model.kv_heads=3 must divide model.heads=8"),
    "kv heads % tp": (["model.heads=8", "model.kv_heads=2", "parallel.tp=4"], {},
                      "model.kv_heads=2 must be divisible by parallel.tp=4"),
    "dim % heads": (["model.dim=100", "model.heads=8"], {}, "model.dim=100 must be divisible by model.heads=8"),
    "micro divides global": (["train.global_batch=10", "train.micro_batch=4"], {},
                             "train.global_batch=10 must be a multiple of train.micro_batch=4"),
    "bad zero stage": (["parallel.zero_stage=5"], {}, "parallel.zero_stage=5"),
    "mode vs kind": (["data.mode=span"], {}, "set model.kind=encoder_decoder"),
    "mlm with a decoder": (["data.mode=mlm"], {}, "data.mode='mlm' (masked LM) trains a bidirectional encoder: set "
                                                  "model.kind=encoder (model.kind=decoder has no masked-LM objective)"),
    "encoder without mlm": (["model.kind=encoder"], {}, "model.kind=encoder needs data.mode='mlm'"),
    "mlm probability of 1": (["model.kind=encoder", "data.mode=mlm", "data.mlm_probability=1"], {},
                             "data.mlm_probability=1.0: expected a fraction strictly between 0 and 1"),
    "mlm probability of 0": (["model.kind=encoder", "data.mode=mlm", "data.mlm_probability=0"], {},
                             "data.mlm_probability=0.0: expected a fraction strictly between 0 and 1"),
    "mlm replace not summing to 1": (["model.kind=encoder", "data.mode=mlm", "data.mlm_replace=[0.8,0.1,0.2]"], {},
                                     "data.mlm_replace=[0.8, 0.1, 0.2]: expected three non-negative fractions "
                                     "[mask, random, keep] summing to 1 (they sum to 1.1)"),
    "mlm replace of two": (["model.kind=encoder", "data.mode=mlm", "data.mlm_replace=[0.9,0.1]"], {},
                           "data.mlm_replace"),
    "encoder in pipeline stages": (["model.kind=encoder", "data.mode=mlm", "parallel.pp=2", "model.depth=2"], {},
                                   "model.kind=encoder with parallel.pp=2"),
    "grad reduce dtype in fp32": (["parallel.grad_reduce_dtype=bf16"], {},
                                  "parallel.grad_reduce_dtype=bf16 applies to train.precision=bf16 only"),
    "compile with dropout": (["train.compile=true", "model.ff_dropout=0.1"], {},
                             "train.compile=true with model.ff_dropout=0.1"),
    "ZeRO 2 with pipeline stages": (["parallel.pp=2", "parallel.zero_stage=2", "model.depth=2"], {},
                                    "parallel.pp=2 with parallel.zero_stage=2: DeepSpeed's pipeline engine supports "
                                    "ZeRO 0-1 only"),
    "fewer layers than stages": (["parallel.pp=2"], {}, "model.depth=1: fewer layers than the 2 pipeline stages"),
    "encoder tower shorter than its stages": (["model.kind=encoder_decoder", "data.mode=span", "parallel.pp=4",
                                               "model.depth=4", "model.enc_depth=1"], {},
                                              "model.enc_depth=1: fewer layers than the 2 pipeline stages"),
    "fp32 reduction without ZeRO": (["train.precision=bf16", "parallel.zero_stage=0",
                                     "parallel.grad_reduce_dtype=fp32"], {},
                                    "parallel.grad_reduce_dtype=fp32 needs parallel.zero_stage 1-3"),
}
LAUNCH = {
    "batch vs DP": (["train.global_batch=6", "train.micro_batch=2"], {"WORLD_SIZE": "2"},
                    "train.global_batch=6 must equal train.micro_batch=2 x accumulation x data-parallel size 2"),
    "tp vs world": (["parallel.tp=2", "model.heads=2"], {"WORLD_SIZE": "3"},
                    "parallel.tp=2 must divide the world size 3"),
    "pp vs world": (["parallel.pp=2", "model.depth=2"], {"WORLD_SIZE": "3"},
                    "parallel.pp=2 must divide the world size 3"),
    "tp vs world / pp": (["parallel.pp=2", "parallel.tp=2", "model.depth=2"], {"WORLD_SIZE": "6"},
                         "parallel.tp=2 must divide the world size 6 / parallel.pp=2"),
    "fp16 on CPU": (["train.precision=fp16"], {}, "train.precision=fp16: not supported on CPU"),
    "missing shards": (["data.shards=/nowhere"], {}, "data.shards='/nowhere'"),
    "streams vs DP": (["data.num_streams=3", "train.global_batch=6", "train.micro_batch=3"], {"WORLD_SIZE": "2"},
                      "data.num_streams=3 must be divisible by the data-parallel size 2"),
}
PATHS = {
    "checkpoint dir is a file": (["checkpoint.dir={run}/config.yaml"], {}, "checkpoint.dir='{run}/config.yaml': "
                                 "{run}/config.yaml is a file, expected a directory"),
    "run dir is a file": (["run.name=r/config.yaml"], {}, "{run}/config.yaml is a file, expected a directory"),
    "out dir under a file": (["run.out_dir={run}/config.yaml/x"], {}, "cannot be created: {run}/config.yaml is a file"),
    "unwritable checkpoint dir, async saves": (["checkpoint.dir=/sys/xft-ckpt", "checkpoint.async_save=true"], {},
                                               "checkpoint.dir='/sys/xft-ckpt': /sys is not writable (needed for "
                                               "/sys/xft-ckpt)"),  # sysfs takes no files, root or not
}
RESUME = {
    "model.dim changed": (["model.dim=64"], {}, "model.dim=32 in the checkpoint, 64 now"),
    "model.dim changed, 2 ranks": (["model.dim=64", "train.global_batch=4"], {"WORLD_SIZE": "2", "RANK": "1"},
                                   "model.dim=32 in the checkpoint, 64 now"),
    "two shape keys": (["model.depth=2", "model.ff_glu=true"], {},
                       "model.depth=1 in the checkpoint, 2 now; model.ff_glu=False in the checkpoint, True now"),
    "the stream's cut": (["data.seq_len=32"], {}, "data.seq_len=16 in the checkpoint, 32 now"),
    "another layout, reshard off": (["checkpoint.reshard=off"], {"WORLD_SIZE": "2"},
                                    "another layout (dp 1 -> 2) and checkpoint.reshard=off"),
    "into ZeRO-3": (["parallel.zero_stage=3"], {}, "zero_stage 1 -> 3"),
    "ZeRO 0": (["parallel.zero_stage=0"], {}, "needs ZeRO stage 1, 2 or 3"),
}
CATALOGUE = {**VALIDATION, **LAUNCH, **PATHS, **RESUME}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run directory with the checkpoints of 2 steps (one process), and its config file."""
    root = tmp_path_factory.mktemp("bad_input")
    make_corpus(root / "shards", num_docs=60, shard_tokens=300)
    cfg = {**BASE, "data": {**BASE["data"], "shards": str(root / "shards")}, "run": {"name": "r", "out_dir": str(root)}}
    path = root / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = cpu_rank_env(clean=True, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    res = subprocess.run([sys.executable, str(REPO / "launch" / "pretrain.py"), "--config", str(path)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (root / "r" / "checkpoints" / "step-00000002" / "COMPLETE").exists()
    return path, root / "r"


def _snapshot(run) -> dict[str, str]:
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", list(CATALOGUE))
def test_bad_input_exits_2_naming_the_culprit(case, trained, monkeypatch, capsys):
    path, run = trained
    overrides, env, words = CATALOGUE[case]
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1",
                 "DS_ACCELERATOR": "cpu", **env}.items():
        monkeypatch.setenv(k, v)
    before = _snapshot(run)
    assert pretrain.main(["--config", str(path), *(o.format(run=run) for o in overrides)]) == 2
    err = capsys.readouterr().err
    assert words.format(run=run) in err, err
    assert err.startswith("pretrain: ") and "Traceback" not in err, err
    if case in PATHS or case in RESUME:
        assert len(err.strip().splitlines()) == 1, err  # one line
    assert _snapshot(run) == before  # nothing of the existing run changed


def test_config_path_that_is_a_directory_or_missing(tmp_path, capsys):
    assert pretrain.main(["--config", str(tmp_path)]) == 2
    assert f"config file {tmp_path} is a directory, expected a YAML file" in capsys.readouterr().err
    assert pretrain.main(["--config", str(tmp_path / "none.yaml")]) == 2
    assert f"config file {tmp_path / 'none.yaml'} does not exist" in capsys.readouterr().err


def test_resume_with_allowed_changes_logs_them(trained, tmp_path):
    """Steps and learning rate may change: the run resumes and says what changed, once."""
    path, run = trained
    shutil.copytree(run, tmp_path / "r")  # the catalogue's run stays as it is
    env = cpu_rank_env(clean=True, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    res = subprocess.run([sys.executable, str(REPO / "launch" / "pretrain.py"), "--config", str(path),
                          "train.steps=3", "optim.lr=0.001", f"run.out_dir={tmp_path}"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stderr and "at step 2" in res.stderr, res.stderr[-3000:]
    changed = [line for line in res.stderr.splitlines() if "with changed settings" in line]
    assert len(changed) == 1 and "optim.lr: 0.0003 -> 0.001" in changed[0] and "train.steps: 2 -> 3" in changed[0]
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]  # the copied history, then the new step


def test_fewer_micro_batches_than_stages_warns_with_the_bubble(trained, caplog):
    from xft_dist.config.load import load_config
    from xft_dist.runtime import DistEnv
    from xft_dist.train.setup import static_checks

    path, _ = trained
    cfg = load_config(path, ["parallel.pp=2", "model.depth=2", "train.global_batch=4", "train.micro_batch=4"])
    env = DistEnv(rank=0, world_size=2, local_rank=0, master_addr="127.0.0.1", master_port=1, launcher="torchrun")
    with caplog.at_level("WARNING", logger="xft_dist.train"):
        static_checks(cfg, env, "cpu")
    assert "parallel.pp=2 with 1 micro-batches per step" in caplog.text, caplog.text
    assert "idles each stage 50 %" in caplog.text, caplog.text


def _tiny_llama(out, **overrides):
    transformers = pytest.importorskip("transformers")
    cfg = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
               tie_word_embeddings=True) | overrides
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).save_pretrained(out)
    return out


def test_init_from_bad_sources_are_refused_naming_file_and_key(trained, tmp_path, monkeypatch, capsys):
    """An unsupported class, a config.json that disagrees with its weights, a vocabulary smaller than
    the shards', and a run config that disagrees with the source: exit 2 before any process group."""
    path, run = trained
    base = yaml.safe_load(path.read_text())
    base.pop("model")
    base["run"] = {"name": "from-hf", "out_dir": str(tmp_path / "runs")}
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(base))
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"],
                                                  "vocab_size": 300}))
    mismatched = _tiny_llama(tmp_path / "mismatched")
    conf = json.loads((mismatched / "config.json").read_text())
    (mismatched / "config.json").write_text(json.dumps(conf | {"intermediate_size": 96}))
    small = _tiny_llama(tmp_path / "small", vocab_size=100)
    good = _tiny_llama(tmp_path / "good")
    cases = [
        ([f"model.init_from={bert}"], f"{bert}/config.json: model_type: 'bert' (BertForMaskedLM): expected a Llama"),
        ([f"model.init_from={mismatched}"], f"model.init_from: {mismatched}: net.attn_layers.layers.0.ff.up.weight: "
                                            "shape (64, 32), but config.json makes the model's (96, 32)"),
        ([f"model.init_from={small}"], "its vocabulary is too small for the shards"),
        ([f"model.init_from={good}", "model.dim=64"], f"model.dim=64 in the run's config, 32 in {good}/config.json"),
    ]
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1",
                 "DS_ACCELERATOR": "cpu"}.items():
        monkeypatch.setenv(k, v)
    for overrides, words in cases:
        assert pretrain.main(["--config", str(cfg), *overrides]) == 2, overrides
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err, (overrides, err)
    assert "vocab_size=259, larger than the model's vocabulary (100)" in _last_err(cfg, small, capsys)


def _last_err(cfg, source, capsys):
    pretrain.main(["--config", str(cfg), f"model.init_from={source}"])
    return capsys.readouterr().err
