"""What is alive on the GPU at a step's peak, grouped by the source line that allocated it.

    from memory_peak import record_peak_sites
    report = record_peak_sites(lambda: step(batch), top=15)

Runs fn once under torch.cuda.memory._record_memory_history (Python stacks), replays the
allocation trace to the moment the traced bytes peaked, and groups the blocks alive then by the
innermost frame in project code (dcwdist, kernels, benchmarks) or DeepSpeed. Tensors allocated
before fn (weights, optimizer state) are not in the trace: the report gives their total as
`allocated_before_gib`. train_step.py's --memory-sites puts this report in the row.
"""
from __future__ import annotations

import os
from typing import Callable, Iterable

ROOTS = ("/dcwdist/", "/kernels/", "/benchmarks/", "/data_pipelines/", "/deepspeed/")
GIB = 2 ** 30


def site_of(frames: Iterable[dict], roots: tuple = ROOTS) -> str:
    """'file.py:line function' of the innermost frame under one of `roots`, else of the
    innermost Python frame, else '?'. Frames come innermost first, as the allocator records."""
    frames = list(frames)
    for f in frames:
        name = f.get("filename", "")
        if any(r in name for r in roots) and "memory_peak.py" not in name:
            return f"{os.path.basename(name)}:{f.get('line')} {f.get('name')}"
    for f in frames:
        if f.get("filename", "").endswith(".py"):
            return f"{os.path.basename(f['filename'])}:{f.get('line')} {f.get('name')}"
    return "?"


def peak_sites(events: list, top: int = 15, roots: tuple = ROOTS) -> dict:
    """Replay allocator trace events ({'action', 'addr', 'size', 'frames'}; 'alloc' adds a block,
    'free_requested' removes it) to the peak of live traced bytes; group the blocks alive at the
    peak by site_of. Returns peak_traced_gib, the event index of the peak and the `top` sites."""
    live, total, peak, peak_at = {}, 0, 0, -1
    for i, e in enumerate(events):
        act = e.get("action")
        if act == "alloc":
            live[e["addr"]] = e["size"]
            total += e["size"]
            if total > peak:
                peak, peak_at = total, i
        elif act == "free_requested" and e["addr"] in live:
            total -= live.pop(e["addr"])
    alive: dict[int, dict] = {}
    for e in events[:peak_at + 1]:  # second pass: the blocks alive at the peak, with frames
        if e.get("action") == "alloc":
            alive[e["addr"]] = e
        elif e.get("action") == "free_requested":
            alive.pop(e["addr"], None)
    sites: dict[str, list] = {}
    for e in alive.values():
        s = sites.setdefault(site_of(e.get("frames", ()), roots), [0, 0])
        s[0] += e["size"]
        s[1] += 1
    ranked = sorted(sites.items(), key=lambda kv: -kv[1][0])[:top]
    return {"peak_traced_gib": round(peak / GIB, 3), "peak_event": peak_at,
            "top_sites": [{"site": k, "gib": round(b / GIB, 3), "bytes": b, "blocks": n}
                          for k, (b, n) in ranked]}


def record_peak_sites(fn: Callable[[], object], top: int = 15,
                      max_entries: int = 500_000) -> dict:
    """Run fn once on the current CUDA device with the allocation history on; peak_sites of it,
    plus allocated_before_gib and the device's peak_gib over fn."""
    import torch
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.memory._record_memory_history(enabled="all", context="alloc", stacks="python",
                                             max_entries=max_entries)
    try:
        fn()
        torch.cuda.synchronize()
        snap = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    events = snap["device_traces"][torch.cuda.current_device()]
    report = peak_sites(events, top)
    report.update(allocated_before_gib=round(before / GIB, 3),
                  peak_gib=round(torch.cuda.max_memory_allocated() / GIB, 3),
                  trace_events=len(events), trace_full=len(events) >= max_entries)
    return report
