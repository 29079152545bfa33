"""Shared pieces of the benchmark scripts (bench_core, bench_levers, bench_gemma3, bench_serving, ...).

The command-line flags they all take (``--threads 1`` re-runs the script pinned to one core with
XLA's CPU thread pools at one thread), the load average before and after a run, a small HF Flax
Llama built from a sizes object (the presets of bench_core, bench_levers, bench_profile and
bench_peft_torch), the frozen floor every adapter step is compared with, compiled variants (train
steps from ``mos_jax.train.make_step``) timed round-robin, the median of per-round ratios with a
95% bootstrap interval, XLA's compiled memory and cost analyses, environment and device
information, MiB formatting and the JSON result file. Each script keeps its own variants, rows,
tables and findings.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, NamedTuple, Protocol, Sequence, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
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
  """The flags every benchmark takes: --quick, --repeats, then ``extra``'s own, then --threads and --out.

  ``extra`` adds a script's flags in between so that --help lists them where they always stood.
  """
  p = argparse.ArgumentParser(description=doc.split("\n")[0])
  p.add_argument("--quick", action="store_true", help=quick_help)
  p.add_argument("--repeats", type=int, default=None, help=repeats_help)
  if extra is not None:
    extra(p)
  add_threads_flag(p)
  p.add_argument("--out", default=results_path(out_file), help="JSON output path")
  return p


def add_threads_flag(p: argparse.ArgumentParser) -> None:
  """``--threads N``: run pinned to N cores (1: also XLA's and OpenMP's thread pools at one thread)."""
  p.add_argument("--threads", type=int, default=None,
                 help="pin the run to this many cores with taskset (1: XLA CPU at one thread as well; "
                      "single-core ratios are the quietest); default: all cores, no pinning")


# ------------------------------------------------------------ threads and load

#: Set in the environment of a run that ``pin_threads`` re-executed; its value is the thread count.
PINNED_ENV = "MOS_BENCH_THREADS"
#: XLA flags for a single-threaded CPU run: no multi-threaded Eigen, one intra-op thread.
ONE_THREAD_XLA_FLAGS = ("--xla_cpu_multi_thread_eigen=false", "intra_op_parallelism_threads=1")


def pinned_command(threads: int, argv: Sequence[str], env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
  """The command and environment that re-run ``argv`` (a Python command line) on ``threads`` cores.

  The first ``threads`` cores this process may use (lowest first), through ``taskset -c``; for one
  thread, XLA's flags for one CPU thread and OpenMP/MKL pools of one (PyTorch) as well.
  """
  if threads < 1:
    raise ValueError(f"--threads must be at least 1, got {threads}.")
  cores = sorted(os.sched_getaffinity(0))
  if threads > len(cores):
    raise ValueError(f"--threads {threads} asks for more cores than this process may use ({len(cores)}: {cores}).")
  env = {**env, PINNED_ENV: str(threads), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
  if threads == 1:
    flags = [f for f in env.get("XLA_FLAGS", "").split() if f.split("=")[0] not in
             {g.split("=")[0] for g in ONE_THREAD_XLA_FLAGS}]
    env["XLA_FLAGS"] = " ".join([*flags, *ONE_THREAD_XLA_FLAGS])
  return ["taskset", "-c", ",".join(str(c) for c in cores[:threads]), *argv], env


def pin_threads(threads: int | None) -> None:
  """Re-executes this script on ``threads`` cores (see ``pinned_command``) unless it already runs so.

  Call it first thing in ``main``: the re-executed process starts from scratch, so nothing done
  before is kept, and JAX reads ``XLA_FLAGS`` when its backend starts.
  """
  if threads is None or os.environ.get(PINNED_ENV) == str(threads):
    return
  cmd, env = pinned_command(threads, [sys.executable, *sys.orig_argv[1:]], dict(os.environ))
  sys.stdout.flush()
  sys.stderr.flush()
  os.execvpe(cmd[0], cmd, env)


def load_average() -> list[float] | None:
  """The 1, 5 and 15 minute load averages (``/proc/loadavg``), or ``None`` where there is no such file."""
  try:
    return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
  except OSError:
    return None


def run_info(args: argparse.Namespace | None = None) -> dict[str, Any]:
  """What a result file records about its run, at its start: command, threads, cores, XLA flags, load.

  Pinned first when ``args.threads`` asks for it (``pin_threads``). ``write_json`` adds the load
  average at the end.
  """
  threads = getattr(args, "threads", None)
  pin_threads(threads)
  return {"command": " ".join(sys.orig_argv), "threads": threads,
          "cpu_affinity": sorted(os.sched_getaffinity(0)), "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "loadavg_before": load_average(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


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


@dataclasses.dataclass
class CoreSizes:
  """The HF Flax Llama of bench_core, bench_levers, bench_profile and bench_peft_torch (8 layers, rank 8)."""

  hidden: int = 256
  intermediate: int = 688
  layers: int = 8
  heads: int = 4
  kv_heads: int = 2
  vocab: int = 1024
  batch: int = 8
  seq: int = 128
  rank: int = 8
  shards_per_vector: int = 2
  repeats: int = 20


#: A tiny model for smoke runs (``--quick``) and tests.
CORE_QUICK = CoreSizes(hidden=64, intermediate=128, layers=4, heads=4, kv_heads=2, vocab=128, batch=2, seq=16, rank=4,
                       repeats=3)
#: The documented sizes, by hidden size (head dim 64 in both).
CORE_PRESETS = {256: CoreSizes(), 1024: CoreSizes(hidden=1024, intermediate=2816, heads=16, kv_heads=8, batch=4)}


def llama_loss_fn(model: Any) -> Callable[[Any, Any], jax.Array]:
  """``loss(params, batch)``: the HF Flax Llama's next-token loss on ``batch["input_ids"]``."""
  def loss_fn(params, batch):
    ids = batch["input_ids"]
    return next_token_loss(model(ids, params=params, train=False).logits, ids)
  return loss_fn


