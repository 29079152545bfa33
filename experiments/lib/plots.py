"""The experiments' PNG plots (matplotlib, headless): training curves, accuracy versus trainable parameters."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mos_jax.formats import atomic_file


def _pyplot() -> Any:
  import matplotlib  # slow import: only when a plot is drawn
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _save(fig: Any, path: Path) -> None:
  fig.tight_layout()
  atomic_file(path, lambda p: fig.savefig(p, format="png", dpi=110))
  _pyplot().close(fig)


def plot_curves(metrics: list[dict], path: Path, title: str) -> None:
  """Training loss (raw and smoothed) and the evaluation metric per step, as a PNG."""
  plt = _pyplot()
  steps = [m["step"] for m in metrics]
  losses = np.array([m["loss"] for m in metrics])
  ema = np.copy(losses)
  for i in range(1, len(ema)):
    ema[i] = 0.9 * ema[i - 1] + 0.1 * losses[i]
  eval_key = next((k for k in ("eval_accuracy", "eval_loss") if any(k in m for m in metrics)), None)
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
  ax1.plot(steps, losses, lw=0.6, alpha=0.4, label="loss")
  ax1.plot(steps, ema, lw=1.5, label="EMA 0.9")
  ax1.legend()
  ax1.set(xlabel="step", ylabel="train loss", title=title)
  if eval_key:
    evals = [m for m in metrics if eval_key in m]
    ax2.plot([m["step"] for m in evals], [m[eval_key] for m in evals], "o-")
  ax2.set(xlabel="step", ylabel=eval_key or "", title="evaluation")
  _save(fig, path)


def accuracy_vs_params(points: Sequence[tuple[str, int, float, float]], path: Path, title: str) -> None:
  """One error bar per ``(name, trainable params, mean accuracy %, std %)``, log x axis; nothing without points."""
  metric_vs_params(points, path, title, xlabel="trainable parameters (incl. 770 of the head)",
                   ylabel="dev accuracy (%)")


def metric_vs_params(points: Sequence[tuple[str, int, float, float]], path: Path, title: str, *, xlabel: str,
                     ylabel: str, baseline: tuple[str, float] | None = None, curve: Sequence[str] = (),
                     ylog: bool = False) -> None:
  """One error bar per ``(name, trainable params, mean, std)`` of any metric, log x axis; nothing without points.

  Args:
    points: the rows; a NaN std (one seed) draws no bar.
    path: the PNG.
    title: the plot's title.
    xlabel: the x axis label.
    ylabel: the y axis label.
    baseline: ``(name, value)`` drawn as a dashed horizontal line (a row without trainable
      parameters, which a log axis cannot place), or only named in the legend when it lies
      far outside the rows' range; ``None`` for none.
    curve: names of points joined by a line in this order (e.g. LoRA at increasing rank).
    ylog: a log y axis (for a metric spanning orders of magnitude).
  """
  if not points:
    return
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(10, 4.8))
  seen: dict[int, int] = {}
  for name, n, mean, std in points:
    # Rows at the same budget are spread a little along x so their error bars stay visible.
    k = seen.setdefault(n, 0)
    seen[n] += 1
    ax.errorbar(max(n, 1) * 1.06 ** k, mean, yerr=0 if np.isnan(std) else std, fmt="o", capsize=3, label=name)
  joined = [next(p for p in points if p[0] == name) for name in curve if any(p[0] == name for p in points)]
  if len(joined) > 1:
    ax.plot([max(p[1], 1) for p in joined], [p[2] for p in joined], "-", color="gray", lw=1, zorder=0)
  if baseline is not None:
    label = f"{baseline[0]}: {baseline[1]:.4g}"
    lo, hi = ax.get_ylim()
    if lo - (hi - lo) <= baseline[1] <= hi + (hi - lo):
      ax.axhline(baseline[1], color="gray", ls="--", lw=1, label=label)
    else:  # far off the rows' range: drawing it would flatten their differences; name it only
      ax.plot([], [], " ", label=f"{label} (off the chart)")
  ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
  ax.set(xscale="log", yscale="log" if ylog else "linear", xlabel=xlabel, ylabel=ylabel, title=title)
  _save(fig, path)


def paired_curves(curves: dict[str, Sequence[Sequence[float]]], path: Path, title: str) -> None:
  """Loss curves of two settings over the same seeds (left) and their paired differences (right), as a PNG.

  Args:
    curves: ``{setting: [one loss per step, per seed]}`` for exactly two settings, seeds in the same
      order; the first is the reference. The right panel draws, per seed, second - first, and the
      reference's own seed-to-seed differences (seed k - seed 0, k >= 1): the noise the paired
      differences are judged against.
    path: the PNG.
    title: the left panel's title.

  Raises:
    ValueError: not two settings, or their seeds or steps differ in number.
  """
  if len(curves) != 2:
    raise ValueError(f"paired_curves compares two settings, got {len(curves)}: {sorted(curves)}.")
  (ref, a), (other, b) = ((k, np.asarray(v, float)) for k, v in curves.items())
  if a.shape != b.shape:
    raise ValueError(f"{ref} has {a.shape[0]} seeds x {a.shape[1]} steps but {other} {b.shape[0]} x {b.shape[1]}: "
                     f"pair the same seeds for the same number of steps.")
  plt = _pyplot()
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
  steps = np.arange(1, a.shape[1] + 1)
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for i in range(a.shape[0]):
    c = colors[i % len(colors)]
    ax1.plot(steps, a[i], "-", color=c, lw=1.2, label=f"{ref}, seed {i}")
    ax1.plot(steps, b[i], "--", color=c, lw=1.2, label=f"{other}, seed {i}")
    ax2.plot(steps, b[i] - a[i], "-", color=c, lw=1.2, label=f"{other} - {ref}, seed {i}")
  for i in range(1, a.shape[0]):
    label = f"{ref}: seed k - seed 0 (k >= 1)" if i == 1 else None
    ax2.plot(steps, a[i] - a[0], ":", color="gray", lw=1, label=label)
  ax2.axhline(0, color="black", lw=0.5)
  ax1.legend(fontsize=7)
  ax2.legend(fontsize=7)
  ax1.set(xlabel="step", ylabel="training loss", title=title)
  ax2.set(xlabel="step", ylabel="loss difference", title=f"paired: {other} - {ref} (gray: seed noise)")
  _save(fig, path)
