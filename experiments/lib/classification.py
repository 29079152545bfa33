"""Sequence classification with a frozen HF Flax encoder, an optional MoS adapter and a linear head.

Trainable: ``{"adapter": Adapter, "head": {...}}`` (the head alone without an
adapter); the head reads the masked mean of the last hidden states. Batches are
trimmed to length buckets (few shapes, few compilations) and drawn from a fresh
permutation per epoch. Training runs :func:`experiments.lib.loop.fit`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mos_jax
from experiments.lib.config import TrainConfig
from experiments.lib.loop import fit
from experiments.lib.outputs import save_outputs

INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


@dataclasses.dataclass
class Dataset:
  """Tokenized split: int32 ``(n, max_len)`` inputs and ``(n,)`` labels."""

  inputs: dict[str, np.ndarray]
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)


def check_dataset(data: Dataset, num_classes: int, name: str) -> None:
  """Fails before any training on data that cannot be trained on."""
  if len(data) == 0:
    raise ValueError(f"The {name} split is empty: nothing to train or evaluate on.")
  if "input_ids" not in data.inputs or "attention_mask" not in data.inputs:
    raise ValueError(f"The {name} split needs 'input_ids' and 'attention_mask', got {sorted(data.inputs)}.")
  bad = np.flatnonzero((data.labels < 0) | (data.labels >= num_classes))
  if bad.size:
    raise ValueError(f"The {name} split has labels outside 0..{num_classes - 1} (first at row {bad[0]}: "
                     f"{data.labels[bad[0]]}); fix the data or num_classes.")
  for key, value in data.inputs.items():
    if value.shape[0] != len(data):
      raise ValueError(f"The {name} split's {key} has {value.shape[0]} rows for {len(data)} labels.")


def trim(inputs: dict[str, np.ndarray], buckets: tuple[int, ...]) -> dict[str, np.ndarray]:
  """The batch cut to the smallest bucket that holds its longest row: few shapes, few compilations."""
  longest = int(inputs["attention_mask"].sum(1).max())
  width = next((b for b in sorted(buckets) if b >= longest), inputs["input_ids"].shape[1])
  return {k: v[:, :width] for k, v in inputs.items()}


class Classifier:
  """Frozen encoder + optional MoS adapter + linear head, as pure functions."""

  def __init__(self, model: Any, params: Any, cfg: TrainConfig):
    if jnp.dtype(model.dtype) != jnp.dtype(cfg.compute_dtype):
      # HF Flax models fix the activation dtype at construction; rebuild without params.
      model = type(model)(model.config, dtype=jnp.dtype(cfg.compute_dtype), _do_init=False)
    self.model, self.params, self.cfg = model, params, cfg
    self.accepts = set(inspect.signature(model.__call__).parameters) & set(INPUT_KEYS)
    hidden = model.config.hidden_size
    key = jax.random.key(cfg.seed)
    head = {"kernel": 0.02 * jax.random.normal(key, (hidden, cfg.num_classes), jnp.float32),
            "bias": jnp.zeros((cfg.num_classes,), jnp.float32)}
    self.init_trainable = {"head": head}
    if cfg.mos is not None:
      self.init_trainable["adapter"] = mos_jax.adapt(params, cfg.mos)

  def logits(self, trainable, params, inputs, dropout_rng=None) -> jax.Array:
    adapter = trainable.get("adapter")
    inject = (mos_jax.linen.inject(adapter, dropout_rng=dropout_rng) if adapter is not None
              else contextlib.nullcontext())
    # HF Flax models rely on implicit rank promotion; keep it local to the model call.
    with inject, jax.numpy_rank_promotion("allow"):
      hidden = self.model(**{k: v for k, v in inputs.items() if k in self.accepts},
                          params=params).last_hidden_state
    mask = inputs["attention_mask"].astype(jnp.float32)[..., None]
    pooled = (hidden.astype(jnp.float32) * mask).sum(1) / jnp.maximum(mask.sum(1), 1.0)
    return pooled @ trainable["head"]["kernel"] + trainable["head"]["bias"][None, :]

  def loss(self, trainable, params, inputs, labels, dropout_rng=None) -> jax.Array:
    logits = self.logits(trainable, params, inputs, dropout_rng)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  def trainable_count(self) -> int:
    return mos_jax.core.count_params(self.init_trainable)


class ShuffledBatches:
  """Batches of a fresh permutation per epoch; ``get_state``/``set_state`` let a resumed run continue it."""

  def __init__(self, data: Dataset, cfg: TrainConfig):
    self.data, self.cfg = data, cfg
    self.rng = np.random.default_rng(cfg.seed)
    self.order, self.cursor = self.rng.permutation(len(data)), 0

  def __call__(self, step: int) -> tuple[Any, int]:
    size = self.cfg.batch_size
    if self.cursor + size > len(self.data):
      self.order, self.cursor = self.rng.permutation(len(self.data)), 0
    idx = self.order[self.cursor:self.cursor + size]
    self.cursor += size
    inputs = trim({k: v[idx] for k, v in self.data.inputs.items()}, self.cfg.length_buckets)
    return {"inputs": inputs, "labels": self.data.labels[idx]}, len(idx)

  def get_state(self) -> dict[str, Any]:
    return {"rng": self.rng.bit_generator.state, "order": self.order.tolist(), "cursor": self.cursor}

  def set_state(self, state: dict[str, Any]) -> None:
    self.rng.bit_generator.state = state["rng"]
    self.order, self.cursor = np.asarray(state["order"], np.int64), state["cursor"]


def train(model: Any, params: Any, train_data: Dataset, eval_data: Dataset, cfg: TrainConfig,
          *, name: str = "run") -> dict[str, Any]:
  """Fine-tunes a classifier; writes metrics.jsonl, curves.png, the adapter and head to cfg.out_dir.

  Returns:
    ``{"metrics", "final_accuracy", "trainable" (count), "step_seconds",
    "trainable_state" ({"adapter", "head"}), "adapter" (the trained one, or
    ``None``), "paths"}``.
  """
  check_dataset(train_data, cfg.num_classes, "train")
  check_dataset(eval_data, cfg.num_classes, "eval")
  clf = Classifier(model, params, cfg)

  @jax.jit
  def evaluate_batch(trainable, params, inputs, labels):
    logits = clf.logits(trainable, params, inputs)
    return ((logits.argmax(-1) == labels).sum(),
            optax.softmax_cross_entropy_with_integer_labels(logits, labels).sum())

  def evaluate(trainable) -> dict[str, float]:
    correct = total_loss = 0.0
    for i in range(0, len(eval_data), cfg.eval_batch_size):
      inputs = trim({k: v[i:i + cfg.eval_batch_size] for k, v in eval_data.inputs.items()}, cfg.length_buckets)
      c, l = evaluate_batch(trainable, params, inputs, eval_data.labels[i:i + cfg.eval_batch_size])
      correct, total_loss = correct + float(c), total_loss + float(l)
    return {"eval_accuracy": correct / len(eval_data), "eval_loss": total_loss / len(eval_data)}

  def loss_fn(trainable, params, batch, rng):
    return clf.loss(trainable, params, batch["inputs"], batch["labels"], rng)

  result = fit(loss_fn, clf.init_trainable, params, ShuffledBatches(train_data, cfg), cfg, evaluate=evaluate,
               name=name)
  trained = result["trainable"]
  adapter_path = save_outputs(Path(cfg.out_dir), cfg, adapter=trained.get("adapter"), head=trained["head"])
  return {"metrics": result["metrics"], "final_accuracy": result["metrics"][-1]["eval_accuracy"],
          "trainable": clf.trainable_count(), "step_seconds": result["step_seconds"],
          "trainable_state": trained, "adapter": trained.get("adapter"),
          "paths": {"metrics": result["metrics_path"], "plot": result["plot_path"], "adapter": adapter_path}}


@dataclasses.dataclass(frozen=True)
class SST2Config:
  """The MiniLM-on-SST-2 run of ``experiments.sst2_demo``, also the rows' defaults of ``sst2_claim``."""

  steps: int = 250
  batch_size: int = 32
  max_len: int = 64
  max_train: int = 20_000
  n_generated: tuple[int, int] = (4000, 800)
  lr: float = 2e-3
  seed: int = 0
  compute_dtype: str = "float32"
  mos: mos_jax.MoSConfig = mos_jax.MoSConfig(
      rank=6, equivalent_rank=1, private_rank=0, shards_per_vector=2, alpha=16.0, dropout=0.1,
      target_modules=mos_jax.core.BERT_TARGETS)
