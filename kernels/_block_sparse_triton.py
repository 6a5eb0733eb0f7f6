"""Triton kernels of block-sparse flash attention (launched from kernels/block_sparse.py).

Legend: M query tokens of one program's tile (BLOCK_M), N key tokens (BLOCK_N), D head dim.
Each CSR row lists its unmasked entries first (every token pair of the tile allowed: no mask
work) and its masked entries from split[row] on; a masked entry carries [lo, hi) bounds on
delta = q_pos - k_pos (its mode) and, with documents, the same-document test. The two kinds run
in two branch-free loops (one inner function, MASKED a constexpr). Layout blocks larger than a
tile are walked as (entry, sub-tile) pairs; a layout block under 16 tokens (tl.dot's minimum)
is padded inside a tile and the pad masked; a tile wider than a block of >= 16 tokens spans
SPAN adjacent blocks of the program's side and walks a spanning CSR whose entries carry one
[lo, hi) per block (_entry_bounds). Scores are kept in the log2 domain
(qk_scale = scale * log2 e); LSE is stored in natural log. Large offsets stay scalar int64 and
per-element offsets int32, and token strides are constexpr: int64 or runtime-stride element
offsets cost ~90 registers per thread and spill (ptxas -v, sm_90a).
"""
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _tile_ptrs(base, start, stride, rows, offs_d):
    """Pointers of a [rows, D] tile whose first token is `start`."""
    return base + start.to(tl.int64) * stride + rows[:, None] * stride + offs_d[None, :]


@triton.jit
def _load_tile(ptrs, tile, VALID: tl.constexpr, PAD: tl.constexpr):
    if PAD:
        return tl.load(ptrs, mask=(tile < VALID)[:, None], other=0.0)
    return tl.load(ptrs)


@triton.jit
def _tok_meta(pos_base, doc_base, start, tile, ok, PAD_DOC: tl.constexpr,
              HAS_DOC: tl.constexpr):
    """(positions, doc ids) of the tile's tokens from `start`; doc ids = positions without
    documents (unused then); masked-out lanes get doc PAD_DOC."""
    pos = tl.load(pos_base + start + tile, mask=ok, other=0)
    doc = pos
    if HAS_DOC:
        doc = tl.load(doc_base + start + tile, mask=ok, other=PAD_DOC)
    return pos, doc


