"""Runs that a preemptible scheduler kills (SIGKILL, no clean-up of any kind) at any moment
and re-runs with the very same command, --resume included: they end bitwise equal to an
uninterrupted run, with the same metrics lines, and leave no temporary file behind.

The exact moments come from VTP_TEST_SIGKILL_AT (vtp/app/checkpoint.py, kill_point): the
process kills itself there, as an outside SIGKILL landing at that instant would. One kill
comes from outside, at whatever moment the run has reached."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

import pytest
import torch

from cli_helpers import (FAST, TINY_MODEL, assert_same_tensors, flags, state_dict_of,
                         subprocess_env)

pytestmark = pytest.mark.skipif(os.name != "posix", reason="SIGKILL is POSIX")

KILLED = -signal.SIGKILL if os.name == "posix" else None
# What differs between two runs of the same computation: wall-clock times and speeds.
TIMING_KEYS = ("time", "eta_s", "images_per_s", "epoch_time_s")
# One run should take seconds; a hang is a failure, not a slow test.
TIMEOUT_S = 120


def _argv(data_dir: Path, out: Path) -> List[str]:
    # 4 steps per epoch, 2 epochs; checkpoints at steps 3 and 6 (--save-every) and 4 and 8
    # (epoch ends); metrics lines at steps 2, 4, 6 and 8, so the step-3 checkpoint falls
    # between two; RandAugment, random erasing, mixup, drop path and shuffling all on.
    return flags(["sparse-train", "--data", str(data_dir), "--output", str(out), "--epochs", "2",
                  "-b", "8", "--lr", "1e-3", "--lr-base-batch", "8", "--save-every", "3",
                  "--log-every", "2", "--warmup-epochs", "0.5", "--drop-path", "0.1"],
                 TINY_MODEL, FAST)


def _command(argv: List[str]) -> List[str]:
    return [sys.executable, "-m", "vtp.app"] + argv


def _env(kill_at: Optional[str]) -> dict:
    env = subprocess_env()
    env.pop("VTP_TEST_SIGKILL_AT", None)
    if kill_at:
        env["VTP_TEST_SIGKILL_AT"] = kill_at
    return env


def _run(argv: List[str], kill_at: Optional[str] = None) -> subprocess.CompletedProcess:
    return subprocess.run(_command(argv), env=_env(kill_at), capture_output=True, text=True,
                          timeout=TIMEOUT_S)


def _run_and_kill_from_outside(argv: List[str], metrics: Path, past_step: int) -> int:
    """Starts the run and SIGKILLs it as soon as its metrics show a step after `past_step`;
    returns its exit status (0 if it finished first)."""
    proc = subprocess.Popen(_command(argv), env=_env(None), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if any(r.get("step", 0) > past_step for r in _rows(metrics)):
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.002)
        return proc.wait(timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _rows(metrics: Path) -> List[dict]:
    rows = []
    try:
        lines = metrics.read_text().splitlines()
    except FileNotFoundError:
        return rows
    for line in lines:
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass  # a line being written
    return rows


def _without_timing(rows: List[dict]) -> List[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


def _saved_step(out: Path) -> Optional[int]:
    ckpt = out / "checkpoints" / "last.pt"
    return torch.load(ckpt, weights_only=True)["global_step"] if ckpt.exists() else None


def _temporaries(out: Path) -> List[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*")
                  if ".tmp-" in p.name or ".old-" in p.name)


def _explain(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"


def test_a_run_killed_at_any_moment_and_resumed_ends_as_if_never_killed(tmp_path, data_dir):
    ref = tmp_path / "ref"
    done = _run(_argv(data_dir, ref))
    assert done.returncode == 0, _explain(done)

    out = tmp_path / "killed"
    again = _argv(data_dir, out) + ["--resume"]  # the one command the scheduler re-runs
    metrics = out / "metrics.jsonl"

    # Killed twice in a row before the first checkpoint (step 3): inside step 2, then
    # inside the write of the first checkpoint, which leaves its temporary file.
    result = _run(again, kill_at="step:2")
    assert result.returncode == KILLED, _explain(result)
    assert "starting from the beginning" in result.stdout
    assert _saved_step(out) is None and _rows(metrics) == []
    result = _run(again, kill_at="checkpoint-write:3")
    assert result.returncode == KILLED, _explain(result)
    assert "starting from the beginning" in result.stdout and _saved_step(out) is None
    assert [r["step"] for r in _rows(metrics)] == [2]
    assert [p.split("-")[0] for p in _temporaries(out)] == ["checkpoints/.last.pt.tmp"]

    # Still no checkpoint: from the beginning again, the temporary file removed; killed in
    # step 4, after the step-3 checkpoint, before step 4's metrics line.
    result = _run(again, kill_at="step:4")
    assert result.returncode == KILLED, _explain(result)
    assert "starting from the beginning" in result.stdout
    assert _saved_step(out) == 3 and _temporaries(out) == []

    # Resumed between two metrics lines (step 4's averages steps 3 and 4); killed inside the
    # write of the step-6 checkpoint: step 4's stays, beside a temporary.
    result = _run(again, kill_at="checkpoint-write:6")
    assert result.returncode == KILLED, _explain(result)
    assert "resumed sparse-train" in result.stdout and "at epoch 0, step 3/4" in result.stdout
    assert _saved_step(out) == 4 and len(_temporaries(out)) == 1

    # Killed from outside once the run is past step 5, wherever it then is.
    outside = _run_and_kill_from_outside(again, metrics, past_step=5)
    assert outside in (KILLED, 0)
    saved = _saved_step(out)
    assert saved in (4, 6, 8)

    # Killed right after the last checkpoint (step 8, end of training), before the model is
    # saved: unless the outside kill came later than that.
    result = _run(again, kill_at="checkpoint-saved:8")
    if saved == 8:
        assert result.returncode == 0, _explain(result)
    else:
        assert result.returncode == KILLED, _explain(result)
        assert _saved_step(out) == 8 and not (out / "summary.json").exists()
        result = _run(again)
        assert result.returncode == 0, _explain(result)
    assert "resumed sparse-train" in result.stdout

    assert_same_tensors(state_dict_of(out / "model"), state_dict_of(ref / "model"))
    assert _without_timing(_rows(metrics)) == _without_timing(_rows(ref / "metrics.jsonl"))
    assert [r["step"] for r in _rows(metrics) if r["kind"] == "train"] == [2, 4, 6, 8]
    summary, ref_summary = (json.loads((d / "summary.json").read_text()) for d in (out, ref))
    summary["last_epoch"], ref_summary["last_epoch"] = _without_timing(
        [summary.get("last_epoch", {}), ref_summary["last_epoch"]])
    assert summary == ref_summary
    assert _temporaries(out) == []
