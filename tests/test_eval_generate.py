"""KV-cache generation: equals the full forward, eviction policies and their budgets."""
import pytest
import torch

from dcwdist.attention.config import AttentionConfig
from dcwdist.attention.context import TIER_BACKGROUND, TIER_BUFFER, TIER_CORE
from dcwdist.eval.generate import generate, generate_recompute
from dcwdist.eval.kvcache import POLICIES, CacheConfig, HeadBudget, KVCache, head_budgets
from dcwdist.model.config import ModelConfig
from dcwdist.model.transformer import Transformer

V, T_PROMPT, NEW = 40, 48, 6


def tiny_model(kind="dense", segmenter=None, attn_cfg=None):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=V, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, init_std=0.3)
    return Transformer(cfg, attn_cfg or AttentionConfig(kind=kind), segmenter).double()


def prompt(n=T_PROMPT):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (n,), generator=g).tolist()
    return ids, [0] * 6 + [1] * (n - 7) + [2]  # instruction, document, <answer>


def _max_diff(a, b):
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def test_kv_cache_decoding_equals_full_forward_each_step():
    model = tiny_model()
    ids, roles = prompt()
    cached = generate(model, ids, roles, NEW, keep_logits=True)
    full = generate_recompute(model, ids, roles, NEW, keep_logits=True)
    assert cached.tokens == full.tokens and len(cached.tokens) == NEW
    diff = _max_diff(cached.logits, full.logits)
    assert diff < 1e-10, f"max logit difference {diff:.3e}"


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("scope", ["head", "total"])
def test_eviction_with_a_covering_budget_equals_full_cache(policy, scope):
    model = tiny_model()
    ids, roles = prompt()
    full = generate(model, ids, roles, NEW, keep_logits=True)
    per_head = T_PROMPT + NEW
    budget = per_head * (4 if scope == "total" else 1)  # 2 layers x 2 kv heads
    out = generate(model, ids, roles, NEW, CacheConfig(policy=policy, budget=budget, scope=scope),
                   keep_logits=True)
    assert out.tokens == full.tokens
    assert _max_diff(out.logits, full.logits) < 1e-12


@pytest.mark.parametrize("policy", ["window", "h2o", "tier", "learned"])
@pytest.mark.parametrize("scope", ["head", "total"])
def test_cache_never_exceeds_its_budget(policy, scope):
    model = tiny_model()
    ids, roles = prompt()
    budget = 10 if scope == "head" else 37
    learned = HeadBudget(2, 2)
    learned.logits.data = torch.tensor([[2.0, 0.0], [0.0, -1.0]])
    out = generate(model, ids, roles, NEW, CacheConfig(policy=policy, budget=budget, scope=scope),
                   head_budget=learned)
    assert (out.peak_sizes <= out.budgets).all(), (out.peak_sizes, out.budgets)
    assert int(out.budgets.sum()) == (budget * 4 if scope == "head" else budget)
    if policy == "learned":  # the softmax weights move budget to the favoured head
        assert out.budgets[0, 0] > out.budgets[0, 1] > out.budgets[1, 1]
    else:
        assert out.budgets.max() - out.budgets.min() <= 1
    assert (out.peak_sizes == out.budgets).all()  # a long prompt fills every head


def test_head_budget_allocation_sums_and_follows_the_softmax():
    hb = HeadBudget(3, 2)
    assert hb.allocate(60).tolist() == [[10, 10]] * 3
    hb.logits.data[1, 0] = 3.0
    b = hb.allocate(60)
    assert int(b.sum()) == 60 and b.min() >= 1 and b[1, 0] == b.max()
    assert torch.allclose(hb.shares().sum(), torch.tensor(1.0))
    assert head_budgets(CacheConfig(policy="full"), 3, 2) is None
    with pytest.raises(ValueError):
        CacheConfig(policy="h2o", budget=0)


