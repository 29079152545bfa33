"""The linen backend: einsum-style kernels, module types it refuses, and the failures it must not hide.

Oracles: the adapted forward (inject, which never forms ΔW) against the merged forward (which
reshapes ΔW into the kernel's own layout by a separate code path), and an explicit NumPy
computation of the low-rank term.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from transformers import FlaxGPT2LMHeadModel, GPT2Config

import mos_jax
import mos_jax.hf
from oracles.helpers import hf_numerics, random_pools, rel_err

RTOL = 1e-5


class Layers(nn.Module):
  """``layers/<i>/...``: ``num`` blocks named by their index, as HF and Tunix models name them."""

  block: type
  num: int

  @nn.compact
  def __call__(self, x):
    for i in range(self.num):
      x = self.block(name=str(i))(x)
    return x


class Model(nn.Module):
  block: type
  num: int

  @nn.compact
  def __call__(self, x):
    return Layers(self.block, self.num, name="layers")(x)


class AttentionBlock(nn.Module):
  """flax MultiHeadDotProductAttention: DenseGeneral kernels (16, 4, 4) for q/k/v and (4, 4, 16) out."""

  @nn.compact
  def __call__(self, x):
    return x + nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=16, name="attn")(x)


class EinsumBlock(nn.Module):
  """Gemma-style einsum projections, kernel labels in their own order (free dims before and after D)."""

  @nn.compact
  def __call__(self, x):
    q = nn.Einsum((4, 16, 2), "BTD,NDH->BTNH", name="q_einsum")(x)
    kv = nn.Einsum((2, 2, 16, 2), "BSD,CKDH->CBSKH", use_bias=False, name="kv_einsum")(x)
    return x + nn.Dense(16, name="mix")(jnp.concatenate(
        [q.reshape(x.shape[:2] + (8,)), kv.transpose(1, 2, 0, 3, 4).reshape(x.shape[:2] + (8,))], -1))


def Attention():
  return Model(AttentionBlock, 2)


def Einsums():
  return Model(EinsumBlock, 3)


def _params(module, x):
  return module.init(jax.random.key(0), x)["params"]


def _adapted_vs_merged(module, params, x, config, layouts):
  adapter = mos_jax.adapt(params, config, layouts=layouts)
  adapter = adapter.replace(pools=random_pools(adapter.pools, seed=3))
  with mos_jax.linen.inject(adapter):
    adapted = module.apply({"params": params}, x)
  merged = module.apply({"params": mos_jax.merge(params, adapter)}, x)
  base = module.apply({"params": params}, x)
  return adapter, adapted, merged, base


def test_dense_general_attention_adapted_equals_merged():
  module, x = Attention(), jax.random.normal(jax.random.key(1), (2, 5, 16))
  params = _params(module, x)
  config = mos_jax.MoSConfig(rank=4, equivalent_rank=2, shards_per_vector=2,
                             target_modules=r"layers/\d+/attn/(query|value|out)")
  with pytest.raises(ValueError, match=r"only 2-D \(d_in, d_out\) kernels"):
    mos_jax.adapt(params, config)  # a (16, 4, 4) kernel is not taken for 16 layers
  layouts = mos_jax.linen.kernel_layouts(lambda p, v: module.apply({"params": p}, v), params, x)
  assert layouts["layers/0/attn/query"] == mos_jax.core.KernelLayout((0,), (1, 2), "DenseGeneral", shape=(16, 4, 4))
  assert layouts["layers/0/attn/out"] == mos_jax.core.KernelLayout((0, 1), (2,), "DenseGeneral", shape=(4, 4, 16))
  adapter, adapted, merged, base = _adapted_vs_merged(module, params, x, config, layouts)
  groups = {g.name: (g.kernel_shape, g.d_in, g.d_out, g.num_layers) for g in adapter.groups}
  assert groups == {"layers/*/attn/query": ((16, 4, 4), 16, 16, 2), "layers/*/attn/value": ((16, 4, 4), 16, 16, 2),
                    "layers/*/attn/out": ((4, 4, 16), 16, 16, 2)}
  assert rel_err(adapted, merged) < RTOL
  assert rel_err(adapted, base) > 1e-3  # the adapter does something


def test_einsum_kernels_match_a_numpy_reference_and_merge():
  module, x = Einsums(), jax.random.normal(jax.random.key(1), (2, 3, 16))
  params = _params(module, x)
  layouts = mos_jax.linen.kernel_layouts(lambda p, v: module.apply({"params": p}, v), params, x)
  assert layouts["layers/0/kv_einsum"].in_axes == (2,) and layouts["layers/0/kv_einsum"].out_axes == (0, 1, 3)
  config = mos_jax.MoSConfig(rank=4, equivalent_rank=2, shards_per_vector=2, target_modules=("q_einsum", "kv_einsum"))
  adapter, adapted, merged, _ = _adapted_vs_merged(module, params, x, config, layouts)
  assert rel_err(adapted, merged) < RTOL

  # One layer by hand: kv_einsum's term is the flat (d_in=16 -> d_out=2·2·2) LoRA map, laid out as "CBSKH".
  a, b = mos_jax.core.layer_factors(adapter)["layers/0/kv_einsum"]
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  xn = np.asarray(x, np.float64)
  term = config.scale * (xn @ a.T @ b.T)                      # (B, S, C·K·H), C, K, H in kernel order
  expected = term.reshape(2, 3, 2, 2, 2).transpose(2, 0, 1, 3, 4)

  captured = {}

  def spy(module_, next_fun, args, kwargs):
    y = next_fun(*args, **kwargs)
    captured["/".join(module_.path)] = y
    return y

  with mos_jax.linen.intercept_kernel_calls(spy):   # outer: sees the adapted output
    with mos_jax.linen.inject(adapter):
      module.apply({"params": params}, x)
  base_kv = np.einsum("bsd,ckdh->cbskh", xn, np.asarray(params["layers"]["0"]["kv_einsum"]["kernel"], np.float64))
  assert rel_err(np.asarray(captured["layers/0/kv_einsum"]) - base_kv, expected) < 1e-4


def test_einsum_gradients_reach_every_pool():
  module, x = Einsums(), jax.random.normal(jax.random.key(1), (2, 3, 16))
  params = _params(module, x)
  layouts = mos_jax.linen.kernel_layouts(lambda p, v: module.apply({"params": p}, v), params, x)
  adapter = mos_jax.adapt(params, mos_jax.MoSConfig(rank=2, equivalent_rank=1, target_modules=("q_einsum", "kv_einsum")),
                          layouts=layouts)
  loss = mos_jax.linen.adapted_loss(lambda p, v: (module.apply({"params": p}, v) ** 2).sum())
  grads = jax.grad(loss)(adapter, params, x)
  assert isinstance(grads, mos_jax.Adapter)
  for name, g in grads.pools.items():
    assert float(jnp.abs(g["B"]).sum()) > 0, name


class ConvNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(16, (3,), name="conv")(x)
    return nn.Dense(16, name="proj")(x)


def test_conv_kernel_is_refused_not_taken_for_layers():
  module, x = ConvNet(), jnp.ones((1, 8, 16))
  params = _params(module, x)
  config = mos_jax.MoSConfig(rank=2, equivalent_rank=1, target_modules=("conv", "proj"))
  with pytest.raises(ValueError, match=r"'conv' has shape \(3, 16, 16\)"):
    mos_jax.adapt(params, config)
  layouts = mos_jax.linen.kernel_layouts(lambda p, v: module.apply({"params": p}, v), params, x)
  with pytest.raises(ValueError, match="belongs to a Conv module"):
    mos_jax.adapt(params, config, layouts=layouts)
  # Excluding it adapts the rest.
  ok = mos_jax.adapt(params, mos_jax.MoSConfig.lora(2, target_modules=("proj",)), layouts=layouts)
  assert [g.name for g in ok.groups] == ["proj"]


class Custom(nn.Module):
  """A layer with its own 2-D kernel that no interceptor can hook (not nn.Dense/DenseGeneral/Einsum)."""

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], 8))
    return x @ kernel


class CustomBlock(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(8, name="proj")(Custom(name="custom")(x))


def CustomModel():
  return Model(CustomBlock, 2)


def test_never_called_modules_raise_instead_of_training_nothing():
  module, x = CustomModel(), jnp.ones((2, 8))
  params = _params(module, x)
  config = mos_jax.MoSConfig(rank=2, equivalent_rank=1, target_modules=("custom", "proj"))
  adapter = mos_jax.adapt(params, config)  # params alone cannot tell Custom from Dense
  with pytest.raises(RuntimeError, match="never reached these adapted modules: layers/0/custom, layers/1/custom"):
    with mos_jax.linen.inject(adapter):
      module.apply({"params": params}, x)
  layouts = mos_jax.linen.kernel_layouts(lambda p, v: module.apply({"params": p}, v), params, x)
  with pytest.raises(ValueError, match="belongs to a Custom module"):
    mos_jax.adapt(params, config, layouts=layouts)


def test_a_jitted_function_follows_the_injection_state_both_ways():
  """Issue 20.11: a function jitted inside ``with inject(a)`` kept returning a's output outside the block.

  The injection state is part of jit's cache key: a trace made inside a block is used only there,
  a trace made outside only outside, and a block of another adapter (same spec, other pools) traces
  again instead of reusing the first adapter's factors.
  """
  module, x = CustomModel(), jnp.ones((2, 8))
  params = _params(module, x)
  adapter = mos_jax.adapt(params, mos_jax.MoSConfig(rank=2, equivalent_rank=1, target_modules=("proj",)))
  a, b = (adapter.replace(pools=random_pools(adapter.pools, seed=s)) for s in (1, 2))
  base = module.apply({"params": params}, x)
  merged = {k: module.apply({"params": mos_jax.merge(params, v)}, x) for k, v in (("a", a), ("b", b))}
  assert min(rel_err(base, m) for m in merged.values()) > 1e-2 and rel_err(merged["a"], merged["b"]) > 1e-2

  inside_first = jax.jit(lambda p, v: module.apply({"params": p}, v))
  with mos_jax.linen.inject(a):
    assert rel_err(inside_first(params, x), merged["a"]) < RTOL
  assert rel_err(inside_first(params, x), base) < RTOL  # the old failure: a's output, outside the block
  with mos_jax.linen.inject(b):
    assert rel_err(inside_first(params, x), merged["b"]) < RTOL  # not a's factors from the cached trace

  outside_first = jax.jit(lambda p, v: module.apply({"params": p}, v))
  assert rel_err(outside_first(params, x), base) < RTOL
  with mos_jax.linen.inject(a):  # the old failure: the cached base trace ran ("never reached" on exit)
    assert rel_err(outside_first(params, x), merged["a"]) < RTOL
  assert rel_err(outside_first(params, x), base) < RTOL


class ProjBlock(nn.Module):
  @nn.compact
  def __call__(self, x):
    return x + nn.Dense(8, name="proj")(x)


class ListModel(nn.Module):
  """Blocks kept in a list attribute: Flax names them ``layers_0``, ``layers_1``, ..."""

  def setup(self):
    self.layers = [ProjBlock() for _ in range(3)]

  def __call__(self, x):
    for layer in self.layers:
      x = layer(x)
    return x


def test_blocks_in_a_flax_list_share_one_pool():
  """Issue 20.9: ``layers_0..N`` were taken for N module types, each with its own pools: nothing shared."""
  module, x = ListModel(), jnp.ones((2, 8))
  params = _params(module, x)
  assert sorted(params) == ["layers_0", "layers_1", "layers_2"]
  adapter = mos_jax.adapt(params, mos_jax.MoSConfig(rank=2, equivalent_rank=1, shards_per_vector=2,
                                                    target_modules=("proj",)))
  (g,) = adapter.groups
  assert (g.name, g.num_layers, g.paths) == ("layers_*/proj", 3, ("layers_0/proj", "layers_1/proj", "layers_2/proj"))
  assert adapter.pools["layers_*/proj"]["A"].shape == (1 * 3 * 2, 4)  # N = r_e·L·l shards shared by the 3 layers
  adapter = adapter.replace(pools=random_pools(adapter.pools, seed=4))
  with mos_jax.linen.inject(adapter):
    adapted = module.apply({"params": params}, x)
  assert rel_err(adapted, module.apply({"params": mos_jax.merge(params, adapter)}, x)) < RTOL


class JittedBlock(nn.Module):
  """A layer run under nn.jit, as Google's gemma library wraps its __call__."""

  @nn.compact
  def __call__(self, x):
    return nn.jit(nn.Dense)(8, name="proj")(x)


