"""Bit-reproducible training on one device (JobConfig.deterministic), as torchtitan's
`debug.deterministic`: two runs of one seed then take the same steps.

Without it, runs of one seed on a GPU diverge: torch's atomics (index_add, embedding backward)
add in varying order, and the block-sparse kernels run the tile timed fastest, a timing that
differs between runs, more so when runs share a GPU. In the quality study that made the same
recipe and seed end its 256-token stage at 0.53 in one run and 1.54 in the next
(benchmarks/results/quality.md, trial 10).
"""
from __future__ import annotations

import os

import torch


def set_deterministic() -> None:
    """Deterministic torch algorithms (a warning where an op has none), the cuBLAS workspace
    setting they need, no cuDNN benchmarking, and the first fitting kernel tile, untimed.
    Process-wide: call before the first CUDA matmul."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    from dcwdist.kernels import _block_sparse_plan
    _block_sparse_plan.AUTOTUNE = False
