"""Brute-force oracle of the attention contract, token by token, independent of the layout code.

Other tests/test_attention_*.py import these helpers. The oracle itself is checked here against
/work/shared/contract/dcw_patterns.json, so a wrong oracle cannot bless a wrong layout.
"""
import json
import math
from pathlib import Path

import torch

CONTRACT = Path(__file__).resolve().parents[2] / "shared" / "contract" / "dcw_patterns.json"
if not CONTRACT.exists():
    CONTRACT = Path("/work/shared/contract/dcw_patterns.json")
TIER = {"core": 0, "buffer": 1, "background": 2}


def doc_pos(doc):
    """Position of each token from its document's start (list of ints)."""
    out = []
    for t, d in enumerate(doc):
        out.append(0 if t == 0 or doc[t - 1] != d else out[-1] + 1)
    return out


def same_doc(doc, i, j):
    return doc[i] >= 0 and doc[i] == doc[j]


def mask_from(doc, rule):
    T = len(doc)
    return torch.tensor([[j <= i and same_doc(doc, i, j) and rule(i, j) for j in range(T)]
                         for i in range(T)])


def dense_mask(doc):
    return mask_from(doc, lambda i, j: True)


def window_mask(doc, w):
    return mask_from(doc, lambda i, j: i - j < w)


def static_mask(doc, w, num_global):
    p = doc_pos(doc)
    return mask_from(doc, lambda i, j: i - j < w or p[j] < num_global)


def dcw_local_mask(doc, tiers, blk, w, bw, stride):
    p = doc_pos(doc)

    def rule(i, j):
        tier = tiers[i // blk]
        if tier == 0:
            return True
        if tier == 1:
            return i - j < bw or (p[j] % stride == 0 and j <= i - bw)
        return i - j < w
    return mask_from(doc, rule)


def dcw_summaries(doc, tiers, blk, pool):
    """For each query i: list of (start, end) token ranges of its visible core summaries."""
    T, out = len(doc), []
    for i in range(T):
        b, rng = i // blk, []
        if doc[i] >= 0 and tiers[b] != 0:
            for c in range(b):
                if tiers[c] == 0 and doc[c * blk] == doc[i]:
                    for s in range(c * blk, (c + 1) * blk, pool):
                        if any(doc[t] >= 0 for t in range(s, s + pool)):
                            rng.append((s, s + pool))
        out.append(rng)
    return out


def block_topk_mask(q, k, doc, blk, topk):
    """[G, T, T] masks of block_topk per kv-head group for one row: q [T,H,D], k [T,Hkv,D].

    topk: int or list per query block (CAA)."""
    T, H, D = q.shape
    Hkv, NB = k.shape[1], T // blk
    masks = torch.zeros(Hkv, T, T, dtype=torch.bool)
    for g in range(Hkv):
        heads = range(g * (H // Hkv), (g + 1) * (H // Hkv))

        def pooled(x, b, hs):
            toks = [t for t in range(b * blk, (b + 1) * blk) if doc[t] >= 0]
            if not toks:
                return torch.zeros(D)
            return torch.stack([x[t, h] for t in toks for h in hs]).mean(0)
        for qb in range(NB):
            kk = topk if isinstance(topk, int) else topk[qb]
            qm = pooled(q, qb - 1, heads) if qb > 0 else torch.zeros(D)  # causal: last full block
            cands = [(float((qm @ pooled(k, c, [g])).detach()), c) for c in range(qb)
                     if doc[c * blk] == doc[qb * blk]]
            chosen = [c for _, c in sorted(cands, reverse=True)[:kk]] + [qb]
            for i in range(qb * blk, (qb + 1) * blk):
                for c in chosen:
                    for j in range(c * blk, (c + 1) * blk):
                        masks[g, i, j] = j <= i and same_doc(doc, i, j)
    return masks


def softmax_attention(q, k, v, mask, scale=None):
    """One row: q [T,H,D], k/v [S,Hkv,D], mask [T,S] or [Hkv,T,S] -> out [T,H,D] (empty rows 0)."""
    T, H, D = q.shape
    Hkv = k.shape[1]
    scale = D ** -0.5 if scale is None else scale
    outs = []
    for h in range(H):
        g = h // (H // Hkv)
        m = mask if mask.dim() == 2 else mask[g]
        s = (q[:, h] @ k[:, g].T) * scale
        s = s.masked_fill(~m, float("-inf"))
        p = torch.softmax(s, -1).nan_to_num(0.0) * m.any(-1, keepdim=True)
        outs.append(p @ v[:, g])
    return torch.stack(outs, 1)


def summary_kv(x, doc, ranges):
    """Mean of real tokens of each range: x [T,Hkv,D] -> [len(ranges), Hkv, D]."""
    return torch.stack([torch.stack([x[t] for t in range(s, e) if doc[t] >= 0]).mean(0)
                        for s, e in ranges]) if ranges else x[:0]


def dcw_oracle(q, k, v, doc, tiers, cfg, alpha, scores=None):
    """Full DCW output for one row: local softmax + alpha * cross-tier softmax over summaries."""
    blk = cfg.block_size
    mask = dcw_local_mask(doc, tiers, blk, cfg.window, cfg.buffer_window, cfg.stride)
    out = softmax_attention(q, k, v, mask)
    sums = dcw_summaries(doc, tiers, blk, cfg.summary_pool)
    cross = []
    for i, rng in enumerate(sums):
        if not rng:
            cross.append(torch.zeros_like(q[i]))
            continue
        ks, vs = summary_kv(k, doc, rng), summary_kv(v, doc, rng)
        if scores is not None:  # straight-through weight of the summary's core block
            w = torch.stack([1 + scores[s // blk] - scores[s // blk].detach() for s, _ in rng])
            vs = vs * w[:, None, None]
        cross.append(softmax_attention(q[i:i + 1], ks, vs, torch.ones(1, len(rng), dtype=torch.bool))[0])
    return out + alpha * torch.stack(cross)


def caa_choices(n, candidates, blk, c):
    """CAA's per-document local width and global k, from the contract's rule (caa.py docstring)."""
    wide = [w for w in sorted(candidates) if w >= 4 * math.sqrt(n)]
    return (wide[0] if wide else max(candidates)), max(1, round(c * math.sqrt(n) / blk))


def test_oracle_reproduces_contract():
    for case in json.loads(CONTRACT.read_text())["cases"]:
        p, doc = case["params"], case["doc_ids"]
        tiers = [TIER[t] for t in case["tiers"]]
        mask = dcw_local_mask(doc, tiers, p["B"], p["window"], p["buffer_window"], p["stride"])
        sums = dcw_summaries(doc, tiers, p["B"], p["summary_pool"])
        for qy in case["queries"]:
            i = qy["i"]
            assert torch.nonzero(mask[i]).flatten().tolist() == qy["keys"], (case["name"], i)
            assert [list(r) for r in sums[i]] == qy["summaries"], (case["name"], i)
