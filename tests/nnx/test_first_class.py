"""The NNX backend's own guarantees: QLoRA through qwix, the call-path check, tied modules, family targets,
``dry_run``, copy-free ``bind`` and ``make_train_step``, and Gemma's fused ``kv_einsum`` split into k and v.

Oracles: the same adapter on the dequantized float model (QLoRA), the merged model (tied modules), an
unfused reference model with the same weights (two einsums) and a NumPy formula (the split).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import mos_jax
from oracles.helpers import assert_close, hf_numerics, random_pools, rel_err

g3 = pytest.importorskip("tunix.models.gemma3.model")
qwix = pytest.importorskip("qwix")

from nnx.test_adapt import MASK, POSITIONS, TOKENS, logits, tiny_gemma3, tiny_llama3  # noqa: E402

CONFIG = mos_jax.MoSConfig(rank=4, equivalent_rank=2, shards_per_vector=2)


def lm_loss(model, tokens=TOKENS):
  out = logits(model, tokens)
  return optax.softmax_cross_entropy_with_integer_labels(out[:, :-1], tokens[:, 1:]).mean()


def train(model, steps=5, lr=3e-2):
  optimizer = nnx.Optimizer(model, optax.adam(lr), wrt=nnx.LoRAParam)

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(lm_loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    optimizer.update(model, grads)
    return loss, grads

  out = [step(model, optimizer) for _ in range(steps)]
  return [float(loss) for loss, _ in out], out[-1][1]  # the last step's gradients: A's is 0 while B = 0


# --- QLoRA -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make,quantize", [(tiny_gemma3, "nf4"), (tiny_llama3, "int8")])
def test_qlora_stores_the_base_quantized_and_trains_the_float_pools(make, quantize):
  model = make()
  adapted = mos_jax.nnx.adapt(model, CONFIG, quantize=quantize)
  layers = mos_jax.nnx.mos_layers(adapted)
  assert layers
  for _, layer in layers:
    kernel = getattr(layer.base, layer.kernel_name)
    assert isinstance(kernel, qwix._src.providers.ptq.WithAux), type(kernel)  # stored quantized
    assert jnp.dtype(kernel.array.qvalue.dtype).itemsize == 1 and kernel.array.qvalue.dtype != jnp.float32
  assert {x.dtype for x in jax.tree_util.tree_leaves(nnx.state(adapted, nnx.LoRAParam))} == {jnp.dtype("float32")}
  # Oracle: the same adapter on the float model whose kernels are the dequantized ones.
  adapter = mos_jax.nnx.adapter_of(adapted)
  mos_jax.nnx.load_pools(adapted, adapter.replace(pools=random_pools(adapter.pools, seed=1, scale=0.3)))
  dequantized = nnx.clone(model)
  plain = {tuple(keys): m for keys, m in nnx.iter_modules(dequantized)}
  for keys, layer in layers:
    w = qwix.dequantize(getattr(layer.base, layer.kernel_name).array)
    getattr(plain[keys], layer.kernel_name)[...] = w
  reference = mos_jax.nnx.adapt(dequantized, mos_jax.nnx.adapter_of(adapted))
  assert rel_err(logits(adapted), logits(reference)) < 1e-4
  assert rel_err(logits(adapted), logits(model)) > 1e-3
  # Training moves the float pools: non-zero gradients, falling loss.
  fresh = mos_jax.nnx.adapt(model, CONFIG, quantize=quantize)
  losses, grads = train(fresh)
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree_util.tree_leaves(grads))
  assert losses[-1] < losses[0] - 0.05, losses


def test_qlora_takes_a_qwix_provider_matched_on_model_paths():
  provider = qwix.PtqProvider([qwix.QuantizationRule(module_path=r".*/mlp/.*", weight_qtype="int8")])
  adapted = mos_jax.nnx.adapt(tiny_llama3(), CONFIG, quantize=provider)
  stored = {keys[-1]: type(getattr(layer.base, layer.kernel_name)).__name__
            for keys, layer in mos_jax.nnx.mos_layers(adapted)}
  assert stored["up_proj"] == "WithAux" and stored["q_proj"] == "Param"
  with pytest.raises(ValueError, match="quantize='nf5'.*one of"):
    mos_jax.nnx.adapt(tiny_llama3(), CONFIG, quantize="nf5")
  with pytest.raises(TypeError, match="LoraProvider"):
    mos_jax.nnx.adapt(tiny_llama3(), CONFIG, quantize=qwix.LoraProvider(module_path=".*", rank=2, alpha=2.0))


def test_a_model_quantized_before_adapt_is_refused_not_silently_untrained():
  rules = [qwix.QuantizationRule(module_path=".*(einsum|proj).*", weight_qtype="int8")]
  with hf_numerics():
    quantized = qwix.quantize_model(tiny_gemma3(), qwix.PtqProvider(rules), TOKENS, POSITIONS, None, MASK)
  with pytest.raises(ValueError, match=r"12 targeted modules hold weights already quantized by qwix: .*quantize='nf4'"):
    mos_jax.nnx.adapt(quantized, CONFIG)


def test_adapt_then_qwix_ptq_over_the_whole_model_trains():
  """The two-step recipe: qwix intercepts every einsum of the model's call, the MoS term's included."""
  adapted = mos_jax.nnx.adapt(tiny_gemma3(), CONFIG)
  rules = [qwix.QuantizationRule(module_path=".*/base", weight_qtype="int8")]
  with hf_numerics():
    quantized = qwix.quantize_model(adapted, qwix.PtqProvider(rules), TOKENS, POSITIONS, None, MASK)
  assert all(type(getattr(layer.base, layer.kernel_name)).__name__ == "WithAux"
             for _, layer in mos_jax.nnx.mos_layers(quantized))
  losses, grads = train(quantized)
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree_util.tree_leaves(grads))
  assert losses[-1] < losses[0]


# --- Call path, tied modules, targets, dry_run ------------------------------------------------------------


class Skipping(nnx.Module):
  def __init__(self, rngs):
    self.layers = nnx.List([nnx.Linear(8, 8, rngs=rngs) for _ in range(2)])
    self.spare = nnx.Linear(8, 8, rngs=rngs)  # adapted (matched) but never called

  def __call__(self, x):
    for layer in self.layers:
      x = layer(x)
    return x


def test_a_mos_layer_off_the_call_path_raises_eager_and_under_jit():
  adapted = mos_jax.nnx.adapt(Skipping(nnx.Rngs(0)), mos_jax.MoSConfig(rank=2, equivalent_rank=2,
                                                                       target_modules=r"(layers/\d+|spare)"))
  x = jnp.ones((2, 8))
  with pytest.raises(RuntimeError, match=r"1 of 3 MoS layers were not called.*spare"):
    adapted(x)
  with pytest.raises(RuntimeError, match="spare"):
    nnx.jit(lambda m, x: m(x))(adapted, x)
  ok = mos_jax.nnx.adapt(Skipping(nnx.Rngs(0)), mos_jax.MoSConfig(rank=2, equivalent_rank=1,
                                                                  target_modules=r"layers/\d+"))
  assert ok(x).shape == (2, 8)
  plain = mos_jax.nnx.merge(adapted)  # a merged model has no MoS layers and no check
  assert plain(x).shape == (2, 8) and type(plain) is Skipping


class Tied(nnx.Module):
  """One projection reached under two names (tied weights), called through both."""

  def __init__(self, rngs):
    self.layers = nnx.List([nnx.Linear(8, 8, rngs=rngs) for _ in range(2)])
    self.proj = nnx.Linear(8, 8, rngs=rngs)
    self.tied = self.proj

  def __call__(self, x):
    for layer in self.layers:
      x = layer(x)
    return self.tied(jnp.tanh(self.proj(x)))


def test_a_module_under_two_names_is_wrapped_once_and_both_names_see_it():
  model = Tied(nnx.Rngs(0))
  adapted = mos_jax.nnx.adapt(model, mos_jax.MoSConfig(rank=2, equivalent_rank=2, target_modules=("tied", "0", "1")))
  assert isinstance(adapted.proj, mos_jax.nnx.MoSLayer) and adapted.proj is adapted.tied
  adapter = mos_jax.nnx.adapter_of(adapted)
  assert [g.paths for g in adapter.groups if "layers" not in g.name] == [("tied",)]
  mos_jax.nnx.load_pools(adapted, adapter.replace(pools=random_pools(adapter.pools, seed=3)))
  merged = mos_jax.nnx.merge(adapted)
  assert merged.proj is merged.tied and not isinstance(merged.proj, mos_jax.nnx.MoSLayer)
  x = jax.random.normal(jax.random.key(0), (3, 8))
  assert rel_err(adapted(x), merged(x)) < 1e-5
  assert rel_err(adapted(x), model(x)) > 1e-3


def test_a_tunix_model_defaults_to_its_family_targets_and_unmatched_names_raise():
  adapter = mos_jax.nnx.adapter_of(mos_jax.nnx.adapt(tiny_gemma3(), CONFIG))  # target_modules left at default
  assert {g.name.split("/")[-1] for g in adapter.groups} == {"q_einsum", "k", "v", "attn_vec_einsum", "gate_proj",
                                                             "up_proj", "down_proj"}
  assert adapter.config.target_modules == mos_jax.nnx.GEMMA3_TARGETS
  with pytest.raises(ValueError, match=r"'k_proj' \(nearest: \['q_einsum'|'k_proj' \(nearest: .*kv_einsum"):
    mos_jax.nnx.adapt(tiny_gemma3(), mos_jax.MoSConfig(rank=2, equivalent_rank=1, target_modules=("q_einsum",
                                                                                                  "k_proj")))


def test_dry_run_lists_what_adapt_wraps_for_nnx_models():
  model = tiny_gemma3()
  text = mos_jax.dry_run(model, CONFIG)
  assert text == mos_jax.nnx.dry_run(model, CONFIG)
  assert "wraps 12 modules:" in text and "layers/0/attn/kv_einsum: Einsum.w (2, 2, 32, 8) -> k, v" in text
  adapter = mos_jax.nnx.adapter_of(mos_jax.nnx.adapt(model, CONFIG))
  assert f"trainable params: {mos_jax.core.trainable_count(adapter.config, adapter.groups):,}" in text
  assert f"all params: {adapter.base_params:,}" in text
  assert not mos_jax.nnx.mos_layers(model)  # nothing was wrapped
  params = {"layers": {str(i): {"q_proj": {"kernel": jnp.zeros((8, 4))}} for i in range(2)}}
  assert "matched 2 modules" in mos_jax.dry_run(params, mos_jax.MoSConfig(rank=2, equivalent_rank=1, target_modules=("q_proj",)))


# --- bind / make_train_step ----------------------------------------------------------------------------------


def _buffers(tree):
  return {x.unsafe_buffer_pointer() for x in jax.tree_util.tree_leaves(tree)}


def test_bind_puts_the_adapters_own_arrays_in_the_graph_without_copies():
  adapted = mos_jax.nnx.adapt(tiny_gemma3(), CONFIG)
  graphdef, adapter, state = mos_jax.nnx.unbind(adapted)
  adapter = adapter.replace(pools=random_pools(adapter.pools, seed=2))
  bound = mos_jax.nnx.bind(graphdef, adapter, state)
  pools = dict(mos_jax.nnx.mos_layers(bound)[0][1].pool_items())
  for name, p in pools.items():
    assert p.a.get_value() is adapter.pools[name]["A"] and p.b.get_value() is adapter.pools[name]["B"]
  base = nnx.state(bound, nnx.Not(nnx.LoRAParam))
  assert _buffers(base) == _buffers(state.state)  # the base arrays are the state's, not copies
  assert _buffers(nnx.state(bound, nnx.LoRAParam)) == _buffers(adapter.pools)
  mos_jax.nnx.load_pools(adapted, adapter)
  assert_close(logits(bound), logits(adapted), rtol=1e-6)


def test_bind_refuses_a_foreign_state_by_name():
  graphdef, adapter, state = mos_jax.nnx.unbind(mos_jax.nnx.adapt(tiny_gemma3(), CONFIG))
  with pytest.raises(TypeError, match="takes the state that mos_jax.nnx.unbind returned"):
    mos_jax.nnx.bind(graphdef, adapter, nnx.state(tiny_gemma3()))
  other_graph, other_adapter, other_state = mos_jax.nnx.unbind(mos_jax.nnx.adapt(tiny_gemma3(layers=3), CONFIG))
  with pytest.raises(mos_jax.MismatchError, match="unbound from another model"):
    mos_jax.nnx.bind(graphdef, adapter, other_state)
  with pytest.raises(mos_jax.MismatchError, match="spec"):
    mos_jax.nnx.bind(other_graph, adapter, other_state)
  reshaped = mos_jax.nnx.BaseState(jax.tree_util.tree_map(lambda x: x[..., :1] if x.ndim else x, state.state),
                                   state.frame)
  with pytest.raises(mos_jax.MismatchError, match="other shapes"):
    mos_jax.nnx.bind(graphdef, adapter, reshaped)


def test_make_train_step_trains_the_adapter_as_nnx_optimizer_does():
  model = tiny_llama3()
  graphdef, adapter, state = mos_jax.nnx.unbind(mos_jax.nnx.adapt(model, CONFIG))
  tx = optax.adam(1e-2)
  step = mos_jax.nnx.make_train_step(lambda m, tokens: lm_loss(m, tokens), tx)
  opt_state, losses = tx.init(adapter), []
  for _ in range(3):
    adapter, opt_state, loss = step(adapter, opt_state, state, TOKENS, None)
    losses.append(float(loss))
  reference = mos_jax.nnx.adapt(model, CONFIG)
  ref_losses, _ = train(reference, steps=3, lr=1e-2)
  assert_close(losses, ref_losses, rtol=1e-5)
  jax.tree_util.tree_map(lambda a, b: assert_close(a, b, rtol=1e-4), adapter.pools,
                         mos_jax.nnx.adapter_of(reference).pools)


# --- Gemma's fused kv_einsum ---------------------------------------------------------------------------------

D, K, H = 32, 2, 8


class Einsum(nnx.Module):
  """Tunix's einsum layer: one weight ``w`` and an equation."""

  def __init__(self, einsum_str, w):
    self.einsum_str = einsum_str
    self.w = nnx.Param(w)

  def __call__(self, x):
    return jnp.einsum(self.einsum_str, x, self.w[...])


