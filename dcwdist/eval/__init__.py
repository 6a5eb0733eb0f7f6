"""Evaluation: loss by position (more suites plug in here)."""
from dcwdist.eval.positions import format_table, loss_by_position

__all__ = ["format_table", "loss_by_position"]
