"""Test setup: JAX strict about rank promotion, several CPU devices, tiny HF models."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_rank_promotion", "raise")

import pytest  # noqa: E402
from transformers import BertConfig, FlaxBertModel, FlaxLlamaForCausalLM, LlamaConfig  # noqa: E402

from oracles.helpers import hf_numerics  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama():
  # GQA: 4 query heads, 2 kv heads, so k_proj/v_proj are narrower than q_proj.
  cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                    tie_word_embeddings=False)
  with hf_numerics():
    return FlaxLlamaForCausalLM(cfg, seed=0)


@pytest.fixture(scope="session")
def tiny_bert():
  cfg = BertConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                   num_attention_heads=4, max_position_embeddings=64)
  with hf_numerics():
    return FlaxBertModel(cfg, seed=0)


def pytest_sessionfinish(session, exitstatus):
  """With ``MOS_NO_SKIPS=1`` (``make test-slow`` sets it) a skipped test fails the run.

  The slow suite's machine has every optional dependency installed (PyTorch, PEFT, the Gemma 3
  weights), so a skip there means a check that silently did not run (a module-level
  ``importorskip`` skips a whole file).
  """
  if os.environ.get("MOS_NO_SKIPS") != "1":
    return
  reporter = session.config.pluginmanager.get_plugin("terminalreporter")
  skipped = reporter.stats.get("skipped", []) if reporter else []
  if skipped:
    reasons = sorted({str(r.longrepr[-1]) if isinstance(r.longrepr, tuple) else str(r.longrepr) for r in skipped})
    reporter.write_line(f"MOS_NO_SKIPS=1: {len(skipped)} skipped, which fails this run: " + "; ".join(reasons),
                        red=True)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