class Fused(nnx.Module):
  def __init__(self, w):
    self.kv_einsum = Einsum("BSD,CKDH->CBSKH", w)

  def __call__(self, x):
    return self.kv_einsum(x)


class Parts(nnx.Module):
  def __init__(self, w):
    self.k = Einsum("BSD,KDH->BSKH", w[0])
    self.v = Einsum("BSD,KDH->BSKH", w[1])


class Unfused(nnx.Module):
  """The same weights as two einsums, at the paths the split names its parts (``kv_einsum/k``, ``kv_einsum/v``)."""

  def __init__(self, w):
    self.kv_einsum = Parts(w)

  def __call__(self, x):
    return jnp.stack([self.kv_einsum.k(x), self.kv_einsum.v(x)])


def _stack(make, w):
  class Model(nnx.Module):
    def __init__(self):
      self.layers = nnx.List([make(w[i]) for i in range(2)])

    def __call__(self, x):
      return jnp.stack([layer(x) for layer in self.layers])

  return Model()


def test_split_kv_einsum_equals_two_separate_einsums_and_the_formula():
  w = jnp.asarray(np.random.default_rng(0).normal(size=(2, 2, K, D, H)), jnp.float32)
  fused = mos_jax.nnx.adapt(_stack(Fused, w), mos_jax.MoSConfig(rank=4, equivalent_rank=2,
                                                               target_modules=("kv_einsum",)))
  unfused = mos_jax.nnx.adapt(_stack(Unfused, w), mos_jax.MoSConfig(rank=4, equivalent_rank=2,
                                                                   target_modules=("k", "v")))
  f_adapter, u_adapter = mos_jax.nnx.adapter_of(fused), mos_jax.nnx.adapter_of(unfused)
  assert [g.name for g in f_adapter.groups] == ["layers/*/kv_einsum/k", "layers/*/kv_einsum/v"]
  assert [g.name for g in u_adapter.groups] == [g.name for g in f_adapter.groups]
  assert [g.d_out for g in f_adapter.groups] == [K * H, K * H]  # each part its own pools
  pools = random_pools(f_adapter.pools, seed=4)
  mos_jax.nnx.load_pools(fused, f_adapter.replace(pools=pools))
  mos_jax.nnx.load_pools(unfused, u_adapter.replace(pools=pools))
  x = jax.random.normal(jax.random.key(1), (3, 5, D))
  out = fused(x)  # (layers, 2, B, S, K, H)
  assert_close(out, unfused(x), rtol=1e-5)
  # NumPy formula: W x plus scale·(x Aᵀ) Bᵀ per part, own A per part.
  factors = mos_jax.core.layer_factors(f_adapter.replace(pools=pools))
  xn, scale = np.asarray(x, np.float64), f_adapter.config.scale
  for i in range(2):
    for c, part in enumerate("kv"):
      a, b = (np.asarray(f, np.float64) for f in factors[f"layers/{i}/kv_einsum/{part}"])
      want = np.einsum("bsd,kdh->bskh", xn, np.asarray(w[i, c], np.float64)) + \
          (scale * (xn @ a.T) @ b.T).reshape(3, 5, K, H)
      assert rel_err(out[i, c], want) < 1e-5
  assert_close(mos_jax.nnx.merge(fused)(x), out, rtol=1e-5)
  one_map = mos_jax.nnx.adapter_of(mos_jax.nnx.adapt(_stack(Fused, w), mos_jax.MoSConfig(
      rank=4, equivalent_rank=2, target_modules=("kv_einsum",)), split_fused={}))
  assert [g.name for g in one_map.groups] == ["layers/*/kv_einsum"]