@triton.jit
def _query_tile(pid, row_order, NQ, G, HPG, KV_RATIO, Q_BLOCK: tl.constexpr,
                BLOCK_M: tl.constexpr, SUB_M: tl.constexpr):
    """Program -> (CSR row, batch, query head, kv head, first query token of its tile)."""
    t = pid // HPG
    r = tl.load(row_order + t // SUB_M)
    bg = r // NQ
    b64 = (bg // G).to(tl.int64)
    h = (bg % G) * HPG + pid % HPG
    m_start = (r % NQ) * Q_BLOCK + (t % SUB_M) * BLOCK_M
    return r, b64, h, h // KV_RATIO, m_start


@triton.jit
def _allowed(q_pos, k_pos, q_doc, k_doc, lo, hi, HAS_DOC: tl.constexpr,
             KEYS_ON_ROWS: tl.constexpr):
    """Token mask of one tile: [M, N], or [N, M] with KEYS_ON_ROWS."""
    if KEYS_ON_ROWS:
        delta = q_pos[None, :] - k_pos[:, None]
    else:
        delta = q_pos[:, None] - k_pos[None, :]
    ok = (delta >= lo) & (delta < hi)
    if HAS_DOC:
        if KEYS_ON_ROWS:
            ok = ok & (q_doc[None, :] == k_doc[:, None]) & (k_doc[:, None] >= 0)
        else:
            ok = ok & (q_doc[:, None] == k_doc[None, :]) & (k_doc[None, :] >= 0)
    return ok


@triton.jit
def _entry_bounds(ent_lo, ent_hi, e, tile, BLOCK: tl.constexpr, SPAN: tl.constexpr):
    """[lo, hi) of entry e: scalars, or with SPAN > 1 one per row of the tile ([rows, 1]), each
    row taking the bounds of the layout block it lies in (spanning CSRs)."""
    if SPAN > 1:  # one return below: Triton types every return, even a pruned branch's
        at = e * SPAN + tile // BLOCK
        lo = tl.load(ent_lo + at)[:, None]
        hi = tl.load(ent_hi + at)[:, None]
    else:
        lo = tl.load(ent_lo + e)
        hi = tl.load(ent_hi + e)
    return lo, hi


@triton.jit
def _fwd_inner(acc, m_i, l_i, q, qp, qd, k_base, v_base, kpos_base, kdoc_base, ent_blk, ent_lo,
               ent_hi, it_lo, it_hi, s_kt, s_vt, qk_scale,
               K_BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
               SUB_N: tl.constexpr, PAD_N: tl.constexpr, MASKED: tl.constexpr,
               HAS_DOC: tl.constexpr, Q_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
               SPAN: tl.constexpr):
    tile_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    for it in range(it_lo, it_hi):  # (entry, sub-tile) pairs
        e = it // SUB_N
        n_start = tl.load(ent_blk + e) * K_BLOCK + (it % SUB_N) * BLOCK_N
        k = _load_tile(_tile_ptrs(k_base, n_start, s_kt, tile_n, offs_d), tile_n, K_BLOCK, PAD_N)
        v = _load_tile(_tile_ptrs(v_base, n_start, s_vt, tile_n, offs_d), tile_n, K_BLOCK, PAD_N)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        if PAD_N:
            s = tl.where((tile_n < K_BLOCK)[None, :], s, float("-inf"))
        if MASKED:
            kp, kd = _tok_meta(kpos_base, kdoc_base, n_start, tile_n, tile_n < K_BLOCK, -1,
                               HAS_DOC)
            lo, hi = _entry_bounds(ent_lo, ent_hi, e, tl.arange(0, BLOCK_M), Q_BLOCK, SPAN)
            ok = _allowed(qp, kp, qd, kd, lo, hi, HAS_DOC, False)
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_ref = m_new
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(s - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, row_order, indptr, split, ent_blk, ent_lo, ent_hi,
                q_pos, k_pos, q_doc, k_doc,
                s_qb, s_qt: tl.constexpr, s_qh, s_kb, s_kt: tl.constexpr, s_kh,
                s_vb, s_vt: tl.constexpr, s_vh, s_ob, s_ot: tl.constexpr, s_oh,
                H, Tq, Tk, G, NQ, HPG, KV_RATIO, qk_scale,
                Q_BLOCK: tl.constexpr, K_BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_DOC: tl.constexpr):
    SUB_M: tl.constexpr = Q_BLOCK // BLOCK_M if Q_BLOCK >= BLOCK_M else 1
    SUB_N: tl.constexpr = K_BLOCK // BLOCK_N if K_BLOCK >= BLOCK_N else 1
    SPAN: tl.constexpr = (BLOCK_M // Q_BLOCK if Q_BLOCK >= 16 else 1) if Q_BLOCK < BLOCK_M else 1
    PAD_M: tl.constexpr = (SPAN == 1) if Q_BLOCK < BLOCK_M else False
    PAD_N: tl.constexpr = K_BLOCK < BLOCK_N
    QUERY_TILE: tl.constexpr = Q_BLOCK * SPAN  # query tokens of one (spanning) CSR row
    r, b64, h, hk, m_start = _query_tile(tl.program_id(0), row_order, NQ, G, HPG, KV_RATIO,
                                         QUERY_TILE, BLOCK_M, SUB_M)
    tile_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = tile_m < QUERY_TILE
    q = _load_tile(_tile_ptrs(Q + b64 * s_qb + h * s_qh, m_start, s_qt, tile_m, offs_d), tile_m,
                   Q_BLOCK, PAD_M)
    qp, qd = _tok_meta(q_pos + b64 * Tq, q_doc + b64 * Tq, m_start, tile_m, row_ok, -2, HAS_DOC)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    start = tl.load(indptr + r)
    mid = tl.load(split + r)
    end = tl.load(indptr + r + 1)
    k_base = K + b64 * s_kb + hk * s_kh
    v_base = V + b64 * s_vb + hk * s_vh
    kpos_base = k_pos + b64 * Tk
    kdoc_base = k_doc + b64 * Tk
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, qp, qd, k_base, v_base, kpos_base, kdoc_base,
                               ent_blk, ent_lo, ent_hi, start * SUB_N, mid * SUB_N, s_kt, s_vt,
                               qk_scale, K_BLOCK, HEAD_DIM, BLOCK_N, SUB_N, PAD_N, False, HAS_DOC,
                               Q_BLOCK, BLOCK_M, SPAN)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, qp, qd, k_base, v_base, kpos_base, kdoc_base,
                               ent_blk, ent_lo, ent_hi, mid * SUB_N, end * SUB_N, s_kt, s_vt,
                               qk_scale, K_BLOCK, HEAD_DIM, BLOCK_N, SUB_N, PAD_N, True, HAS_DOC,
                               Q_BLOCK, BLOCK_M, SPAN)

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * LN2)
    o_ptrs = _tile_ptrs(O + b64 * s_ob + h * s_oh, m_start, s_ot, tile_m, offs_d)
    lse_ptrs = LSE + (b64 * H + h) * Tq + m_start + tile_m
    if PAD_M:
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None])
        tl.store(lse_ptrs, lse, mask=row_ok)
    else:
        tl.store(o_ptrs, out.to(O.dtype.element_ty))
        tl.store(lse_ptrs, lse)


