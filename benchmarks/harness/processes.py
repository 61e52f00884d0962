"""A step run in its own process under a time limit, its output both shown and logged."""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from typing import Dict, Optional, Sequence

from . import ROOT


class RunningChild:
    """The process a runner waits on, so that a SIGTERM to the runner can end it first."""
    proc: Optional[subprocess.Popen] = None


def stop_process_group(proc: subprocess.Popen) -> None:
    """End ``proc`` and everything it started (compile workers): SIGTERM to its process
    group, SIGKILL 10 s later if it is still there."""
    for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def run_logged(cmd: Sequence[str], env: Dict[str, str], log_path: str, timeout: float,
               cwd: str = ROOT) -> Dict[str, object]:
    """Run ``cmd``, its output both to our stdout and to ``log_path``; ended (with its
    process group) after ``timeout`` seconds. Returns status ("ok", "failed" or "timeout"),
    exit code and seconds."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    start = time.monotonic()
    with open(log_path, "w") as log:
        log.write("$ " + shlex.join(cmd) + "\n")
        log.flush()
        # Its own process group, so that a time-out ends its compile workers too; not its own
        # session, so that whoever ends the runner's session ends it as well.
        group = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
        proc = subprocess.Popen(list(cmd), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, **group)
        RunningChild.proc = proc

        def copy():
            for raw in iter(proc.stdout.readline, b""):
                line = raw.decode("utf-8", "replace")
                sys.stdout.write(line)
                sys.stdout.flush()
                log.write(line)
                log.flush()

        reader = threading.Thread(target=copy, daemon=True)
        reader.start()
        try:
            proc.wait(timeout=max(timeout, 1.0))
            status = "ok" if proc.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            stop_process_group(proc)
            status = "timeout"
        reader.join(timeout=10)
        RunningChild.proc = None
        seconds = time.monotonic() - start
        if status == "timeout":
            log.write(f"\n[stopped after {seconds:.0f} s: the time limit of {timeout:.0f} s was up]\n")
    return {"status": status, "returncode": proc.returncode, "seconds": round(seconds, 1)}
