"""Multi-adapter serving: one jitted forward over rows that use different MoS adapters."""

import dataclasses
import functools
import json
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mos_jax
from mos_jax import MoSConfig, adapt
from mos_jax.core import stack_adapters
from mos_jax.linen import inject, inject_multi
from oracles.helpers import REPO_ROOT, assert_close, full_width_upcasts, hf_numerics, random_pools

BASE = MoSConfig(rank=4, equivalent_rank=1, shards_per_vector=2)
# Different seeds (so different routings), strategies and alphas: all stack together.
CONFIGS = [BASE, dataclasses.replace(BASE, seed=1, alpha=4.0),
           dataclasses.replace(BASE, seed=2, pair_dissociation=False, subset_selection=False)]


@pytest.fixture(scope="module")
def adapters(tiny_llama):
  out = []
  for k, cfg in enumerate(CONFIGS):
    adapter = adapt(tiny_llama.params, cfg)
    pools = jax.tree_util.tree_map(lambda x: 0.1 * x, random_pools(adapter.pools, seed=10 + k))
    out.append(adapter.replace(pools=pools))
  return out


def forward_fn(model):
  @jax.jit
  def forward(stack, ids, input_ids):
    with inject_multi(stack, ids), hf_numerics():
      return model(input_ids, params=model.params).logits
  return forward


@pytest.fixture(scope="module")
def forward(tiny_llama):
  """One jitted forward for the file: calls of the same shapes, dtypes and plan kind share its compilation."""
  return forward_fn(tiny_llama)


@functools.lru_cache(maxsize=None)
def _alone_fn(model):
  @jax.jit
  def run(adapter, input_ids):
    with inject(adapter), hf_numerics():
      return model(input_ids, params=model.params).logits
  return run


def alone(model, adapter, input_ids):
  """The model with one adapter (mos_jax.linen.inject), jitted: eager, each call takes seconds."""
  return np.asarray(_alone_fn(model)(adapter, input_ids))


@pytest.mark.parametrize("mode", ["per-row", "segmented"])
def test_mixed_batch_rows_equal_each_adapter_alone(tiny_llama, adapters, forward, mode):
  ids = np.array([2, 0, 1, -1, 1, 2, 0], np.int32)
  input_ids = np.random.default_rng(0).integers(0, 64, size=(len(ids), 10)).astype(np.int32)
  # Traced ids gather per row; this plan made on the host computes each of the 3 adapters once for all rows.
  plan = ids if mode == "per-row" else mos_jax.core.plan_rows(ids, len(adapters), segment_max=4 * 10)
  assert mode == "per-row" or plan.slots.tolist() == [0, 1, 2, 0]
  mixed = np.asarray(forward(stack_adapters(adapters), plan, input_ids))
  with hf_numerics():
    base = np.asarray(tiny_llama(input_ids).logits)
  for k, adapter in enumerate(adapters):
    rows = np.flatnonzero(ids == k)
    ref = alone(tiny_llama, adapter, input_ids[rows])
    assert np.abs(ref - base[rows]).max() > 1e-2  # each adapter visibly changes its rows
    # Same float32 products, grouped differently (batched per row vs shared factors).
    assert_close(mixed[rows], ref, rtol=1e-5)
  assert_close(mixed[ids == -1], base[ids == -1], rtol=1e-5)
  # Adapters really differ from each other, so a row given the wrong adapter would fail above.
  rows = np.flatnonzero(ids == 0)
  assert np.abs(alone(tiny_llama, adapters[1], input_ids[rows]) - mixed[rows]).max() > 1e-2


def test_new_adapters_of_the_same_shapes_reuse_the_compiled_forward(tiny_llama, adapters):
  forward = forward_fn(tiny_llama)
  ids = np.array([0, 1, 1], np.int32)
  input_ids = np.ones((3, 5), np.int32)
  forward(stack_adapters(adapters[:2]), ids, input_ids)
  compiles = []

  def on_event(event, *args, **kwargs):  # counted by compile events: inject's jit user context hides _cache_size
    if event == "/jax/core/compile/backend_compile_duration":
      compiles.append(event)

  jax.monitoring.register_event_duration_secs_listener(on_event)
  try:
    swapped = forward(stack_adapters(adapters[1:]), ids, input_ids)
  finally:
    jax.monitoring.unregister_event_duration_listener(on_event)
  assert compiles == [], f"recompiled {len(compiles)} times for a stack of the same shapes"
  assert_close(np.asarray(swapped)[0], alone(tiny_llama, adapters[1], input_ids[:1])[0], rtol=1e-5)


