"""Where a run reports: TensorBoard scalars and a progress bar."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class LoggingConfig:
    """Run directory and logging."""

    run_dir: str = "runs/{name}"
    """Output folder; {name} is the job name."""
    tensorboard: bool = True
    """Write TensorBoard event files under RUN_DIR/tb."""
    log_every: int = 1
    """Steps between scalar writes."""
    progress: bool = True
    """Show a progress bar (tokens/s, loss) on rank 0."""


class ScalarLog:
    """TensorBoard writer that tolerates being disabled (non-zero ranks, tensorboard off)."""

    def __init__(self, log_dir: Optional[str]):
        self.writer = None
        if log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=log_dir)

    def scalars(self, values: dict, step: int) -> None:
        if self.writer is None:
            return
        for key, value in values.items():
            self.writer.add_scalar(key, float(value), step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
