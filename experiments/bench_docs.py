"""Writes docs/benchmarks.md's tables from the benchmarks' JSON files (experiments/results/*.json).

The page's prose is written by hand; every table sits between ``<!-- table: NAME -->`` and
``<!-- /table -->`` and is generated here from the results, so that no figure in a table is typed
by hand. ``make bench-all`` runs every benchmark and then this script; a test checks that the
committed page equals what this script makes of the committed results.

  .venv/bin/python -m experiments.bench_docs            # rewrite the tables in place
  .venv/bin/python -m experiments.bench_docs --check    # exit 1 if a table is stale
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Callable

from experiments.lib.paths import REPO, RESULTS_DIR

DOC = REPO / "docs" / "benchmarks.md"
MARKER = re.compile(r"<!-- table: ([\w-]+) -->\n(.*?)<!-- /table -->", re.S)


def load(results: Path, name: str) -> dict[str, Any] | None:
  """The JSON result ``name`` in ``results``, or ``None`` when that benchmark has not been run in the current format.

  A result without a ``"run"`` record (threads, load average: written by ``bench.write_json`` since
  issue 24) predates the per-round intervals and the current floor; its figures are not tabulated.
  """
  path = results / name
  if not path.is_file():
    return None
  result = json.loads(path.read_text())
  return result if "run" in result else None


def ratio(r: dict[str, Any] | None, digits: int = 3) -> str:
  """A paired ratio as ``1.043 [1.031, 1.052]`` (the median of per-round ratios and its 95% interval)."""
  if not r:
    return "-"
  lo, hi = r["ci95"]
  return f"{r['median']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def run_line(result: dict[str, Any], what: str) -> str:
  """Where a table's figures come from: the file, its threads and the load average around the run."""
  run = result.get("run") or {}
  threads = run.get("threads")
  pinned = f"{threads} thread{'s' if threads != 1 else ''} (pinned)" if threads else "all cores, not pinned"
  load = ""
  if run.get("loadavg_before") and run.get("loadavg_after"):
    load = f", load average {run['loadavg_before'][0]:.2f} before / {run['loadavg_after'][0]:.2f} after"
  when = f", {run['started'][:16].replace('T', ' ')}" if run.get("started") else ""
  return f"*`{what}`: {pinned}{load}{when}.*\n"


def table(head: list[str], rows: list[list[str]], align: str | None = None) -> str:
  align = align or "l" + "r" * (len(head) - 1)
  sep = ["---" if a == "l" else "---:" for a in align]
  cells = [[c.replace("|", "\\|") for c in r] for r in [head, *rows]]  # a "|" in a name would split its cell
  return "\n".join("| " + " | ".join(r) + " |" for r in [cells[0], sep, *cells[1:]]) + "\n"


def missing(make: str) -> str:
  return f"*(no results in the current format yet: run `{make}`)*\n"


def ms(row: dict[str, Any]) -> str:
  return f"{row['median_ms']:.0f} ms" if row["median_ms"] >= 100 else f"{row['median_ms']:.1f} ms"


def mib(n: int | None) -> str:
  return "-" if n is None else f"{n / 2**20:.0f} MiB"


# ------------------------------------------------------------------------------------ tables


def core_table(results: Path) -> str:
  runs = [(h, load(results, f)) for h, f in ((256, "bench_core.json"), (1024, "bench_core_h1024.json"))]
  runs = [(h, r) for h, r in runs if r]
  if not runs:
    return missing("make bench")
  torch = load(results, "bench_peft_torch.json")
  head = ["hidden (batch)", "frozen fwd+bwd", "LoRA step", "MoS step", "MoS / frozen", "LoRA / frozen", "MoS / LoRA",
          "PEFT LoRA / frozen (PyTorch)"]
  rows = []
  for h, r in runs:
    rw, ra, s = r["rows"], r["ratios"], r["sizes"]
    peft = (torch or {}).get("runs", {}).get(str(h), {}).get("lora_over_frozen")
    rows.append([f"{h} ({s['batch']} x {s['seq']})", ms(rw["frozen fwd+bwd"]), ms(rw["LoRA step"]), ms(rw["MoS step"]),
                 f"**{ratio(ra['mos_over_frozen'])}**", ratio(ra["lora_over_frozen"]), ratio(ra["mos_over_lora"]),
                 ratio(peft)])
  out = table(head, rows)
  out += "".join(run_line(r, f"bench_core{'' if h == 256 else f'_h{h}'}.json") for h, r in runs)
  if torch:
    out += run_line(torch, "bench_peft_torch.json")
  return out


