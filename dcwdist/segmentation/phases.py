"""Which parameters each training phase trains (seed 000 section 2.2).

scorer  phase 1: the segmenter alone, on its labels (L_seg, plus L_eff when lambda_eff > 0);
joint   phase 2: everything, L_task + lambda_seg L_seg + lambda_eff L_eff;
frozen  the segmenter is fixed (it runs without gradient); the rest of the model trains.
"""
from __future__ import annotations

from torch import nn


def segmenter_parameter_names(model: nn.Module) -> set[str]:
    """Names (as model.named_parameters gives them) of every segmenter parameter in `model`."""
    from dcwdist.segmentation.segmenter import Segmenter
    ids = {id(p) for m in model.modules() if isinstance(m, Segmenter) for p in m.parameters()}
    return {name for name, p in model.named_parameters() if id(p) in ids}


def trainable_parameter_names(model: nn.Module, phase: str) -> set[str]:
    """Names of the parameters `phase` trains."""
    seg = segmenter_parameter_names(model)
    names = {name for name, _ in model.named_parameters()}
    if phase == "scorer":
        return seg
    if phase == "frozen":
        return names - seg
    if phase == "joint":
        return names
    raise ValueError(f"segmentation.phase must be scorer|joint|frozen, got {phase!r}")


def apply_phase(model: nn.Module, phase: str) -> list[nn.Parameter]:
    """Set requires_grad for `phase`; returns the trainable parameters (for the optimizer)."""
    keep = trainable_parameter_names(model, phase)
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(name in keep)
        if name in keep:
            params.append(p)
    return params