def JittedModel():
  return Model(JittedBlock, 2)


def test_nn_jit_layers_are_adapted_or_refused_never_silent():
  module, x = JittedModel(), jnp.ones((2, 8))
  params = _params(module, x)
  adapter = mos_jax.adapt(params, mos_jax.MoSConfig(rank=2, equivalent_rank=1, target_modules=("proj",)))
  adapter = adapter.replace(pools=random_pools(adapter.pools))
  merged = module.apply({"params": mos_jax.merge(params, adapter)}, x)
  module.apply({"params": params}, x)  # a trace without the adapter, which nn.jit may cache
  for _ in range(2):
    try:
      with mos_jax.linen.inject(adapter):
        adapted = module.apply({"params": params}, x)
    except RuntimeError as e:
      assert "never reached" in str(e)
    else:
      assert rel_err(adapted, merged) < RTOL


@pytest.fixture(scope="module")
def tiny_gpt2():
  cfg = GPT2Config(vocab_size=64, n_embd=32, n_layer=4, n_head=4, n_positions=32)
  with hf_numerics():
    return FlaxGPT2LMHeadModel(cfg, seed=0)


def test_gpt2_conv1d_needs_its_layout_and_then_matches_merge(tiny_gpt2):
  model, ids = tiny_gpt2, jnp.arange(12).reshape(2, 6) % 64
  config = mos_jax.MoSConfig(rank=4, equivalent_rank=1, shards_per_vector=2, target_modules=("c_attn", "c_fc"))
  wrong = mos_jax.adapt(model.params, config)  # (out, in) kernels read as (in, out)
  with pytest.raises(ValueError, match="FlaxConv1D stores its kernel as \\(out, in\\)"):
    with mos_jax.linen.inject(wrong), hf_numerics():
      model(ids, params=model.params)
  layouts = mos_jax.hf.kernel_layouts(model)
  assert layouts["transformer/h/0/attn/c_attn"].in_axes == (1,)
  adapter = mos_jax.adapt(model.params, config, layouts=layouts)
  assert {(g.d_in, g.d_out) for g in adapter.groups} == {(32, 96), (32, 128)}
  adapter = adapter.replace(pools=random_pools(adapter.pools, seed=1))
  with hf_numerics():
    with mos_jax.linen.inject(adapter):
      adapted = model(ids, params=model.params).logits
    merged = model(ids, params=mos_jax.merge(model.params, adapter)).logits
  assert rel_err(adapted, merged) < RTOL


