"""The experiments' command lines: one ``argparse`` style for every script.

The module docstring is the description (its layout kept), and every flag's help ends with its
default, so ``--help`` is the script's manual.
"""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
  """Keeps the description's line breaks and appends ``(default: ...)`` to every flag's help."""


def parser(doc: str | None) -> argparse.ArgumentParser:
  """An ``ArgumentParser`` described by ``doc`` (a script's ``__doc__``) that shows every default.

  Give each flag a ``help`` string: only flags with one get their default shown.

  Example:
    >>> p = parser("Trains a thing.")
    >>> _ = p.add_argument("--steps", type=int, default=100, help="training steps")
    >>> "(default: 100)" in p.format_help()
    True
  """
  return argparse.ArgumentParser(description=doc, formatter_class=HelpFormatter)
