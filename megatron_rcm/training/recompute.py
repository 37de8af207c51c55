"""Activation recomputation of the DiT's transformer blocks in the with-grad passes.

`enable_activation_checkpointing(model, policy)` turns every block of `model.blocks` into a checkpointed region
(torch's non-reentrant `checkpoint`) in the calls that build an autograd graph: grad enabled and no tangent. The
no-grad passes and the JVP pass run the plain blocks. What a checkpointed block keeps for its backward is the
training config's `model.recompute_policy`:

* `full`: its input only. The backward re-runs the whole block forward, both attentions included.
* `selective`: its input and the results of its fused attention ops, for self- and cross-attention the attention
  output and its log-sum-exp (what the attention backward reads next to q, k and v). The backward re-runs the
  projections, norms, RoPE, gates and the MLP, takes the attention results from the kept ones, and runs no
  attention forward a second time. Built on torch's selective activation checkpointing
  (`create_selective_checkpoint_contexts`: a policy per dispatched op, see `keeps_output`).
* `selective_self`: as `selective` for self-attention only; cross-attention is recomputed. Its keys are the text
  tokens, so its forward costs (text tokens / patch tokens) of the self-attention's while its output is as large:
  half the kept memory of `selective` for nearly all of its saving at video sizes. (Told apart by their key counts,
  `_is_self_attention`: where the text has more tokens than the video, both are kept.)

Which attention calls are kept (`keeps_output`): the ops that `models.attention.attention` reaches in a with-grad
pass. On CUDA in half precision those are SDPA's fused kernels (`aten._scaled_dot_product_cudnn_attention`, or the
flash / efficient one the backend order falls through to) or, with `kernels.attention_backend=flash_attn` /
`flash_attn_3`, the forward ops that FlashAttention registers as torch ops (namespaces `flash_attn`,
`flash_attn_3`). Ring context parallelism runs SDPA's flash kernel once per key/value block inside its autograd
Function; each block's partial output and log-sum-exp are kept (CP of them per block). The math path (CPU, and
float32 / float64 on CUDA: matmul, softmax, matmul) is no fused op, so there the selective policies recompute
what `full` does. The with-grad passes launch no Triton attention kernel today (the JVP kernel and the q/k/v kernel run only
without autograd); a kernel launched directly from Python bypasses the dispatcher, so a future with-grad attention
kernel is kept only when its forward is a torch op: `torch.library.custom_op("rcm::<name>_forward", ...)` (called
from an autograd Function's forward, or with `register_autograd`), a forward-named op of a namespace in
`KEPT_NAMESPACES`.

The compiled elementwise regions (`models.fusion.fused`) run under the policy's dispatch mode as single ops and are
recomputed; this needs a torch whose selective-checkpoint modes let torch.compile through (they declare
`ignore_compile_internals`), else the regions run eagerly inside checkpointed blocks.
"""

import functools

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

RECOMPUTE_POLICIES = ("full", "selective", "selective_self")

_ATEN_ATTENTION = ("_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention",
                   "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention_for_cpu",
                   "_scaled_dot_product_fused_attention_overrideable")
KEPT_ATEN_OPS = frozenset(getattr(torch.ops.aten, name).default for name in _ATEN_ATTENTION
                          if hasattr(torch.ops.aten, name))
"""SDPA's fused attention forwards: each returns the output and the log-sum-exp (plus seeds and sizes that cost
nothing) that its backward reads."""
KEPT_NAMESPACES = ("flash_attn", "flash_attn_3", "rcm")
"""Namespaces whose forward ops (`fwd` / `forward` in the name, no `bwd` / `backward`) are attention forwards:
FlashAttention-2 and -3, and this package's own kernels once they are registered as torch ops."""


def keeps_output(op) -> bool:
    """Whether selective recomputation keeps the outputs of dispatched op `op` (an attention forward)."""
    if op in KEPT_ATEN_OPS:
        return True
    if not isinstance(op, torch._ops.OpOverload) or op.namespace not in KEPT_NAMESPACES:
        return False
    name = op._opname
    return ("fwd" in name or "forward" in name) and not ("bwd" in name or "backward" in name)


def _is_self_attention(args) -> bool:
    """Whether an attention op's (q, k, v, ...) arguments are self-attention's: keys at least half as many as the
    queries. q and k differ only in their token count in every layout the ops take; self-attention's keys are all
    the tokens (or one ring block; a2a pads the queries only), cross-attention's the text's, far fewer at video
    sizes."""
    q, k = (args + (None, None))[:2]
    return isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and 2 * k.numel() >= q.numel()


def attention_policy(self_attention_only: bool):
    """The policy function of `selective` (`self_attention_only=False`) or `selective_self`: keep the attention
    forwards' outputs (of self-attention only), recompute every other op."""

    def policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
        keep = keeps_output(op) and (not self_attention_only or _is_self_attention(args))
        return CheckpointPolicy.MUST_SAVE if keep else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def _selective_contexts(self_attention_only: bool):
    # `attention_policy` is looked up at each call, so that a wrapped one (tests counting what is kept) takes effect
    return create_selective_checkpoint_contexts(attention_policy(self_attention_only))


def enable_activation_checkpointing(model: torch.nn.Module, policy: str = "full") -> None:
    """Checkpoint every transformer block of `model` in its with-grad calls, keeping what `policy` says (`full`:
    the block input; `selective`: the block input and the attention forwards' outputs and log-sum-exps;
    `selective_self`: those of self-attention only). Numbers do not change: the gradients are those of the plain
    blocks."""
    if policy not in RECOMPUTE_POLICIES:
        raise ValueError(f"recompute policy must be one of {RECOMPUTE_POLICIES}, got {policy!r}")
    options = {}
    if policy != "full":
        options["context_fn"] = functools.partial(_selective_contexts, policy == "selective_self")
    for block in model.blocks:
        plain = block.forward

        def forward(x, x_tangent, *args, _plain=plain):
            if torch.is_grad_enabled() and x_tangent is None:
                return checkpoint(_plain, x, x_tangent, *args, use_reentrant=False, **options)
            return _plain(x, x_tangent, *args)

        block.forward = forward
