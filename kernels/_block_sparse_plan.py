"""What the block-sparse kernels read besides q/k/v: a BlockLayout flattened per entry, and tuning.

Per CSR entry (forward: query block -> key block; transposed: key block -> query block) the plan
holds the block index, the delta bounds [lo, hi) of its mode (delta = q_pos - k_pos; WINDOW /
FAR entries take their window / far from layout.entry_bound when set, else layout.window /
layout.far) and a flag:
bit 0 set unless every token pair of the tile passes (decided from per-block position and
document ranges, so full interior blocks skip all mask work), bit 1 when the document test is
needed. Rows are launched heaviest first (longest CSR row first) so the long causal rows of a
sparse pattern do not trail at the end of the grid. Plans are cached per (layout object, device)
and dropped with the layout: layouts are treated as immutable.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from dcwdist.attention.layout import MODE_CAUSAL, MODE_FAR, MODE_FULL, MODE_WINDOW, BlockLayout

_BIG = 1 << 30
FLAG_MASK, FLAG_DOC = 1, 2


@dataclass
class EntryCSR:
    indptr: torch.Tensor
    """int32 [R + 1]."""
    split: torch.Tensor
    """int32 [R] first masked entry of each row (unmasked entries come first)."""
    blk: torch.Tensor
    """int32 [nnz] key block (forward) or query block (transposed)."""
    lo: torch.Tensor
    """int32 [nnz] smallest allowed delta ([nnz, span] in a spanning CSR: one per layout
    block of the program's tile, _BIG where that block has no entry)."""
    hi: torch.Tensor
    """int32 [nnz] first disallowed delta ([nnz, span] likewise, -_BIG where absent)."""
    flag: torch.Tensor
    """int32 [nnz] FLAG_MASK | FLAG_DOC."""
    order: torch.Tensor
    """int32 [R] rows, longest first (launch order)."""
    row_bucket: int = 0
    """floor(log4) of the mean entries per non-empty row: part of the kernels' tuning key."""


@dataclass
class KernelPlan:
    fwd: EntryCSR
    bwd: EntryCSR
    q_pos: torch.Tensor
    """int32 [B, Tq]."""
    k_pos: torch.Tensor
    """int32 [B, Tk]."""
    q_doc: torch.Tensor
    """int32 [B, Tq] (q_pos when the layout has no documents: never read then)."""
    k_doc: torch.Tensor
    has_doc: bool
    groups: int
    num_q_blocks: int
    num_k_blocks: int
    q_block: int
    k_block: int
    interpret: bool
    """Not on CUDA, so Triton runs interpreted: no tuning, small tiles."""
    spans: dict = field(default_factory=dict)
    """(side, span) -> a CSR over tiles of `span` adjacent blocks (spanned_csr)."""


_PLANS: dict[int, tuple[weakref.ref, dict[str, KernelPlan]]] = {}


def kernel_plan(layout: BlockLayout, device: torch.device) -> KernelPlan:
    """The plan of `layout` on `device`, built on first use."""
    key = id(layout)
    hit = _PLANS.get(key)
    if hit is None or hit[0]() is not layout:
        hit = (weakref.ref(layout), {})
        _PLANS[key] = hit
        weakref.finalize(layout, _PLANS.pop, key, None)
    plan = hit[1].get(str(device))
    if plan is None:
        plan = _build(layout.to(device))
        hit[1][str(device)] = plan
    return plan


def _block_range(x_BT: torch.Tensor, blk: int):
    x = x_BT.view(x_BT.shape[0], -1, blk)
    return x.amin(-1), x.amax(-1)


def _entries(layout: BlockLayout, bg, qb, kb, mode, stats, bound=None):
    """Bounds and flags of entries (bg = b * G + g, query block, key block, MODE_*, and the
    entries' own window / far: layout.entry_bound in this order, or None for the layout's)."""
    dev = mode.device
    lo_tab = torch.tensor([-_BIG, 0, 0, layout.far], dtype=torch.int64, device=dev)
    hi_tab = torch.tensor([_BIG, _BIG, layout.window, _BIG], dtype=torch.int64, device=dev)
    assert (MODE_FULL, MODE_CAUSAL, MODE_WINDOW, MODE_FAR) == (0, 1, 2, 3)
    m = mode.long()
    lo, hi = lo_tab[m], hi_tab[m]
    if bound is not None:  # per-entry window (hi of WINDOW) / far (lo of FAR)
        bound = bound.long().clamp(-_BIG, _BIG)
        lo = torch.where(m == MODE_FAR, bound, lo)
        hi = torch.where(m == MODE_WINDOW, bound, hi)
    b = bg // layout.groups
    (qmin, qmax), (kmin, kmax) = stats["q_pos"], stats["k_pos"]
    d_min = qmin[b, qb] - kmax[b, kb]
    d_max = qmax[b, qb] - kmin[b, kb]
    need_mask = ~((d_min >= lo) & (d_max < hi))
    need_doc = torch.zeros_like(need_mask)
    if "q_doc" in stats:
        (qdmin, qdmax), (kdmin, kdmax) = stats["q_doc"], stats["k_doc"]
        uniform = ((qdmin[b, qb] == qdmax[b, qb]) & (kdmin[b, kb] == kdmax[b, kb])
                   & (qdmin[b, qb] == kdmin[b, kb]) & (kdmin[b, kb] >= 0))
        need_doc = ~uniform
    flag = (need_mask | need_doc).int() * FLAG_MASK + need_doc.int() * FLAG_DOC
    return lo.int(), hi.int(), flag.int()


def _csr(indptr, rows, blk, lo, hi, flag) -> EntryCSR:
    """Entries of each row reordered unmasked first; split[row] = its first masked entry."""
    counts = indptr[1:] - indptr[:-1]
    masked = (flag & FLAG_MASK) != 0
    perm = torch.argsort(rows * 2 + masked.long(), stable=True)
    unmasked_per_row = torch.zeros_like(counts).index_add_(0, rows, (~masked).long())
    order = torch.argsort(counts, descending=True, stable=True)
    busy = int((counts > 0).sum())
    mean = blk.numel() / max(busy, 1)
    return EntryCSR(row_bucket=int(math.log(max(mean, 1.0), 4)),
                    indptr=indptr.int().contiguous(),
                    split=(indptr[:-1] + unmasked_per_row).int().contiguous(),
                    blk=blk[perm].int().contiguous(), lo=lo[perm].contiguous(),
                    hi=hi[perm].contiguous(), flag=flag[perm].contiguous(),
                    order=order.int().contiguous())


def _build(layout: BlockLayout) -> KernelPlan:
    for name in ("q_pos", "k_pos"):
        pos = getattr(layout, name)
        if pos.numel() and int(pos.abs().max()) >= _BIG // 2:
            raise ValueError(f"layout.{name} beyond +-2^29: positions are int32 in the kernel")
    has_doc = layout.q_doc is not None and layout.k_doc is not None
    stats = {"q_pos": _block_range(layout.q_pos, layout.q_block),
             "k_pos": _block_range(layout.k_pos, layout.k_block)}
    if has_doc:
        stats["q_doc"] = _block_range(layout.q_doc, layout.q_block)
        stats["k_doc"] = _block_range(layout.k_doc, layout.k_block)
    NQ, NK = layout.num_q_blocks, layout.num_k_blocks
    rows = torch.repeat_interleave(torch.arange(layout.indptr.numel() - 1,
                                                device=layout.indptr.device),
                                   layout.indptr[1:] - layout.indptr[:-1])
    kb = layout.kv_block.long()
    fwd = _csr(layout.indptr, rows, kb,
               *_entries(layout, rows // NQ, rows % NQ, kb, layout.mode, stats,
                         layout.entry_bound))
    tr = layout.transpose()
    cols = torch.repeat_interleave(torch.arange(tr.indptr.numel() - 1, device=tr.indptr.device),
                                   tr.indptr[1:] - tr.indptr[:-1])
    qb = tr.q_block_idx.long()
    bwd = _csr(tr.indptr, cols, qb,
               *_entries(layout, cols // NK, qb, cols % NK, tr.mode, stats, tr.bound))
    q_pos, k_pos = layout.q_pos.int().contiguous(), layout.k_pos.int().contiguous()
    return KernelPlan(
        fwd=fwd, bwd=bwd, q_pos=q_pos, k_pos=k_pos,
        q_doc=layout.q_doc.int().contiguous() if has_doc else q_pos,
        k_doc=layout.k_doc.int().contiguous() if has_doc else k_pos,
        has_doc=has_doc, groups=layout.groups, num_q_blocks=NQ, num_k_blocks=NK,
        q_block=layout.q_block, k_block=layout.k_block,
        interpret=layout.indptr.device.type != "cuda")


def spanned_csr(plan: KernelPlan, side: str, span: int) -> EntryCSR:
    """plan.fwd (side "fwd": rows are query blocks) or plan.bwd ("bwd": rows are key blocks)
    with each row widened to `span` adjacent blocks of one group.

    With 64-token layout blocks a program's tile holds 64 rows, so each tile of the other side
    it loads serves 64 rows; FlashAttention-2 holds 128 queries in its forward and 128 keys in
    its dK/dV pass. A spanning program holds blocks [j * span, (j + 1) * span) and walks the
    union of their rows; an entry keeps each block's own delta bounds (lo/hi [nnz, span]), and
    a block missing from it gets an empty range, so its pairs are masked. An entry is unmasked
    only when every block is present and unmasked. The row count per group must be a multiple
    of span. Built once per (side, span), kept on the plan.
    """
    hit = plan.spans.get((side, span))
    if hit is not None:
        return hit
    t, n_rows, n_other = ((plan.fwd, plan.num_q_blocks, plan.num_k_blocks) if side == "fwd"
                          else (plan.bwd, plan.num_k_blocks, plan.num_q_blocks))
    if span < 2 or n_rows % span:
        raise ValueError(f"span {span} must be >= 2 and divide the {n_rows} blocks of a row "
                         f"group ({side})")
    NS = n_rows // span
    dev = t.indptr.device
    R = t.indptr.numel() - 1  # B * G * n_rows rows
    row = torch.repeat_interleave(torch.arange(R, device=dev),
                                  (t.indptr[1:] - t.indptr[:-1]).long())
    sup = (row // n_rows) * NS + (row % n_rows) // span  # spanning row of the entry
    sub = (row % n_rows) % span  # its block inside the span
    key = sup * n_other + t.blk.long()
    uniq, inv = torch.unique(key, return_inverse=True)  # sorted: by spanning row, then block
    U = uniq.numel()
    lo = torch.full((U, span), _BIG, dtype=torch.int32, device=dev)
    hi = torch.full((U, span), -_BIG, dtype=torch.int32, device=dev)
    lo[inv, sub] = t.lo
    hi[inv, sub] = t.hi
    present = torch.bincount(inv, minlength=U)
    flag = torch.zeros(U, dtype=torch.int32, device=dev).scatter_reduce(
        0, inv, t.flag, "amax", include_self=True)
    flag = torch.where(present < span, flag | FLAG_MASK, flag)
    rows = uniq // n_other
    indptr = torch.zeros(R // span + 1, dtype=torch.long, device=dev)
    indptr[1:] = torch.bincount(rows, minlength=R // span).cumsum(0)
    csr = _csr(indptr, rows, uniq % n_other, lo, hi, flag)
    plan.spans[(side, span)] = csr
    return csr


def sub_tiles(block: int, tile: int) -> int:
    """Tiles of `tile` tokens one layout block spans (1 when the block is padded into a tile)."""
    return max(block // tile, 1)


_TUNED: dict[tuple, tuple] = {}
_TIMINGS: dict[tuple, list] = {}
"""key -> [(ms, config)] of every config timed for it, fastest first."""
AUTOTUNE = True
"""Time every fitting config once per key on CUDA; False: take the first (tests: fewer compiles)."""
LONG_RUN_MS = 1000.0
"""Once NARROW_TO configs are timed and the fastest took this long, tuning stops: at 2M tokens
one dK/dV run takes ~10 s, and ~12 candidates timed twice each would not fit a 10-minute job."""
NARROW_TO = 3
AGREED_RUN_MS = 100.0
"""When at least two related classes are tuned and all chose the same tile, and that tile's run
takes this long, tuning stops after timing it alone. On the H200 every class of the 100M and 1B
models, 32k to 512k, chose the same tile per kernel, while full tuning of each new (length, row)
class at 512k cost ~2 runs of ~12 candidates for ~12 keys in the first step."""


def launch_tuned(kernel, key: tuple, configs: list, grid: Callable[[tuple], tuple], args,
                 consts: dict, before: Optional[Callable[[], object]] = None) -> None:
    """Launch `kernel` with the fastest of `configs` (BLOCK_M, BLOCK_N, warps, stages) for `key`.

    args: a tuple, or a function of the config (a config may walk another CSR). Timed once per
    key (_time_ms; every kernel here only stores its outputs, so re-running it is harmless); a
    single candidate, or the interpreter, skips timing. Candidates run in the order of the
    nearest tuned class (candidate_order), and long kernels stop after NARROW_TO (pick_config).
    """
    if not configs:
        raise ValueError(f"no kernel tile fits layout blocks for {key}")

    def run(cfg):
        bm, bn, warps, stages = cfg
        if before is not None:  # e.g. zero an atomic accumulator: every run starts clean
            before()
        kernel[grid(cfg)](*(args(cfg) if callable(args) else args), **consts, BLOCK_M=bm,
                          BLOCK_N=bn, num_warps=warps, num_stages=stages)

    best = _TUNED.get(key)
    if best is not None and best not in configs:
        # Same problem class, but this layout's block count does not take the tuned tile's span
        # (e.g. 13 key blocks after a class with 14): tune the fitting tiles under its own key.
        key = key + (tuple(configs),)
        best = _TUNED.get(key)
    if best is None:
        if len(configs) == 1 or not AUTOTUNE:
            best = configs[0]
        else:
            best = pick_config(key, configs, lambda cfg: _time_ms(lambda: run(cfg)))
        _TUNED[key] = best
    run(best)


def _related(key: tuple) -> list:
    """Tuned classes of the same kernel, dtype, head dim, blocks and documents."""
    return [k for k in _TIMINGS if k[:6] == key[:6] and k != key]


def candidate_order(key: tuple, configs: list) -> list:
    """configs, those ranked for the nearest tuned class first (fastest first), then the rest in
    their given order. Nearest: same kernel, dtype, head dim, blocks and documents, the largest
    (length, row) buckets: the longest problem timed so far."""
    related = _related(key)
    if not related:
        return list(configs)
    ranked = [cfg for _, cfg in _TIMINGS[max(related, key=lambda k: tuple(k[6:]))]
              if cfg in configs]
    return ranked + [cfg for cfg in configs if cfg not in ranked]


def pick_config(key: tuple, configs: list, time_ms: Callable[[tuple], float]) -> tuple:
    """The fastest config by time_ms(config); after NARROW_TO timed configs, stops once the
    fastest so far took LONG_RUN_MS or more, and after one when the related classes agree on it
    and it took AGREED_RUN_MS (see there). A config that needs more resources than the GPU has
    is skipped. Timings are kept for candidate_order."""
    related = _related(key)
    winners = {_TIMINGS[k][0][1] for k in related}
    agreed = len(related) >= 2 and len(winners) == 1
    timings = []
    for cfg in candidate_order(key, configs):
        if len(timings) >= NARROW_TO and min(timings)[0] >= LONG_RUN_MS:
            break
        if (agreed and len(timings) == 1 and timings[0][1] in winners
                and timings[0][0] >= AGREED_RUN_MS):
            break
        try:
            timings.append((time_ms(cfg), cfg))
        except Exception as err:  # e.g. a tile that needs more shared memory than exists
            if "OutOfResources" not in type(err).__name__ and "resources" not in str(err):
                raise
    if not timings:
        raise RuntimeError(f"no config of {configs} could run for {key}")
    timings.sort(key=lambda t: t[0])
    _TIMINGS[key] = timings
    return timings[0][1]


def _time_ms(fn: Callable[[], None], long_ms: float = 20.0) -> float:
    """Milliseconds of one fn() on the current CUDA stream. One run compiles and warms up, one
    is timed; a run shorter than `long_ms` goes to triton's do_bench (many repetitions). At long
    sequences one launch takes 0.1-1 s, and do_bench's minimum of ~7 runs per config made the
    first step at 512k tokens 4x slower than the next."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    ms = start.elapsed_time(end)
    if ms >= long_ms:
        return ms
    from triton.testing import do_bench
    return do_bench(fn, warmup=5, rep=20)


def tuned_configs() -> dict:
    """Chosen config per tuning key (for benchmark reports)."""
    return dict(_TUNED)