def core_details_table(results: Path) -> str:
  runs = [(h, load(results, f)) for h, f in ((256, "bench_core.json"), (1024, "bench_core_h1024.json"))]
  runs = [(h, r) for h, r in runs if r]
  if not runs:
    return missing("make bench")
  head = ["hidden", "target MoS / frozen (on the 95% interval)", "MoS / LoRA peak memory",
          "old floor (embedding gradient) / floor", "assembly inside the MoS step (profiled)"]
  rows = []
  for h, r in runs:
    t, ra, a = r["targets"], r["ratios"], r["assembly_in_step"]
    goal = t.get("mos_over_frozen")
    goal = f"<= {goal['max']}: {'met' if goal['met'] else '**not met**'}" if goal else "-"
    mem = r["rows"]
    peak = (f"{ra['mos_over_lora_peak_memory']:.3f} ({mib(mem['MoS step']['memory'].get('peak_estimate_bytes'))} vs "
            f"{mib(mem['LoRA step']['memory'].get('peak_estimate_bytes'))})") if "mos_over_lora_peak_memory" in ra else "-"
    rows.append([str(h), goal, peak, ratio(ra["old_floor_over_floor"]),
                 f"{100 * a['share']:.2f}% ({a['ms']:.1f} of {a['step_ms']:.0f} ms)"])
  return table(head, rows)


def levers_table(results: Path) -> str:
  r = load(results, "bench_levers.json")
  # A size missing from bench_levers.json may come from its own run (bench_levers_h256.json: --hidden 256 --out ...).
  by_size = {}
  for k in ("256", "1024"):
    src = (r, "bench_levers.json") if r and k in r["runs"] else (load(results, f"bench_levers_h{k}.json"),
                                                                 f"bench_levers_h{k}.json")
    if src[0] and k in src[0]["runs"]:
      by_size[k] = src
  if not by_size:
    return missing("make bench-levers")
  extra = [(label, load(results, f)) for label, f in (("1024, rank 16", "bench_levers_r16.json"),
                                                       ("1024, YNN dot fusion flag", "bench_levers_ynn.json"))]
  extra = [(label, e) for label, e in extra if e]
  sizes = list(by_size)
  head = ["lever (LoRA step / frozen fwd+bwd)", *(f"hidden {k}" for k in sizes)]
  if "1024" in by_size:
    head += ["1024: GB accessed", "1024: peak"]
  head += [label for label, _ in extra]
  by = {k: {row["name"]: row for row in res["runs"][k]["rows"]} for k, (res, _) in by_size.items()}
  by_extra = [{row["name"]: row for row in e["runs"].get("1024", {"rows": []})["rows"]} for _, e in extra]
  names = list(dict.fromkeys(n for k in sizes for n in by[k] if n != "frozen fwd+bwd" and n != "library inject"))
  rows = []
  for n in [*names, "library inject"]:
    cells = [n if n != "library inject" else "**the library** (`mos_jax.linen.adapted_loss`)"]
    cells += [ratio(by[k][n]["over_frozen"]) if n in by[k] else "-" for k in sizes]
    if "1024" in by:
      row = by["1024"].get(n)
      cells += [f"{row['gb_accessed']:.2f}" if row else "-",
                mib(row["memory"].get("peak_estimate_bytes")) if row else "-"]
    cells += [ratio(e[n]["over_frozen"]) if n in e else "-" for e in by_extra]
    rows.append(cells)
  out = table(head, rows)
  files = dict.fromkeys(f for _, f in by_size.values())
  out += "".join(run_line(next(res for res, g in by_size.values() if g == f), f) for f in files)
  out += "".join(run_line(e, f"bench_levers_{'r16' if 'rank' in label else 'ynn'}.json") for label, e in extra)
  return out


def profile_table(results: Path) -> str:
  r = load(results, "bench_profile.json")
  if not r:
    return missing("make bench-profile")
  names = list(r["variants"])
  kinds = list(next(iter(r["variants"].values()))["by_kind"])
  head = ["kind (ms/step profiled, MB moved)", *names]
  rows = []
  for k in (*kinds, "total"):
    cells = []
    for n in names:
      v = r["variants"][n]
      t, mb = (v["total_ms"], v["total_mb"]) if k == "total" else (v["by_kind"][k]["ms"], v["by_kind"][k]["mb"])
      cells.append(f"{t:.0f} ms, {mb:.0f} MB")
    rows.append([k, *cells])
  return table(head, rows) + run_line(r, "bench_profile.json") + f"*hidden {r['sizes']['hidden']}.*\n"


