"""Evaluation: loss by position (positions), answer metrics (metrics), needle / kv / QA tasks
(tasks), RULER jsonl files (ruler), heat-maps (heatmap), prefill speed and FLOPs (speed),
KV-cache generation with eviction (generate, kvcache) and the `dcwdist eval --suite` driver
(suite). Import the heavier modules directly; this package stays light for the trainer."""
from dcwdist.eval.positions import format_table, loss_by_position

__all__ = ["format_table", "loss_by_position"]