def test_split_gemma_adapter_exports_k_and_v_with_their_own_lora_a_and_reloads(tmp_path):
  safetensors = pytest.importorskip("safetensors.numpy")
  model = tiny_gemma3()
  adapted = mos_jax.nnx.adapt(model, CONFIG)
  adapter = mos_jax.nnx.adapter_of(adapted)
  adapter = adapter.replace(pools=random_pools(adapter.pools, seed=6))
  mos_jax.nnx.load_pools(adapted, adapter)
  folder = mos_jax.export_peft(tmp_path / "peft", adapter, names=mos_jax.nnx.PEFT_NAMES["gemma3"])
  tensors = safetensors.load_file(str(folder / "adapter_model.safetensors"))
  stem = "base_model.model.model.layers.1.self_attn"
  k_a, v_a = tensors[f"{stem}.k_proj.lora_A.weight"], tensors[f"{stem}.v_proj.lora_A.weight"]
  assert k_a.shape == v_a.shape == (4, 32) and np.abs(k_a - v_a).max() > 1e-3  # own A each
  factors = mos_jax.core.layer_factors(adapter)
  for part, proj in (("k", "k_proj"), ("v", "v_proj")):
    a, b = factors[f"layers/1/attn/kv_einsum/{part}"]
    assert_close(tensors[f"{stem}.{proj}.lora_A.weight"], a)
    assert_close(tensors[f"{stem}.{proj}.lora_B.weight"], b)
  path = mos_jax.save_adapter(tmp_path / "a.safetensors", adapter)
  reloaded = mos_jax.nnx.adapt(model, mos_jax.load_adapter(path))
  np.testing.assert_array_equal(logits(reloaded), logits(adapted))