def passes_table(results: Path) -> str:
  runs = [(h, f, load(results, f)) for h, f in ((256, "bench_passes.json"), (1024, "bench_passes_h1024.json"))]
  runs = [(h, f, r) for h, f, r in runs if r]
  if not runs:
    return missing("make bench-passes")
  goals = {256: 1.10, 1024: 1.04}
  head = ["hidden", "floor", "six passes hot / cold", "(floor + hot passes) / floor", "(floor + cold passes) / floor",
          "MoS step / floor", "goal"]
  rows = [[str(h), f"{r['floor_ms']:.0f} ms", f"{r['hot_passes_ms']:.1f} / {r['cold_passes_ms']:.1f} ms",
           ratio(r["hot_passes_over_floor"]), ratio(r["cold_passes_over_floor"]), ratio(r["step_over_floor"]),
           f"<= {goals[h]:.2f}" if h in goals else "-"] for h, _, r in runs]
  kinds = list(runs[0][2]["passes_by_kind"])
  head2 = ["pass (ms per step, hot / cold)", *(f"hidden {h}" for h, _, _ in runs)]
  rows2 = [[k, *(f"{r['passes_by_kind'][k]['hot_ms']:.1f} / {r['passes_by_kind'][k]['cold_ms']:.1f}"
                 for _, _, r in runs)] for k in kinds]
  return table(head, rows) + "\n" + table(head2, rows2) + "".join(run_line(r, f) for _, f, r in runs)


def gemma3_table(results: Path) -> str:
  runs = [(d, load(results, f)) for d, f in (("float32", "bench_gemma3.json"), ("bfloat16", "bench_gemma3_bf16.json"))]
  runs = [(d, r) for d, r in runs if r]
  if not runs:
    return missing("make bench-gemma3")
  head = ["model dtype", "variant", "step", "/ frozen fwd+bwd", "/ qwix LoRA", "compile", "peak memory (XLA)"]
  rows = []
  for d, r in runs:
    for row in r["rows"]:
      name = row["name"] if row["name"] != "MoS step" else "**MoS step** (r=8, r_e=1, l=2)"
      rows.append([d, name, ms(row), ratio(row["over_frozen"]), ratio(row["over_qwix_lora"]),
                   f"{row['compile_s']:.1f} s", mib(row["memory"].get("peak_estimate_bytes"))])
  return table(head, rows, "ll" + "r" * 5) + "".join(
      run_line(r, f"bench_gemma3{'' if d == 'float32' else '_bf16'}.json") for d, r in runs)


def curves_table(results: Path) -> str:
  r = load(results, "gemma3_bf16_curves.json")
  if not r:
    return missing("make bench-gemma3-curves")
  s, c = r["summary"], r["config"]
  head = ["loss (mean over seeds)", "float32", "bfloat16", "bf16 - f32, paired (sd over seeds)",
          "seed-to-seed sd (f32 / bf16)"]
  rows = []
  for key, label in (("last_quarter_train_loss", f"training, last {max(1, c['steps'] // 4)} steps"),
                     ("held_out_loss", f"held-out ({c['eval_pairs']} test pairs)")):
    v = s[key]
    mean = lambda xs: sum(xs) / len(xs)
    rows.append([label, f"{mean(v['float32']):.4f}", f"{mean(v['bfloat16']):.4f}",
                 f"{v['paired_diff_mean']:+.4f} ({v['paired_diff_sd']:.4f})",
                 f"{v['seed_sd_float32']:.4f} / {v['seed_sd_bfloat16']:.4f}"])
  steps = (f"*{len(c['seeds'])} seeds x {c['steps']} steps (batch {c['batch']}, lr {c['lr']}); over all steps the "
           f"mean |bf16 - f32| of a seed's curves is {s['mean_abs_step_diff']:.4f}, the mean seed-to-seed sd of the "
           f"float32 curves {s['mean_step_seed_sd']:.4f}.*\n")
  return table(head, rows) + steps + run_line(r, "gemma3_bf16_curves.json")


