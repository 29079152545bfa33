"""Device meshes and partitioning rules for the frozen base, the pools and the batch."""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import jax
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from mos_jax._src.core.adapter import Adapter
from mos_jax._src.core.config import MoSConfig
from mos_jax._src.core.targets import KERNEL, kernel_module, matches, path_str

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


def base_spec(path: str, shape: tuple[int, ...], mesh: Mesh, *, layer_axis: int | None = None,
              tensor_rules: Sequence[tuple[str, int]] = DEFAULT_TENSOR_RULES,
              fsdp_min_size: int = 2**14) -> P:
  """PartitionSpec of one frozen-base leaf.

  Kernels matching a tensor rule split that dim over ``tensor``; every leaf of at
  least ``fsdp_min_size`` elements then splits its largest remaining divisible dim
  over ``fsdp`` (ZeRO-3 style: gathered per use). Dims that do not divide stay whole.
  A stacked kernel (``layer_axis`` given) keeps its layer axis whole and gets the
  rules of one layer's kernel; other multi-dim kernels get FSDP only.
  """
  spec: list[Any] = [None] * len(shape)
  dims = [d for d in range(len(shape)) if d != layer_axis]
  module = kernel_module(path)
  if module is not None and len(dims) == 2:
    for pattern, dim in tensor_rules:
      if re.fullmatch(pattern, module) and _fits(mesh, shape[dims[dim]], "tensor"):
        spec[dims[dim]] = "tensor"
        break
  if int(np.prod(shape)) >= fsdp_min_size:
    free = [d for d in dims if spec[d] is None and _fits(mesh, shape[d], "fsdp")]
    if free:
      spec[max(free, key=lambda d: shape[d])] = "fsdp"
  return P(*spec)


def base_shardings(params: Any, mesh: Mesh, *, config: MoSConfig | None = None, **kwargs) -> Any:
  """NamedShardings for every leaf of the frozen base (see :func:`base_spec`).

  Args:
    params: the frozen base params.
    mesh: the device mesh.
    config: an adapter config whose ``stacked_modules`` declare stacked kernels
      (their layer axis, ``config.layer_axis``, stays whole).
    **kwargs: ``tensor_rules``, ``fsdp_min_size`` of :func:`base_spec`.

  Example:
    >>> params = jax.device_put(params, base_shardings(params, mesh))  # doctest: +SKIP
  """
  def one(path, x):
    p = path_str(path)
    module = kernel_module(p)
    stacked = config is not None and module is not None and matches(module, config.stacked_modules)
    return NamedSharding(mesh, base_spec(p, tuple(x.shape), mesh,
                                         layer_axis=config.layer_axis if stacked else None, **kwargs))

  return jax.tree_util.tree_map_with_path(one, params)


def pool_shardings(adapter: Adapter, mesh: Mesh, *, follow_base: bool = False, **kwargs) -> Adapter:
  """NamedShardings for the pools, as an :class:`~mos_jax.Adapter` whose leaves are shardings.

  The result is a pytree of the adapter's structure, so it serves directly as
  ``jax.device_put(adapter, shardings)`` and as a jit in/out sharding.
  Pools are replicated by default (they are tiny next to the base). With
  ``follow_base``, ``P_A``'s shard-length axis takes the mesh axis that splits a
  dense group's kernels' input dim and ``P_B``'s the one that splits their output
  dim, when it divides the shard length. With ``l > 1`` a rank vector's shards
  interleave along ``d_in``, so the assembled factor is laid out differently
  from the kernel and XLA adds a small reshard.

  Example:
    >>> adapter = jax.device_put(adapter, pool_shardings(adapter, mesh))  # doctest: +SKIP
  """
  l = adapter.config.effective_shards_per_vector
  out = {}
  for g in adapter.groups:
    specs = {"A": P(), "B": P()}
    if follow_base and len(g.kernel_shape) == 2:
      spec = list(base_spec(f"{g.paths[0]}/{KERNEL}", g.full_shape, mesh, layer_axis=g.layer_axis, **kwargs))
      spec += [None] * (len(g.full_shape) - len(spec))
      kernel = [a for d, a in enumerate(spec) if d != g.layer_axis]
      for factor, axis, length in (("A", kernel[g.in_axes[0]], g.d_in // l),
                                   ("B", kernel[g.out_axes[0]], g.d_out // l)):
        if axis is not None and length % mesh.shape[axis] == 0:
          specs[factor] = P(None, axis)
    out[g.name] = {k: NamedSharding(mesh, s) for k, s in specs.items()}
  return dataclasses.replace(adapter, pools=out)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Rows over ``data`` x ``fsdp``; the other dims whole."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def init_opt_state(optimizer: optax.GradientTransformation, trainable: Any, mesh: Mesh) -> tuple[Any, Any]:
  """Optimizer state laid out like the (already placed) trainable pytree, and its shardings.

  Moments inherit the pools' shardings by propagation; scalars (the step count)
  are replicated.

  Example:
    >>> opt_state, opt_sharding = init_opt_state(optimizer, adapter, mesh)  # doctest: +SKIP
  """
  state = jax.jit(optimizer.init)(trainable)
  replicated = NamedSharding(mesh, P())
  shardings = jax.tree_util.tree_map(
      lambda x: x.sharding if isinstance(x.sharding, NamedSharding) else replicated, state)
  return jax.device_put(state, shardings), shardings
