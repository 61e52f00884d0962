"""What a record says and where it goes: its head (what ran, where, with which versions, how
to repeat it), file names, atomic writes, plots and archives."""
from __future__ import annotations

import datetime
import importlib.util
import os
import re
import shlex
import sys
import tarfile
from typing import Callable, Dict, Optional, Sequence

from . import ROOT
from .environment import versions


def _load_atomic():
    # vtp/atomic.py by its path: it needs only the standard library, while `import vtp`
    # would import torch and decorate the kernels before --smoke has set TRITON_INTERPRET.
    spec = importlib.util.spec_from_file_location("_vtp_atomic", os.path.join(ROOT, "vtp", "atomic.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_ATOMIC = _load_atomic()


def command_line(script: str, argv: Optional[Sequence[str]]) -> str:
    """The command that repeats this run from the repository root.

    ``argv`` is what main() was given (tests, the runner); None means the command line.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join(["python", f"benchmarks/{os.path.basename(script)}", *map(shlex.quote, args)])


def record_head(benchmark: str, script: str, argv: Optional[Sequence[str]], *, smoke: bool, device: str,
                packages: Sequence[str], created: Optional[datetime.datetime] = None) -> Dict[str, object]:
    """The fields a record begins with: what ran, where, with which versions, how to repeat it.

    The versions of ``packages`` go under "versions"; with ``created`` (the gated-linear and
    gated-training records) the time of the run is recorded and the versions stand at the
    top level instead, where those records have always kept them.
    """
    head: Dict[str, object] = {"benchmark": benchmark}
    if created is not None:
        head["created"] = created.isoformat(timespec="seconds")
    head.update(command=command_line(script, argv), smoke=smoke, device=device)
    if created is not None:
        head.update(versions(packages))
    else:
        head["versions"] = versions(packages)
    return head


def slug(text: str) -> str:
    """A file-name-safe form of a device name (the part before the first comma): every
    character other than a-z and 0-9 becomes '-'."""
    return re.sub(r"[^a-z0-9]", "-", text.split(",")[0].strip().lower()).strip("-")


def now() -> datetime.datetime:
    """The time of the run: the record's ``created`` field and the default file stems."""
    return datetime.datetime.now()


def output_stem(out: str, prefix: str, smoke: bool, device: str, tag: Optional[str] = None) -> str:
    """``<out>/<prefix>_<tag>``, the tag defaulting to ``smoke`` in --smoke mode and to the
    device's slug otherwise: one record per benchmark and machine, replaced by a rerun."""
    return os.path.join(out, f"{prefix}_{tag or ('smoke' if smoke else slug(device))}")


def timestamped_stem(prefix: str, device: str, when: datetime.datetime) -> str:
    """``<prefix>_<device slug>_<YYYYmmdd-HHMMSS>``: a default file stem that a later run on
    the same machine does not overwrite."""
    return f"{prefix}_{slug(device)}_{when.strftime('%Y%m%d-%H%M%S')}"


def write_atomically(path: str, write: Callable[[str], None]) -> str:
    """Have ``write`` fill a temporary file beside ``path``, then move it into place
    (``vtp.atomic.atomic_write``, the project's one writer of files).

    Every record, text, plot and archive the benchmarks write goes through here (the live
    step logs are the one exception: they are streamed, and archived whole afterwards).
    A reader (or a run killed half-way) never sees a half-written record or plot: ``path``
    holds either the old file or the complete new one.
    """
    _ATOMIC.atomic_write(path, write)
    return str(path)


def write_json(path, record) -> str:
    """Write ``record`` as indented JSON to ``path`` atomically (parents created); returns the path."""
    _ATOMIC.write_json(str(path), record)
    return str(path)


def write_text(path, text: str) -> str:
    """Write ``text`` to ``path`` atomically (parents created); returns the path."""
    _ATOMIC.write_text(str(path), text)
    return str(path)


def save_record(record, stem: str, plot: Optional[Callable[[object, str], None]]) -> None:
    """Write ``<stem>.json`` and, unless ``plot`` is None, ``<stem>.png`` drawn by
    ``plot(record, path)``; then say on stdout what was written."""
    write_json(stem + ".json", record)
    if plot is not None:
        plot(record, stem + ".png")
    print(f"wrote {stem}.json" + ("" if plot is None else f" and {stem}.png"))


def pack(folder: str, archive: str) -> str:
    """Every file below ``folder`` into the .tar.gz ``archive``, written atomically."""
    def write(tmp):
        with tarfile.open(tmp, "w:gz") as tar:
            for dirpath, _, filenames in sorted(os.walk(folder)):
                for name in sorted(filenames):
                    path = os.path.join(dirpath, name)
                    tar.add(path, arcname=os.path.relpath(path, folder))
    return write_atomically(archive, write)


def pyplot():
    """matplotlib.pyplot on the Agg backend: the benchmarks run on machines without a display."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path) -> str:
    """Lay out ``fig``, write it as a 120 dpi PNG to ``path`` atomically and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        return write_atomically(str(path), lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    finally:
        plt.close(fig)


def bar_panel(ax, labels: Sequence[str], medians: Sequence[float]) -> None:
    """Median times as labelled bars, the last bar (the baseline the others are held
    against) grey."""
    colours = [f"C{i}" for i in range(len(labels) - 1)] + ["0.6"]
    bars = ax.bar(list(labels), list(medians), color=colours)
    ax.bar_label(bars, fmt="%.3g", fontsize=8)
    ax.set_ylabel("median ms (lower is better)")


def smoke_suffix(smoke: bool, text: str = " [smoke]") -> str:
    """Marks a title or table heading of a --smoke run, whose numbers are not speeds."""
    return text if smoke else ""