def scan_table(results: Path) -> str:
  r = load(results, "bench_scan.json")
  if not r:
    return missing("make bench-scan")
  head = ["L", "compile scanned / unrolled", "step scanned / unrolled", "scanned / unrolled", "extra peak over frozen, "
          "scanned / unrolled", "budget", "no base copy"]
  rows = [[str(x["layers"]), f"{x['compile_s']['scanned']:.2f} / {x['compile_s']['unrolled']:.2f} s",
           f"{1e3 * x['step_s']['scanned']:.1f} / {1e3 * x['step_s']['unrolled']:.1f} ms",
           ratio(x.get("ratios", {}).get("scanned_over_unrolled")),
           f"{mib(x.get('extra_peak_bytes'))} / {mib(x.get('extra_peak_unrolled_bytes'))}",
           mib(x["adapter_budget_bytes"]), str(x.get("no_base_copy", "-"))] for x in r["rows"]]
  return table(head, rows) + run_line(r, "bench_scan.json")


def quantized_table(results: Path) -> str:
  r = load(results, "bench_quantized.json")
  if not r:
    return missing("make bench-quantized")
  found = r["findings"]
  head = ["base", "base size", "peak memory (XLA)", f"step / {found['reference']}", "final loss"]
  rows = [[row["name"], mib(row["base_bytes"]), mib(row["memory"].get("peak_estimate_bytes")),
           ratio(found.get(name, {}).get("time_over_reference"), 2) if name != found["reference"] else "1",
           f"{row['losses'][-1]:.4f}"] for name, row in r["rows"].items()]
  return table(head, rows) + run_line(r, "bench_quantized.json")


def scaling_table(results: Path) -> str:
  r = load(results, "bench_scaling.json")
  if not r:
    return missing("make bench-scaling")
  head = ["mesh", "devices", "step", "efficiency"]
  rows = []
  for x in r["rows"]:
    eff = x.get("efficiency")
    eff = ratio(eff, 2) if isinstance(eff, dict) else (f"{eff:.2f}" if eff is not None else "-")
    ci = x.get("step_s_ci95")
    step = f"{1e3 * x['step_s']:.1f} ms" + (f" [{1e3 * ci[0]:.1f}, {1e3 * ci[1]:.1f}]" if ci else "")
    rows.append([x["mode"], str(x["devices"]), step, eff])
  return table(head, rows, "lrrr") + (run_line(r, "bench_scaling.json") if "run" in r else "")


def serving_table(results: Path) -> str:
  nnx_r, linen_r = load(results, "bench_serving_nnx.json"), load(results, "bench_serving.json")
  if not nnx_r and not linen_r:
    return missing("make bench-serving")
  head = ["backend, job", "adapters", "rows", "mixed tok/s", "one at a time tok/s", "base tok/s",
          "mixed / one at a time", "mixed / base time", "target"]
  rows = []
  for r in (nnx_r or {}).get("rows", []):
    for job in ("forward", "decode"):
      j, t = r[job], r[job].get("target")
      rows.append([f"NNX Gemma 3, {job}", f"{r['adapters']:,}", f"{r['rows']:,}", f"{j['mixed_tokens_per_s']:,.0f}",
                   f"{j['one_tokens_per_s']:,.0f}", f"{j['base_tokens_per_s']:,.0f}",
                   f"**{ratio(j['mixed_speedup'], 2)}**", ratio(j["mixed_over_base"], 2),
                   f">= {t['min']}: {t['verdict']}" if t else "-"])
  if linen_r:
    t = linen_r["throughput"]
    for r in t["rows"]:
      rows.append(["linen Llama, forward", f"{r['adapters']:,}", f"{linen_r['sizes']['batch']:,}",
                   f"{r['mixed_tokens_per_s']:,.0f}", f"{r['one_at_a_time_tokens_per_s']:,.0f}",
                   f"{t['base_tokens_per_s']:,.0f}", f"**{ratio(r['mixed_speedup'], 2)}**",
                   ratio(r.get("mixed_over_base"), 2), "-"])
  out = table(head, rows, "lrrrrrrrl")
  if nnx_r:
    m, s = nnx_r["stack_memory"], nnx_r["sizes"]
    big = next(r for r in nnx_r["rows"] if r["adapters"] == max(s["adapters"]))
    peak = {n: big.get("memory", {}).get(n, {}).get("peak_estimate_bytes") for n in ("mixed forward", "base forward")}
    out += (f"*NNX: Tunix Gemma 3 (random) {s['layers']} layers, embed {s['embed']}, MLP {s['hidden']}, vocab "
            f"{s['vocab']}; forward {s['seq']} tokens per row, decode one token per row over a {s['cache']}-token "
            "cache; "
            f"MoS r={s['rank']} r_e={s['equivalent_rank']} l={s['shards_per_vector']} on the six projections. "
            f"{m['adapters']:,} stacked adapters hold {mib(m['pools_bytes'])} of pools "
            f"({m['per_adapter_pools_bytes']:,} bytes each) and {mib(m['routing_bytes'])} of routing "
            f"({mib(m.get('lora_same_rank_bytes'))} for as many LoRAs of rank {s['rank']}); XLA's "
            f"peak for the forward over {big['rows']:,} rows: {mib(peak['mixed forward'])} mixed, "
            f"{mib(peak['base forward'])} base.*\n")
    out += run_line(nnx_r, "bench_serving_nnx.json")
  if linen_r:
    s, m = linen_r["sizes"], linen_r["memory"]
    out += (f"*linen: HF Flax Llama (random) hidden {s['hidden']}, {s['layers']} layers, batch {s['batch']} x "
            f"{s['seq']}, MoS r={s['rank']} r_e={s['equivalent_rank']} l={s['shards_per_vector']} on all seven "
            f"projections. Per adapter: {m['mos_total_bytes']:,} bytes in memory (pools + int32 routing) vs "
            f"{m['lora_same_rank_bytes']:,} for LoRA r={s['rank']}; files {m['mos_file_bytes']:,} (native MoS) vs "
            f"{m['lora_peft_file_bytes']:,} (PEFT export).*\n")
    out += run_line(linen_r, "bench_serving.json")
  return out


