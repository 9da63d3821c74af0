"""tools/bench.py runs both implementations side by side and prints the ratio (numbers not asserted)."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_bench_prints_side_by_side_ratio():
    out = subprocess.run(
        [sys.executable, str(REPO / "tools" / "bench.py"), "--dim", "32", "--depth", "1", "--heads", "2",
         "--dim-head", "16", "--vocab", "128", "--seq", "16", "--batch", "2", "--steps", "2",
         "--warmup", "1", "--threads", "1"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert any(line.startswith("xft ") for line in lines), out.stdout
    assert any(line.startswith("x-transformers") for line in lines), out.stdout
    ratio = next(line for line in lines if line.startswith("xft / x-t")).split()
    assert float(ratio[3]) > 0, out.stdout


@pytest.mark.slow  # a benchmark subprocess of tens of seconds; the fast loop keeps the model-mode smoke
def test_bench_data_mode_prints_loader_vs_minimal_packer_memory_and_mixture_shares():
    out = subprocess.run([sys.executable, str(REPO / "tools" / "bench.py"), "--mode", "data", "--seq", "64",
                          "--batch", "2", "--data-tokens", "20000", "--workers", "0", "--corpus-docs", "3000",
                          "--shard-mib", "4", "--mixture-steps", "1000"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "minimal packer" in out.stdout and "packed, 0 workers" in out.stdout, out.stdout
    assert "loader memory: 4 streams over" in out.stdout and "growth" in out.stdout, out.stdout
    errors = [line for line in out.stdout.splitlines() if "largest share error" in line]
    assert len(errors) == 2 and "long documents" in errors[0] and "short documents" in errors[1], out.stdout
    for line in errors:  # "... largest share error 0.0000 at 100 steps, 0.0000 at 1,000 steps"
        values = [float(v.split()[0]) for v in line.split("largest share error ")[1].split(", ")]
        assert len(values) == 2 and values[0] <= 0.02 and values[1] <= 0.005, line


@pytest.mark.slow  # a benchmark subprocess of tens of seconds; the fast loop keeps the model-mode smoke
def test_bench_converge_mode_trains_both_on_the_same_batches_and_prints_the_ratio():
    out = subprocess.run([sys.executable, str(REPO / "tools" / "bench.py"), "--mode", "converge", "--dim", "32",
                          "--depth", "1", "--heads", "2", "--dim-head", "16", "--seq", "32", "--batch", "2",
                          "--steps", "6", "--warmup-steps", "2", "--init", "small_init"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert "init=small_init" in lines[0], out.stdout
    rows = {line.split()[0]: line.split() for line in lines
            if line.split()[:1] in (["xft"], ["x-transformers"]) and "/" not in line}
    first_xft, first_xt = float(rows["xft"][1]), float(rows["x-transformers"][1])
    # same batches, untrained models over 259 byte ids: both start near ln(259) = 5.56
    assert abs(first_xft - 5.56) < 0.6 and abs(first_xt - 5.56) < 0.6, out.stdout
    ratio = next(line for line in lines if line.startswith("xft / x-t")).split()[-1]
    assert float(ratio) > 0, out.stdout


def test_gpu_smoke_without_a_gpu_says_what_to_install():
    out = subprocess.run([sys.executable, str(REPO / "tools" / "gpu_smoke.py")], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "CPU build" in out.stderr or "sees no GPU" in out.stderr, out.stderr


@pytest.mark.slow  # a benchmark subprocess of tens of seconds; the fast loop keeps the model-mode smoke
def test_bench_comm_mode_prints_the_ledger_of_a_config_at_the_minimum():
    out = subprocess.run([sys.executable, str(REPO / "tools" / "bench.py"), "--mode", "comm", "--config",
                          str(REPO / "configs" / "tiny.yaml"), "--batch", "1"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    totals = [line for line in out.stdout.splitlines() if line.startswith("total")]
    assert len(totals) == 3, out.stdout  # TP=2, with sequence parallelism, with full recomputation
    assert all("count 1.00, bytes 1.00" in line for line in totals), out.stdout
    assert "net.attn_layers.layers.1" in out.stdout and "reduce_scatter" in out.stdout, out.stdout


@pytest.mark.slow  # a benchmark subprocess of tens of seconds; the fast loop keeps the model-mode smoke
def test_bench_memory_mode_prints_activation_memory_ratios():
    out = subprocess.run([sys.executable, str(REPO / "tools" / "bench.py"), "--mode", "memory", "--dim", "64",
                          "--depth", "2", "--heads", "4", "--vocab", "128", "--seq", "256", "--batch", "1",
                          "--steps", "1"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {line[:32].strip(): line[32:].split() for line in out.stdout.splitlines()[2:] if line.strip()}
    assert float(rows["TP=2 + sequence parallel"][2]) < 1.0, out.stdout  # the residual stream is split
    assert float(rows["TP=1 full"][2]) < 0.5, out.stdout
    assert float(rows["TP=2 full + sequence parallel"][2]) < 1.0, out.stdout
    assert float(rows["TP=1 padding mask selective"][2]) < 1.0, out.stdout


@pytest.mark.slow  # inductor compiles C++: tens of seconds
def test_bench_compile_prints_compiled_vs_eager_and_kernels_per_layer():
    out = subprocess.run(
        [sys.executable, str(REPO / "tools" / "bench.py"), "--dim", "32", "--depth", "1", "--heads", "2",
         "--dim-head", "16", "--vocab", "128", "--seq", "16", "--batch", "2", "--steps", "2",
         "--warmup", "1", "--threads", "1", "--compile"],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    ratio = next(line for line in out.stdout.splitlines() if line.startswith("compiled / eager")).split()
    assert float(ratio[3]) > 0, out.stdout
    kernels = next(line for line in out.stdout.splitlines() if line.startswith("# kernels per layer"))
    counts = [int(w) for w in kernels.replace(",", " ").split() if w.isdigit()]
    assert len(counts) == 3 and all(c > 0 for c in counts), kernels
