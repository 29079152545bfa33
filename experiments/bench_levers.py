"""Where the adapter's overhead goes: each way of computing the low-rank term, in one LoRA train step.

On bench_core's HF Flax Llama (all seven projections, rank 8, AdamW, float32) this times, in one
process and round-robin, the frozen model's forward+backward (the floor, as in bench_core) and
one LoRA train step per lever, each lever being a way to add ``(α/r)·(x Aᵀ) Bᵀ`` to every
projection:

  plain               scale · (x Aᵀ) Bᵀ, differentiated by JAX: the implementation before issue 14.
  scale on r          (scale · x Aᵀ) Bᵀ: the scale on the (tokens, r) intermediate, autodiff.
  custom VJP          a hand-written backward (saves x and h = x Aᵀ; four rank-r products), but dB
                      left as gᵀh, which XLA emits with d_out as the major axis of a (d_out, r) dot.
  custom VJP, fast dB dBᵀ = hᵀ g as an (r, d_out) product, the orientation the CPU kernels run
                      ~5x faster (a barrier keeps XLA from folding the transpose back).
  + fused h·Bᵀ        and the forward's h Bᵀ as r broadcast multiply-adds, which XLA fuses into
                      the layer's add and its consumers: the library (mos_jax.core.low_rank_term)
                      up to rank 8; forced here at any rank.
  + fused h·Bᵀ, dh·A  the backward's dh A fused the same way too.
  shared A            "custom VJP, fast dB" with one x·[A_q; A_k; A_v]ᵀ (and [A_gate; A_up]) for
                      the projections that share an input, instead of three (two).
  fold into W         y = x (W + scale·Aᵀ Bᵀ), custom VJP: no full-width term, but ΔW formed per
                      step (and kept for the backward).
  library inject      mos_jax.linen.adapted_loss, the real code path (equals "+ fused h·Bᵀ" up to
                      rank 8, "custom VJP, fast dB" above).

Each lever runs through a small interceptor written here with public names only, so the levers
differ in the term alone. Reported per lever: median ms, the per-round (paired) ratio over the
frozen fwd+bwd and over "plain", XLA's compiled peak memory and bytes accessed. Results go to
experiments/results/bench_levers.json (--out).

  .venv/bin/python -m experiments.bench_levers               # both sizes, ~5 minutes on 2 cores
  .venv/bin/python -m experiments.bench_levers --hidden 1024 --rank 16 --out /tmp/levers_r16.json
  .venv/bin/python -m experiments.bench_levers --quick       # smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
from typing import Any, Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import mos_jax
from experiments import bench_core
from experiments.lib import bench
from experiments.lib.bench import mib

Term = Callable[[jax.Array, jax.Array, jax.Array, float], jax.Array]
#: HF Llama's projections that read the same input, first member first.
SIBLINGS = {"q_proj": ("q_proj", "k_proj", "v_proj"), "gate_proj": ("gate_proj", "up_proj")}


def parse_args() -> argparse.Namespace:
  def extra(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hidden", type=int, nargs="+", default=sorted(bench_core.PRESETS),
                   choices=sorted(bench_core.PRESETS), help="model sizes (default: 256 1024)")
    p.add_argument("--rank", type=int, default=None, help="LoRA rank r (default 8)")

  return bench.bench_parser(__doc__, out_file="bench_levers.json", quick_help="tiny model, 2 repeats (smoke test)",
                            repeats_help="timed calls per variant (default 20 at hidden 256, 10 at 1024)",
                            extra=extra).parse_args()


# ----------------------------------------------------------------------------------- levers


def plain(x, a, b, scale):
  return scale * jnp.einsum("...r,or->...o", jnp.einsum("...i,ri->...r", x, a), b)


def scale_on_r(x, a, b, scale):
  return jnp.einsum("...r,or->...o", jnp.einsum("...i,ri->...r", x, a) * scale, b)


def _rows(t):
  return t.reshape(-1, t.shape[-1])


def _outer_sum(h: jax.Array, m: jax.Array) -> jax.Array:
  """``h @ m`` for ``h (..., r)``, ``m (r, n)`` as ``r`` broadcast multiply-adds (XLA fuses them)."""
  rows = m.reshape((m.shape[0],) + (1,) * (h.ndim - 1) + (m.shape[1],))
  out = h[..., 0:1] * rows[0]
  for j in range(1, h.shape[-1]):
    out = out + h[..., j:j + 1] * rows[j]
  return out


def make_term(fused_up: bool, fused_dx: bool, fast_db: bool) -> Term:
  """A custom-VJP term: ``h Bᵀ`` (and the backward's ``dh A``) fused or a matmul; ``dB`` fast or not."""
  up = (lambda h, b: _outer_sum(h, b.T)) if fused_up else (lambda h, b: jnp.einsum("...r,or->...o", h, b))

  @jax.custom_vjp
  def term(x, a, b):
    return up(jnp.einsum("...i,ri->...r", x, a), b)

  def fwd(x, a, b):
    h = jnp.einsum("...i,ri->...r", x, a)
    return up(h, b), (x, a, b, h)

  def bwd(res, g):
    x, a, b, h = res
    dh = _rows(g) @ b
    if fast_db:
      db = jax.lax.optimization_barrier(jnp.einsum("tr,to->ro", _rows(h), _rows(g))).T
    else:
      db = jnp.einsum("to,tr->or", _rows(g), _rows(h))
    dx = _outer_sum(dh, a) if fused_dx else dh @ a
    return dx.reshape(x.shape), jnp.einsum("tr,ti->ri", dh, _rows(x)), db

  term.defvjp(fwd, bwd)
  return lambda x, a, b, scale: term(x, a * scale, b)


@jax.custom_vjp
def _down(x, a):
  """``h = x Aᵀ`` with its own backward: ``dA = dhᵀ x``, ``dx = dh A``."""
  return jnp.einsum("...i,ri->...r", x, a)


def _down_fwd(x, a):
  return _down(x, a), (x, a)


def _down_bwd(res, dh):
  x, a = res
  return (_rows(dh) @ a).reshape(x.shape), jnp.einsum("tr,ti->ri", _rows(dh), _rows(x))


_down.defvjp(_down_fwd, _down_bwd)


@jax.custom_vjp
def _up(h, b):
  """``h Bᵀ`` with ``dBᵀ = hᵀ g`` kept in the fast (r, d_out) orientation."""
  return jnp.einsum("...r,or->...o", h, b)


def _up_fwd(h, b):
  return _up(h, b), (h, b)


def _up_bwd(res, g):
  h, b = res
  db = jax.lax.optimization_barrier(jnp.einsum("tr,to->ro", _rows(h), _rows(g))).T
  return (_rows(g) @ b).reshape(h.shape), db


_up.defvjp(_up_fwd, _up_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _folded(x, w, a, b, scale):
  return x @ (w + scale * a.T @ b.T)


def _folded_fwd(x, w, a, b, scale):
  return _folded(x, w, a, b, scale), (x, w, a, b)


def _folded_bwd(scale, res, g):
  x, w, a, b = res
  h = _rows(x) @ a.T * scale
  dh = _rows(g) @ b * scale
  db = jax.lax.optimization_barrier(jnp.einsum("tr,to->ro", h, _rows(g))).T
  return g @ (w + scale * a.T @ b.T).T, jnp.zeros_like(w), jnp.einsum("tr,ti->ri", dh, _rows(x)), db


_folded.defvjp(_folded_fwd, _folded_bwd)


# ------------------------------------------------------------------------------ injection


@contextlib.contextmanager
def inject_lever(adapter: mos_jax.Adapter, lever: str) -> Iterator[None]:
  """Adds the adapter's term to every adapted ``nn.Dense`` (HF Llama's projections) the lever's way."""
  per_path = mos_jax.core.layer_factors(adapter)
  scale = float(adapter.config.scale)
  shared: dict[tuple[int, str], jax.Array] = {}
  term = TERMS.get(lever)

  def down_shared(path: str, x: jax.Array) -> jax.Array:
    parent, name = path.rsplit("/", 1)
    if (id(x), path) not in shared:
      paths = [f"{parent}/{n}" for n in SIBLINGS.get(name, (name,)) if f"{parent}/{n}" in per_path]
      a = jnp.concatenate([per_path[p][0] * scale for p in paths])
      h = _down(x, a)
      r = per_path[path][0].shape[0]
      for i, p in enumerate(paths):
        shared[(id(x), p)] = h[..., i * r:(i + 1) * r]
    return shared.pop((id(x), path))

  def handle(module: nn.Module, next_fun, args, kwargs):
    path = "/".join(module.path)
    if path not in per_path or module.is_initializing():
      return next_fun(*args, **kwargs)
    a, b = per_path[path]
    x = mos_jax.linen.module_input(args, kwargs)
    if lever == "fold into W":
      return _folded(x, module.get_variable("params", "kernel"), a, b, scale)
    y = next_fun(*args, **kwargs)
    if lever == "shared A":
      return y + _up(down_shared(path, x), b)
    return y + term(x, a, b, scale)

  with mos_jax.linen.intercept_kernel_calls(handle):
    yield


TERMS: dict[str, Term] = {
    "plain": plain, "scale on r": scale_on_r, "custom VJP": make_term(False, False, False),
    "custom VJP, fast dB": make_term(False, False, True), "+ fused h·Bᵀ": make_term(True, False, True),
    "+ fused h·Bᵀ, dh·A": make_term(True, True, True)}
LEVERS = (*TERMS, "shared A", "fold into W")


def lever_variant(lever: str, loss_fn, params, batch, adapter) -> bench.Variant:
  def loss(adapter, params, batch, rng):
    with inject_lever(adapter, lever):
      return loss_fn(params, batch)

  return bench.train_step_variant(lever, f"LoRA step, term computed as: {lever}", loss, adapter, params, batch)


# ---------------------------------------------------------------------------------- report


def row(v: bench.Variant, frozen: bench.Variant, before: bench.Variant) -> dict[str, Any]:
  t, f, b = (np.asarray(x.times) for x in (v, frozen, before))
  cost = bench_core.cost_of(v)
  return {"name": v.name, "what": v.what, "median_ms": float(np.median(t) * 1e3), "compile_s": v.compile_s,
          "over_frozen_fwd_bwd_paired": float(np.median(t / f)),
          "over_plain_paired": float(np.median(t / b)),
          "memory": bench.compiled_memory(v.compiled), "gflop": cost.get("flops", 0) / 1e9,
          "gb_accessed": cost.get("bytes accessed", 0) / 1e9, "times_ms": [float(x * 1e3) for x in t]}


def run_size(s: bench_core.Sizes) -> dict[str, Any]:
  model = bench.build_llama(s)
  params, batch, loss_fn = model.params, bench.random_batch(s), bench_core.make_loss_fn(model)
  frozen = bench_core.base_variants(loss_fn, params, batch)[1]
  adapter = mos_jax.adapt(params, mos_jax.MoSConfig.lora(s.rank))
  variants = [frozen] + [lever_variant(lv, loss_fn, params, batch, adapter) for lv in LEVERS]
  library = bench.train_step_variant("library inject", "mos_jax.linen.adapted_loss (make_train_step's loss)",
                                     mos_jax.linen.adapted_loss(loss_fn), adapter, params, batch)
  variants.append(library)
  print(f"hidden {s.hidden}: compiled " + ", ".join(f"{v.name} {v.compile_s:.1f}s" for v in variants), flush=True)
  bench.time_variants(variants, s.repeats)
  rows = [row(v, frozen, variants[1]) for v in variants]
  head = f"{'lever':<22} {'median ms':>10} {'/ frozen':>9} {'/ plain':>8} {'peak MiB':>9} {'GB accessed':>12}"
  print("\n".join([f"hidden {s.hidden}, batch {s.batch} x {s.seq}", head, "-" * len(head)] + [
      f"{r['name']:<22} {r['median_ms']:>10.1f} {r['over_frozen_fwd_bwd_paired']:>9.3f} "
      f"{r['over_plain_paired']:>8.3f} {mib(r['memory'].get('peak_estimate_bytes')):>9} {r['gb_accessed']:>12.2f}"
      for r in rows]), flush=True)
  return {"sizes": dataclasses.asdict(s), "rows": rows}


def main() -> None:
  args = parse_args()
  sizes = [bench_core.QUICK] if args.quick else [bench_core.PRESETS[h] for h in args.hidden]
  runs = {}
  for s in sizes:
    s = dataclasses.replace(s, repeats=args.repeats or (2 if args.quick else 20 if s.hidden <= 256 else 10),
                            rank=args.rank or s.rank)
    runs[str(s.hidden)] = run_size(s)
  bench.write_json(args.out, {"quick": args.quick, "environment": bench.environment(), "runs": runs,
                              "levers": list(LEVERS)})


if __name__ == "__main__":
  main()
