"""Output projection fused with cross-entropy, in chunks: the [T, vocab] logits never exist at once.

The forward computes, chunk by chunk, the summed token losses and their gradients with respect
to the hidden states and the output weight (the Liger / Cut-Cross-Entropy idea); the backward
only scales them, in place. Memory, for N tokens, chunk C, vocabulary V, hidden size D:

- kept from forward to backward: grad_h [N, D] in the hidden states' dtype, which stands in for
  the hidden states themselves (this function does not keep them), and grad_w [V, D]. A loss that
  recomputes the logits in backward (ALST's tiled loss) must keep the [N, D] hidden states
  instead: the same size, one more pass over the logits. Nothing of size N x V is kept.
- transient, per chunk: the [C, V] logits in fp32 (the softmax is formed in their buffer), their
  gradient in the hidden dtype, and the chunk's [V, D] contribution to grad_w.
- backward: no new [N, D] or [V, D] tensor; the saved gradients are scaled in place, so one
  forward supports one backward.
"""
from __future__ import annotations

import torch


class _ChunkedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_ND, weight_VD, labels_N, chunk: int):
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        acc = torch.promote_types(hidden_ND.dtype, torch.float32)  # fp32 at least
        total = torch.zeros((), dtype=acc, device=hidden_ND.device)
        grad_h = torch.zeros_like(hidden_ND) if needs_grad else None
        grad_w = torch.zeros_like(weight_VD, dtype=acc) if needs_grad else None
        for s in range(0, hidden_ND.shape[0], chunk):
            h = hidden_ND[s:s + chunk]
            y = labels_N[s:s + chunk]
            valid = y >= 0
            if not bool(valid.any()):
                continue
            logits = (h @ weight_VD.t()).to(acc)  # [C, V]
            lse = torch.logsumexp(logits, dim=-1)
            y_safe = y.clamp_min(0)
            picked = logits.gather(1, y_safe[:, None])[:, 0]
            total = total + ((lse - picked) * valid).sum()
            if needs_grad:
                # d(sum loss)/d logits = softmax - onehot, zero on ignored rows; the softmax
                # exp(logits - lse) overwrites the logits (one [C, V] fp32 buffer, not two).
                g = logits.sub_(lse[:, None]).exp_()
                g[torch.arange(len(y), device=y.device), y_safe] -= 1.0
                g *= valid[:, None]
                g = g.to(h.dtype)
                grad_h[s:s + chunk] = g @ weight_VD
                grad_w += (g.t() @ h).to(acc)  # (not addmm_: in-place ops escape autocast)
        if needs_grad:
            ctx.save_for_backward(grad_h, grad_w.to(weight_VD.dtype))
        ctx.scaled = False
        return total

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.scaled:  # saved-tensor hooks (activation offload) skip autograd's version check
            raise RuntimeError("chunked cross-entropy: a second backward through one forward is "
                               "not supported (its saved gradients are scaled in place)")
        ctx.scaled = True
        grad_h, grad_w = ctx.saved_tensors
        # In place: no second [N, D] / [V, D] tensor at the start of backward.
        return (grad_h.mul_(grad_out.to(grad_h.dtype)), grad_w.mul_(grad_out.to(grad_w.dtype)),
                None, None)


def chunked_cross_entropy_sum(hidden_BTD: torch.Tensor, weight_VD: torch.Tensor,
                              labels_BT: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """Sum over tokens of CE(hidden @ weight.T, label); labels < 0 are ignored. Returns fp32 scalar.

    Divide by the (global) count of loss tokens yourself: the mean's denominator is a
    data-parallel decision, not this function's.
    """
    D = hidden_BTD.shape[-1]
    return _ChunkedLinearCE.apply(hidden_BTD.reshape(-1, D), weight_VD,
                                  labels_BT.reshape(-1), chunk)


def full_cross_entropy_sum(hidden_BTD, weight_VD, labels_BT) -> torch.Tensor:
    """Unchunked reference: materialises every logit."""
    logits = (hidden_BTD @ weight_VD.t()).to(torch.promote_types(hidden_BTD.dtype, torch.float32))
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels_BT.reshape(-1), ignore_index=-100,
        reduction="sum")
