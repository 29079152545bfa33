"""Device meshes and partitioning rules for the frozen base, the pools and the batch."""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Sequence

import jax
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from mos_jax._pools import Pools
from mos_jax._routing import Routing
from mos_jax._targets import KERNEL, path_str
from mos_jax._train import adapted_loss

AXES = ("data", "fsdp", "tensor")
#: Batch rows are split over both data-parallel axes.
BATCH_AXES = ("data", "fsdp")

#: Megatron-style tensor parallelism for Llama/BERT names: column-parallel layers split
#: their output features, row-parallel layers their input features, so the pair needs one
#: all-reduce. Each rule: (regex on the "/"-joined module path, which kernel dim is "tensor").
DEFAULT_TENSOR_RULES: tuple[tuple[str, int], ...] = (
    (r".*(q_proj|k_proj|v_proj|gate_proj|up_proj|query|key|value|intermediate/dense)", 1),
    (r".*(o_proj|down_proj|attention/output/dense|layer/\d+/output/dense)", 0),
    (r".*(lm_head)", 1),
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig:
  """Sizes of the ``data``, ``fsdp`` and ``tensor`` mesh axes; one may be -1 (the rest).

  Example:
    >>> MeshConfig(data=2, fsdp=-1, tensor=2).shape(8)
    (2, 2, 2)
  """

  data: int = -1
  fsdp: int = 1
  tensor: int = 1

  def shape(self, num_devices: int) -> tuple[int, int, int]:
    sizes = [self.data, self.fsdp, self.tensor]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
      raise ValueError(f"{self}: axis sizes must be positive, with at most one -1 (the rest).")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
      if num_devices % known:
        raise ValueError(f"{self}: {num_devices} devices are not divisible by {known}.")
      sizes[sizes.index(-1)] = num_devices // known
    if int(np.prod(sizes)) != num_devices:
      raise ValueError(f"{self}: mesh {tuple(sizes)} needs {int(np.prod(sizes))} devices, "
                       f"{num_devices} are available. Make the sizes multiply to {num_devices}.")
    return tuple(sizes)


def make_mesh(config: MeshConfig, devices: Sequence[Any] | None = None) -> Mesh:
  """A ``(data, fsdp, tensor)`` mesh over ``devices`` (default: all, every process's).

  Axes are ``Auto``: XLA's sharding propagation places the intermediates (the
  routing gather included), so only inputs and outputs carry explicit shardings.
  """
  devices = list(devices) if devices is not None else jax.devices()
  shape = config.shape(len(devices))
  return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def _fits(mesh: Mesh, dim: int, axis: str) -> bool:
  return mesh.shape[axis] > 1 and dim % mesh.shape[axis] == 0


def base_spec(path: str, shape: tuple[int, ...], mesh: Mesh, *,
              tensor_rules: Sequence[tuple[str, int]] = DEFAULT_TENSOR_RULES,
              fsdp_min_size: int = 2**14) -> P:
  """PartitionSpec of one frozen-base leaf.

  Kernels matching a tensor rule split that dim over ``tensor``; every leaf of at
  least ``fsdp_min_size`` elements then splits its largest remaining divisible dim
  over ``fsdp`` (ZeRO-3 style: gathered per use). Dims that do not divide stay whole.
  A stacked (scanned) kernel keeps its leading layer axis whole.
  """
  spec: list[Any] = [None] * len(shape)
  offset = 1 if len(shape) == 3 and path.endswith("/" + KERNEL) else 0
  module = path[: -len(KERNEL) - 1] if path.endswith("/" + KERNEL) else path
  if path.endswith("/" + KERNEL) and len(shape) - offset == 2:
    for pattern, dim in tensor_rules:
      if re.fullmatch(pattern, module) and _fits(mesh, shape[offset + dim], "tensor"):
        spec[offset + dim] = "tensor"
        break
  if int(np.prod(shape)) >= fsdp_min_size:
    free = [d for d in range(offset, len(shape)) if spec[d] is None and _fits(mesh, shape[d], "fsdp")]
    if free:
      spec[max(free, key=lambda d: shape[d])] = "fsdp"
  return P(*spec)


def base_shardings(params: Any, mesh: Mesh, **kwargs) -> Any:
  """NamedShardings for every leaf of the frozen base (see :func:`base_spec`).

  Example:
    >>> params = jax.device_put(params, base_shardings(params, mesh))  # doctest: +SKIP
  """
  return jax.tree_util.tree_map_with_path(
      lambda path, x: NamedSharding(mesh, base_spec(path_str(path), tuple(x.shape), mesh, **kwargs)), params)


def pool_shardings(routing: Routing, mesh: Mesh, *, params: Any | None = None,
                   follow_base: bool = False, **kwargs) -> dict[str, dict[str, NamedSharding]]:
  """NamedShardings for the pools: replicated, or following the base kernels.

  With ``follow_base``, ``P_A``'s shard-length axis takes the mesh axis that splits
  the group's kernels' input dim and ``P_B``'s the one that splits their output dim,
  when it divides the shard length. With ``l > 1`` a rank vector's shards interleave
  along ``d_in``, so the assembled factor is laid out differently from the kernel
  and XLA adds a small reshard; replication (the default) avoids that and pools are
  tiny next to the base.
  """
  l = routing.config.effective_shards_per_vector
  out = {}
  for g in routing.groups:
    specs = {"A": P(), "B": P()}
    if follow_base:
      if params is None:
        raise ValueError("follow_base=True needs params to read the base kernels' specs.")
      shape = (g.num_layers, g.d_in, g.d_out) if g.stacked else (g.d_in, g.d_out)
      kernel = base_spec(f"{g.paths[0]}/{KERNEL}", shape, mesh, **kwargs)[-2:]
      for factor, axis, length in (("A", kernel[0], g.d_in // l), ("B", kernel[1], g.d_out // l)):
        if axis is not None and length % mesh.shape[axis] == 0:
          specs[factor] = P(None, axis)
    out[g.name] = {k: NamedSharding(mesh, s) for k, s in specs.items()}
  return out


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Rows over ``data`` x ``fsdp``; the other dims whole."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def make_sharded_train_step(loss_fn: Callable[[Any, Any], jax.Array], routing: Routing,
                            optimizer: optax.GradientTransformation, *, params_sharding: Any,
                            pools_sharding: Any, opt_state_sharding: Any, batch_sharding: Any,
                            ) -> Callable[..., tuple[Pools, Any, jax.Array]]:
  """The pjit train step: explicit in/out shardings, pools and optimizer state donated.

  Same contract as :func:`mos_jax.make_train_step`:
  ``step(pools, opt_state, params, batch, dropout_rng) -> (pools, opt_state, loss)``,
  with the base params a non-differentiated input.

  Example:
    >>> step = make_sharded_train_step(loss_fn, routing, opt, params_sharding=ps,  # doctest: +SKIP
    ...     pools_sharding=qs, opt_state_sharding=os, batch_sharding=bs)
  """
  grad_fn = jax.value_and_grad(adapted_loss(loss_fn, routing))

  def step(pools, opt_state, params, batch, dropout_rng):
    loss, grads = grad_fn(pools, params, batch, dropout_rng)
    updates, opt_state = optimizer.update(grads, opt_state, pools)
    return optax.apply_updates(pools, updates), opt_state, loss

  replicated = NamedSharding(next(iter(jax.tree_util.tree_leaves(pools_sharding))).mesh, P())
  return jax.jit(step, donate_argnums=(0, 1),
                 in_shardings=(pools_sharding, opt_state_sharding, params_sharding, batch_sharding, replicated),
                 out_shardings=(pools_sharding, opt_state_sharding, replicated))


def init_opt_state(optimizer: optax.GradientTransformation, pools: Pools, mesh: Mesh) -> tuple[Any, Any]:
  """Optimizer state laid out like the (already placed) pools, and its shardings.

  Moments inherit the pools' shardings by propagation; scalars (the step count)
  are replicated.
  """
  state = jax.jit(optimizer.init)(pools)
  replicated = NamedSharding(mesh, P())
  shardings = jax.tree_util.tree_map(
      lambda x: x.sharding if isinstance(x.sharding, NamedSharding) else replicated, state)
  return jax.device_put(state, shardings), shardings