def test_stack_memory_is_the_pools_plus_routing(adapters):
  stack = stack_adapters(adapters)
  assert stack.num_adapters == 3
  pool_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(stack.pools))
  assert pool_bytes == 3 * sum(x.nbytes for x in jax.tree_util.tree_leaves(adapters[0].pools))


def test_refuses_incompatible_adapters_and_bad_ids(tiny_llama, adapters):
  other_rank = adapt(tiny_llama.params, dataclasses.replace(BASE, rank=2))
  with pytest.raises(ValueError, match="Adapter 1 cannot share a stack") as err:
    stack_adapters([adapters[0], other_rank])
  assert "rank: adapter 0 has 4, adapter 1 has 2" in str(err.value)
  with pytest.raises(ValueError, match="at least one"):
    stack_adapters([])
  stack = stack_adapters(adapters)
  with pytest.raises(ValueError, match=r"in \[-1, 3\)"):
    with inject_multi(stack, np.array([0, 3])):
      pass
  with pytest.raises(ValueError, match="1-D integer"):
    with inject_multi(stack, np.zeros((2, 2), np.int32)):
      pass
  with pytest.raises(ValueError, match="first axis is not the batch of 3"):
    with inject_multi(stack, np.array([0, 1, 2])), hf_numerics():
      tiny_llama(np.ones((2, 4), np.int32))


@pytest.mark.slow  # a benchmark's quick run in a subprocess (~20 s): the slow suite runs it
def test_benchmark_quick_run_writes_json(tmp_path):
  out = tmp_path / "bench.json"
  root = REPO_ROOT
  run = subprocess.run([sys.executable, "-m", "experiments.bench_serving", "--quick", "--out", str(out)],
                       capture_output=True, text=True, timeout=600, cwd=root)
  assert run.returncode == 0, run.stderr[-3000:]
  printed = run.stdout
  result = json.loads(out.read_text())
  rows = result["throughput"]["rows"]
  assert [r["adapters"] for r in rows] == [1, 4, 8]
  assert all(r["mixed_tokens_per_s"] > 0 and r["one_at_a_time_tokens_per_s"] > 0 for r in rows)
  memory = result["memory"]
  # Quick sizes: r=4, r_e=2, so MoS pools hold half of LoRA(r=4)'s values.
  assert memory["mos_pools_bytes"] * 2 == memory["lora_same_rank_bytes"]
  assert memory["mos_file_bytes"] < memory["lora_peft_file_bytes"]
  assert "speedup" in printed and "file (native MoS vs PEFT export)" in printed


def test_invalid_ids_under_jit_never_serve_another_adapter(tiny_llama, adapters, forward):
  """Issue 13.1: traced ids 7, 3 and -5 used to be served by adapter 2 and the base model."""
  stack = stack_adapters(adapters)
  ids = np.array([7, 3, -5, 1, -1], np.int32)
  input_ids = np.random.default_rng(1).integers(0, 64, size=(len(ids), 6)).astype(np.int32)
  out = np.asarray(forward(stack, jnp.asarray(ids), input_ids))
  assert np.isnan(out[:3]).all()  # poisoned, not clipped onto adapter 2 / the base model
  assert_close(out[3:4], alone(tiny_llama, adapters[1], input_ids[3:4]), rtol=1e-5)
  with hf_numerics():
    assert_close(out[4:], np.asarray(tiny_llama(input_ids[4:]).logits), rtol=1e-5)


