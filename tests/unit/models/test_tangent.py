"""models/tangent.py: every JVP rule against torch.func.jvp of the plain function (float64), and the plain pass
(tangent None) giving the same primal and no tangent."""

import pytest
import torch
import torch.nn.functional as F

from megatron_rcm.models import tangent as T

F64 = torch.float64
EPS = 1e-6


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


X, TX = _randn(3, 5, 8, seed=0), _randn(3, 5, 8, seed=1)
W, B = _randn(8, seed=2) + 1.0, _randn(8, seed=3)


def _rms_norm(x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * W


ONE_INPUT = {
    "silu": (T.silu, F.silu),
    "gelu_tanh": (T.gelu_tanh, lambda x: F.gelu(x, approximate="tanh")),
    "gelu_erf": (T.gelu_erf, F.gelu),
    "layer_norm": (lambda x, tx: T.layer_norm(x, tx, EPS, W, B), lambda x: F.layer_norm(x, (8,), W, B, EPS)),
    "layer_norm_no_affine": (lambda x, tx: T.layer_norm(x, tx, EPS), lambda x: F.layer_norm(x, (8,), eps=EPS)),
    "rms_norm": (lambda x, tx: T.rms_norm(x, tx, W, EPS, full_dim=8), _rms_norm),
}


@pytest.mark.parametrize("name", sorted(ONE_INPUT))
def test_rule_is_the_jvp(name):
    rule, plain = ONE_INPUT[name]
    want, want_t = torch.func.jvp(plain, (X,), (TX,))
    y, ty = rule(X, TX)
    torch.testing.assert_close(y, want, rtol=0, atol=1e-13)
    torch.testing.assert_close(ty, want_t, rtol=1e-12, atol=1e-12)
    y0, none = rule(X, None)
    assert none is None and torch.equal(y0, y)


def test_modulate_and_gated_residual_are_their_jvps():
    n, shift, scale = X, _randn(3, 1, 8, seed=4), _randn(3, 1, 8, seed=5)
    tn, tshift, tscale = TX, _randn(3, 1, 8, seed=6), _randn(3, 1, 8, seed=7)
    want = torch.func.jvp(lambda a, b, c: a * (1 + c) + b, (n, shift, scale), (tn, tshift, tscale))
    got = T.modulate(n, tn, shift, tshift, scale, tscale)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-13, atol=1e-13)
    a, gate, ta, tgate = _randn(3, 5, 8, seed=8), _randn(3, 1, 8, seed=9), _randn(3, 5, 8, seed=10), scale
    want = torch.func.jvp(lambda x, y, z: x + y * z, (X, a, gate), (TX, ta, tgate))
    for g, w in zip(T.gated_residual(X, TX, a, ta, gate, tgate), want):
        torch.testing.assert_close(g, w, rtol=1e-13, atol=1e-13)
    assert T.gated_residual(X, None, a, None, gate, None)[1] is None


def test_linear_pieces_run_primal_and_tangent_together():
    layer = torch.nn.Linear(8, 4, dtype=F64)
    y, ty = T.linear(layer, X, TX)
    torch.testing.assert_close(y, layer(X), rtol=0, atol=1e-13)
    torch.testing.assert_close(ty, F.linear(TX, layer.weight), rtol=0, atol=1e-13)  # the bias is the primal's
    y, ty = T.stacked(lambda z: z.cumsum(1), X, TX, dim=0)  # one call over the batch-stacked pair
    assert torch.equal(y, X.cumsum(1)) and torch.equal(ty, TX.cumsum(1))
    s, ts = T.add(X, TX, W, None)
    assert torch.equal(s, X + W) and ts is TX


def test_statistics_in_at_least_float32():
    assert T.compute_dtype(torch.bfloat16) == torch.float32 and T.compute_dtype(F64) == F64
    y, ty = T.layer_norm(X.bfloat16(), TX.bfloat16(), EPS)
    assert y.dtype == ty.dtype == torch.float32
    y, ty = T.rms_norm(X.bfloat16(), TX.bfloat16(), W.bfloat16(), EPS, full_dim=8)
    assert y.dtype == ty.dtype == torch.bfloat16  # returned in the input's dtype
    lt, tt = T.input_tangents(X, torch.tensor([500], dtype=torch.bfloat16), None, None)
    assert torch.equal(lt, torch.zeros_like(X)) and tt.dtype == torch.float32
