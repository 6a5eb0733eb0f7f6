"""benchmarks/cp_comm.py's byte model equals the bytes a real CP run sends (counted per call)."""
import importlib.util
import os

import pytest
import torch

from dcwdist.attention.context import AttnContext
from dcwdist.attention.dcw import DCWAttention
from dcwdist.parallel.comm import CommCounter
from dcwdist.parallel.ring import dense_step_layouts, ring_attention
from dcwdist.parallel.zigzag import CPShard, shard_tensor
from tests.conftest import REPO
from tests.cp_helpers import spawn
from tests.test_cp_attention import B, D, H, HKV, T, _dcw_setup, _qkv, packed_docs


def bench():
    spec = importlib.util.spec_from_file_location(
        "cp_comm", os.path.join(REPO, "benchmarks", "cp_comm.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def check_counted_bytes(rank, world, group):
    model = bench()
    dtype = torch.float64  # K/V travel as 8-byte values, dK/dV as fp32: both conventions show
    q, k, v, _ = _qkv(dtype)
    # dense ring
    doc = packed_docs(T)
    counter = CommCounter()
    shard = CPShard(group, world, rank, T, doc, doc * 0, counter=counter)
    ql, kl, vl = (shard_tensor(t, world, rank).requires_grad_() for t in (q, k, v))
    out, _ = ring_attention(ql, kl, vl, dense_step_layouts(shard, 64), shard)
    out.sum().backward()
    assert dict(counter.bytes) == model.ring_bytes(B, T, world, HKV, D, 8)
    # DCW layer: ring + strided keys + core summaries
    cfg, doc, tiers, scores = _dcw_setup(dtype)
    counter = CommCounter()
    shard = CPShard(group, world, rank, T, doc, doc * 0, counter=counter)
    ql, kl, vl = (shard_tensor(t, world, rank).requires_grad_() for t in (q, k, v))
    mod = DCWAttention(cfg, 0, H, HKV, D).to(dtype)
    ctx = AttnContext(doc_ids=shard_tensor(doc, world, rank), positions=doc * 0, tiers=tiers,
                      block_scores=scores, group=group, cache={"cp_shard": shard})
    mod(ql, kl, vl, ctx).sum().backward()
    want = model.dcw_bytes(cfg, doc, tiers, world, H, HKV, D, 8, rank=rank)["breakdown"]
    assert dict(counter.bytes) == want, (dict(counter.bytes), want)  # cp_core auto's pick
    assert all(want[k] > 0 for k in ("strided_fwd", "summary_fwd", "strided_bwd"))


@pytest.mark.parametrize("world", [2, 4])
def test_byte_model_matches_counted_bytes(world):
    spawn(world, [(check_counted_bytes, ())])


def test_benchmark_prints_one_json_line_per_case(capsys):
    assert bench().main(["--lengths", "32768", "--cp", "2,4"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4
    import json
    rows = [json.loads(x) for x in lines]
    assert {(r["cp"], r["kind"]) for r in rows} == {(2, "dense"), (2, "dcw"), (4, "dense"),
                                                    (4, "dcw")}
