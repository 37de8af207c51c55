"""Model FLOPs of the rCM passes of a Wan DiT: what the console's and the scale probe's TFLOP/s count.

Matmul FLOPs only (2 per multiply-add), as Megatron-LM counts its model TFLOP/s: elementwise work, norms and
recomputation (activation checkpointing) are not counted, so the number compares layouts, not kernels.
"""


def forward_flops(config, tokens: int, text_tokens: int) -> float:
    """Matmul FLOPs of one forward of one sample of a Wan DiT (2 per multiply-add)."""
    h, f = config.hidden_size, config.ffn_dim
    per_layer = (2 * tokens * 4 * h * h            # self-attention q, k, v, o
                 + 2 * 2 * tokens * tokens * h     # QK^T and PV
                 + 2 * tokens * 2 * h * h          # cross-attention q, o
                 + 2 * text_tokens * 2 * h * h     # cross-attention k, v
                 + 2 * 2 * tokens * text_tokens * h
                 + 2 * tokens * 2 * h * f)         # MLP
    return config.num_layers * per_layer


def flops_by_pass(config, tokens: int, text_tokens: int, phase: str, rollout_steps: int) -> dict[str, float]:
    """FLOPs per sample of each timed pass of one iteration, keyed as the trainer's `time/<pass>` records
    (`training/step.py`). With-grad passes count their backward as 2 x forward (the trainer times the backward
    under the pass's name). The JVP pass counts the linear layers twice (primal + tangent) and attention three
    times (the JVP kernel)."""
    fwd = forward_flops(config, tokens, text_tokens)
    if phase == "student":
        attn = config.num_layers * 2 * 2 * tokens * tokens * config.hidden_size
        return {"teacher_cfg": 2 * fwd,                    # conditional + unconditional forward
                "student_jvp": 2 * (fwd - attn) + 3 * attn,
                "rollout": rollout_steps * fwd,           # rollout (N - 1 steps) + its last step, no grad
                "dmd_gradient": 3 * fwd,                  # critic + teacher CFG at the re-noised sample
                "student_grad": 2 * 3 * fwd}              # sCM and DMD inputs in one batch, forward + backward
    return {"rollout": rollout_steps * fwd,
            "critic_grad": 3 * fwd}                       # critic forward + backward


def pass_flops(config, tokens: int, text_tokens: int, phase: str, rollout_steps: int) -> float:
    """FLOPs per sample of one iteration: the sum of `flops_by_pass` (the no-grad passes plus the with-grad pass)."""
    return sum(flops_by_pass(config, tokens, text_tokens, phase, rollout_steps).values())


def iteration_flops(config, tokens: int, text_tokens: int, phase: str, rollout_steps: int, passes) -> float:
    """FLOPs per sample of the passes of `passes` (the pass names an iteration timed): what the trainer's TFLOP/s
    counts. A student step's with-grad pass carries the sCM and the DMD input only when both parts ran (the
    `student_jvp` and `dmd_gradient` passes); with one of them it is half as large."""
    by_pass = flops_by_pass(config, tokens, text_tokens, phase, rollout_steps)
    total = sum(v for k, v in by_pass.items() if k in passes)
    if phase == "student" and "student_grad" in passes and not ("student_jvp" in passes and "dmd_gradient" in passes):
        total -= by_pass["student_grad"] / 2
    return total


def tokens_per_sample(config, latent_shape) -> int:
    """Patch tokens of one sample of latent shape `[C, T, H, W]` (the full sample, before any CP split)."""
    _, t, h, w = latent_shape
    pt, ph, pw = config.patch_size
    return (t // pt) * (h // ph) * (w // pw)
