"""The claim scripts' runs store: JSONL results, resume, rows x seeds statistics, the docs table updater.

One self-describing JSON object per finished run, one per line. The file is rewritten whole
through :func:`mos_jax.formats.atomic_file` on every append (it holds a few hundred lines), so a
kill leaves the old file or the new one, never half a line. A file written by other means may
still end in a torn line (a copy cut short): :func:`load` skips it and says so; damage anywhere
else is refused, since dropping a finished run silently would bias the table.

Statistics: a rows x seeds additive model (``y = mu + row + seed + error``) fitted by least
squares, its pooled residual variance as the error term of every contrast, Student-t
intervals and p-values, and Holm's step-down correction over a pre-registered family of
contrasts (:func:`contrasts`). The same seeds pair the rows (same data order and task), so the
seed effect is taken out of the error, as in a paired test, but the error is estimated from
every row at once instead of from the few seeds of one pair.

Example:
  >>> records, torn = load(path)  # doctest: +SKIP
  >>> append(path, {"row": "LoRA r=1", "seed": 0, "fact_nll": 1.5})  # doctest: +SKIP
  >>> results = contrasts(values, [("MoS", "LoRA r=1")])  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import math
import re
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import contextlib

import numpy as np

from mos_jax.formats import atomic_file

# ----------------------------------------------------------------------------------------------
# The store.


class DamagedResults(ValueError):
  """A results file has an unreadable line before its last one."""


def load(path: Path) -> tuple[list[dict], str | None]:
  """The records of a JSONL results file, and a note if its torn last line was skipped.

  Args:
    path: the file; a missing file has no records.

  Returns:
    ``(records, note)``: ``note`` is ``None``, or says which last line was skipped (a write
    cut short: that run is simply run again).

  Raises:
    DamagedResults: a line other than the last is not a JSON object; the message names the
      line and the fix.
  """
  path = Path(path)
  if not path.exists():
    return [], None
  lines = path.read_text().split("\n")
  if lines and lines[-1] == "":
    lines.pop()
  records, note = [], None
  for i, line in enumerate(lines, 1):
    try:
      record = json.loads(line)
      if not isinstance(record, dict):
        raise ValueError(f"a {type(record).__name__}, not an object")
    except ValueError as e:
      if i == len(lines) and not path.read_bytes().endswith(b"\n"):
        note = f"{path}: skipped the torn last line {i} ({len(line)} characters: {line[:60]!r}...)"
        continue
      raise DamagedResults(f"{path}: line {i} of {len(lines)} is not a JSON record ({e}): {line[:80]!r}. Fix "
                           "the line by hand or delete it (its run is then made again); nothing was read.") from e
    records.append(record)
  return records, note


def append(path: Path, record: Mapping[str, Any]) -> None:
  """Adds one record: the file is rewritten atomically with the previous records and this one.

  A torn last line (see :func:`load`) is dropped in the rewrite, with a note on stdout.

  Raises:
    DamagedResults: the file is damaged before its last line (nothing is written).
    TypeError: the record is not JSON-serialisable (nothing is written).
  """
  path = Path(path)
  records, note = load(path)
  if note:
    print(f"note: {note}; it is dropped now", flush=True)
  text = "".join(json.dumps(r) + "\n" for r in [*records, dict(record)])
  atomic_file(path, lambda tmp: Path(tmp).write_text(text))


def key_of(record: Mapping[str, Any], fields: Sequence[str]) -> tuple:
  """The identity of a run: the values of ``fields`` (missing ones are ``None``)."""
  return tuple(record.get(f) for f in fields)


def missing(planned: Sequence[Mapping[str, Any]], records: Sequence[Mapping[str, Any]],
            fields: Sequence[str]) -> list[Mapping[str, Any]]:
  """The planned runs that no record matches on ``fields``, in plan order (resume)."""
  done = {key_of(r, fields) for r in records}
  return [p for p in planned if key_of(p, fields) not in done]


@contextlib.contextmanager
def heavy_lock(path: str | Path | None) -> Iterator[float]:
  """Holds the machine's heavy-job lock (``flock(2)``, as ``flock /tmp/mos_heavy.lock``) for one run.

  Yields the seconds spent waiting for it; ``path=None`` takes no lock. Do not run a script that
  takes it per run under ``flock`` of the same file: it would wait for its own parent forever.
  """
  start = time.perf_counter()
  if path is None:
    yield 0.0
    return
  with open(path, "a") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      print(f"waiting for {path} (another heavy job holds it; if this script runs under `flock {path}`, "
            "stop it and run it without, or pass --lock '')", flush=True)
      fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield time.perf_counter() - start
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def loadavg() -> float:
  """The 1-minute load average (``/proc/loadavg``), NaN where there is none."""
  try:
    return float(Path("/proc/loadavg").read_text().split()[0])
  except (OSError, ValueError, IndexError):
    return math.nan


# ----------------------------------------------------------------------------------------------
# Statistics.


@dataclasses.dataclass(frozen=True)
class RowsSeeds:
  """A least-squares fit of ``y[row, seed] = mu + row effect + seed effect + error``.

  Attributes:
    rows: the rows, in the order given.
    seeds: the seeds seen.
    coef: the fitted coefficients (intercept, rows but the first, seeds but the first).
    cov_unscaled: ``(X'X)^-1``; times ``sigma2`` it is the coefficients' covariance.
    sigma2: the pooled residual variance (residual sum of squares / ``df``).
    df: residual degrees of freedom, ``n - p``.
    n: observations.
  """

  rows: tuple[str, ...]
  seeds: tuple[Any, ...]
  coef: np.ndarray
  cov_unscaled: np.ndarray
  sigma2: float
  df: int
  n: int

  def row_vector(self, row: str) -> np.ndarray:
    """The design vector of ``row`` at the average seed (for adjusted means and contrasts)."""
    v = np.zeros(len(self.coef))
    v[0] = 1.0
    i = self.rows.index(row)
    if i:
      v[i] = 1.0
    v[len(self.rows):] = 1.0 / len(self.seeds)
    return v


def fit_rows_seeds(values: Mapping[tuple[str, Any], float], rows: Sequence[str] | None = None) -> RowsSeeds:
  """Fits the rows x seeds additive model to ``{(row, seed): y}`` (missing cells are allowed).

  Args:
    values: one observation per (row, seed).
    rows: the rows to fit, in order (default: as they appear); others are ignored.

  Raises:
    ValueError: fewer than 2 rows, no residual degree of freedom, or a non-finite value.
  """
  rows = tuple(rows) if rows is not None else tuple(dict.fromkeys(r for r, _ in values))
  cells = [(r, s, float(y)) for (r, s), y in values.items() if r in rows]
  if len(rows) < 2 or any(not any(r == c[0] for c in cells) for r in rows):
    counts = [(r, sum(c[0] == r for c in cells)) for r in rows]
    raise ValueError(f"need >= 2 rows, each with an observation; got (row, observations) {counts}")
  bad = [(r, s, y) for r, s, y in cells if not math.isfinite(y)]
  if bad:
    raise ValueError(f"non-finite observations {bad[:3]}: drop those runs or transform the metric")
  seeds = tuple(sorted({s for _, s, _ in cells}, key=str))
  p = len(rows) + len(seeds) - 1
  x = np.zeros((len(cells), p))
  x[:, 0] = 1.0
  for k, (r, s, _) in enumerate(cells):
    if rows.index(r):
      x[k, rows.index(r)] = 1.0
    if seeds.index(s):
      x[k, len(rows) + seeds.index(s) - 1] = 1.0
  y = np.asarray([c[2] for c in cells])
  rank = np.linalg.matrix_rank(x)
  df = len(cells) - rank
  if df < 1:
    raise ValueError(f"{len(cells)} observations of {len(rows)} rows x {len(seeds)} seeds leave no residual degree "
                     "of freedom: run more seeds")
  coef = np.linalg.lstsq(x, y, rcond=None)[0]
  resid = y - x @ coef
  return RowsSeeds(rows=rows, seeds=seeds, coef=coef, cov_unscaled=np.linalg.pinv(x.T @ x),
                   sigma2=float(resid @ resid) / df, df=df, n=len(cells))


@dataclasses.dataclass(frozen=True)
class Contrast:
  """``a - b`` from a :class:`RowsSeeds` fit: estimate, standard error, t, p, 95% interval, Holm p."""

  a: str
  b: str
  estimate: float
  se: float
  df: int
  t: float
  p: float
  low: float
  high: float
  p_holm: float = math.nan
  alpha: float = 0.05

  @property
  def significant(self) -> bool:
    """Survives Holm's correction over its family at ``alpha``."""
    return self.p_holm < self.alpha


def contrast(model: RowsSeeds, a: str, b: str, level: float = 0.95) -> Contrast:
  """Row ``a`` minus row ``b`` with the pooled error term (Student t with ``model.df`` degrees of freedom)."""
  from scipy import stats  # noqa: PLC0415

  c = model.row_vector(a) - model.row_vector(b)
  est = float(c @ model.coef)
  se = math.sqrt(model.sigma2 * float(c @ model.cov_unscaled @ c))
  t = est / se if se > 0 else (math.copysign(math.inf, est) if est else math.nan)
  p = float(2 * stats.t.sf(abs(t), model.df)) if not math.isnan(t) else math.nan
  half = float(stats.t.ppf(0.5 + level / 2, model.df)) * se
  return Contrast(a=a, b=b, estimate=est, se=se, df=model.df, t=t, p=p, low=est - half, high=est + half)


def holm(p: Sequence[float]) -> np.ndarray:
  """Holm's step-down adjusted p-values (family-wise error), in the input order; NaN stays NaN."""
  p = np.asarray(p, float)
  out = np.full(len(p), np.nan)
  ok = np.flatnonzero(~np.isnan(p))
  order = ok[np.argsort(p[ok], kind="stable")]
  m = len(order)
  running = 0.0
  for k, i in enumerate(order):
    running = max(running, min(1.0, (m - k) * p[i]))
    out[i] = running
  return out


def contrasts(values: Mapping[tuple[str, Any], float], pairs: Sequence[tuple[str, str]], *,
              rows: Sequence[str] | None = None, alpha: float = 0.05) -> list[Contrast]:
  """A pre-registered family of contrasts ``a - b`` on one metric, Holm-corrected together.

  Args:
    values: ``{(row, seed): y}``.
    pairs: the contrasts; a pair naming a row without observations is left out.
    rows: the rows the model is fitted to (default: every row in ``values``).
    alpha: the family-wise error rate.

  Returns:
    One :class:`Contrast` per pair that could be estimated, with ``p_holm`` set.
  """
  model = fit_rows_seeds(values, rows)
  found = [contrast(model, a, b) for a, b in pairs if a in model.rows and b in model.rows]
  adjusted = holm([c.p for c in found])
  return [dataclasses.replace(c, p_holm=float(q), alpha=alpha) for c, q in zip(found, adjusted)]


def paired_contrasts(values: Mapping[tuple[str, Any], float], pairs: Sequence[tuple[str, str]], *,
                     alpha: float = 0.05) -> list[Contrast]:
  """The same family with each pair's own error term (a paired t-test on their common seeds), Holm-corrected.

  A check on the pooled error's assumption that every row is equally noisy: where the two
  disagree, the rows' noise differs and the paired result is the safer one.
  """
  found = []
  for a, b in pairs:
    common = {s for r, s in values if r == a} & {s for r, s in values if r == b}
    if len(common) >= 2:
      pair = {(r, s): y for (r, s), y in values.items() if r in (a, b) and s in common}
      found.append(contrast(fit_rows_seeds(pair, (a, b)), a, b))
  adjusted = holm([c.p for c in found])
  return [dataclasses.replace(c, p_holm=float(q), alpha=alpha) for c, q in zip(found, adjusted)]


def values_of(records: Sequence[Mapping[str, Any]], metric: str, *,
              transform: Callable[[float], float] | None = None) -> dict[tuple[str, Any], float]:
  """``{(row, seed): metric}`` of the records (one per cell: a later record replaces an earlier one)."""
  return {(r["row"], r["seed"]): (transform or float)(r[metric]) for r in records}


# ----------------------------------------------------------------------------------------------
# Docs.


def markers(name: str) -> tuple[str, str]:
  """The comments around a generated block of a docs page."""
  return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def update_block(page: Path, name: str, text: str, *, heading: str | None = None) -> str:
  """Replaces the block ``name`` of ``page`` with ``text`` (atomically); a page or block not there is added.

  Args:
    page: the markdown file.
    name: the block's name (see :func:`markers`).
    text: the block's new content.
    heading: a ``## heading`` written above a block that is added.

  Returns:
    ``"replaced"``, ``"appended"`` or ``"created"``.

  Raises:
    ValueError: the page has one marker without the other, or a marker twice.
  """
  start, end = markers(name)
  page = Path(page)
  content = page.read_text() if page.exists() else ""
  counts = (content.count(start), content.count(end))
  block = f"{start}\n{text.strip()}\n{end}"
  if counts == (1, 1) and content.index(start) < content.index(end):
    new, how = re.sub(f"{re.escape(start)}.*?{re.escape(end)}", lambda _: block, content, flags=re.S), "replaced"
  elif counts == (0, 0):
    how = "appended" if content else "created"
    new = content.rstrip("\n") + ("\n\n" if content else "") + (f"## {heading}\n\n" if heading else "") + block + "\n"
  else:
    raise ValueError(f"{page}: the markers of block {name!r} appear {counts[0]} and {counts[1]} times (or out of "
                     f"order); leave exactly one {start} before one {end}")
  atomic_file(page, lambda tmp: Path(tmp).write_text(new))
  return how


# ----------------------------------------------------------------------------------------------
# Table cells.


def mean_sd(x: Sequence[float], scale: float = 1.0, digits: int = 3) -> str:
  """``"mean ± sd"`` (sample SD) of ``scale * x``; the mean alone for one value."""
  x = scale * np.asarray(x, float)
  return f"{x.mean():.{digits}f}" + (f" ± {x.std(ddof=1):.{digits}f}" if len(x) > 1 else "")


def effect_cell(c: Contrast, scale: float = 1.0, digits: int = 3, *, ratio: bool = False) -> str:
  """``"est [low, high]"`` of a contrast (``exp`` of it with ``ratio``: log metrics); bold if it survives Holm."""
  if ratio:
    text = f"{math.exp(c.estimate):.3g}× [{math.exp(c.low):.3g}, {math.exp(c.high):.3g}]"
  else:
    text = f"{scale * c.estimate:+.{digits}f} [{scale * c.low:+.{digits}f}, {scale * c.high:+.{digits}f}]"
  return f"**{text}**" if c.significant else text
