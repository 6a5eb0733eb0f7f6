"""Trial 11's control: a minimal GPT in plain torch (LayerNorm, learned positions, SDPA; none
of dcwdist's model code) of the quality model's size, trained on the same copy rows at 128
tokens. It plateaus as dcwdist's model does (3.1 nats/token after 300 steps), so the slow
copy learning is the task at this size, not a defect of the framework.

    python benchmarks/results/quality/trial11_cpu/mini_gpt.py abs 3e-3   # (positions, lr)
"""
import os, sys, torch, torch.nn as nn, torch.nn.functional as F
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), *[".."] * 4))
from dcwdist.data_pipelines import DataConfig, build_rows
torch.manual_seed(0)
# the copy stage's rows: quality_base's data with stages.0.data {generator: copy, min_doc_len: 16}
rows = build_rows(DataConfig(generator="copy", min_doc_len=16, num_facts=1, loss_on="answer",
                             doc_len_dist="loguniform"), 128, 1)
V, D, L, H, T = 264, 128, 4, 4, 128
pos_kind = sys.argv[1] if len(sys.argv) > 1 else "abs"
lr = float(sys.argv[2]) if len(sys.argv) > 2 else 3e-3
class Block(nn.Module):
    def __init__(s):
        super().__init__(); s.n1 = nn.LayerNorm(D); s.qkv = nn.Linear(D, 3 * D); s.o = nn.Linear(D, D)
        s.n2 = nn.LayerNorm(D); s.mlp = nn.Sequential(nn.Linear(D, 4 * D), nn.GELU(), nn.Linear(4 * D, D))
    def forward(s, x):
        B, T_, _ = x.shape
        q, k, v = s.qkv(s.n1(x)).view(B, T_, 3, H, D // H).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + s.o(a.transpose(1, 2).reshape(B, T_, D))
        return x + s.mlp(s.n2(x))
class GPT(nn.Module):
    def __init__(s):
        super().__init__(); s.e = nn.Embedding(V, D); s.p = nn.Embedding(T, D)
        s.b = nn.ModuleList(Block() for _ in range(L)); s.n = nn.LayerNorm(D); s.h = nn.Linear(D, V)
    def forward(s, t):
        x = s.e(t) + s.p(torch.arange(t.shape[1]))
        for b in s.b: x = b(x)
        return s.h(s.n(x))
m = GPT(); opt = torch.optim.AdamW(m.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
for step in range(1, 301):
    b = rows.batch((step - 1) * 64, 64)
    for g in opt.param_groups: g["lr"] = lr * min(1, step / 20)
    loss = F.cross_entropy(m(b.tokens).transpose(1, 2), b.labels, ignore_index=-100)
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0); opt.step()
    if step % 25 == 0: print(step, round(loss.item(), 3), flush=True)
