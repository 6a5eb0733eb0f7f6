"""Decoder shape (Llama / Qwen2 family)."""
from __future__ import annotations

from dataclasses import dataclass, field

from dcwdist.model.rope import RopeConfig


@dataclass
class ModelConfig:
    """Llama/Qwen2-style decoder: RMSNorm, RoPE, SwiGLU, GQA."""

    vocab_size: int = 32000
    """Embedding rows (the tokenizer's vocabulary, padded up as you like)."""
    dim: int = 768
    """Hidden size."""
    n_layers: int = 12
    """Decoder layers."""
    n_heads: int = 12
    """Query heads."""
    n_kv_heads: int = 4
    """Key/value heads (GQA); must divide n_heads."""
    ffn_dim: int = 0
    """SwiGLU inner size; 0 picks round_up(8/3 * dim, 64)."""
    norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    tie_embeddings: bool = False
    """Share the input embedding with the output projection."""
    qkv_bias: bool = False
    """Bias on q/k/v projections (Qwen2 has it, Llama not)."""
    rope: RopeConfig = field(default_factory=RopeConfig)
    """Rotary embedding; stages may override it."""
    activation_checkpointing: bool = False
    """Recompute each layer in backward instead of storing its activations."""
    tiled_mlp: int = 0
    """Tokens per tile of the SwiGLU MLP, each tile recomputed in backward (ALST TiledMLP): the
    MLP's [tokens, ffn] intermediates peak at one tile; 0 = untiled."""
    keep_attention_outputs: bool = True
    """With activation_checkpointing: keep each attention kernel's output (and LSE) from the
    forward so the recompute in backward skips the attention forward (torchtitan's selective
    checkpointing saves SDPA outputs alike). Costs one [tokens, heads*head_dim] tensor per
    layer. Triton path: offloaded with offload_activations; torch path (attention.impl=torch):
    torch's SDPA outputs, kept by a selective-checkpoint policy, on the device."""
    offload_activations: bool = False
    """Keep what training saves between forward and backward at hidden-state size (each
    checkpointed layer's input, the final norm's input, the loss's hidden gradient) in host
    memory, pinned on GPU; needs activation_checkpointing."""
    norm_impl: str = "auto"
    """RMSNorm: torch (reference ops), triton (one fused kernel each way, kernels/rmsnorm.py) or
    auto (triton on CUDA tensors, torch otherwise)."""
    rope_impl: str = "auto"
    """RoPE on q and k: torch (reference ops), triton (one fused kernel each way per tensor,
    kernels/rope.py; head dim twice a power of two) or auto (triton on CUDA, torch otherwise)."""
    swiglu_impl: str = "auto"
    """The MLP's silu(gate) * up: torch (reference ops), triton (one fused kernel each way,
    kernels/swiglu.py; keeps no silu(gate) for backward) or auto (triton on CUDA)."""
    init_std: float = 0.02
    """Std of the normal init of linear and embedding weights."""
    loss_chunk: int = 2048
    """Tokens per chunk of the fused output projection + cross-entropy."""
    init_from: str = ""
    """Local Hugging Face Llama/Qwen2 directory to start from; its config.json sets the shape."""

    def __post_init__(self):
        if self.dim % self.n_heads:
            raise ValueError(f"model.dim ({self.dim}) must be divisible by model.n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"model.n_heads ({self.n_heads}) must be divisible by model.n_kv_heads ({self.n_kv_heads})")
        if (self.dim // self.n_heads) % 2:
            raise ValueError("model head_dim (dim / n_heads) must be even for RoPE")
        if self.ffn_dim < 0:
            raise ValueError(f"model.ffn_dim must be >= 0, got {self.ffn_dim}")
        if self.tiled_mlp < 0:
            raise ValueError(f"model.tiled_mlp must be >= 0 (0 = off), got {self.tiled_mlp}")
        for key in ("norm_impl", "rope_impl", "swiglu_impl"):
            if getattr(self, key) not in ("auto", "torch", "triton"):
                raise ValueError(f"model.{key} must be one of auto, torch, triton; got "
                                 f"{getattr(self, key)!r}")
        half = (self.dim // self.n_heads) // 2
        if self.rope_impl == "triton" and half & (half - 1):
            raise ValueError(f"model.rope_impl=triton needs head_dim twice a power of two; got "
                             f"head_dim {2 * half}: use rope_impl=torch")
        if self.offload_activations and not self.activation_checkpointing:
            raise ValueError("model.offload_activations moves the checkpointed layer inputs to "
                             "the host: set model.activation_checkpointing=true as well")

    @property
    def ffn_hidden(self) -> int:
        """SwiGLU inner size actually used (derived, so overriding dim keeps it consistent)."""
        return self.ffn_dim or ((8 * self.dim // 3) + 63) // 64 * 64

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def num_params(self) -> int:
        """Parameter count without building the model."""
        d, hd = self.dim, self.head_dim
        attn = d * (self.n_heads * hd) * 2 + d * (self.n_kv_heads * hd) * 2
        if self.qkv_bias:
            attn += (self.n_heads + 2 * self.n_kv_heads) * hd
        layer = attn + 3 * d * self.ffn_hidden + 2 * d
        emb = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return self.n_layers * layer + emb + d
