"""Named choices shared by the schema and the code that implements them (kept torch-free)."""

INIT_SCHEMES = ("normal", "small_init", "xtransformers")
# The default initialisation, chosen by measurement: tools/bench.py --mode converge (docs/perf.md).
DEFAULT_INIT = "xtransformers"
