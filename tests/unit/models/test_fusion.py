"""The block forward's fast paths: fc1 + bias + GELU-tanh as one GEMM with a GELU epilogue, and each residual
update fused with the norm after it. Each is checked against the path it replaces."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from wan_reference import diffusers_wan, inputs, megatron_state_dict, relative_error

from megatron_rcm.checkpoint.sharding import load_full_state_dict
from megatron_rcm.models import blocks
from megatron_rcm.models.blocks import MLP, build_parallel_config
from megatron_rcm.models.wan import PRESETS, WanModel
from megatron_rcm.parallel import run_on_ranks, state


def _mlp(dtype=torch.float32, device="cpu", hidden=24, ffn=64):
    state.ensure_parallel()
    torch.manual_seed(0)
    mlp = MLP(hidden, ffn, build_parallel_config(dtype, False)).to(device)
    with torch.no_grad():
        mlp.linear_fc1.bias.normal_()
        mlp.linear_fc2.bias.normal_()
    return mlp


def _count_epilogue_calls(patch=setattr):
    """Counts calls of the fused fc1 + GELU GEMM (`blocks.linear_gelu_tanh`) from now on."""
    calls, plain = [], blocks.linear_gelu_tanh

    def counted(*args):
        calls.append(1)
        return plain(*args)

    patch(blocks, "linear_gelu_tanh", counted)
    return calls


@pytest.fixture
def epilogue_calls(monkeypatch):
    return _count_epilogue_calls(monkeypatch.setattr)


def test_gelu_epilogue_path_matches_megatron_path(epilogue_calls):
    mlp = _mlp()
    calls = epilogue_calls
    x = torch.randn(7, 3, 24)
    with torch.no_grad():
        mlp.gelu_epilogue = False
        expected = mlp(x)[0]
        assert not calls
        mlp.gelu_epilogue = True
        got, tangent, bias = mlp(x, add_bias=False)
    assert len(calls) == 1, "the forced epilogue path must run fc1 as one GEMM with the GELU epilogue"
    assert tangent is None
    assert relative_error(got + bias, expected) <= 1e-6


def test_gelu_epilogue_only_without_grad_and_tangents(epilogue_calls):
    mlp = _mlp()
    mlp.gelu_epilogue = True
    calls = epilogue_calls
    x = torch.randn(5, 2, 24)
    mlp(x)[0].sum().backward()  # autograd on: megatron's path, with its weight gradients
    assert not calls and mlp.linear_fc1.weight.grad is not None
    with torch.no_grad():
        mlp(x, torch.randn_like(x))  # a tangent: megatron's path
    assert not calls
    cosmos_mlp = MLP(24, 64, build_parallel_config(torch.float32, False), bias=False, activation="gelu_erf")
    cosmos_mlp.gelu_epilogue = True
    with torch.no_grad():
        cosmos_mlp(x)  # exact GELU, no bias: no epilogue
    assert not calls


def _check_gelu_epilogue_tp2():
    from megatron_rcm.parallel import initialize_parallel

    initialize_parallel(tensor_model_parallel_size=2)
    ref = diffusers_wan("wan-tiny-tp")
    x, t, text = inputs(2, 3, 6, 8)
    with torch.no_grad():
        expected = ref(x, t, text, return_dict=False)[0]
        for sp in (False, True):
            model = WanModel(PRESETS["wan-tiny-tp"], sequence_parallel=sp)
            load_full_state_dict(model, megatron_state_dict(ref))
            calls = _count_epilogue_calls()
            for block in model.blocks:
                block.mlp.gelu_epilogue = True
            assert relative_error(model(x, t, text), expected) <= 1e-5, f"sp={sp}"
            # the epilogue takes this rank's fc1 shard directly; under SP megatron's forward gathers the tokens
            assert len(calls) == (0 if sp else len(model.blocks)), f"sp={sp}"


@pytest.mark.distributed
def test_gelu_epilogue_at_tp2_matches_diffusers():
    run_on_ranks(_check_gelu_epilogue_tp2, 2)


def test_cpu_addmm_activation_is_not_gelu_tanh():
    """Why `linear_gelu_tanh` avoids torch._addmm_activation on the CPU: there its GELU is the exact one, while on
    CUDA (cuBLASLt's epilogue and PyTorch's fallback alike) it is the tanh approximation."""
    x, w, b = torch.randn(6, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64), torch.randn(4)
    got = torch._addmm_activation(b.double(), x, w.t(), use_gelu=True)
    h = torch.addmm(b.double(), x, w.t())
    assert torch.equal(got, F.gelu(h))
    assert not torch.allclose(got, F.gelu(h, approximate="tanh"))


@pytest.mark.parametrize("tangents", [False, True])
def test_residual_norm_fusion_switch_gives_the_same_model(monkeypatch, tangents):
    state.ensure_parallel()
    torch.manual_seed(0)
    model = WanModel(PRESETS["wan-tiny"])
    x, t, text = inputs(2, 3, 4, 6)
    tx = torch.randn_like(x) if tangents else None

    def run():
        if tangents:
            return torch.cat(model.jvp(x, t, text, tx, torch.ones_like(t)))
        with torch.no_grad():
            return model(x, t, text)

    fused = run()
    monkeypatch.setenv("RCM_RESIDUAL_NORM_FUSION", "0")
    assert torch.equal(run(), fused)


@pytest.mark.gpu
def test_gpu_fast_paths_match_the_plain_block_in_bf16(monkeypatch, epilogue_calls):
    """On CUDA the new paths compile and run for real: the GELU epilogue (cuBLASLt) and the chained regions
    (torch.compile) against the separate regions and megatron's fc1, bf16, one rounding apart."""
    mlp = _mlp(torch.bfloat16, "cuda", 128, 512)
    x = torch.randn(300, 2, 128, device="cuda", dtype=torch.bfloat16)
    calls = epilogue_calls
    with torch.no_grad():
        got = mlp(x)[0]
        assert len(calls) == 1, "on CUDA without grad the epilogue path is the default"
        mlp.gelu_epilogue = False
        expected = mlp(x)[0]
    assert relative_error(got.double(), expected.double()) <= 2e-2

    state.ensure_parallel()
    torch.manual_seed(0)
    cfg = dataclasses.replace(PRESETS["wan-tiny"], attention_head_dim=64, ffn_dim=256)
    model = WanModel(cfg, params_dtype=torch.bfloat16).cuda()
    x, t, text = (a.cuda() for a in inputs(2, 3, 8, 8))
    x, text = x.bfloat16(), text.bfloat16()
    tx, tt = torch.randn_like(x), torch.ones_like(t)
    with torch.no_grad():
        fast = model(x, t, text)
    fast_jvp = model.jvp(x, t, text, tx, tt)
    monkeypatch.setenv("RCM_RESIDUAL_NORM_FUSION", "0")
    monkeypatch.setenv("RCM_GELU_EPILOGUE", "0")
    with torch.no_grad():
        plain = model(x, t, text)
    plain_jvp = model.jvp(x, t, text, tx, tt)
    assert relative_error(fast.double(), plain.double()) <= 2e-2
    for a, b in zip(fast_jvp, plain_jvp):
        assert relative_error(a.double(), b.double()) <= 2e-2
