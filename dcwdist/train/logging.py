"""Where a run reports: TensorBoard scalars and a progress bar."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


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
    peak_tflops: float = 0.0
    """Per-device peak for MFU; 0 picks the bf16 dense peak of known GPUs (none on CPU)."""


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


KNOWN_PEAKS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # bf16 dense TFLOP/s per device


def peak_tflops(configured: float, device: torch.device) -> float:
    if configured or device.type != "cuda":
        return configured
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in KNOWN_PEAKS.items() if k in name), 0.0)


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated GPU memory, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def read_scalars(run_dir: str, missing_ok: bool = False) -> dict[str, list[tuple[int, float]]]:
    """Every TensorBoard scalar under RUN_DIR/tb: {tag: [(step, value), ...]}."""
    import os

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb_dir = os.path.join(run_dir, "tb")
    if not os.path.isdir(tb_dir):
        if missing_ok:
            return {}
        raise FileNotFoundError(f"{run_dir} has no tb/ folder (was logging.tensorboard off?)")
    acc = EventAccumulator(tb_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def last_scalars(run_dir: str) -> list[dict]:
    """Last value of every TensorBoard scalar under RUN_DIR/tb (for `dcwdist tb`)."""
    return [{"scalar": tag, "step": series[-1][0], "value": f"{series[-1][1]:.6g}"}
            for tag, series in sorted(read_scalars(run_dir).items())]


# measured, not computed: these differ between identical runs and are left out of a comparison
MEASURED = ("tokens_per_s", "peak_mem", "mfu", "step_s", "time")


def compare_scalars(run_a: str, run_b: str) -> list[dict]:
    """Per scalar logged by both runs (timings left out): the steps both logged, how many
    differ, the first that does, and the largest |a - b| (`dcwdist tb A --against B`: are two
    runs of one seed the same run?)."""
    a, b = read_scalars(run_a), read_scalars(run_b)
    rows = []
    for tag in sorted(set(a) & set(b)):
        if any(m in tag for m in MEASURED):
            continue
        vb = dict(b[tag])
        pairs = [(step, v, vb[step]) for step, v in a[tag] if step in vb]
        diffs = [(step, abs(x - y)) for step, x, y in pairs if x != y]
        rows.append({"scalar": tag, "steps": len(pairs), "differ": len(diffs),
                     "first_differing_step": diffs[0][0] if diffs else "-",
                     "max_abs_diff": f"{max(d for _, d in diffs):.3g}" if diffs else "0"})
    if not rows:
        raise ValueError(f"{run_a} and {run_b} logged no scalar in common")
    return rows
