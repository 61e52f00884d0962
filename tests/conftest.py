import os

# Triton kernels run on CPU tensors through the interpreter; this must be set
# before any @triton.jit decorator runs, so before vtp_kernels is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield
