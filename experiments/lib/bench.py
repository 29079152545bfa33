"""Shared pieces of the benchmark scripts (bench_core, bench_levers, bench_gemma3, bench_serving, ...).

The command-line flags they all take, a small HF Flax Llama built from a sizes
object, compiled variants (train steps from ``mos_jax.train.make_step``) timed
round-robin, XLA's compiled memory analysis, environment and device information, MiB formatting
and the JSON result file. Each script keeps its own variants, rows, tables and
findings.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable, NamedTuple, Protocol, Sequence, TypeVar

import jax
import jax.numpy as jnp
import optax

import mos_jax
from experiments.lib.models import random_llama
from experiments.lib.paths import RESULTS_DIR

if TYPE_CHECKING:
  from transformers import FlaxLlamaForCausalLM

# Memory-analysis fields every benchmark reports; others (e.g. generated code size) are opt-in.
MEMORY_KEYS = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes")

S = TypeVar("S")


# ------------------------------------------------------------------ command line


def results_path(name: str) -> str:
  """The default output path of a benchmark: ``experiments/results/<name>``."""
  return str(RESULTS_DIR / name)


def bench_parser(doc: str, *, out_file: str, quick_help: str, repeats_help: str,
                 extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.ArgumentParser:
  """The flags every benchmark takes: --quick, --repeats, then ``extra``'s own, then --out.

  ``extra`` adds a script's flags in between so that --help lists them where they always stood.
  """
  p = argparse.ArgumentParser(description=doc.split("\n")[0])
  p.add_argument("--quick", action="store_true", help=quick_help)
  p.add_argument("--repeats", type=int, default=None, help=repeats_help)
  if extra is not None:
    extra(p)
  p.add_argument("--out", default=results_path(out_file), help="JSON output path")
  return p


def sizes_from(args: argparse.Namespace, full: S, quick: S, overrides: Sequence[str] = ("repeats",)) -> S:
  """A copy of ``quick`` or ``full`` (per --quick) with the flags in ``overrides`` applied when given."""
  s = dataclasses.replace(quick if args.quick else full)  # a copy: the module-level defaults stay intact
  for name in overrides:
    if getattr(args, name) is not None:
      setattr(s, name, getattr(args, name))
  return s


# ------------------------------------------------------------------ model, data


class LlamaSizes(Protocol):
  """What ``build_llama`` and ``random_batch`` read from a script's ``Sizes``."""

  hidden: int
  intermediate: int
  layers: int
  heads: int
  kv_heads: int
  vocab: int
  batch: int
  seq: int


def build_llama(s: LlamaSizes, dtype: Any = jnp.float32) -> FlaxLlamaForCausalLM:
  """A randomly initialised (seed 0) HF Flax Llama with untied embeddings; ``dtype`` is its compute dtype."""
  return random_llama(vocab=s.vocab, hidden=s.hidden, intermediate=s.intermediate, layers=s.layers, heads=s.heads,
                      kv_heads=s.kv_heads, max_positions=max(s.seq, 128), dtype=dtype, tie_word_embeddings=False)


def random_batch(s: LlamaSizes) -> dict[str, jax.Array]:
  """A fixed (key 1) ``(batch, seq)`` batch of uniformly random token ids."""
  ids = jax.random.randint(jax.random.key(1), (s.batch, s.seq), 0, s.vocab, dtype=jnp.int32)
  return {"input_ids": ids}


def next_token_loss(logits: jax.Array, ids: jax.Array) -> jax.Array:
  """Mean next-token cross-entropy of ``logits`` over ``ids``, in float32 whatever the compute dtype."""
  return optax.softmax_cross_entropy_with_integer_labels(
      logits[:, :-1].astype(jnp.float32), ids[:, 1:]).mean()


def tree_bytes(tree: Any) -> int:
  """Total bytes of a pytree's array leaves."""
  return int(sum(x.nbytes for x in jax.tree_util.tree_leaves(tree)))


# ---------------------------------------------------------------------- timing


class Timing(NamedTuple):
  """One timed call: wall-clock and process CPU (all threads) seconds."""

  wall_s: float
  cpu_s: float


def time_round_robin(calls: Sequence[Callable[[], Any]], repeats: int, *,
                     alternate: bool = True) -> list[list[Timing]]:
  """Time each call ``repeats`` times, one call of each per round; the result follows ``calls``.

  Every call gets one untimed warm-up (compilation, allocations, caches) and
  each timed call ends in ``jax.block_until_ready``. Interleaving makes slow
  drifts in load hit all calls alike; ``alternate`` reverses every other round
  so that no call always runs right after the same neighbour.
  """
  for fn in calls:
    jax.block_until_ready(fn())
  times: list[list[Timing]] = [[] for _ in calls]
  for i in range(repeats):
    order = range(len(calls)) if i % 2 == 0 or not alternate else reversed(range(len(calls)))
    for j in order:
      wall, cpu = time.perf_counter(), time.process_time()
      jax.block_until_ready(calls[j]())
      times[j].append(Timing(time.perf_counter() - wall, time.process_time() - cpu))
  return times