def _llama_params(layers, tiny_llama_cls):
  from transformers import LlamaConfig
  cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
  with hf_numerics():
    return tiny_llama_cls(cfg, seed=0)


def test_adapter_for_another_model_is_refused_by_merge_and_inject():
  from transformers import FlaxLlamaForCausalLM
  six, four = _llama_params(6, FlaxLlamaForCausalLM), _llama_params(4, FlaxLlamaForCausalLM)
  config = mos_jax.MoSConfig(rank=4, equivalent_rank=1)
  big, small = mos_jax.adapt(six.params, config), mos_jax.adapt(four.params, config)
  with pytest.raises(ValueError, match=r"model/layers/4/self_attn/q_proj: the adapter expects a kernel \(32, 32\), "
                                       r"the params have none"):
    mos_jax.merge(four.params, big)  # would silently drop layers 4-5
  with pytest.raises(ValueError, match="model/layers/5/mlp/up_proj: the params have a targeted kernel"):
    mos_jax.merge(six.params, small)
  ids = jnp.ones((1, 4), jnp.int32)
  with pytest.raises(RuntimeError, match="model/layers/4/"):
    with mos_jax.linen.inject(big), hf_numerics():
      four(ids, params=four.params)
  with pytest.raises(ValueError, match="model/layers/4/.* has no factors"):
    with mos_jax.linen.inject(small), hf_numerics():
      six(ids, params=six.params)


