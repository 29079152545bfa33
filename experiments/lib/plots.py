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