def test_serve_checks_ids_on_the_host_before_dispatch(tiny_llama, adapters):
  from mos_jax.linen import serve
  stack = stack_adapters(adapters)
  calls = []

  def forward(stack, ids, input_ids):
    calls.append(ids)
    return forward_fn(tiny_llama)(stack, ids, input_ids)

  checked = serve(forward)
  input_ids = np.zeros((3, 4), np.int32)
  for bad in ([0, 3, 1], [-2, 0, 0], [0, 1, 7]):
    with pytest.raises(ValueError, match=r"adapter_ids must lie in \[-1, 3\).*row"):
      checked(stack, jnp.asarray(bad, jnp.int32), input_ids)
  with pytest.raises(ValueError, match="1-D integer"):
    checked(stack, np.zeros((3,), np.float32), input_ids)
  assert not calls  # nothing was dispatched
  out = checked(stack, np.array([2, -1, 0], np.int32), input_ids)
  assert len(calls) == 1 and np.isfinite(np.asarray(out)).all()


def _rows_and_tokens(ids, seed=2):
  return np.random.default_rng(seed).integers(0, 64, size=(len(ids), 6)).astype(np.int32)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint32, np.int8, np.int64])
def test_any_integer_id_dtype_serves_the_same_rows(tiny_llama, adapters, forward, dtype):
  """Issue 20.3: unsigned ids (all valid) made every row NaN, eager, under jit and through serve()."""
  from mos_jax.linen import serve
  stack = stack_adapters(adapters)
  ids = np.array([2, 0, 1, 1, 0], np.int32)
  input_ids = _rows_and_tokens(ids)
  ref = np.asarray(forward(stack, ids, input_ids))
  assert np.isfinite(ref).all()
  typed = ids.astype(dtype)
  if np.issubdtype(dtype, np.unsignedinteger):  # eager runs take seconds: the unsigned dtypes of the issue
    with inject_multi(stack, typed), hf_numerics():
      eager = np.asarray(tiny_llama(input_ids, params=tiny_llama.params).logits)
    assert_close(eager, ref, rtol=1e-5)
  assert_close(np.asarray(forward(stack, typed, input_ids)), ref, rtol=1e-5)
  assert_close(np.asarray(serve(forward)(stack, typed, input_ids)), ref, rtol=1e-5)


@pytest.mark.parametrize("bad", [[np.uint8(200)], [np.uint32(2**32 - 1), np.uint32(3)]], ids=["uint8", "uint32"])
def test_a_bad_unsigned_id_under_jit_poisons_only_its_row(tiny_llama, adapters, forward, bad):
  """Issue 20.3: under jit one bad unsigned id turned the valid rows NaN too (2**32 - 1 is not -1)."""
  stack = stack_adapters(adapters)
  ids = np.array([0, 1, 2, 0, 1], bad[0].dtype)
  rows = [2, 4][:len(bad)]
  ids[rows] = bad
  input_ids = _rows_and_tokens(ids, seed=3)
  out = np.asarray(forward(stack, jnp.asarray(ids), input_ids))
  assert np.isnan(out[rows]).all()
  for row in sorted({0, 1, 2, 3, 4} - set(rows)):
    assert_close(out[row:row + 1], alone(tiny_llama, adapters[int(ids[row])], input_ids[row:row + 1]), rtol=1e-5)
  with pytest.raises(ValueError, match=rf"in \[-1, 3\).*row 2: {int(bad[0])}"):
    with inject_multi(stack, ids):
      pass


def test_stack_for_a_smaller_model_is_refused(tiny_llama):
  """Issue 20.4: a stack made for a 2-layer model ran on a 3-layer model with its third layer unadapted."""
  from transformers import FlaxLlamaForCausalLM
  cfg = tiny_llama.config.__class__(**{**tiny_llama.config.to_dict(), "num_hidden_layers": 2})
  with hf_numerics():
    small = FlaxLlamaForCausalLM(cfg, seed=0)
  small_config = dataclasses.replace(BASE, equivalent_rank=2)  # 2 layers need a larger pool
  stack = stack_adapters([adapt(small.params, small_config),
                          adapt(small.params, dataclasses.replace(small_config, seed=1))])
  ids = np.array([0, 1], np.int32)
  with pytest.raises(ValueError, match="matches the adapter's target_modules but the adapter has no factors"):
    forward_fn(tiny_llama)(stack, ids, np.ones((2, 4), np.int32))
  # As inject refuses the same pairing.
  with pytest.raises(ValueError, match="no factors"):
    with inject(adapt(small.params, small_config)), hf_numerics():
      tiny_llama(np.ones((2, 4), np.int32))


