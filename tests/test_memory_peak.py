"""benchmarks/memory_peak.py: replaying an allocator trace to its peak names what was alive
then, by the innermost project frame that allocated it."""
import os
import sys

from tests.conftest import REPO

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
from memory_peak import peak_sites, site_of  # noqa: E402


def frame(file, line, name):
    return {"filename": file, "line": line, "name": name}


ATTN = [frame("/x/torch/nn/functional.py", 10, "linear"),
        frame("/r/dcwdist/model/attention.py", 42, "forward")]
MLP = [frame("/r/dcwdist/model/mlp.py", 7, "forward")]
LOSS = [frame("/r/dcwdist/model/loss.py", 99, "chunked_ce")]


def ev(action, addr, size=0, frames=()):
    return {"action": action, "addr": addr, "size": size, "frames": list(frames)}


def test_site_is_the_innermost_project_frame():
    assert site_of(ATTN) == "attention.py:42 forward"
    assert site_of([frame("/x/torch/autograd/graph.py", 3, "run")]) == "graph.py:3 run"
    assert site_of([]) == "?"


def test_peak_counts_only_blocks_alive_at_the_peak():
    events = [ev("alloc", 1, 100, ATTN), ev("alloc", 2, 300, MLP),
              ev("free_requested", 2), ev("free_completed", 2),
              ev("alloc", 3, 250, LOSS), ev("alloc", 4, 50, ATTN),  # peak: 1 + 3 + 4 = 400
              ev("free_requested", 3), ev("alloc", 5, 120, MLP)]
    r = peak_sites(events)
    assert r["peak_event"] == 1  # 400 bytes first reached by alloc 2 (100 + 300)
    events[1]["size"] = 200  # now 1 + 2 = 300 < 1 + 3 + 4 = 400
    r = peak_sites(events)
    assert r["peak_event"] == 5
    got = {s["site"]: (s["bytes"], s["blocks"]) for s in r["top_sites"]}
    assert got == {"loss.py:99 chunked_ce": (250, 1), "attention.py:42 forward": (150, 2)}
