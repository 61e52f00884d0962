"""What a run records as JSON: metrics.jsonl (one line per logging step and per epoch), and
the JSON-friendly form of the summaries, evaluations and metadata written beside it."""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional

from vtp.atomic import write_text

__all__ = ["MetricsLogger", "read_metrics", "jsonable"]


def jsonable(value: Any) -> Any:
    """A JSON-friendly copy: tuples to lists, tensors and numpy scalars to numbers."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value


def read_metrics(path: Optional[str]) -> List[Dict[str, Any]]:
    """The rows of a metrics.jsonl file; a line cut short by an interruption is skipped."""
    rows: List[Dict[str, Any]] = []
    if path and os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    pass
    return rows


class MetricsLogger:
    """JSON lines; only rank 0 writes. On resume, lines past the checkpoint are dropped so
    the file reads as if the run had never stopped."""

    def __init__(self, path: Optional[str], enabled: bool = True):
        self.path = path if enabled else None

    def truncate_after(self, global_step: int, epoch: int) -> None:
        if not self.path or not os.path.exists(self.path):
            return
        # read_metrics skips a line cut short by the interruption
        keep = [row for row in read_metrics(self.path)
                if (row.get("epoch", 0) < epoch if row.get("kind") == "epoch"
                    else row.get("step", 0) <= global_step)]
        write_text(self.path, "".join(json.dumps(row) + "\n" for row in keep))

    def reset(self) -> None:
        if self.path and os.path.exists(self.path):
            os.remove(self.path)

    def log(self, row: Dict[str, Any]) -> None:
        if not self.path:
            return
        # Appended, not rewritten: a line cut short by a crash is skipped on reading.
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
