"""The experiments' classification trainer on tiny random BERT and Llama encoders."""

import dataclasses
import json
import shutil

import jax
import numpy as np
import pytest
from transformers import FlaxLlamaModel, LlamaConfig

from experiments.lib.classification import Dataset, train
from experiments.lib.config import TrainConfig
from mos_jax import MismatchError, MoSConfig
from mos_jax.core import BERT_TARGETS
from oracles.helpers import assert_trees_equal, hf_numerics


def toy_data(n, seed=0, vocab=64, length=12):
  """Label = whether token 5 occurs; padded rows of varying length."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(6, vocab, size=(n, length)).astype(np.int32)
  lengths = rng.integers(4, length + 1, size=n)
  labels = (rng.random(n) < 0.5).astype(np.int32)
  for i in range(n):
    if labels[i]:
      ids[i, rng.integers(1, lengths[i])] = 5
  mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
  return Dataset({"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}, labels)


def tiny_llama_encoder():
  with hf_numerics():
    return FlaxLlamaModel(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64), seed=0)


def cfg(tmp_path, **kw):
  base = dict(mos=MoSConfig(rank=3, equivalent_rank=1, shards_per_vector=2, target_modules=BERT_TARGETS,
                            dropout=0.1),
              steps=3, batch_size=8, eval_every=2, length_buckets=(8, 16), progress=False,
              out_dir=str(tmp_path / "run"))
  return TrainConfig(**{**base, **kw})


def test_three_steps_on_tiny_bert_write_outputs(tiny_bert, tmp_path):
  before = jax.tree_util.tree_map(np.asarray, tiny_bert.params)
  result = train(tiny_bert, tiny_bert.params, toy_data(32), toy_data(16, seed=1), cfg(tmp_path))
  rows = [json.loads(line) for line in result["paths"]["metrics"].read_text().splitlines()]
  assert [r["step"] for r in rows] == [1, 2, 3] and "eval_accuracy" in rows[1] and "eval_accuracy" in rows[2]
  assert result["paths"]["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert result["paths"]["adapter"].stat().st_size > 0
  meta = json.loads((tmp_path / "run" / "mos_config.json").read_text())
  assert meta["mos"]["rank"] == 3 and len(meta["groups"]) == 6
  # Base params are never updated: bit-identical after training.
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.tree_util.tree_map(np.asarray, tiny_bert.params), before)
  assert not list((tmp_path / "run").glob(".*"))  # no temp files left behind


def test_three_steps_on_tiny_llama(tmp_path):
  model = tiny_llama_encoder()
  result = train(model, model.params, toy_data(32), toy_data(16, seed=1),
                 cfg(tmp_path, mos=MoSConfig(rank=2, equivalent_rank=1, shards_per_vector=2)))
  assert len(result["metrics"]) == 3 and np.isfinite(result["metrics"][-1]["loss"])


def test_loss_falls_on_a_fixed_batch_and_runs_are_deterministic(tiny_bert, tmp_path):
  data = toy_data(8)
  kw = dict(steps=20, lr=1e-2, warmup_frac=0.0, eval_every=20)
  first = train(tiny_bert, tiny_bert.params, data, data, cfg(tmp_path / "a", **kw))
  losses = [m["loss"] for m in first["metrics"]]
  assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3]), losses
  second = train(tiny_bert, tiny_bert.params, data, data, cfg(tmp_path / "b", **kw))
  assert [m["loss"] for m in second["metrics"]] == losses
  other = train(tiny_bert, tiny_bert.params, data, data, cfg(tmp_path / "c", seed=1, **kw))
  assert [m["loss"] for m in other["metrics"]] != losses


def test_head_only_and_bfloat16(tiny_bert, tmp_path):
  result = train(tiny_bert, tiny_bert.params, toy_data(16), toy_data(8, seed=1),
                 cfg(tmp_path, mos=None, compute_dtype="bfloat16"))
  assert result["trainable"] == 32 * 2 + 2 and np.isfinite(result["metrics"][-1]["loss"])


@pytest.mark.parametrize("mutate, message", [
    (lambda d: Dataset({k: v[:0] for k, v in d.inputs.items()}, d.labels[:0]), "empty"),
    (lambda d: Dataset({"input_ids": d.inputs["input_ids"]}, d.labels), "attention_mask"),
    (lambda d: Dataset(d.inputs, np.where(np.arange(len(d)) == 3, 2, d.labels)), "outside 0..1"),
])
def test_bad_data_fails_before_training(tiny_bert, tmp_path, mutate, message):
  with pytest.raises(ValueError, match=message):
    train(tiny_bert, tiny_bert.params, mutate(toy_data(16)), toy_data(8), cfg(tmp_path))
  assert not (tmp_path / "run").exists()


def test_saved_adapter_loads_back_as_a_native_mos_adapter(tiny_bert, tmp_path):
  import mos_jax
  result = train(tiny_bert, tiny_bert.params, toy_data(16), toy_data(8, seed=1), cfg(tmp_path))
  loaded = mos_jax.load_adapter(result["paths"]["adapter"], params=tiny_bert.params)
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.tree_util.tree_map(np.asarray, loaded.pools),
                         jax.tree_util.tree_map(np.asarray, result["trainable_state"]["adapter"].pools))
  assert (tmp_path / "run" / "head.safetensors").exists()


def test_train_resumes_from_a_mid_run_checkpoint_and_refuses_another_seed(tiny_bert, tmp_path):
  data, held_out = toy_data(24), toy_data(8, seed=1)
  kw = dict(steps=4, eval_every=4, checkpoint_every=2, out_dir=str(tmp_path / "a"))
  full = train(tiny_bert, tiny_bert.params, data, held_out, cfg(tmp_path, **kw))
  # Keep only the step-2 checkpoint, as if the run had died during step 3.
  run = tmp_path / "b"
  shutil.copytree(tmp_path / "a", run)
  shutil.rmtree(run / "checkpoints" / "4")
  resume = cfg(tmp_path, **{**kw, "out_dir": str(run), "resume": True})
  resumed = train(tiny_bert, tiny_bert.params, data, held_out, resume)
  assert [m["loss"] for m in resumed["metrics"]] == [m["loss"] for m in full["metrics"]]
  assert_trees_equal(resumed["trainable_state"], full["trainable_state"])

  other = cfg(tmp_path, **{**kw, "out_dir": str(run), "resume": True})
  other = dataclasses.replace(other, mos=dataclasses.replace(other.mos, seed=5))
  with pytest.raises(MismatchError, match=r"train\.mos\.seed: the checkpoint has 0, this run has 5"):
    train(tiny_bert, tiny_bert.params, data, held_out, other)
