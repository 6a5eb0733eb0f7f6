"""What every GPU benchmark needs from a plain checkout, and the shared synthetic DCW tiers.

On the GPU machine dcwdist is not installed: `map_packages()` maps pyproject's package-dir
entries (kernels/, data_pipelines/ -> dcwdist.kernels, dcwdist.data_pipelines) by hand.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def map_packages() -> None:
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    for sub in ("kernels", "data_pipelines"):
        try:
            importlib.import_module(f"dcwdist.{sub}")
        except ImportError:
            spec = importlib.util.spec_from_file_location(
                f"dcwdist.{sub}", os.path.join(REPO, sub, "__init__.py"),
                submodule_search_locations=[os.path.join(REPO, sub)])
            mod = importlib.util.module_from_spec(spec)
            sys.modules[f"dcwdist.{sub}"] = mod
            spec.loader.exec_module(mod)


def dcw_tiers(num_blocks: int, seed: int = 0) -> torch.Tensor:
    """[num_blocks] tiers with exact 20/30/50 core/buffer/background ratios, block 0 core."""
    g = torch.Generator().manual_seed(seed)
    n_core, n_buf = round(0.2 * num_blocks), round(0.3 * num_blocks)
    perm = torch.randperm(num_blocks - 1, generator=g) + 1
    tiers = torch.full((num_blocks,), 2, dtype=torch.long)
    tiers[0] = 0
    tiers[perm[:n_core - 1]] = 0
    tiers[perm[n_core - 1:n_core - 1 + n_buf]] = 1
    return tiers