@pytest.mark.parametrize("factor", ["A", "B"])
def test_a_nan_adapter_never_touches_other_rows(tiny_llama, adapters, forward, factor):
  """Issue 20.5: a NaN in adapter 0 turned the base-model rows (id -1) NaN (0 * NaN = NaN)."""
  poisoned = adapters[0].replace(pools={
      n: {f: (jnp.full_like(v, jnp.nan) if f == factor else v) for f, v in p.items()}
      for n, p in adapters[0].pools.items()})
  stack = stack_adapters([poisoned, adapters[1], adapters[2]])
  ids = np.array([-1, 1, 0, 2, -1], np.int32)
  input_ids = _rows_and_tokens(ids, seed=4)
  segmented = mos_jax.core.plan_rows(ids, 3, segment_max=4 * 6)  # adapters 0, 1, 2 (+ padding) for every row
  for out in (np.asarray(forward(stack, ids, input_ids)), np.asarray(forward(stack, segmented, input_ids))):
    assert np.isnan(out[2]).any()
    with hf_numerics():
      base = np.asarray(tiny_llama(input_ids).logits)
    assert_close(out[[0, 4]], base[[0, 4]], rtol=1e-5)
    assert_close(out[1:2], alone(tiny_llama, adapters[1], input_ids[1:2]), rtol=1e-5)
    assert_close(out[3:4], alone(tiny_llama, adapters[2], input_ids[3:4]), rtol=1e-5)


def test_a_single_adapter_is_refused_with_a_type_error(adapters):
  """Issue 20: inject_multi(Adapter) gave an AttributeError."""
  from mos_jax.linen import serve
  with pytest.raises(TypeError, match=r"stack_adapters\(\[adapter\]\)"):
    with inject_multi(adapters[0], np.array([0])):
      pass
  with pytest.raises(TypeError, match=r"AdapterStack.*stack_adapters"):
    serve(lambda stack, ids: None)(adapters[0], np.array([0]))


class _Bf16Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(16, use_bias=False, dtype=jnp.bfloat16, param_dtype=jnp.float32, name="q_proj")(x)


class _Bf16Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    for i in range(4):
      x = _Bf16Block(name=f"layers_{i}")(x)
    return x


@pytest.mark.parametrize("segment_max", [0, 64])
def test_a_bf16_model_is_served_in_bf16_without_float32_copies_of_its_activations(segment_max):
  """Issue 24.1 for serving: the term ran in the pools' float32 (the activations copied up) while training
  runs it in the input's dtype. Values: each row equals its adapter alone (bf16 tolerance)."""
  net = _Bf16Net()
  x = jax.random.normal(jax.random.key(0), (3, 5, 16)).astype(jnp.bfloat16)
  params = net.init(jax.random.key(1), x)["params"]
  cfg = MoSConfig(rank=4, equivalent_rank=2, shards_per_vector=2, target_modules=("q_proj",))
  adapters = [adapt(params, dataclasses.replace(cfg, seed=k)) for k in range(2)]
  adapters = [a.replace(pools=random_pools(a.pools, seed=20 + k)) for k, a in enumerate(adapters)]
  stack, ids = stack_adapters(adapters), np.array([1, -1, 0], np.int32)
  plan = mos_jax.core.plan_rows(ids, 2, segment_max=segment_max)

  def served(stack, x):
    with inject_multi(stack, plan):
      return net.apply({"params": params}, x)

  y = jax.jit(served)(stack, x)
  assert y.dtype == jnp.bfloat16
  assert full_width_upcasts(served, stack, x, min_size=x.size) == []
  for row, k in enumerate(ids):
    if k < 0:
      want = net.apply({"params": params}, x[row:row + 1])
    else:
      with inject(adapters[k]):
        want = net.apply({"params": params}, x[row:row + 1])
    assert_close(np.asarray(y[row:row + 1], np.float32), np.asarray(want, np.float32), rtol=3e-2)
