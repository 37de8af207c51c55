"""Model FLOPs of the rCM passes of a Wan DiT: what the console's and the scale probe's TFLOP/s count.

Matmul FLOPs only (2 per multiply-add), as Megatron-LM counts its model TFLOP/s: elementwise work, norms and
recomputation (activation checkpointing) are not counted, so the number compares layouts, not kernels.
"""


def forward_flops(cfg, tokens: int, text_tokens: int) -> float:
    """Matmul FLOPs of one forward of one sample of a Wan DiT (2 per multiply-add)."""
    h, f = cfg.hidden_size, cfg.ffn_dim
    per_layer = (2 * tokens * 4 * h * h            # self-attention q, k, v, o
                 + 2 * 2 * tokens * tokens * h     # QK^T and PV
                 + 2 * tokens * 2 * h * h          # cross-attention q, o
                 + 2 * text_tokens * 2 * h * h     # cross-attention k, v
                 + 2 * 2 * tokens * text_tokens * h
                 + 2 * tokens * 2 * h * f)         # MLP
    return cfg.num_layers * per_layer


def pass_flops(cfg, tokens: int, text_tokens: int, phase: str, rollout_steps: int) -> float:
    """FLOPs per sample of one iteration: the no-grad passes plus the with-grad pass (backward = 2 x forward).
    The JVP pass counts the linear layers twice (primal + tangent) and attention three times (the JVP kernel)."""
    fwd = forward_flops(cfg, tokens, text_tokens)
    attn = cfg.num_layers * 2 * 2 * tokens * tokens * cfg.hidden_size
    if phase == "student":
        jvp = 2 * (fwd - attn) + 3 * attn
        return (2 * fwd + jvp            # teacher CFG, student JVP
                + rollout_steps * fwd    # rollout (N - 1 steps) + its last step, no grad
                + 3 * fwd                # critic + teacher CFG at the re-noised sample
                + 2 * 3 * fwd)           # with-grad pass over the sCM and DMD inputs
    return rollout_steps * fwd + 3 * fwd  # rollout + critic forward/backward


def tokens_per_sample(cfg, latent_shape) -> int:
    """Patch tokens of one sample of latent shape `[C, T, H, W]` (the full sample, before any CP split)."""
    _, t, h, w = latent_shape
    pt, ph, pw = cfg.patch_size
    return (t // pt) * (h // ph) * (w // pw)
