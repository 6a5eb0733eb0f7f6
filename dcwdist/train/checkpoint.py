"""Sharded checkpoints with atomic publication and fallback to the previous one.

Layout under the checkpoint folder:
    step00000040/            one tag per save; the backend writes its (sharded) files here
    step00000040/MANIFEST.json   written last by rank 0: every file with its size
    latest                   name of the newest complete tag (written via rename)
A tag without a manifest, or whose files no longer match it (truncated, missing), is torn:
resume skips it with one line and takes the previous complete one.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist

TAG_RE = re.compile(r"^step(\d{8})$")


@dataclass
class CheckpointConfig:
    """When and where checkpoints are written."""

    dir: str = ""
    """Checkpoint folder; empty means RUN_DIR/checkpoints."""
    every: int = 0
    """Save every N optimizer steps; 0 saves only at the end of each stage."""
    keep_last: int = 3
    """Complete checkpoints kept; older ones are pruned."""
    resume: str = "none"
    """none | auto (newest complete checkpoint, else start fresh) | a tag or path to resume from."""
    stop_at: int = 0
    """Stop after this optimizer step as a preemption would: checkpoint, exit 0 (0: off). For
    preemption drills and the demo's resume leg."""

    def __post_init__(self):
        if self.every < 0 or self.keep_last < 1 or self.stop_at < 0:
            raise ValueError("checkpoint.every and checkpoint.stop_at must be >= 0 and "
                             "checkpoint.keep_last >= 1")


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def _manifest(path: str) -> dict:
    files = {}
    for root, _, names in os.walk(path):
        for n in names:
            if n.startswith("MANIFEST.json"):
                continue
            full = os.path.join(root, n)
            files[os.path.relpath(full, path)] = os.path.getsize(full)
    return files


def check_complete(path: str) -> Optional[str]:
    """None if the tag at `path` is complete, else the reason it is not."""
    mf = os.path.join(path, "MANIFEST.json")
    if not os.path.exists(mf):
        return "no manifest (save did not finish)"
    try:
        with open(mf) as f:
            expected = json.load(f)["files"]
    except (OSError, ValueError, KeyError) as e:
        return f"unreadable manifest ({e})"
    for rel, size in expected.items():
        full = os.path.join(path, rel)
        if not os.path.exists(full):
            return f"missing {rel}"
        if os.path.getsize(full) != size:
            return f"{rel} is {os.path.getsize(full)} bytes, expected {size}"
    return None


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def saved_world_size(path: str) -> int:
    with open(os.path.join(path, "MANIFEST.json")) as f:
        return int(json.load(f).get("world_size", 1))


def _barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _all_ok(ok: bool) -> bool:
    """True only if every rank says ok (ranks must agree on a fallback)."""
    if not (dist.is_available() and dist.is_initialized()):
        return ok
    flag = torch.tensor([0 if ok else 1])
    dist.all_reduce(flag)
    return int(flag) == 0


class CheckpointManager:
    def __init__(self, cfg: CheckpointConfig, ckpt_dir: str, rank: int, echo: Callable = print):
        self.cfg = cfg
        self.dir = ckpt_dir
        self.rank = rank
        self.echo = echo

    def tags(self) -> list[str]:
        """Tags on disk, newest first."""
        if not os.path.isdir(self.dir):
            return []
        return sorted((t for t in os.listdir(self.dir) if TAG_RE.match(t)), reverse=True)

    def save(self, backend, step: int, client_state: dict, extra: dict[str, str]) -> str:
        """Every rank calls this. `extra` maps file names to text written into the tag by rank 0."""
        tag = tag_for(step)
        path = os.path.join(self.dir, tag)
        if self.rank == 0 and os.path.exists(path):
            shutil.rmtree(path)  # a torn earlier attempt at the same step
        _barrier()
        backend.save(self.dir, tag, client_state)
        _barrier()
        if self.rank == 0:
            for name, text in extra.items():
                with open(os.path.join(path, name), "w") as f:
                    f.write(text)
            files = _manifest(path)
            tmp = os.path.join(path, "MANIFEST.json.tmp")
            with open(tmp, "w") as f:
                json.dump({"step": step, "world_size": _world_size(), "files": files}, f,
                          indent=1)
            os.replace(tmp, os.path.join(path, "MANIFEST.json"))
            tmp = os.path.join(self.dir, "latest.tmp")
            with open(tmp, "w") as f:
                f.write(tag)
            os.replace(tmp, os.path.join(self.dir, "latest"))
            self._prune()
        _barrier()
        return tag

    def _prune(self) -> None:
        complete = [t for t in self.tags() if check_complete(os.path.join(self.dir, t)) is None]
        for old in complete[self.cfg.keep_last:]:
            shutil.rmtree(os.path.join(self.dir, old), ignore_errors=True)

    def resume(self, backend, which: str) -> Optional[dict]:
        """Load `which` (auto | tag | path); on auto, fall back past torn or unloadable tags."""
        if which == "none":
            return None
        if which != "auto":
            ckpt_dir, tag = (os.path.split(which.rstrip("/")) if os.sep in which
                             else (self.dir, which))
            reason = check_complete(os.path.join(ckpt_dir, tag))
            if reason:
                raise FileNotFoundError(f"checkpoint {os.path.join(ckpt_dir, tag)}: {reason}")
            return backend.load(ckpt_dir, tag, saved_world_size(os.path.join(ckpt_dir, tag)))
        for tag in self.tags():
            path = os.path.join(self.dir, tag)
            reason = check_complete(path)
            if reason is None:
                try:
                    state = backend.load(self.dir, tag, saved_world_size(path))
                    ok = True
                except Exception as e:  # a corrupt shard fails inside torch.load
                    reason, ok = f"failed to load ({type(e).__name__}: {str(e)[:120]})", False
                if _all_ok(ok):
                    self.echo(f"resuming from {path}")
                    return state
                reason = reason or "failed to load on another rank"
            self.echo(f"checkpoint {path} is incomplete or corrupt: {reason}; "
                      "falling back to the previous one")
        self.echo(f"no complete checkpoint in {self.dir}; starting fresh")
        return None


def save_model(state_dict: dict, path: str) -> None:
    """Atomic write of a model state dict (temp file, then rename)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    torch.save(state_dict, tmp)
    os.replace(tmp, path)
