"""The Flax NNX backend: MoS on any NNX model (Tunix Gemma 3 / Llama 3 / Qwen 3, MaxText-style, your own).

``adapt(model, config)`` returns a copy whose targeted layers are :class:`MoSLayer`
wrappers; the pools are ``nnx.LoRAParam`` (select them by type, as with
``flax.nnx.nn.lora`` and qwix), the adapter's spec static.

The verbs, the same job under the same name in each backend (linen works on
params and an ``Adapter`` value, NNX on the adapted model itself):

===============  ================================================  =====================================================
verb             NNX (an adapted model)                            linen (params + an ``Adapter`` value)
===============  ================================================  =====================================================
adapt            ``adapt(model, config)`` -> model                 ``mos_jax.adapt(params, config)`` -> Adapter
dry_run          ``dry_run(model, config)`` (or ``mos_jax.dry_run``)  ``mos_jax.dry_run(params, config)``
merge            ``merge(model)`` -> plain model                   ``mos_jax.merge(params, adapter)`` -> params
kernel_layouts   (read from the modules by ``adapt``)              ``mos_jax.linen.kernel_layouts(fn, *args)``;
                                                                   HF: ``mos_jax.hf.kernel_layouts(model)``
inject           (the adapted model applies its terms)             ``with mos_jax.linen.inject(adapter): ...``
make_train_step  ``make_train_step(loss_fn, optimizer)``           ``mos_jax.linen.make_train_step(loss_fn, optimizer)``
adapter_of       ``adapter_of(model)`` -> Adapter (a copy)         (the adapter is already a value)
load_pools       ``load_pools(model, adapter)``, in place          (replace the value)
unbind / bind    ``unbind(model)`` -> (graphdef, adapter, state);  (not needed)
                 ``bind(graphdef, adapter, state)`` -> model
===============  ================================================  =====================================================

``merge`` here folds the adapter into the model (``mos_jax.merge``'s job); it is
not ``flax.nnx.merge``. ``unbind``/``bind`` are named apart from ``flax.nnx.split``
/``flax.nnx.merge``, whose jobs they extend (they also take the adapter out / put it in).
"""

from mos_jax._src.nnx.adapt import adapt  # An adapted copy of an NNX model (MoS layers, pools as nnx.LoRAParam).
from mos_jax._src.nnx.adapt import merge  # A plain copy of an adapted model with ΔW in its kernels.
from mos_jax._src.nnx.adapt import adapter_of  # The adapted model's adapter as one Adapter value (a copy).
from mos_jax._src.nnx.adapt import load_pools  # Writes an adapter's pools (a stack's: served) into a model, in place.
from mos_jax._src.nnx.adapt import unbind  # (graphdef, adapter, state) of an adapted model, to train the Adapter value.
from mos_jax._src.nnx.adapt import bind  # The model of unbind with an (optionally traced) adapter's pools.
from mos_jax._src.nnx.adapt import mos_layers  # (keys, layer) of every MoSLayer of a model.
from mos_jax._src.nnx.adapt import dry_run  # What adapt would wrap and create (paths, shapes, counts), allocating nothing.
from mos_jax._src.nnx.adapt import make_train_step  # A jitted optax step on (adapter, opt_state, state, batch, rng).
from mos_jax._src.nnx.adapt import BaseState  # The base weights of an unbound model, with what bind checks.
from mos_jax._src.nnx.serving import adapt_multi  # A copy of a base model whose rows each run their own adapter.
from mos_jax._src.nnx.serving import set_adapter_ids  # Names each row's adapter (checked on the host), in place.
from mos_jax._src.nnx.serving import serve  # Generates a mixed batch through Tunix's Sampler, ids checked first.
from mos_jax._src.nnx.discover import kernel_modules  # Every module of a model that owns a kernel, with its layout.
from mos_jax._src.nnx.layers import MoSLayer  # A base layer plus its MoS low-rank term.
from mos_jax._src.nnx.layers import MoSModel  # The root of a model with stacked (nnx.scan) groups.
from mos_jax._src.nnx.names import GEMMA3_TARGETS  # The attention and MLP projections of a Tunix Gemma 3 block.
from mos_jax._src.nnx.names import PEFT_NAMES  # export_peft name rules for Tunix models, by family.
from mos_jax._src.nnx.names import FAMILY_TARGETS  # adapt's default targets by Tunix model family.
from mos_jax._src.nnx.names import FUSED  # Fused projections adapt splits into module types (Gemma's kv_einsum).

__all__ = ["adapt", "merge", "adapter_of", "load_pools", "unbind", "bind", "mos_layers", "dry_run", "make_train_step",
           "BaseState", "kernel_modules", "MoSLayer", "MoSModel", "GEMMA3_TARGETS", "PEFT_NAMES", "FAMILY_TARGETS",
           "FUSED", "adapt_multi", "set_adapter_ids", "serve"]