@triton.jit
def _bwd_preprocess(O, DO, DLSE, DELTA, s_ob, s_ot: tl.constexpr, s_oh, s_db,
                    s_dt: tl.constexpr, s_dh, H, Tq,
                    BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
    """delta[b, h, t] = rowsum(dO * O) - dlse: the softmax-backward row term with LSE gradient."""
    pid_t = tl.program_id(0)
    bh = tl.program_id(1)
    b64 = (bh // H).to(tl.int64)
    h = bh % H
    tile = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    t_ok = pid_t * BLOCK + tile < Tq
    o = tl.load(_tile_ptrs(O + b64 * s_ob + h * s_oh, pid_t * BLOCK, s_ot, tile, offs_d),
                mask=t_ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(_tile_ptrs(DO + b64 * s_db + h * s_dh, pid_t * BLOCK, s_dt, tile, offs_d),
                 mask=t_ok[:, None], other=0.0).to(tl.float32)
    row = (b64 * H + h) * Tq + pid_t * BLOCK
    dlse = tl.load(DLSE + row + tile, mask=t_ok, other=0.0)
    tl.store(DELTA + row + tile, tl.sum(o * do, 1) - dlse, mask=t_ok)


@triton.jit
def _dq_inner(dq, q, do, lse2, delta, qp, qd, k_base, v_base, kpos_base, kdoc_base, ent_blk,
              ent_lo, ent_hi, it_lo, it_hi, s_kt, s_vt, qk_scale,
              K_BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
              SUB_N: tl.constexpr, PAD_N: tl.constexpr, MASKED: tl.constexpr,
              HAS_DOC: tl.constexpr, Q_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
              SPAN: tl.constexpr):
    tile_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    for it in range(it_lo, it_hi):
        e = it // SUB_N
        n_start = tl.load(ent_blk + e) * K_BLOCK + (it % SUB_N) * BLOCK_N
        k = _load_tile(_tile_ptrs(k_base, n_start, s_kt, tile_n, offs_d), tile_n, K_BLOCK, PAD_N)
        v = _load_tile(_tile_ptrs(v_base, n_start, s_vt, tile_n, offs_d), tile_n, K_BLOCK, PAD_N)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        p = tl.exp2(s - lse2[:, None])
        if PAD_N:
            p = tl.where((tile_n < K_BLOCK)[None, :], p, 0.0)
        if MASKED:
            kp, kd = _tok_meta(kpos_base, kdoc_base, n_start, tile_n, tile_n < K_BLOCK, -1,
                               HAS_DOC)
            lo, hi = _entry_bounds(ent_lo, ent_hi, e, tl.arange(0, BLOCK_M), Q_BLOCK, SPAN)
            ok = _allowed(qp, kp, qd, kd, lo, hi, HAS_DOC, False)
            p = tl.where(ok, p, 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    return dq


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, row_order, indptr, split, ent_blk, ent_lo,
                   ent_hi, q_pos, k_pos, q_doc, k_doc,
                   s_qb, s_qt: tl.constexpr, s_qh, s_kb, s_kt: tl.constexpr, s_kh,
                   s_vb, s_vt: tl.constexpr, s_vh, s_db, s_dt: tl.constexpr, s_dh,
                   H, Tq, Tk, G, NQ, HPG, KV_RATIO, qk_scale, scale,
                   Q_BLOCK: tl.constexpr, K_BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_DOC: tl.constexpr):
    """dQ over the forward CSR; DQ has Q's strides."""
    SUB_M: tl.constexpr = Q_BLOCK // BLOCK_M if Q_BLOCK >= BLOCK_M else 1
    SUB_N: tl.constexpr = K_BLOCK // BLOCK_N if K_BLOCK >= BLOCK_N else 1
    SPAN: tl.constexpr = (BLOCK_M // Q_BLOCK if Q_BLOCK >= 16 else 1) if Q_BLOCK < BLOCK_M else 1
    PAD_M: tl.constexpr = (SPAN == 1) if Q_BLOCK < BLOCK_M else False
    PAD_N: tl.constexpr = K_BLOCK < BLOCK_N
    QUERY_TILE: tl.constexpr = Q_BLOCK * SPAN  # query tokens of one (spanning) CSR row
    r, b64, h, hk, m_start = _query_tile(tl.program_id(0), row_order, NQ, G, HPG, KV_RATIO,
                                         QUERY_TILE, BLOCK_M, SUB_M)
    tile_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = tile_m < QUERY_TILE
    q = _load_tile(_tile_ptrs(Q + b64 * s_qb + h * s_qh, m_start, s_qt, tile_m, offs_d), tile_m,
                   Q_BLOCK, PAD_M)
    do = _load_tile(_tile_ptrs(DO + b64 * s_db + h * s_dh, m_start, s_dt, tile_m, offs_d),
                    tile_m, Q_BLOCK, PAD_M)
    row = (b64 * H + h) * Tq + m_start
    lse = tl.load(LSE + row + tile_m, mask=row_ok, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)  # empty rows: P = 0
    delta = tl.load(DELTA + row + tile_m, mask=row_ok, other=0.0)
    qp, qd = _tok_meta(q_pos + b64 * Tq, q_doc + b64 * Tq, m_start, tile_m, row_ok, -2, HAS_DOC)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    start = tl.load(indptr + r)
    mid = tl.load(split + r)
    end = tl.load(indptr + r + 1)
    k_base = K + b64 * s_kb + hk * s_kh
    v_base = V + b64 * s_vb + hk * s_vh
    kpos_base = k_pos + b64 * Tk
    kdoc_base = k_doc + b64 * Tk
    dq = _dq_inner(dq, q, do, lse2, delta, qp, qd, k_base, v_base, kpos_base, kdoc_base, ent_blk,
                   ent_lo, ent_hi, start * SUB_N, mid * SUB_N, s_kt, s_vt, qk_scale,
                   K_BLOCK, HEAD_DIM, BLOCK_N, SUB_N, PAD_N, False, HAS_DOC, Q_BLOCK, BLOCK_M,
                   SPAN)
    dq = _dq_inner(dq, q, do, lse2, delta, qp, qd, k_base, v_base, kpos_base, kdoc_base, ent_blk,
                   ent_lo, ent_hi, mid * SUB_N, end * SUB_N, s_kt, s_vt, qk_scale,
                   K_BLOCK, HEAD_DIM, BLOCK_N, SUB_N, PAD_N, True, HAS_DOC, Q_BLOCK, BLOCK_M,
                   SPAN)
    dq = dq * scale
    dq_ptrs = _tile_ptrs(DQ + b64 * s_qb + h * s_qh, m_start, s_qt, tile_m, offs_d)
    if PAD_M:
        tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])
    else:
        tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty))


