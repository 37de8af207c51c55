"""models/blocks.py in one process (float64): the attention and MLP blocks against plain-torch formulas written from
their docstrings (fused per-head projection layouts, q/k RMSNorm across heads, interleaved RoPE), their tangents
against torch.func.jvp of those formulas, and the timestep sinusoid against diffusers'. TP=2 against TP=1 is
tests/distributed/test_blocks_tensor_parallel.py."""

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.embeddings import get_timestep_embedding

from megatron_rcm.models.blocks import MLP, Attention, AttentionConfig, build_parallel_config, sinusoidal_embedding
from megatron_rcm.models.rope import rope_angles
from megatron_rcm.parallel import state

F64 = torch.float64
HIDDEN, HEADS, HEAD_DIM, CONTEXT = 16, 2, 6, 10
S, B, L = 12, 2, 5  # tokens (grid 2 x 3 x 2), batch, context length


def _randomised(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=F64))  # norm weights too: ones would hide a mix-up
    return module


def _inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    x, tx = (torch.randn(S, B, HIDDEN, generator=g, dtype=F64) for _ in range(2))
    context = torch.randn(L, B, CONTEXT, generator=g, dtype=F64)
    angles = rope_angles((2, 3, 2), HEAD_DIM)
    return x, tx, context, angles


def _rms(y, w, eps=1e-6):
    return y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps) * w


def _rotate_pairs(x, angles):
    z = torch.view_as_complex(x.unflatten(-1, (-1, 2)).contiguous()) * torch.polar(torch.ones_like(angles),
                                                                                  angles)[:, None, None]
    return torch.view_as_real(z).flatten(-2)


def _attention(q, k, v):
    """[S, B, H, D] -> [S, B, H*D], softmax(q k^T / sqrt(D)) v per sample and head."""
    w = torch.einsum("sbhd,tbhd->bhst", q, k) / math.sqrt(q.shape[-1])
    return torch.einsum("bhst,tbhd->sbhd", w.softmax(-1), v).flatten(2)


def _self_attention(block, angles):
    def f(x):
        y = F.linear(x, block.linear_qkv.weight, block.linear_qkv.bias).unflatten(-1, (HEADS, 3, HEAD_DIM))
        q, k, v = y.unbind(3)  # fused rows ordered (head, {q, k, v}, channel)
        q = _rms(q.flatten(2), block.q_norm).unflatten(-1, (HEADS, HEAD_DIM))  # the norm spans all heads
        k = _rms(k.flatten(2), block.k_norm).unflatten(-1, (HEADS, HEAD_DIM))
        o = _attention(_rotate_pairs(q, angles), _rotate_pairs(k, angles), v)
        return F.linear(o, block.linear_proj.weight, block.linear_proj.bias)
    return f


def _cross_attention(block, context):
    def f(x):
        q = F.linear(x, block.linear_q.weight, block.linear_q.bias)
        k, v = F.linear(context, block.linear_kv.weight, block.linear_kv.bias).unflatten(-1, (HEADS, 2, HEAD_DIM)
                                                                                        ).unbind(3)
        q = _rms(q, block.q_norm).unflatten(-1, (HEADS, HEAD_DIM))
        k = _rms(k.flatten(2), block.k_norm).unflatten(-1, (HEADS, HEAD_DIM))
        o = _attention(q, k, v)
        return F.linear(o, block.linear_proj.weight, block.linear_proj.bias)
    return f


def _check(block_call, formula, x, tx):
    want, want_t = torch.func.jvp(formula, (x,), (tx,))
    with torch.no_grad():
        y, none = block_call(x, None)
        yj, ty = block_call(x, tx)
    assert none is None
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(yj, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ty, want_t, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["self", "cross"])
def test_attention_is_its_formula(kind):
    state.ensure_parallel()
    x, tx, context, angles = _inputs()
    cfg = build_parallel_config(F64, sequence_parallel=False)
    if kind == "self":
        block = _randomised(Attention(AttentionConfig(HIDDEN, HEADS, HEAD_DIM), cfg), seed=2)
        rope = (torch.cos(angles)[:, None, None], torch.sin(angles)[:, None, None])
        _check(lambda a, ta: block(a, ta, rope=rope), _self_attention(block, angles), x, tx)
    else:
        block = _randomised(Attention(AttentionConfig(HIDDEN, HEADS, HEAD_DIM, context_dim=CONTEXT), cfg), seed=3)
        _check(lambda a, ta: block(a, ta, context=context), _cross_attention(block, context), x, tx)


@pytest.mark.parametrize("activation", ["gelu_tanh", "gelu_erf"])
def test_mlp_is_its_formula(activation):
    state.ensure_parallel()
    x, tx, _, _ = _inputs()
    mlp = _randomised(MLP(HIDDEN, 24, build_parallel_config(F64, sequence_parallel=False), activation=activation), seed=4)
    approximate = "tanh" if activation == "gelu_tanh" else "none"

    def formula(a):
        h = F.gelu(F.linear(a, mlp.linear_fc1.weight, mlp.linear_fc1.bias), approximate=approximate)
        return F.linear(h, mlp.linear_fc2.weight, mlp.linear_fc2.bias)

    _check(mlp, formula, x, tx)


def test_timestep_sinusoid_is_diffusers_and_its_tangent_the_jvp():
    t = torch.tensor([0.0, 3.5, 250.0, 999.0], dtype=F64)
    tt = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=F64)
    emb, temb = sinusoidal_embedding(t, tt, 16)
    theirs = get_timestep_embedding(t.float(), 16, flip_sin_to_cos=True, downscale_freq_shift=0)
    torch.testing.assert_close(emb.float(), theirs, rtol=0, atol=2e-4)  # diffusers' float32 frequencies
    _, want_t = torch.func.jvp(lambda s: sinusoidal_embedding(s, None, 16)[0], (t,), (tt,))
    torch.testing.assert_close(temb, want_t, rtol=1e-12, atol=1e-12)
    assert sinusoidal_embedding(t.bfloat16(), None, 16)[0].dtype == torch.float32
