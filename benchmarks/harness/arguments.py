"""Argument-parser helpers: the same flags with the same help in every script."""
from __future__ import annotations

import argparse
from typing import Iterable, List

from . import RESULTS


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show a flag's default unless it is None or the help already names it (then the help
    text says what the default depends on, e.g. --smoke)."""

    def _get_help_string(self, action):
        if action.default is None or "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def parser(doc: str, formatter_class=argparse.RawDescriptionHelpFormatter) -> argparse.ArgumentParser:
    """An argument parser whose description is the first paragraph of the script's docstring."""
    return argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=formatter_class)


def add_do_bench_flags(p: argparse.ArgumentParser) -> None:
    """--warmup and --rep: do_bench's warm-up and measuring times in ms on a GPU, and the
    counts of untimed and timed calls in --smoke mode (wall_clock_ms)."""
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up time in ms (--smoke: warm-up iterations)")
    p.add_argument("--rep", type=int, default=200, help="do_bench measuring time in ms (--smoke: timed iterations)")


def add_output_flags(p: argparse.ArgumentParser, smoke_help: str) -> None:
    """--out, --no-plot and --smoke, in that order and with the same help, for the kernel
    benchmarks whose file names are ``<kernel>_<device>`` (or ``_smoke``)."""
    p.add_argument("--out", default=RESULTS, help="folder for the JSON record and the PNG plot")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG (JSON and table only)")
    p.add_argument("--smoke", action="store_true", help=smoke_help)


def subset(text: str, allowed: Iterable[str], flag: str) -> List[str]:
    """The comma-separated names in ``text``; exits naming ``flag`` on one not in ``allowed``."""
    allowed = list(allowed)
    chosen = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in allowed]
    if unknown:
        raise SystemExit(f"{flag}: unknown {unknown}; expected a subset of {','.join(allowed)}")
    return chosen