@triton.jit
def _dkdv_inner(dk, dv, k, v, kp, kd, q_base, do_base, lse_base, delta_base, qpos_base,
                qdoc_base, dq_base, ent_blk, ent_lo, ent_hi, it_lo, it_hi, s_qt, s_dt,
                qk_scale, scale,
                Q_BLOCK: tl.constexpr, K_BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SUB_M: tl.constexpr,
                PAD_M: tl.constexpr, PAD_N: tl.constexpr, MASKED: tl.constexpr,
                HAS_DOC: tl.constexpr, ATOMIC_DQ: tl.constexpr, SPAN: tl.constexpr):
    tile_m = tl.arange(0, BLOCK_M)
    tile_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    for it in range(it_lo, it_hi):
        e = it // SUB_M
        m_start = tl.load(ent_blk + e) * Q_BLOCK + (it % SUB_M) * BLOCK_M
        q = _load_tile(_tile_ptrs(q_base, m_start, s_qt, tile_m, offs_d), tile_m, Q_BLOCK, PAD_M)
        do = _load_tile(_tile_ptrs(do_base, m_start, s_dt, tile_m, offs_d), tile_m, Q_BLOCK,
                        PAD_M)
        if PAD_M:
            row_ok = tile_m < Q_BLOCK
            lse = tl.load(lse_base + m_start + tile_m, mask=row_ok, other=float("inf"))
            delta = tl.load(delta_base + m_start + tile_m, mask=row_ok, other=0.0)
        else:
            lse = tl.load(lse_base + m_start + tile_m)
            delta = tl.load(delta_base + m_start + tile_m)
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
        s_t = tl.dot(k, tl.trans(q)) * qk_scale  # [N, M]
        p_t = tl.exp2(s_t - lse2[None, :])
        if PAD_N:
            p_t = tl.where((tile_n < K_BLOCK)[:, None], p_t, 0.0)
        if MASKED:
            qp, qd = _tok_meta(qpos_base, qdoc_base, m_start, tile_m, tile_m < Q_BLOCK, -2,
                               HAS_DOC)
            lo, hi = _entry_bounds(ent_lo, ent_hi, e, tile_n, K_BLOCK, SPAN)  # keys on rows
            ok = _allowed(qp, kp, qd, kd, lo, hi, HAS_DOC, True)
            p_t = tl.where(ok, p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do)
        dp_t = tl.dot(v, tl.trans(do))
        ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
        dk += tl.dot(ds_t, q)
        if ATOMIC_DQ:  # dQ += dS K here instead of a second pass that recomputes P and dP
            dq = tl.dot(tl.trans(ds_t), k) * scale
            dq_ptrs = _tile_ptrs(dq_base, m_start, s_qt, tile_m, offs_d)
            if PAD_M:
                tl.atomic_add(dq_ptrs, dq, mask=(tile_m < Q_BLOCK)[:, None], sem="relaxed")
            else:
                tl.atomic_add(dq_ptrs, dq, sem="relaxed")
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, DK, DV, DQACC, LSE, DELTA, col_order, indptr, split, ent_blk,
                     ent_lo, ent_hi, q_pos, k_pos, q_doc, k_doc,
                     s_qb, s_qt: tl.constexpr, s_qh, s_kb, s_kt: tl.constexpr, s_kh,
                   s_vb, s_vt: tl.constexpr, s_vh, s_db, s_dt: tl.constexpr, s_dh,
                     H, Tq, Tk, G, NK, KPG, KV_RATIO, qk_scale, scale,
                     Q_BLOCK: tl.constexpr, K_BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_DOC: tl.constexpr,
                     ATOMIC_DQ: tl.constexpr):
    """dK, dV over the transposed CSR (key block -> query blocks); DK/DV have K's/V's strides.

    One program owns a key tile of one kv head and sums over the KV_RATIO query heads sharing
    it (GQA), so every dK/dV element has one writer: no atomics. With ATOMIC_DQ it also adds
    its dS K into the fp32 DQACC (Q's strides) with atomics: faster, not bit-deterministic.
    A tile wider than a key block of >= 16 tokens spans SPAN adjacent blocks and walks the
    spanning CSR (_block_sparse_plan.spanned_csr; NK counts spanning columns then).
    """
    SUB_M: tl.constexpr = Q_BLOCK // BLOCK_M if Q_BLOCK >= BLOCK_M else 1
    SUB_N: tl.constexpr = K_BLOCK // BLOCK_N if K_BLOCK >= BLOCK_N else 1
    PAD_M: tl.constexpr = Q_BLOCK < BLOCK_M
    SPAN: tl.constexpr = (BLOCK_N // K_BLOCK if K_BLOCK >= 16 else 1) if K_BLOCK < BLOCK_N else 1
    PAD_N: tl.constexpr = (SPAN == 1) if K_BLOCK < BLOCK_N else False
    KEY_TILE: tl.constexpr = K_BLOCK * SPAN  # key tokens of one spanning column
    pid = tl.program_id(0)
    t = pid // KPG
    c = tl.load(col_order + t // SUB_N)
    bg = c // NK
    b64 = (bg // G).to(tl.int64)
    hk = (bg % G) * KPG + pid % KPG
    tile_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    n_start = (c % NK) * KEY_TILE + (t % SUB_N) * BLOCK_N
    col_ok = tile_n < KEY_TILE
    k = _load_tile(_tile_ptrs(K + b64 * s_kb + hk * s_kh, n_start, s_kt, tile_n, offs_d), tile_n,
                   K_BLOCK, PAD_N)
    v = _load_tile(_tile_ptrs(V + b64 * s_vb + hk * s_vh, n_start, s_vt, tile_n, offs_d), tile_n,
                   K_BLOCK, PAD_N)
    kp, kd = _tok_meta(k_pos + b64 * Tk, k_doc + b64 * Tk, n_start, tile_n, col_ok, -1, HAS_DOC)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    start = tl.load(indptr + c)
    mid = tl.load(split + c)
    end = tl.load(indptr + c + 1)
    for hh in range(KV_RATIO):
        h = hk * KV_RATIO + hh
        q_base = Q + b64 * s_qb + h * s_qh
        do_base = DO + b64 * s_db + h * s_dh
        lse_base = LSE + (b64 * H + h) * Tq
        delta_base = DELTA + (b64 * H + h) * Tq
        qpos_base = q_pos + b64 * Tq
        qdoc_base = q_doc + b64 * Tq
        dq_base = DQACC + b64 * s_qb + h * s_qh
        dk, dv = _dkdv_inner(dk, dv, k, v, kp, kd, q_base, do_base, lse_base, delta_base,
                             qpos_base, qdoc_base, dq_base, ent_blk, ent_lo, ent_hi,
                             start * SUB_M, mid * SUB_M, s_qt, s_dt, qk_scale, scale, Q_BLOCK,
                             K_BLOCK, HEAD_DIM, BLOCK_M, BLOCK_N, SUB_M, PAD_M, PAD_N, False,
                             HAS_DOC, ATOMIC_DQ, SPAN)
        dk, dv = _dkdv_inner(dk, dv, k, v, kp, kd, q_base, do_base, lse_base, delta_base,
                             qpos_base, qdoc_base, dq_base, ent_blk, ent_lo, ent_hi,
                             mid * SUB_M, end * SUB_M, s_qt, s_dt, qk_scale, scale, Q_BLOCK,
                             K_BLOCK, HEAD_DIM, BLOCK_M, BLOCK_N, SUB_M, PAD_M, PAD_N, True,
                             HAS_DOC, ATOMIC_DQ, SPAN)
    dk = dk * scale
    dk_ptrs = _tile_ptrs(DK + b64 * s_kb + hk * s_kh, n_start, s_kt, tile_n, offs_d)
    dv_ptrs = _tile_ptrs(DV + b64 * s_vb + hk * s_vh, n_start, s_vt, tile_n, offs_d)
    if PAD_N:
        tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=col_ok[:, None])
        tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=col_ok[:, None])
    else:
        tl.store(dk_ptrs, dk.to(DK.dtype.element_ty))
        tl.store(dv_ptrs, dv.to(DV.dtype.element_ty))
