"""model.keep_attention_outputs on the torch attention path (attention.impl=torch, dense: torch's
SDPA): the checkpoint keeps SDPA's outputs from the forward, so the recompute in backward runs
no SDPA again -- and the loss and every gradient equal recomputing it, with and without
activation offload."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dcwdist.attention import AttentionConfig, AttnContext
from dcwdist.model import ModelConfig, Transformer
from dcwdist.model.activations import _SDPA_OPS


class CountSDPA(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += func in _SDPA_OPS
        return func(*args, **(kwargs or {}))


def run(keep, offload):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=3, n_heads=4, n_kv_heads=2,
                      loss_chunk=16, activation_checkpointing=True,
                      keep_attention_outputs=keep, offload_activations=offload)
    m = Transformer(cfg, AttentionConfig(kind="dense", impl="torch")).train()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 64, (1, 48), generator=g)
    labels = torch.randint(0, 64, (1, 48), generator=g)
    ctx = AttnContext(doc_ids=torch.zeros(1, 48, dtype=torch.long),
                      positions=torch.arange(48)[None])
    with CountSDPA() as count:
        loss = m(tokens, ctx, labels)
        in_forward = count.n
        loss.backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    return loss.detach(), grads, in_forward, count.n - in_forward


@pytest.mark.parametrize("offload", [False, True])
def test_kept_sdpa_outputs_skip_the_recompute_and_change_no_gradient(offload):
    loss0, grads0, fwd0, bwd0 = run(keep=False, offload=offload)
    loss1, grads1, fwd1, bwd1 = run(keep=True, offload=offload)
    assert fwd0 == fwd1 == 3 and bwd0 == 3, "one SDPA per layer, run again in the recompute"
    assert bwd1 == 0, "the recompute ran SDPA although its outputs were kept"
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=0)
    assert grads1.keys() == grads0.keys()
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=0, atol=0, msg=name)
