"""The README example and the benchmark script run as written."""

import json
import re
import subprocess
import sys
from pathlib import Path

from conftest import hf_numerics

ROOT = Path(__file__).resolve().parents[1]


def test_readme_example_runs():
  code = re.search(r"## Usage\n\n```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
  scope = {}
  with hf_numerics():
    exec(compile(code, "README.md", "exec"), scope)
  assert float(scope["loss"]) > 0
  assert set(scope["merged"]) == set(scope["model"].params)


def test_benchmark_quick_run_writes_json(tmp_path):
  out = tmp_path / "bench.json"
  subprocess.run([sys.executable, str(ROOT / "experiments" / "bench_core.py"), "--quick", "--out", str(out)],
                 check=True, capture_output=True, timeout=600)
  result = json.loads(out.read_text())
  assert result["ratios"]["mos_over_lora_trainable"] < 1
  assert result["ratios"]["assemble_over_mos_step"] > 0
