"""The NNX backend on tiny random Tunix models (Gemma 3, Llama 3, Qwen 3) and hand-written NNX models.

Oracles: the adapted forward against the merged forward, plain LoRA (``MoSConfig.lora``) against
qwix's independent LoRA given the same factors, and an NNX model against a linen model with the
same weights and pools.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import mos_jax
from oracles.gemma3 import randomize, tiny_gemma3
from oracles.helpers import assert_close, hf_numerics, random_pools, rel_err

g3 = pytest.importorskip("tunix.models.gemma3.model")
l3 = pytest.importorskip("tunix.models.llama3.model")
q3 = pytest.importorskip("tunix.models.qwen3.model")

RTOL = 1e-5
BASE = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))


def tiny_llama3(layers=2):
  cfg = l3.ModelConfig(num_layers=layers, vocab_size=64, embed_dim=32, hidden_dim=48, num_heads=4, head_dim=8,
                       num_kv_heads=2, rope_theta=10_000, norm_eps=1e-6)
  return randomize(l3.Llama3(cfg, rngs=nnx.Rngs(0)))


def tiny_qwen3(layers=2):
  cfg = q3.ModelConfig(num_layers=layers, vocab_size=64, embed_dim=32, hidden_dim=48, num_heads=4, head_dim=8,
                       num_kv_heads=2, rope_theta=10_000, norm_eps=1e-6)
  return randomize(q3.Qwen3(cfg, rngs=nnx.Rngs(0)))


TOKENS = jnp.array([[1, 5, 7, 9, 3, 2], [4, 4, 8, 1, 0, 6]])
POSITIONS = jnp.broadcast_to(jnp.arange(6), (2, 6))
MASK = jnp.broadcast_to(jnp.tril(jnp.ones((6, 6), bool)), (2, 6, 6))


def logits(model, tokens=TOKENS):
  b, t = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(t), (b, t))
  mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
  with hf_numerics():  # Tunix models broadcast implicitly, like HF's
    return model(tokens, positions, None, mask)[0]


MODELS = {
    "gemma3": (tiny_gemma3, mos_jax.nnx.GEMMA3_TARGETS),
    "llama3": (tiny_llama3, mos_jax.core.LLAMA_TARGETS),
    "qwen3": (tiny_qwen3, mos_jax.core.LLAMA_TARGETS),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_tunix_model_adapted_equals_merged_and_counts_match(name):
  make, targets = MODELS[name]
  model = make()
  before = logits(model)
  config = mos_jax.MoSConfig(rank=4, equivalent_rank=2, shards_per_vector=2, target_modules=targets)
  adapted = mos_jax.nnx.adapt(model, config)
  adapter = mos_jax.nnx.adapter_of(adapted)
  # The pools are the only LoRAParams, each held once although every layer references it.
  lora = nnx.state(adapted, nnx.LoRAParam)
  assert sum(x.size for x in jax.tree_util.tree_leaves(lora)) == \
      mos_jax.core.trainable_count(adapter.config, adapter.groups)
  # Gemma's fused kv_einsum is split into its k and v parts, each its own module type (the paper's types).
  assert {g.name.split("/")[-1] for g in adapter.groups} == {n for t in targets for n in mos_jax.nnx.FUSED.get(t, (t,))}
  assert rel_err(logits(adapted), before) < 1e-6  # B = 0 at init
  mos_jax.nnx.load_pools(adapted, adapter.replace(pools=random_pools(adapter.pools, seed=1)))
  merged = mos_jax.nnx.merge(adapted)
  assert not jax.tree_util.tree_leaves(nnx.state(merged, nnx.LoRAParam))
  assert rel_err(logits(adapted), logits(merged)) < RTOL
  assert rel_err(logits(adapted), before) > 1e-3
  # The original model is untouched: its layers are not wrapped and its outputs are unchanged.
  assert not mos_jax.nnx.mos_layers(model)
  np.testing.assert_array_equal(logits(model), before)


def test_nnx_optimizer_trains_only_the_pools():
  adapted = mos_jax.nnx.adapt(tiny_gemma3(), mos_jax.MoSConfig(rank=4, equivalent_rank=2, shards_per_vector=2,
                                                               target_modules=mos_jax.nnx.GEMMA3_TARGETS))
  base_before = [np.asarray(x) for x in jax.tree_util.tree_leaves(nnx.state(adapted, BASE))]
  optimizer = nnx.Optimizer(adapted, optax.adam(1e-2), wrt=nnx.LoRAParam)

  def loss_fn(model):
    out = logits(model)
    return optax.softmax_cross_entropy_with_integer_labels(out[:, :-1], TOKENS[:, 1:]).mean()

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(adapted, optimizer)) for _ in range(5)]
  assert losses[-1] < losses[0]
  base_after = jax.tree_util.tree_leaves(nnx.state(adapted, BASE))
  assert all(np.array_equal(a, b) for a, b in zip(base_before, base_after))  # bit for bit


def _qwix_lora(model, rank, alpha, pattern):
  qwix = pytest.importorskip("qwix")
  provider = qwix.LoraProvider(module_path=pattern, rank=rank, alpha=alpha)
  with hf_numerics():
    return qwix.apply_lora_to_model(model, provider, TOKENS, POSITIONS, None, MASK, rngs=nnx.Rngs(0))


def test_mos_lora_equals_qwix_lora_with_the_same_factors():
  model = tiny_llama3()
  config = mos_jax.MoSConfig.lora(3, alpha=6.0, target_modules=("q_proj", "o_proj", "up_proj"))
  adapted = mos_jax.nnx.adapt(model, config)
  adapter = mos_jax.nnx.adapter_of(adapted)
  mos_jax.nnx.load_pools(adapted, adapter.replace(pools=random_pools(adapter.pools, seed=2)))
  qwixed = _qwix_lora(model, 3, 6.0, r".*/(q_proj|o_proj|up_proj)")
  # Copy each layer's assembled A (r, d_in), B (d_out, r) into qwix's layout: A over the contracted
  # dims then rank, B rank then the free dims, both in the kernel's own dim order.
  for keys, layer in mos_jax.nnx.mos_layers(adapted):
    a, b = (np.asarray(f) for f in layer.factors())
    g = layer.group
    target = qwixed
    for k in keys:
      target = target[k] if isinstance(k, int) else getattr(target, k)
    lora_a = getattr(target, f"{layer.kernel_name}_lora_a")
    lora_b = getattr(target, f"{layer.kernel_name}_lora_b")
    contracted = tuple(g.kernel_shape[i] for i in g.in_axes)
    free = tuple(g.kernel_shape[i] for i in g.out_axes)
    lora_a[...] = jnp.asarray(a.T.reshape(lora_a[...].shape if lora_a[...].ndim == 2 else contracted + (3,)))
    lora_b[...] = jnp.asarray(b.T.reshape(lora_b[...].shape if lora_b[...].ndim == 2 else (3,) + free))
  assert rel_err(logits(adapted), logits(qwixed)) < RTOL
  assert rel_err(logits(adapted), logits(model)) > 1e-3


class LinenBlock(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.gelu(nn.Dense(24, name="up")(x))
    return x + nn.Dense(16, name="down")(h)


class LinenModel(nn.Module):
  @nn.compact
  def __call__(self, x):
    for i in range(3):
      x = LinenBlock(name=f"layers_{i}")(x)
    return x


class NNXBlock(nnx.Module):
  def __init__(self, rngs):
    self.up = nnx.Linear(16, 24, rngs=rngs)
    self.down = nnx.Linear(24, 16, rngs=rngs)

  def __call__(self, x):
    return x + self.down(nnx.gelu(self.up(x)))


class NNXModel(nnx.Module):
  def __init__(self, rngs):
    self.layers = nnx.List([NNXBlock(rngs) for _ in range(3)])

  def __call__(self, x):
    for layer in self.layers:
      x = layer(x)
    return x


def test_nnx_and_linen_models_with_the_same_weights_agree():
  x = jax.random.normal(jax.random.key(0), (2, 5, 16))
  nnx_model = NNXModel(nnx.Rngs(0))
  # The linen model's params, renamed into NNX's layers/<i>/... layout (linen names layers_<i>).
  params = {"layers": {str(i): {name: {"kernel": getattr(nnx_model.layers[i], name).kernel[...],
                                       "bias": getattr(nnx_model.layers[i], name).bias[...]}
                                for name in ("up", "down")} for i in range(3)}}
  linen = LinenModel()
  to_linen = lambda p: {f"layers_{i}": p["layers"][str(i)] for i in range(3)}
  assert_close(linen.apply({"params": to_linen(params)}, x), nnx_model(x), rtol=1e-5)

  config = mos_jax.MoSConfig(rank=3, equivalent_rank=1, shards_per_vector=2, target_modules=("up", "down"))
  linen_adapter = mos_jax.adapt(params, config)
  adapted = mos_jax.nnx.adapt(nnx_model, config)
  nnx_adapter = mos_jax.nnx.adapter_of(adapted)
  assert nnx_adapter.spec == linen_adapter.spec  # same groups, same draw
  jax.tree_util.tree_map(np.testing.assert_array_equal, nnx_adapter.pools, linen_adapter.pools)
  trained = linen_adapter.replace(pools=random_pools(linen_adapter.pools, seed=4))
  mos_jax.nnx.load_pools(adapted, trained)
  linen_out = linen.apply({"params": to_linen(mos_jax.merge(params, trained))}, x)
  assert rel_err(adapted(x), linen_out) < RTOL


def test_adapter_file_and_checkpoint_round_trip(tmp_path):
  model = tiny_gemma3()
  config = mos_jax.MoSConfig(rank=4, equivalent_rank=2, shards_per_vector=2,
                             target_modules=mos_jax.nnx.GEMMA3_TARGETS)
  adapted = mos_jax.nnx.adapt(model, config)
  adapter = mos_jax.nnx.adapter_of(adapted)
  mos_jax.nnx.load_pools(adapted, adapter.replace(pools=random_pools(adapter.pools, seed=5)))
  path = mos_jax.save_adapter(tmp_path / "a.safetensors", mos_jax.nnx.adapter_of(adapted))
  reloaded = mos_jax.nnx.adapt(model, mos_jax.load_adapter(path))
  np.testing.assert_array_equal(logits(reloaded), logits(adapted))
  # An adapter of a 2-layer model does not go into a 3-layer one.
  with pytest.raises(mos_jax.core.MismatchError, match="layers/2/attn/q_einsum: the params have a targeted kernel"):
    mos_jax.nnx.adapt(tiny_gemma3(layers=3), mos_jax.load_adapter(path))
  # Orbax: the pools (an Adapter) checkpoint and restore bit for bit.
  ident = {"adapter": mos_jax.train.adapter_identity(adapter)}
  with mos_jax.TrainCheckpointer(tmp_path / "ckpt", identity=ident, async_save=False) as ckpt:
    ckpt.save(1, {"adapter": mos_jax.nnx.adapter_of(adapted)}, force=True)
    ckpt.wait()
    restored = ckpt.restore({"adapter": adapter}).state["adapter"]
  fresh = mos_jax.nnx.adapt(model, config)
  mos_jax.nnx.load_pools(fresh, restored)
  np.testing.assert_array_equal(logits(fresh), logits(adapted))


class ConvNet(nnx.Module):
  def __init__(self, rngs):
    self.layers = nnx.List([nnx.Conv(8, 8, (3,), rngs=rngs) for _ in range(2)])


def test_unsupported_modules_are_refused_by_class():
  with pytest.raises(ValueError, match="belongs to a Conv module"):
    mos_jax.nnx.adapt(ConvNet(nnx.Rngs(0)), mos_jax.MoSConfig(rank=1, equivalent_rank=1, target_modules=("0", "1")))
  with pytest.raises(ValueError, match=r"match no module of this model: 'nope'"):
    mos_jax.nnx.adapt(tiny_gemma3(), mos_jax.MoSConfig(rank=2, equivalent_rank=1, target_modules=("nope",)))
  with pytest.raises(ValueError, match="No module matched"):
    mos_jax.nnx.adapt(tiny_gemma3(), mos_jax.MoSConfig(rank=2, equivalent_rank=1, target_modules="nope.*"))


def test_sharded_step_on_a_mesh_matches_one_device():
  config = mos_jax.MoSConfig(rank=4, equivalent_rank=2, shards_per_vector=2, target_modules=mos_jax.nnx.GEMMA3_TARGETS)

  def run(mesh):
    adapted = mos_jax.nnx.adapt(tiny_gemma3(), config)
    if mesh is not None:
      # Base weights FSDP-split by the project's rules, pools replicated, batch split over data.
      base = nnx.state(adapted, BASE)
      shardings = mos_jax.parallel.base_shardings(base, mesh, fsdp_min_size=0)
      nnx.update(adapted, jax.device_put(base, shardings))
      replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
      nnx.update(adapted, jax.device_put(nnx.state(adapted, nnx.LoRAParam), replicated))
    optimizer = nnx.Optimizer(adapted, optax.adam(1e-2), wrt=nnx.LoRAParam)
    tokens = jnp.concatenate([TOKENS, TOKENS[:, ::-1]])  # 4 rows: one per data x fsdp shard
    if mesh is not None:
      tokens = jax.device_put(tokens, mos_jax.parallel.batch_sharding(mesh))

    @nnx.jit
    def step(model, optimizer, tokens):
      def loss_fn(model):
        out = logits(model, tokens)
        return optax.softmax_cross_entropy_with_integer_labels(out[:, :-1], tokens[:, 1:]).mean()
      loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
      optimizer.update(model, grads)
      return loss

    return [float(step(adapted, optimizer, tokens)) for _ in range(3)], mos_jax.nnx.adapter_of(adapted)

  single, single_adapter = run(None)
  mesh = mos_jax.parallel.make_mesh(mos_jax.parallel.MeshConfig(data=2, fsdp=2, tensor=2))
  sharded, sharded_adapter = run(mesh)
  assert_close(sharded, single, rtol=1e-5)
  jax.tree_util.tree_map(lambda a, b: assert_close(a, b, rtol=1e-4),
                         sharded_adapter.pools, single_adapter.pools)


def test_tunix_peft_trainer_trains_the_pools_unchanged(tmp_path):
  peft_trainer = pytest.importorskip("tunix.sft.peft_trainer")
  adapted = mos_jax.nnx.adapt(tiny_gemma3(), mos_jax.MoSConfig(rank=4, equivalent_rank=2,
                                                               target_modules=mos_jax.nnx.GEMMA3_TARGETS))
  start = mos_jax.nnx.adapter_of(adapted)
  base_before = [np.asarray(x) for x in jax.tree_util.tree_leaves(nnx.state(adapted, BASE))]
  trainer = peft_trainer.PeftTrainer(adapted, optax.adam(1e-2), peft_trainer.TrainingConfig(
      eval_every_n_steps=100, max_steps=3, pbar_description=None))
  trainer = trainer.with_gen_model_input_fn(lambda x: {
      "input_tokens": x.input_tokens, "input_mask": x.input_mask, "positions": POSITIONS, "attention_mask": MASK})
  batch = peft_trainer.TrainingInput(input_tokens=TOKENS, input_mask=jnp.ones(TOKENS.shape, bool))
  with hf_numerics():
    trainer.train([batch] * 3)
  trained = mos_jax.nnx.adapter_of(adapted)
  assert float(jnp.abs(trained.pools["layers/*/attn/q_einsum"]["B"]).sum()) > 0  # B moved off zero
  assert trained.spec == start.spec
  base_after = jax.tree_util.tree_leaves(nnx.state(adapted, BASE))
  assert all(np.array_equal(a, b) for a, b in zip(base_before, base_after))


def _hf_weight(kernel, group_path):
  """A Tunix kernel as HF's nn.Linear weight(s) (out, in), by Tunix's own HF mapping (no permutation)."""
  k = np.asarray(kernel, np.float64)
  if group_path.endswith("kv_einsum"):           # (2, K, D, H) -> k_proj, v_proj: (K·H, D) each
    return [k[c].transpose(0, 2, 1).reshape(-1, k.shape[2]) for c in range(2)]
  if group_path.endswith("q_einsum"):            # (N, D, H) -> (N·H, D)
    return [k.transpose(0, 2, 1).reshape(-1, k.shape[1])]
  if group_path.endswith("attn_vec_einsum"):     # (N, H, D) -> (D, N·H)
    return [k.reshape(-1, k.shape[2]).T]
  if k.ndim == 3 and group_path.endswith("o_proj"):  # Llama (N, H, D) -> (D, N·H)
    return [k.reshape(-1, k.shape[2]).T]
  if k.ndim == 3:                                # Llama q/k/v (D, N, H) -> (N·H, D)
    return [k.reshape(k.shape[0], -1).T]
  return [k.T]                                   # nnx.Linear (in, out) -> (out, in)


@pytest.mark.parametrize("family", ["gemma3", "llama3"])
def test_peft_export_uses_hf_names_and_layouts(family, tmp_path):
  make, targets = MODELS[family]
  model = make()
  adapted = mos_jax.nnx.adapt(model, mos_jax.MoSConfig(rank=4, equivalent_rank=2, shards_per_vector=2,
                                                       target_modules=targets))
  adapter = mos_jax.nnx.adapter_of(adapted)
  adapter = adapter.replace(pools=random_pools(adapter.pools, seed=6))
  mos_jax.nnx.load_pools(adapted, adapter)
  with pytest.raises(NotImplementedError, match="name its PyTorch modules"):
    mos_jax.export_peft(tmp_path / "plain", adapter)
  folder = mos_jax.export_peft(tmp_path / "peft", adapter, names=mos_jax.nnx.PEFT_NAMES[family])
  factors, scale = mos_jax.formats.load_peft_factors(folder)
  merged = mos_jax.nnx.merge(adapted)
  hf = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
  assert {p.split("/")[-1] for p in factors} == hf and len(factors) == 7 * 2
  # PEFT's ΔW = scale · B A, in HF's (out, in) layout, equals what merge added to the Tunix kernel.
  for keys, layer in mos_jax.nnx.mos_layers(adapted):
    path = "/".join(str(k) for k in keys)
    before = _hf_weight(getattr(layer.base, layer.kernel_name)[...], path)
    target = merged
    for k in keys:
      target = target[k] if isinstance(k, int) else getattr(target, k)
    after = _hf_weight(getattr(target, layer.kernel_name)[...], path)
    names = [n for n in factors if n.startswith(f"model/layers/{keys[1]}/")
             and n.split("/")[-1] in _torch_names(path)]
    assert len(names) == len(before)
    for name, w0, w1 in zip(sorted(names, key=lambda n: _torch_names(path).index(n.split("/")[-1])), before, after):
      a, b = factors[name]
      assert rel_err(scale * b.astype(np.float64) @ a.astype(np.float64), w1 - w0) < 1e-4, name


def _torch_names(path):
  leaf = path.split("/")[-1]
  return {"q_einsum": ["q_proj"], "kv_einsum": ["k_proj", "v_proj"], "attn_vec_einsum": ["o_proj"]}.get(leaf, [leaf])


def test_unbind_bind_trains_the_adapter_with_the_one_train_step():
  adapted = mos_jax.nnx.adapt(tiny_llama3(), mos_jax.MoSConfig(rank=4, equivalent_rank=2, shards_per_vector=2))
  graphdef, adapter, state = mos_jax.nnx.unbind(adapted)

  def loss_fn(model):
    out = logits(model)
    return optax.softmax_cross_entropy_with_integer_labels(out[:, :-1], TOKENS[:, 1:]).mean()

  # The gradient with respect to the Adapter value equals NNX's gradient of the LoRAParams.
  grads = jax.grad(lambda a: loss_fn(mos_jax.nnx.bind(graphdef, a, state)))(adapter)
  nnx_grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(adapted)
  by_group = {layer.group.name: layer for _, layer in mos_jax.nnx.mos_layers(adapted)}
  flat = dict(nnx.to_flat_state(nnx_grads))
  for name, layer in by_group.items():
    key = next(k for k in flat if k[-1] == "a" and _reaches(adapted, k[:-1]) is layer.pools)
    assert_close(grads.pools[name]["A"], flat[key][...], rtol=1e-5)
  step = mos_jax.train.make_step(lambda a, s, batch, rng: loss_fn(mos_jax.nnx.bind(graphdef, a, s)),
                                 optax.adam(1e-2))
  opt_state = optax.adam(1e-2).init(adapter)
  losses = []
  for _ in range(3):
    adapter, opt_state, loss = step(adapter, opt_state, state, None, None)
    losses.append(float(loss))
  assert losses[-1] < losses[0]
  mos_jax.nnx.load_pools(adapted, adapter)
  assert abs(float(loss_fn(adapted)) - losses[-1]) < losses[0] - losses[-1]


def _reaches(model, keys):
  node = model
  for k in keys:
    node = node[k] if isinstance(k, int) else getattr(node, k)
  return node


def test_adapted_model_keeps_its_own_pools_when_the_adapter_is_donated():
  model = tiny_llama3()
  config = mos_jax.MoSConfig(rank=4, equivalent_rank=2, shards_per_vector=2)
  adapter = mos_jax.nnx.adapter_of(mos_jax.nnx.adapt(model, config))
  adapter = adapter.replace(pools=random_pools(adapter.pools, seed=7))
  for adapted in (mos_jax.nnx.adapt(model, adapter), mos_jax.nnx.adapt(model, config)):
    mos_jax.nnx.load_pools(adapted, adapter)
    expected = logits(adapted)
    step = mos_jax.train.make_step(lambda a, s, b, r: sum(jnp.sum(x) for x in jax.tree_util.tree_leaves(a)),
                                   optax.sgd(0.1))
    step(adapter, optax.sgd(0.1).init(adapter), None, None, None)  # donates `adapter` itself
    np.testing.assert_array_equal(logits(adapted), expected)
    adapter = mos_jax.nnx.adapter_of(adapted)


def test_bind_needs_the_step_key_for_dropout():
  adapted = mos_jax.nnx.adapt(NNXModel(nnx.Rngs(0)), mos_jax.MoSConfig(rank=2, equivalent_rank=1, dropout=0.5,
                                                                      target_modules=("up",)),
                              rngs=nnx.Rngs(dropout=0))
  graphdef, adapter, state = mos_jax.nnx.unbind(adapted)
  adapter = adapter.replace(pools=random_pools(adapter.pools))
  x = jnp.ones((2, 16))
  with pytest.raises(ValueError, match="pass the step's key"):
    mos_jax.nnx.bind(graphdef, adapter, state)
  run = jax.jit(lambda a, s, k: mos_jax.nnx.bind(graphdef, a, s, rng=k)(x))
  first, again, other = run(adapter, state, jax.random.key(1)), run(adapter, state, jax.random.key(1)), \
      run(adapter, state, jax.random.key(2))
  np.testing.assert_array_equal(first, again)
  assert np.abs(np.asarray(first) - np.asarray(other)).max() > 1e-4