def qlora_table(results: Path) -> str:
  r = load(results, "bench_qlora_nnx.json")
  if not r:
    return missing("make bench-qlora")
  from experiments.lib.bench import paired_ratio  # noqa: PLC0415 - imports JAX: only when this table has results

  qwix = next((row for row in r["rows"] if row["name"] == "qwix QLoRA"), None)
  head = ["variant", "step", "/ MoS float", "/ qwix QLoRA", "base weights", "peak memory (XLA)"]
  rows = [[row["name"], ms(row), ratio(row["over_mos_float"]),
           ratio(paired_ratio(row["times_ms"], qwix["times_ms"])) if qwix else "-", mib(row["base_weights_bytes"]),
           mib(row["memory"].get("peak_estimate_bytes"))] for row in r["rows"]]
  return (table(head, rows) + f"*{r['model']}, batch {r['batch']} x {r['seq']}, rank {r['rank']}, "
          f"{r['repeats']} rounds.*\n" + run_line(r, "bench_qlora_nnx.json"))


TABLES: dict[str, Callable[[Path], str]] = {
    "core": core_table, "core-details": core_details_table, "levers": levers_table, "profile": profile_table,
    "gemma3": gemma3_table, "gemma3-curves": curves_table, "scan": scan_table, "quantized": quantized_table,
    "scaling": scaling_table, "passes": passes_table, "serving": serving_table, "qlora": qlora_table}


def render(text: str, results: Path = RESULTS_DIR) -> str:
  """``text`` with every marked table regenerated from the JSON files in ``results``.

  Raises:
    ValueError: a marker names no known table, or a ``<!-- table: ... -->`` has no ``<!-- /table -->``.
  """
  opened = len(re.findall(r"<!-- table: ", text))
  found = MARKER.findall(text)
  if opened != len(found):
    raise ValueError(f"{opened} table markers but {len(found)} closed by <!-- /table -->: close every table.")
  unknown = sorted({name for name, _ in found} - set(TABLES))
  if unknown:
    raise ValueError(f"unknown table markers {unknown}; known: {sorted(TABLES)}.")
  return MARKER.sub(lambda m: f"<!-- table: {m.group(1)} -->\n{TABLES[m.group(1)](results)}<!-- /table -->", text)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--check", action="store_true", help="exit 1 if the page's tables differ from the results")
  p.add_argument("--doc", type=Path, default=DOC, help="the page (default docs/benchmarks.md)")
  p.add_argument("--results", type=Path, default=RESULTS_DIR, help="the JSON folder (default experiments/results)")
  args = p.parse_args()
  text = args.doc.read_text()
  new = render(text, args.results)
  if args.check:
    if new != text:
      print(f"{args.doc}: tables differ from {args.results}; run `python -m experiments.bench_docs`.")
      sys.exit(1)
    print(f"{args.doc}: tables match the results.")
    return
  if new != text:
    from mos_jax.formats import atomic_file  # noqa: PLC0415
    atomic_file(args.doc, lambda tmp: Path(tmp).write_text(new))
  print(f"wrote {args.doc}" if new != text else f"{args.doc}: unchanged")


if __name__ == "__main__":
  main()