def _cache_with(tiers, policy="tier", budget=0, mass=None, **kw):
    n = len(tiers)
    cache = KVCache(CacheConfig(policy=policy, budget=budget, window=4, buffer_window=6,
                                stride=4, **kw), 1, 1)
    k = torch.randn(n, 1, 2, dtype=torch.float64)
    cache.prefill(0, k, k.clone(), torch.arange(n), torch.tensor(tiers),
                  None if mass is None else torch.tensor([mass], dtype=torch.float64))
    return cache


def test_tier_policy_keeps_the_dcw_pattern():
    C, U, G = TIER_CORE, TIER_BUFFER, TIER_BACKGROUND
    tiers = [C] * 4 + [U] * 12 + [G] * 8 + [U] * 4  # 28 tokens, newest = 27
    kept = _cache_with(tiers).positions(0, 0).tolist()
    # core 0-3; buffer 4-15 on the stride grid (4, 8, 12); background 16-23 none (too old);
    # buffer 24-27: within buffer_window and window.
    assert kept == [0, 1, 2, 3, 4, 8, 12, 24, 25, 26, 27]
    # A budget evicts in priority order: the recent window, then core, then strided buffer.
    assert _cache_with(tiers, budget=9).positions(0, 0).tolist() == [0, 1, 2, 3, 12, 24, 25, 26, 27]
    assert _cache_with(tiers, budget=6).positions(0, 0).tolist() == [2, 3, 24, 25, 26, 27]


def test_h2o_keeps_heavy_hitters_and_recent_tokens():
    mass = [0.1] * 20
    mass[3], mass[7], mass[11], mass[18] = 5.0, 3.0, 4.0, 9.0
    cache = _cache_with([TIER_CORE] * 20, policy="h2o", budget=6, mass=mass)
    # 3 recent slots (17-19), 3 heavy hitters among the older tokens.
    assert cache.positions(0, 0).tolist() == [3, 7, 11, 17, 18, 19]
    window = _cache_with([TIER_CORE] * 20, policy="window", budget=6, mass=mass)
    assert window.positions(0, 0).tolist() == list(range(14, 20))


def test_dcw_prefix_model_decodes_as_its_forward_and_feeds_tiers_to_the_cache():
    """Prefix mode: answer tokens are core (full attention) and tiers never read the answer, so
    full-cache decoding equals the DCW forward; the tier policy reads the prefill's tiers."""
    from dcwdist.segmentation import build_segmenter
    from dcwdist.segmentation.config import SegmentationConfig
    attn = AttentionConfig(kind="dcw", block_size=8, window=8, buffer_window=8, stride=4,
                           summary_pool=2)
    seg = build_segmenter(SegmentationConfig(mode="prefix", scorer_layers=1, scorer_dim=16,
                                             scorer_heads=2, scorer_window=16), 32, attn)
    model = tiny_model(attn_cfg=attn, segmenter=seg)
    for layer in model.layers:  # a live cross-tier residual for the non-core prompt tokens
        layer.self_attn.attn.alpha.data.fill_(0.5)
    ids, roles = prompt(60)
    cached = generate(model, ids, roles, 3, align=8, keep_logits=True)
    full = generate_recompute(model, ids, roles, 3, align=8, keep_logits=True)
    assert cached.tokens == full.tokens
    diff = _max_diff(cached.logits, full.logits)
    assert diff < 1e-5, f"max logit difference {diff:.3e} (DCW executor accumulates in fp32)"
    tier = generate(model, ids, roles, 3, CacheConfig(policy="tier", window=8, buffer_window=8,
                                                      stride=4), align=8)
    assert (tier.peak_sizes < len(ids) + 3).all()  # the pattern drops old background tokens


def test_window_policy_reproduces_the_window_kind():
    """A sliding-window cache of attention.window tokens is exactly the window kind's pattern."""
    model = tiny_model(attn_cfg=AttentionConfig(kind="window", window=12))
    ids, roles = prompt()
    cached = generate(model, ids, roles, NEW, CacheConfig(policy="window", budget=12),
                      keep_logits=True)
    full = generate_recompute(model, ids, roles, NEW, keep_logits=True)
    assert cached.tokens == full.tokens
    assert _max_diff(cached.logits, full.logits) < 1e-5  # the window executor runs in fp32
    assert (cached.peak_sizes == 12).all()