def core_mos_config(s: CoreSizes) -> mos_jax.MoSConfig:
  """MoS at bench_core's active rank: ``r_e = r / 8`` (at least 1), ``l`` from the sizes, no private rank.

  Raises:
    SystemExit: the config needs more shards than ``s.layers`` layers give; the message has the numbers.
  """
  r_e = max(1, s.rank // 8)
  if s.rank * s.shards_per_vector > r_e * s.layers * s.shards_per_vector:
    raise SystemExit(f"MoS config does not fit: r*l = {s.rank * s.shards_per_vector} > r_e*L*l = "
                     f"{r_e * s.layers * s.shards_per_vector}; raise --layers or lower --rank.")
  return mos_jax.MoSConfig(rank=s.rank, equivalent_rank=r_e, private_rank=0, shards_per_vector=s.shards_per_vector)


# ------------------------------------------------------------------ the floor

#: HF Llama's projections that read the embeddings. A step that trains no embedding never needs the
#: gradient of their input (nor the embedding table's): the floor differentiates up to their outputs.
LLAMA_FLOOR_OUTPUTS = tuple(f"model/layers/0/self_attn/{n}_proj" for n in "qkv")
FLOOR_WHAT = ("frozen base: value_and_grad w.r.t. a scalar added to each of layer 0's q/k/v outputs (the whole "
              "activation backward an adapter step needs, no weight gradient, no gradient of layer 0's input)")


@contextlib.contextmanager
def added_to_outputs(deltas: dict[str, jax.Array], hit: set[str] | None = None) -> Iterator[None]:
  """Adds ``deltas[path]`` to the output of each linen kernel layer (``nn.Dense``, ...) at ``path``.

  The paths reached are added to ``hit`` when given.
  """
  def handle(module, next_fun, args, kwargs):
    y = next_fun(*args, **kwargs)
    path = "/".join(module.path)
    if path not in deltas:
      return y
    if hit is not None:
      hit.add(path)
    return y + deltas[path].astype(y.dtype)

  with mos_jax.linen.intercept_kernel_calls(handle):
    yield


def floor_variant(loss_fn: Callable[[Any, Any], jax.Array], params: Any, batch: Any,
                  paths: Sequence[str] = LLAMA_FLOOR_OUTPUTS, name: str = "frozen fwd+bwd") -> Variant:
  """The frozen model's forward + the backward an adapter step cannot avoid: the floor under every step.

  ``value_and_grad`` w.r.t. scalars added to the outputs at ``paths`` (layer 0's projections): the
  activation backward reaches every adapted layer's output, but computes no weight gradient and no
  gradient of the first projections' input, which an adapter step never needs either.

  Raises:
    ValueError: a path the model never calls (the floor would differentiate nothing there).
  """
  deltas = {p: jnp.zeros((), jnp.float32) for p in paths}
  hit: set[str] = set()

  def loss(deltas, params, batch):
    with added_to_outputs(deltas, hit):
      return loss_fn(params, batch)

  v = compile_variant(name, FLOOR_WHAT, jax.jit(jax.value_and_grad(loss)), (), (deltas, params, batch))
  if hit != set(paths):
    raise ValueError(f"The floor's paths {sorted(set(paths) - hit)} are not kernel layers the model calls; "
                     f"pass the paths of its first layer's projections.")
  return v


def cost_of(compiled: Any) -> dict[str, float]:
  """XLA's cost analysis of a compiled function: ``{"flops", "bytes accessed"}`` where the backend gives them."""
  try:
    c = compiled.cost_analysis()
  except Exception:  # noqa: BLE001 - backend may not implement it
    return {}
  c = c[0] if isinstance(c, (list, tuple)) and c else c
  return {k: float(c[k]) for k in ("flops", "bytes accessed") if c and k in c}


# ---------------------------------------------------------------------- timing


class Timing(NamedTuple):
  """One timed call: wall-clock and process CPU (all threads) seconds."""

  wall_s: float
  cpu_s: float


def time_round_robin(calls: Sequence[Callable[[], Any]], repeats: int, *,
                     alternate: bool = True, shuffle: int | None = None) -> list[list[Timing]]:
  """Time each call ``repeats`` times, one call of each per round; the result follows ``calls``.

  Every call gets one untimed warm-up (compilation, allocations, caches) and
  each timed call ends in ``jax.block_until_ready``. Interleaving makes slow
  drifts in load hit all calls alike; ``alternate`` reverses every other round
  so that no call always runs right after the same neighbour; ``shuffle`` (a
  seed) runs each round in its own random order instead.
  """
  for fn in calls:
    jax.block_until_ready(fn())
  times: list[list[Timing]] = [[] for _ in calls]
  rng = None if shuffle is None else np.random.default_rng(shuffle)
  for i in range(repeats):
    if rng is not None:
      order = rng.permutation(len(calls)).tolist()
    else:
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


#: Resamples of the bootstrap intervals; the seed keeps an interval the same for the same times.
BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED = 10_000, 0


def median_ci(values: Sequence[float], *, level: float = 0.95) -> tuple[float, float, float]:
  """The median of ``values`` and its percentile-bootstrap interval at ``level``: ``(median, low, high)``."""
  v = np.asarray(values, np.float64)
  if v.ndim != 1 or v.size == 0:
    raise ValueError(f"median_ci needs a non-empty 1-D sequence, got shape {v.shape}.")
  rng = np.random.default_rng(BOOTSTRAP_SEED)
  medians = np.median(v[rng.integers(0, v.size, (BOOTSTRAP_RESAMPLES, v.size))], axis=1)
  tail = (1.0 - level) / 2 * 100
  low, high = np.percentile(medians, [tail, 100 - tail])
  return float(np.median(v)), float(low), float(high)


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> dict[str, Any]:
  """Median of the per-round ratios ``num[i] / den[i]`` with its 95% bootstrap interval.

  Rounds are paired (``time_round_robin`` runs one call of each variant per round), so load that
  drifts over the run cancels in each ratio; resampling the rounds gives the interval.

  Returns:
    ``{"median": m, "ci95": [low, high], "rounds": n}``.
  """
  num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
  if num.shape != den.shape:
    raise ValueError(f"paired_ratio needs as many rounds of each: {num.shape} vs {den.shape}.")
  m, low, high = median_ci(num / den)
  return {"median": m, "ci95": [low, high], "rounds": int(num.size)}


def fmt_ratio(r: dict[str, Any], digits: int = 3) -> str:
  """A ``paired_ratio`` as ``1.043 [1.031, 1.052]``."""
  lo, hi = r["ci95"]
  return f"{r['median']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


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


def write_json(path: str, result: dict[str, Any], run: dict[str, Any] | None = None) -> None:
  """Write ``result`` as indented JSON (atomically, creating the folder) and say where.

  ``run`` (from ``run_info``) is stored under ``"run"`` with the load average at the end added.
  """
  if run is not None:
    result = {**result, "run": {**run, "loadavg_after": load_average()}}
    print(f"load average before {run['loadavg_before']}, after {result['run']['loadavg_after']}")
  text = json.dumps(result, indent=2)
  mos_jax.formats.atomic_file(Path(path), lambda tmp: Path(tmp).write_text(text))
  print(f"wrote {path}")