def test_pools_of_another_config_cannot_be_paired_with_a_routing(tiny_llama):
  rank8 = mos_jax.adapt(tiny_llama.params, mos_jax.MoSConfig(rank=4, equivalent_rank=2))
  rank4 = mos_jax.adapt(tiny_llama.params, mos_jax.MoSConfig(rank=2, equivalent_rank=1))
  with pytest.raises(ValueError, match=r"has shape \(8, 48\), expected \(4, 48\)"):
    rank4.replace(pools=rank8.pools)
  with pytest.raises(TypeError, match="takes an mos_jax.Adapter"):
    mos_jax.merge(tiny_llama.params, mos_jax.assemble(rank4))  # factors alone carry no routing
  with pytest.raises(TypeError, match="takes an mos_jax.Adapter"):
    with mos_jax.linen.inject(rank4.pools):
      pass


def test_adapter_is_a_pytree_of_its_pools_and_trains_with_optax(tiny_llama):
  adapter = mos_jax.adapt(tiny_llama.params, mos_jax.MoSConfig(rank=4, equivalent_rank=1, shards_per_vector=2))
  leaves = jax.tree_util.tree_leaves(adapter)
  assert len(leaves) == 2 * len(adapter.groups)
  assert sum(x.size for x in leaves) == mos_jax.core.trainable_count(adapter.config, adapter.groups)
  opt = optax.adam(1e-2)
  state = opt.init(adapter)
  assert sum(x.size for x in jax.tree_util.tree_leaves(state)) == 2 * sum(x.size for x in leaves) + 1

  def loss_fn(params, ids):
    with hf_numerics():
      logits = tiny_llama(ids[:, :-1], params=params).logits
    return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

  step = mos_jax.linen.make_train_step(loss_fn, opt)
  ids = jax.random.randint(jax.random.key(0), (2, 8), 0, 64)
  new, state, loss0 = step(adapter, state, tiny_llama.params, ids, None)
  new, state, loss1 = step(new, state, tiny_llama.params, ids, None)
  assert isinstance(new, mos_jax.Adapter) and new.spec == adapter.spec
  assert float(loss1) < float(loss0)
  assert step._cache_size() == 1  # a new adapter value with the same routing does not recompile


class SwappedAxes(nn.Module):
  """DenseGeneral contracting two input axes written out of order: Flax sorts them for the kernel."""

  @nn.compact
  def __call__(self, x):
    for i in range(2):
      x = nn.DenseGeneral((3, 5), axis=(-1, -2), name=f"proj_{i}")(x)
    return x


def test_dense_general_with_unsorted_axes_matches_merge():
  module, x = SwappedAxes(), jax.random.normal(jax.random.key(0), (2, 3, 5))
  params = _params(module, x)
  layouts = mos_jax.linen.kernel_layouts(lambda p, v: module.apply({"params": p}, v), params, x)
  config = mos_jax.MoSConfig.lora(2, target_modules=r"proj_\d")
  _, adapted, merged, base = _adapted_vs_merged(module, params, x, config, layouts)
  assert rel_err(adapted, merged) < RTOL and rel_err(adapted, base) > 1e-3