def median_timing(timings: Iterable[Timing]) -> Timing:
  """Median wall and median CPU seconds, each taken separately."""
  timings = list(timings)
  return Timing(statistics.median(t.wall_s for t in timings), statistics.median(t.cpu_s for t in timings))


# -------------------------------------------------------------------- variants


@dataclasses.dataclass
class Variant:
  """A compiled function plus the state it threads through repeated calls."""

  name: str
  what: str
  compiled: Any
  state: tuple
  const: tuple
  carry: int  # leading outputs fed back as the next call's leading state
  compile_s: float
  times: list[float] = dataclasses.field(default_factory=list)  # wall seconds per timed call

  def call(self) -> Any:
    """Run once on the current state and carry the leading outputs forward."""
    out = self.compiled(*self.state, *self.const)
    if self.carry:
      self.state = tuple(out[:self.carry])
    return out


V = TypeVar("V", bound=Variant)


def compile_variant(name: str, what: str, fn: Any, state: Sequence[Any], const: Sequence[Any], carry: int = 0, *,
                    cls: type[V] = Variant, **extra: Any) -> V:
  """Lower and compile jitted ``fn`` for ``(*state, *const)``; ``extra`` fills a subclass's own fields."""
  t0 = time.perf_counter()
  compiled = fn.lower(*state, *const).compile()
  return cls(name, what, compiled, tuple(state), tuple(const), carry, time.perf_counter() - t0, **extra)


def train_step_variant(name: str, what: str, loss_fn: Callable[[Any, Any, Any, Any], jax.Array], initial: Any,
                       base: Any, batch: Any, *, cls: type[V] = Variant, **extra: Any) -> V:
  """A compiled ``mos_jax.train.make_step`` (adamw, lr 1e-3) training ``initial`` over the frozen ``base``.

  ``loss_fn(trainable, params, batch, rng)``; for an adapter on a linen model,
  ``mos_jax.linen.adapted_loss(loss)`` (what ``mos_jax.linen.make_train_step`` trains).
  """
  opt = optax.adamw(1e-3)
  step = mos_jax.train.make_step(loss_fn, opt)
  trainable = jax.tree_util.tree_map(jnp.copy, initial)  # the step donates its copy
  state = (trainable, opt.init(trainable))
  return compile_variant(name, what, step, state, (base, batch, jax.random.key(2)), 2, cls=cls, **extra)


def time_variants(variants: Sequence[Variant], repeats: int) -> None:
  """Time the variants round-robin (see ``time_round_robin``), appending wall seconds to each ``times``."""
  for v, timings in zip(variants, time_round_robin([v.call for v in variants], repeats)):
    v.times.extend(t.wall_s for t in timings)


def compiled_memory(compiled: Any, extra_keys: Sequence[str] = ()) -> dict[str, Any]:
  """XLA's compiled memory analysis, with peak estimate = arguments + outputs - donated aliases + temporaries.

  ``{"available": False}`` where the backend does not implement the analysis.
  """
  try:
    m = compiled.memory_analysis()
  except Exception:  # noqa: BLE001 - backend may not implement it
    m = None
  if m is None:
    return {"available": False}
  out: dict[str, Any] = {k: int(getattr(m, k, 0) or 0) for k in (*MEMORY_KEYS, *extra_keys)}
  out["peak_estimate_bytes"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"]
                                - out["alias_size_in_bytes"] + out["temp_size_in_bytes"])
  out["available"] = True
  return out


# ---------------------------------------------------------------------- report


def environment() -> dict[str, Any]:
  """Platform, device kind and count, and versions: enough to tell runs on different machines apart."""
  d = jax.devices()[0]
  return {"platform": d.platform, "device_kind": d.device_kind, "device_count": jax.device_count(),
          "jax": jax.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count()}


def device_summary() -> str:
  """One line naming the device kind, count and host architecture, e.g. ``cpu x1 (x86_64)``."""
  return f"{jax.devices()[0].device_kind} x{jax.device_count()} ({platform.machine()})"


def mib(b: int | None) -> str:
  """Bytes as MiB with two decimals; "n/a" for an unknown size."""
  return "n/a" if b is None else f"{b / 2**20:.2f}"


def write_json(path: str, result: dict[str, Any]) -> None:
  """Write ``result`` as indented JSON, creating the folder, and say where."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(result, f, indent=2)
  print(f"wrote {path}")
