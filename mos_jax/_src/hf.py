"""Glue for HF ``transformers`` Flax models: shapes without weights, layouts, generation, merged export.

Needs the ``transformers`` extra (``pip install mos_jax[hf]``); the rest of
``mos_jax`` does not import it.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from mos_jax._src.core.adapter import Adapter
from mos_jax._src.core.assemble import merge
from mos_jax._src.core.identity import differences, tree_layout
from mos_jax._src.core.targets import KernelLayout
from mos_jax._src.errors import MismatchError
from mos_jax._src.io.files import atomic_dir, write_manifest
from mos_jax._src.linen.inject import inject, kernel_layouts as _linen_layouts


def generate(model: Any, params: Any, input_ids: jax.Array, *, adapter: Adapter | None = None,
             attention_mask: jax.Array | None = None,
             max_new_tokens: int = 32, do_sample: bool = False, prng_key: jax.Array | None = None,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             pad_token_id: int | None = None, eos_token_id: int | None = None) -> jax.Array:
  """Greedy or sampled decoding with HF Flax ``generate`` (its KV cache), adapter injected.

  With ``adapter`` the low-rank terms are injected into every decoding step;
  without it the model runs on ``params`` as given (e.g. :func:`mos_jax.merge`-d params).

  Args:
    model: a ``transformers`` Flax causal LM (``FlaxLlamaForCausalLM``, ...).
    params: its (frozen base or merged) params.
    input_ids: ``(batch, prompt_len)`` prompt ids, left-padded when lengths differ.
    adapter: the adapter to inject, or ``None``.
    attention_mask: ``(batch, prompt_len)``; 0 marks left padding.
    max_new_tokens: tokens to generate after the prompt.
    do_sample: sample instead of greedy decoding; needs ``prng_key``.
    prng_key: key for sampling.
    temperature: sampling temperature.
    top_k: sample from the ``top_k`` most likely tokens.
    top_p: nucleus sampling mass.
    pad_token_id: id written after a sequence has ended.
    eos_token_id: id that ends a sequence.

  Returns:
    ``(batch, prompt_len + max_new_tokens)`` token ids.

  Example:
    >>> out = generate(model, params, ids, adapter=adapter, max_new_tokens=8)  # doctest: +SKIP
  """
  if do_sample and prng_key is None:
    raise ValueError("do_sample=True needs prng_key.")
  ctx = inject(adapter) if adapter is not None else contextlib.nullcontext()
  gen = model.generation_config
  eos_token_id = eos_token_id if eos_token_id is not None else gen.eos_token_id
  if pad_token_id is None:
    # HF Flax decoding needs a pad id to write after EOS; reuse EOS (or 0) as tokenizers do.
    pad_token_id = next((t for t in (gen.pad_token_id, eos_token_id, 0) if t is not None))
  kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, prng_key=prng_key,
                pad_token_id=pad_token_id, eos_token_id=eos_token_id)
  if do_sample:
    kwargs.update(temperature=temperature, top_k=top_k, top_p=top_p)
  # HF Flax models broadcast implicitly; keep that local to the model.
  with ctx, jax.numpy_rank_promotion("allow"):
    return model.generate(input_ids, attention_mask=attention_mask, params=params, **kwargs).sequences


# HF Flax Llama slices its rotary table's feature axis by the position count, so
# fewer than 2·head_dim positions break it; 4096 is safe for any real head size.
_PROBE_POSITIONS = 4096


def _traced_shapes(model_cls: Any, hf_config: Any) -> Any:
  # HF's Flax models broadcast implicitly, which a strict global setting rejects.
  with jax.numpy_rank_promotion("allow"):
    return model_cls(hf_config, _do_init=False).params_shape_tree


def _with_positions(hf_config: Any, n: int) -> Any:
  small = copy.deepcopy(hf_config)
  small.max_position_embeddings = n
  return small


def _same_shapes(a: Any, b: Any) -> bool:
  leaves_a, tree_a = jax.tree_util.tree_flatten(a)
  leaves_b, tree_b = jax.tree_util.tree_flatten(b)
  return tree_a == tree_b and all(x.shape == y.shape for x, y in zip(leaves_a, leaves_b))


def param_shapes(model_cls: Any, hf_config: Any, *, trim_positions: bool = True) -> Any:
  """Shapes and dtypes of an HF Flax model's params, allocating none of them.

  Builds the model with ``_do_init=False``: HF then traces ``init_weights``
  under ``jax.eval_shape``, so a 7B-parameter tree costs a second and no
  memory.

  Args:
    model_cls: an HF Flax model class, e.g. ``FlaxLlamaForCausalLM``.
    hf_config: its ``PretrainedConfig``; not modified.
    trim_positions: for a long context (``max_position_embeddings`` above
      8192), trace with 4096 and 8192 positions instead and, if both give the
      same shapes (positions own no parameters, as with rotary embeddings),
      return those. HF Flax Llama builds its rotary tables eagerly in NumPy
      for every layer: LLaMA 3.2's 131072 positions cost about 10 s and 4 GB
      otherwise. Learned position tables change shape, so the full config is
      traced for them.

  Returns:
    The params pytree with ``jax.ShapeDtypeStruct`` leaves, structured like
    ``model.params``; :func:`find_groups` and :func:`estimate_memory` accept it.

  Example:
    >>> shapes = param_shapes(FlaxLlamaForCausalLM, LlamaConfig())  # doctest: +SKIP
    >>> shapes["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"].shape  # doctest: +SKIP
    (4096, 4096)
  """
  if trim_positions and getattr(hf_config, "max_position_embeddings", 0) > 2 * _PROBE_POSITIONS:
    try:
      short, longer = (_traced_shapes(model_cls, _with_positions(hf_config, n))
                       for n in (_PROBE_POSITIONS, 2 * _PROBE_POSITIONS))
    except Exception:  # noqa: BLE001 - a model that cannot be shortened is traced in full below.
      short = longer = None
    if short is not None and _same_shapes(short, longer):
      return short
  return _traced_shapes(model_cls, hf_config)


def kernel_layouts(model: Any, params: Any = None, *, seq_len: int = 8) -> dict[str, KernelLayout]:
  """:func:`mos_jax.linen.kernel_layouts` of an HF Flax model, traced on a dummy ``(1, seq_len)`` batch.

  Needed for models whose kernels are not plain ``nn.Dense`` (GPT-2's
  ``FlaxConv1D`` stores ``(out, in)``); allocates nothing.

  Example:
    >>> adapter = mos_jax.adapt(model.params, config, layouts=kernel_layouts(model))  # doctest: +SKIP
  """
  params = model.params if params is None else params
  ids = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
  with jax.numpy_rank_promotion("allow"):
    return _linen_layouts(lambda p, i: model(i, params=p), params, ids)


def export_merged(folder: str | Path, model: Any, params: Any, adapter: Adapter) -> Path:
  """Saves ``W + ΔW`` for every adapted kernel as a HF Flax ``model.safetensors`` folder.

  The folder (``config.json``, ``model.safetensors``, generation config) loads
  with ``type(model).from_pretrained(folder)`` and needs no MoS code.

  Args:
    folder: output folder (replaced whole, atomically).
    model: the ``transformers`` Flax model (for its config and ``save_pretrained``).
    params: its base params.
    adapter: the trained adapter.

  Returns:
    The folder.

  Raises:
    MismatchError: ``params`` do not have the shapes ``model``'s config gives
      (the folder would not load); nothing is written.

  Example:
    >>> export_merged("out/merged", model, model.params, adapter)  # doctest: +SKIP
    >>> FlaxLlamaForCausalLM.from_pretrained("out/merged")  # doctest: +SKIP
  """
  # config.json comes from the model, the weights from params: they must describe one model.
  shape_of = lambda layout: {path: shape for path, (shape, _) in layout.items()}
  expected = shape_of(tree_layout(param_shapes(type(model), model.config)))
  diffs = differences({"params": expected}, {"params": shape_of(tree_layout(params))},
                      names=("the model's config", "the params tree"))
  if diffs:
    shown = "\n  - ".join(diffs[:20]) + (f"\n  ... and {len(diffs) - 20} more" if len(diffs) > 20 else "")
    raise MismatchError(f"export_merged: the params are not the model's ({type(model).__name__} with its "
                        f"config) shapes, so the folder would not load:\n  - {shown}\nPass the model whose "
                        "params these are.")
  merged = merge(params, adapter)
  folder = Path(folder)
  with atomic_dir(folder) as tmp:
    # transformers writes safetensors only unsharded (its sharded path falls back to
    # msgpack), so the shard limit is set above any model this targets.
    model.save_pretrained(str(tmp), params=merged, safe_serialization=True, max_shard_size="10000GB")
    write_manifest(tmp)  # transformers ignores it; mos_jax.formats.verify_export checks it
  return folder
