"""Brute-force oracles of the memory family, token by token, independent of dcwdist.attention.

Every query's keys are listed explicitly (own-segment tokens and pooled units built by hand from
K/V slices), then one softmax per head. Rows are lists of document ids (-1 padding); documents
start at block boundaries.
"""
import torch


def doc_pos(doc):
    """Position of each token from its document's start."""
    out = []
    for t, d in enumerate(doc):
        out.append(0 if t == 0 or doc[t - 1] != d else out[-1] + 1)
    return out


def hier_units(P, S, levels, near):
    """Document-relative (start, size) of the units a query at position P sees, walking back
    from its segment start: each level but the last takes cells until it has `near` of them
    and stands on a boundary of the next level's cells; the last level takes the rest."""
    pos, out = P // S * S, []
    for li, (p, c) in enumerate(levels):
        lo = 0
        if li < len(levels) - 1:
            nxt, taken, lo = levels[li + 1][1], 0, pos
            while lo > 0 and (taken < near or lo % nxt):
                lo, taken = lo - c, taken + 1
        out += [(u, p) for u in range(lo, pos, p)]
        pos = lo
    return out


def memory_slots(P, S, M, budget):
    """(segment, slot) pairs a query at position P sees: the last `budget` of all earlier ones."""
    s = P // S
    every = [(sp, m) for sp in range(s) for m in range(M)]
    return every[max(0, len(every) - budget):]


def _attend(qi, keys, vals, rep):
    """qi [H, D]; keys / vals [n, Hkv, D] -> [H, D], one softmax per head."""
    D = qi.shape[-1]
    kk, vv = keys.repeat_interleave(rep, 1), vals.repeat_interleave(rep, 1)
    p = torch.softmax(torch.einsum("hd,nhd->hn", qi, kk) * D ** -0.5, -1)
    return torch.einsum("hn,nhd->hd", p, vv)


def oracle(q, k, v, docs, cfg, slot_queries=None):
    """Outputs [B, T, H, D] of hierarchical / compressed_memory for rows `docs` (lists)."""
    B, T, H, D = q.shape
    rep = H // k.shape[2]
    S = cfg.segment_size
    levels = [(cfg.segment_pool * cfg.hier_factor ** i,
               max(S, cfg.segment_pool * cfg.hier_factor ** i)) for i in range(cfg.hier_levels)]
    out = torch.zeros_like(q)
    for b in range(B):
        doc, dp = docs[b], doc_pos(docs[b])
        for i in range(T):
            if doc[i] < 0:
                continue
            P, ds = dp[i], i - dp[i]
            seg0 = ds + P // S * S
            local = [j for j in range(seg0, i + 1)
                     if cfg.kind == "hierarchical" or not cfg.memory_window
                     or i - j < cfg.memory_window]
            keys, vals = [k[b, j] for j in local], [v[b, j] for j in local]
            if cfg.kind == "hierarchical":
                for u, p in hier_units(P, S, levels, cfg.hier_near):
                    keys.append(k[b, ds + u:ds + u + p].mean(0))
                    vals.append(v[b, ds + u:ds + u + p].mean(0))
            else:
                M = cfg.memory_slots
                for sp, m in memory_slots(P, S, M, cfg.memory_budget):
                    if cfg.compressor == "mean":
                        a = ds + sp * S + m * (S // M)
                        keys.append(k[b, a:a + S // M].mean(0))
                        vals.append(v[b, a:a + S // M].mean(0))
                    else:  # softmax over the segment's tokens of <w_m, k_j> / sqrt(D), per head
                        a = ds + sp * S
                        seg_k, seg_v = k[b, a:a + S], v[b, a:a + S]
                        w = torch.softmax(torch.einsum("jhd,hd->jh", seg_k, slot_queries[m])
                                          * D ** -0.5, 0)
                        keys.append(torch.einsum("jh,jhd->hd", w, seg_k))
                        vals.append(torch.einsum("jh,jhd->hd", w, seg_v))
            out[b, i] = _attend(q[b, i], torch.stack(keys), torch.stack(vals), rep)
    return out


def key_counts(docs, T, cfg):
    """[B, T] keys each query reads (local + pooled), for the FLOPs and budget checks."""
    S = cfg.segment_size
    levels = [(cfg.segment_pool * cfg.hier_factor ** i,
               max(S, cfg.segment_pool * cfg.hier_factor ** i)) for i in range(cfg.hier_levels)]
    rows = []
    for doc in docs:
        dp, row = doc_pos(doc), []
        for i in range(T):
            if doc[i] < 0:
                row.append(0)
                continue
            P = dp[i]
            n_local = P - P // S * S + 1
            if cfg.kind == "hierarchical":
                row.append(n_local + len(hier_units(P, S, levels, cfg.hier_near)))
            else:
                if cfg.memory_window:
                    n_local = min(n_local, cfg.memory_window)
                row.append(n_local + len(memory_slots(P, S, cfg.memory_slots, cfg.memory_budget)))
        rows.append(row)
    return torch.tensor(rows)


def conv_reference(x_BTC, h_TC, doc):
    """Direct causal convolution within documents: y[t] = sum_{s <= t, same doc} h[t - s] x[s]."""
    T = x_BTC.shape[1]
    out = torch.zeros_like(x_BTC)
    for b in range(x_BTC.shape[0]):
        for t in range(T):
            if doc[b][t] < 0:
                continue
            src = torch.tensor([s for s in range(t + 1) if doc[b][s] == doc[b][t]])
            out[b, t] = (h_TC[t - src] * x_BTC[b, src]).sum(0)
    return out
