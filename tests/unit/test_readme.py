"""The README's runnable model examples run as written (blocks that need a launched world are skipped)."""

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[2] / "README.md"
BLOCKS = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
          if "init_process_group" not in b and "CheckSet" not in b and "data/shards" not in b]


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index):
    torch.manual_seed(0)
    exec(compile(BLOCKS[index], f"README.md[python block {index}]", "exec"), {})
