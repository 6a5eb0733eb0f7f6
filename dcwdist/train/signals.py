"""Preemption: SIGTERM / SIGUSR1 ask the trainer to checkpoint at the end of the step and exit 0.

Slurm sends SIGUSR1 ahead of the time limit (`--signal=USR1@120`) and SIGTERM on preemption.
The signal may reach only some ranks, so the ranks agree (all-reduce) before acting.
"""
from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    def __init__(self):
        self.signame = None
        self._previous = {}

    @classmethod
    def install(cls) -> "StopRequest":
        req = cls()
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                req._previous[sig] = signal.signal(sig, req._handle)
        return req

    def _handle(self, signum, frame):
        self.signame = signal.Signals(signum).name

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def agreed(self) -> bool:
        """True on every rank if any rank was signalled."""
        flag = torch.tensor([1.0 if self.signame else 0.0])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() and not self.signame:
                self.signame = "a signal on another rank"
        return bool(flag.item())
