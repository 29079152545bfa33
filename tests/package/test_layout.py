"""The package's shape: thin public packages over a private ``_src`` whose units import only downward."""

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import mos_jax
from oracles.helpers import REPO_ROOT

PACKAGE = REPO_ROOT / "mos_jax"
SRC = PACKAGE / "_src"

#: Which ``_src`` units each unit may import (besides itself): ``errors`` and ``io`` at the bottom,
#: the framework-free core on ``errors`` only (never on file I/O), the backends on top.
ALLOWED = {
    "errors": set(),
    "io": {"errors"},
    "core": {"errors"},
    "train": {"errors", "io", "core"},
    "formats": {"errors", "io", "core"},
    "parallel": {"errors", "core"},
    "linen": {"errors", "io", "core", "train"},
    "nnx": {"errors", "io", "core", "train"},
    "hf": {"errors", "io", "core", "linen"},
    "api": {"errors", "core", "nnx"},
}
#: The public packages and the most names each may export (``__all__``).
PUBLIC = {"mos_jax": 20, "mos_jax.core": 30, "mos_jax.linen": 20, "mos_jax.nnx": 20, "mos_jax.formats": 20,
          "mos_jax.train": 20, "mos_jax.parallel": 20, "mos_jax.hf": 20}


def _imports(path: Path) -> list[str]:
  """Every absolute module name ``path`` imports (``from m import n`` gives ``m`` and ``m.n``)."""
  tree = ast.parse(path.read_text())
  names = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names += [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      assert node.level == 0, f"{path}: relative import; mos_jax imports absolutely"
      if node.module:
        names.append(node.module)
        names += [f"{node.module}.{a.name}" for a in node.names]
  return names


def _unit(path: Path) -> str:
  rel = path.relative_to(SRC)
  return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _src_units(name: str) -> str | None:
  parts = name.split(".")
  return parts[2] if parts[:2] == ["mos_jax", "_src"] and len(parts) > 2 else None


def test_units_import_only_downward():
  for path in SRC.rglob("*.py"):
    if path.parent == SRC and path.stem == "__init__":
      continue
    unit = _unit(path)
    for name in _imports(path):
      parts = name.split(".")
      if parts[0] != "mos_jax":
        continue
      target = _src_units(name)
      assert target is not None, f"{path.relative_to(REPO_ROOT)} imports {name}: inside _src, import from _src"
      assert target == unit or target in ALLOWED[unit], f"{path.relative_to(REPO_ROOT)} ({unit}) imports {name}"


def test_core_source_never_imports_flax():
  for path in (SRC / "core").rglob("*.py"):
    bad = [n for n in _imports(path) if n.split(".")[0] == "flax"]
    assert not bad, f"{path.name} imports {bad}"


def test_public_packages_only_reexport_from_src():
  for path in [PACKAGE / "__init__.py", PACKAGE / "hf.py", *PACKAGE.glob("*/__init__.py")]:
    if path.parent == SRC:
      continue
    tree = ast.parse(path.read_text())
    for node in tree.body:
      if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):  # the docstring
        continue
      if isinstance(node, ast.ImportFrom):
        ok = node.module.startswith("mos_jax._src.") or (node.module == "mos_jax" and path.parent == PACKAGE)
        assert ok, f"{path.relative_to(REPO_ROOT)} imports from {node.module}"
        continue
      targets = [t.id for t in getattr(node, "targets", [])] + [getattr(getattr(node, "target", None), "id", None)]
      assert {"__all__", "__version__"} & set(targets), \
          f"{path.relative_to(REPO_ROOT)}:{node.lineno}: a public package only re-exports (no code, no constants)"


def test_nothing_outside_the_package_imports_src():
  for folder in ("tests", "experiments"):
    for path in (REPO_ROOT / folder).rglob("*.py"):
      bad = [n for n in _imports(path) if n.split(".")[:2] == ["mos_jax", "_src"] or
             (n.startswith("mos_jax.") and any(p.startswith("_") for p in n.split(".")[1:]))]
      assert not bad, f"{path.relative_to(REPO_ROOT)} imports {bad}"
      # Nor through a string (a script run in a subprocess, importlib).
      assert path == Path(__file__) or "mos_jax._src" not in path.read_text(), \
          f"{path.relative_to(REPO_ROOT)} names mos_jax._src"


def test_core_runs_without_flax():
  # Import mos_jax._src.core under a parent package that does not run mos_jax/__init__ (which imports
  # the linen backend), with flax made unimportable: any flax import in the core fails here.
  code = f"""
import sys, types
sys.modules["flax"] = None
parent = types.ModuleType("mos_jax")
parent.__path__ = [{str(PACKAGE)!r}]
sys.modules["mos_jax"] = parent
import mos_jax.core as core
import jax.numpy as jnp
params = {{"layers": {{str(i): {{"q_proj": {{"kernel": jnp.ones((4, 4))}}}} for i in range(2)}}}}
adapter = core.adapt(params, core.MoSConfig(rank=2, equivalent_rank=1, target_modules=("q_proj",)))
core.merge(params, adapter)
assert not any(m == "flax" or m.startswith("flax.") for m, v in sys.modules.items() if v is not None)
print("ok")
"""
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_public_names_are_few_documented_and_real(name, capsys):
  module = importlib.import_module(name)
  names = list(module.__all__)
  with capsys.disabled():
    print(f"\n{name}: {len(names)} public names (at most {PUBLIC[name]}): {', '.join(names)}")
  assert len(names) <= PUBLIC[name], f"{name} exports {len(names)} names; at most {PUBLIC[name]}"
  assert len(set(names)) == len(names), f"{name}.__all__ repeats a name"
  assert all(hasattr(module, n) for n in names)
  # Each re-export carries a one-line comment saying what it is.
  source = Path(module.__file__).read_text().splitlines()
  undocumented = [line for line in source if line.startswith("from mos_jax._src.") and "  # " not in line]
  assert not undocumented, f"{name}: re-exports without a comment: {undocumented}"


def test_root_is_backend_neutral():
  assert not {"inject", "make_train_step", "with_factors", "inject_multi"} & set(mos_jax.__all__)
  assert all(getattr(mos_jax, sub).__name__ == f"mos_jax.{sub}"
             for sub in ("core", "linen", "nnx", "formats", "train", "parallel"))


def test_readme_is_short(capsys):
  lines = len((REPO_ROOT / "README.md").read_text().splitlines())
  with capsys.disabled():
    print(f"\nREADME.md: {lines} lines (at most 200)")
  assert lines <= 200


def test_experiment_scripts_import_only_the_experiments_library():
  """Issue 21.3: a script imports ``experiments.lib`` (and ``mos_jax``), never another script; the library
  never imports a script either. Pod configs (``experiments/configs``) import only the library too."""
  for path in (REPO_ROOT / "experiments").rglob("*.py"):
    own = [n for n in _imports(path) if n.split(".")[0] == "experiments"]
    # `from experiments import lib` names "experiments" and "experiments.lib"; `from experiments.lib import x` adds
    # "experiments.lib.x". Anything else under experiments is a script.
    bad = [n for n in own if n != "experiments" and n.split(".")[:2] != ["experiments", "lib"]]
    assert not bad, f"{path.relative_to(REPO_ROOT)} imports {bad}: move what scripts share into experiments/lib/"
