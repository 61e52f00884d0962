"""What the benchmark scripts in this folder share, one module per concern:

    environment   the device, the Triton interpreter of --smoke, versions, dtypes, the
                  carried wheels of packages the machine has too old
    timing        timers (do_bench, wall clock, CUDA events per step), interleaved rounds
                  and their summary, the spread the decision rule reads
    checks        errors against a reference, the bounds they are held to
    records       record heads, file names, atomic writes, plots, archives
    processes     a step run in its own process under a time limit
    arguments     argument-parser helpers

Every benchmark writes a JSON record that has to say where and how it was measured (device,
library versions, the command that reproduces it) and keep every raw timing, so that a
number in a table can be traced back and re-measured; keeping those pieces here makes the
records of different scripts agree with each other.

Only the standard library is imported at module level: the runner (gpu_check.py) imports
the harness without torch, and the scripts import torch and triton only after --smoke has
had the chance to set TRITON_INTERPRET. Importing the package puts the repository root on
sys.path, so ``vtp`` and ``vtp_kernels`` import from the checkout without installing.

The scripts import it as ``harness`` after putting their own folder on sys.path, which
works both for ``python benchmarks/bench_x.py`` and for loading a script by file path (as
the tests do).
"""
import os
import sys

BENCHMARKS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(BENCHMARKS)
RESULTS = os.path.join(BENCHMARKS, "results")

if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # the checkout's vtp and vtp_kernels, not an installed copy
