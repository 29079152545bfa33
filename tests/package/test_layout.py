"""The package's shape: a small root, a core without flax, imports that only go downward."""

import ast
import subprocess
import sys
from pathlib import Path

import mos_jax

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mos_jax"

#: Which mos_jax subpackages each one may import (besides itself).
ALLOWED = {
    "core": set(),
    "train": {"core"},
    "formats": {"core"},
    "parallel": {"core"},
    "linen": {"core", "train"},
    "nnx": {"core", "train"},
    "hf": {"core", "linen"},
}


def _imports(path: Path) -> list[str]:
  tree = ast.parse(path.read_text())
  names = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names += [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names.append(node.module)
      names += [f"{node.module}.{a.name}" for a in node.names]
  return names


def _unit(path: Path) -> str:
  rel = path.relative_to(PACKAGE)
  return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def test_root_exports_at_most_20_names():
  assert len(mos_jax.__all__) <= 20
  assert all(hasattr(mos_jax, name) for name in mos_jax.__all__)


def test_core_runs_without_flax():
  # Load mos_jax.core under a parent package that does not run mos_jax/__init__ (which imports the
  # linen backend), with flax made unimportable: any flax import in the core fails here.
  code = f"""
import sys, types
sys.modules["flax"] = None
parent = types.ModuleType("mos_jax")
parent.__path__ = [{str(PACKAGE)!r}]
sys.modules["mos_jax"] = parent
import mos_jax.core as core
import jax.numpy as jnp
params = {{"layers": {{str(i): {{"q_proj": {{"kernel": jnp.ones((4, 4))}}}} for i in range(2)}}}}
adapter = core.adapt(params, core.MoSConfig(rank=2, equivalent_rank=1))
core.merge(params, adapter)
assert not any(m == "flax" or m.startswith("flax.") for m, v in sys.modules.items() if v is not None)
print("ok")
"""
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_core_source_never_imports_flax_or_a_backend():
  for path in (PACKAGE / "core").glob("*.py"):
    bad = [n for n in _imports(path) if n.split(".")[0] == "flax" or
           (n.startswith("mos_jax.") and not n.startswith("mos_jax.core"))]
    assert not bad, f"{path.name} imports {bad}"


def test_modules_import_only_downward_and_no_private_names_cross_packages():
  for path in PACKAGE.rglob("*.py"):
    unit = _unit(path)
    if unit == "__init__":
      continue
    for name in _imports(path):
      parts = name.split(".")
      if parts[0] != "mos_jax" or len(parts) < 2:
        continue
      target = parts[1]
      assert target == unit or target in ALLOWED[unit], f"{path.relative_to(ROOT)} imports {name}"
      private = [p for p in parts[1:] if p.startswith("_")]
      assert not private or target == unit, f"{path.relative_to(ROOT)} uses private {name}"


def test_tests_and_experiments_use_public_names_only():
  for folder in ("tests", "experiments"):
    for path in (ROOT / folder).rglob("*.py"):
      for name in _imports(path):
        parts = name.split(".")
        if parts[0] == "mos_jax":
          assert not any(p.startswith("_") for p in parts[1:]), f"{path.relative_to(ROOT)} imports {name}"
