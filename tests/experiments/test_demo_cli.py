"""The experiments' command lines: ``--help`` exits 0 without running anything, and documents every flag."""

from __future__ import annotations

import importlib

import pytest

from experiments.lib import cli

#: Each script and the flags its --help must list.
CLIS = {
    "experiments.gemma3_demo": ("--steps", "--lr", "--rank", "--equivalent-rank", "--eval-size", "--model", "--data-dir",
                                "--generated", "--out", "--cache-dir", "--no-progress"),
    "experiments.tiny_llama_demo": ("--steps", "--layers", "--lr"),
    "experiments.sst2_demo": ("--data-dir", "--allow-network", "--generated", "--steps", "--out"),
    "experiments.gsm8k": ("--model", "--data-dir", "--allow-network", "--preset", "--steps", "--rank", "--equivalent-rank",
                          "--private-rank", "--shards-per-vector", "--train-limit", "--eval-limit", "--max-new-tokens",
                          "--seed", "--out"),
}


def _flat(text: str) -> str:
  return " ".join(text.split())


@pytest.mark.parametrize("name", sorted(CLIS))
def test_help_exits_zero_and_lists_every_flag_with_help_and_default(name, capsys, monkeypatch):
  module = importlib.import_module(name)
  ran = []
  # Anything past argument parsing would load a model or data: none of it may run.
  for attr in ("fit", "train", "train_lm", "load_model", "random_llama", "load_minilm", "get_data"):
    if hasattr(module, attr):
      monkeypatch.setattr(module, attr, lambda *a, _attr=attr, **k: ran.append(_attr))
  with pytest.raises(SystemExit) as stopped:
    module.main(["--help"])
  assert stopped.value.code == 0 and not ran
  text = _flat(capsys.readouterr().out)
  assert text.startswith("usage:")
  actions = [a for a in module.build_parser()._actions if a.dest != "help"]
  assert sorted(f for a in actions for f in a.option_strings) == sorted(CLIS[name])
  for action in actions:
    assert action.help, f"{name} {action.option_strings[0]} has no help text"
    shown = f"{_flat(action.help.replace('%%', '%'))} (default: {action.default})"
    assert shown in text, f"{name}: --help does not show {shown!r}"


def test_unknown_flag_is_refused_before_any_work(capsys):
  from experiments import tiny_llama_demo
  with pytest.raises(SystemExit) as stopped:
    tiny_llama_demo.main(["--stpes", "3"])
  assert stopped.value.code == 2 and "--stpes" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--layers", "4"], ["--steps", "0"], ["--lr", "0"]])
def test_tiny_llama_demo_refuses_bad_values_before_any_work(argv, monkeypatch):
  from experiments import tiny_llama_demo
  monkeypatch.setattr(tiny_llama_demo, "random_llama", lambda *a, **k: pytest.fail("built a model"))
  with pytest.raises(SystemExit, match="--layers at least 8"):
    tiny_llama_demo.main(argv)


@pytest.mark.slow
def test_tiny_llama_demo_runs_with_its_flags(capsys):
  from conftest import hf_numerics
  from experiments import tiny_llama_demo
  with hf_numerics():  # HF's Flax Llama broadcasts implicitly
    tiny_llama_demo.main(["--steps", "2", "--layers", "9", "--lr", "0.01"])
  out = capsys.readouterr().out
  for row in ("frozen base", "LoRA r=8", "MoS r=8, r_e=1, l=2", "LoRA r=1"):
    assert row in out
  assert "model/layers/*/self_attn/q_proj                    9" in out  # --layers took effect


def test_parser_keeps_the_description_layout_and_shows_defaults():
  p = cli.parser("Title.\n\n    python -m x --flag   # an indented example\n")
  p.add_argument("--steps", type=int, default=100, help="training steps")
  text = p.format_help()
  assert "    python -m x --flag   # an indented example" in text
  assert "training steps (default: 100)" in text
