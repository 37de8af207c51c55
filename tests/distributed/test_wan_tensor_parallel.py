"""Wan DiT at TP=2 and TP=2 + sequence parallel (2 gloo processes) against the single-process diffusers model."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "unit", "models"))
from wan_reference import diffusers_wan, inputs, megatron_state_dict, relative_error  # noqa: E402

from megatron_rcm.parallel import run_on_ranks  # noqa: E402

pytestmark = pytest.mark.distributed


def _check_tp(ckpt_dir, tp1_dir):
    from megatron_rcm.checkpoint import wan as wan_keys
    from megatron_rcm.checkpoint.sharding import gather_grads, load_full_state_dict
    from megatron_rcm.models import save_megatron
    from megatron_rcm.models.wan import PRESETS, WanConfig, WanModel
    from megatron_rcm.parallel import initialize_parallel

    initialize_parallel(tensor_model_parallel_size=2)
    ref = diffusers_wan("wan-tiny-tp")
    full = megatron_state_dict(ref)
    x, t, text = inputs(2, 3, 6, 8)
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    expected = ref(x, t, text, return_dict=False)[0]
    (expected * w).sum().backward()
    ref_grads = wan_keys.hf_to_mcore({n: p.grad for n, p in ref.named_parameters()}, 4)

    for sp in (False, True):
        model = WanModel(PRESETS["wan-tiny-tp"], sequence_parallel=sp)
        assert model.sequence_parallel == sp
        load_full_state_dict(model, full)
        out = model(x, t, text)
        assert relative_error(out.detach(), expected.detach()) <= 1e-5, f"sp={sp}"
        (out * w).sum().backward()
        grads = gather_grads(model)
        assert set(grads) == set(ref_grads)
        for name, g in grads.items():
            assert relative_error(g, ref_grads[name]) <= 1e-4, f"sp={sp} {name}"
    save_megatron(model, ckpt_dir)

    # a checkpoint written by one process at TP=1 loads here at TP=2
    from megatron_rcm.models import from_pretrained

    loaded = from_pretrained(tp1_dir, params_dtype=torch.float32, sequence_parallel=True)
    assert relative_error(loaded(x, t, text).detach(), expected.detach()) <= 1e-5

    with pytest.raises(ValueError, match="does not divide the 3 attention heads"):
        WanModel(WanConfig(num_attention_heads=3, attention_head_dim=12, ffn_dim=32, num_layers=1, in_channels=4,
                           out_channels=4, text_dim=16, freq_dim=16))


def test_tensor_and_sequence_parallel_match_single_process(tmp_path):
    from megatron_rcm.checkpoint.sharding import load_full_state_dict
    from megatron_rcm.models import save_megatron
    from megatron_rcm.models.wan import PRESETS, WanModel

    single = WanModel(PRESETS["wan-tiny-tp"])
    load_full_state_dict(single, megatron_state_dict(diffusers_wan("wan-tiny-tp")))
    save_megatron(single, str(tmp_path / "tp1"))
    ckpt = str(tmp_path / "tp2")
    run_on_ranks(_check_tp, 2, ckpt, str(tmp_path / "tp1"))
    # a checkpoint written at TP=2 loads at TP=1 bit-exact
    from megatron_rcm.models import from_pretrained

    net = from_pretrained(ckpt, params_dtype=torch.float32)
    full = megatron_state_dict(diffusers_wan("wan-tiny-tp"))
    for name, p in net.named_parameters():
        assert torch.equal(p, full[name]), name


def _check_tp_jvp():
    from wan_float64_reference import float64_diffusers, reference_jvp

    from megatron_rcm.checkpoint.sharding import load_full_state_dict
    from megatron_rcm.models.wan import PRESETS, WanModel
    from megatron_rcm.parallel import initialize_parallel

    initialize_parallel(tensor_model_parallel_size=2)
    with float64_diffusers():
        ref = diffusers_wan("wan-tiny-tp", dtype=torch.float64)
        ref.rope.__init__(ref.config.attention_head_dim, ref.config.patch_size, ref.config.rope_max_seq_len)
    x, t, text = inputs(2, 3, 6, 8, dtype=torch.float64)
    g = torch.Generator().manual_seed(5)
    tx = torch.randn(x.shape, generator=g, dtype=torch.float64)
    tt = 100 * torch.randn(t.shape, generator=g, dtype=torch.float64)
    with float64_diffusers():
        expected, expected_tangent = reference_jvp(ref, x, t, text, tx, tt)
    for sp in (False, True):
        model = WanModel(PRESETS["wan-tiny-tp"], params_dtype=torch.float64, sequence_parallel=sp)
        load_full_state_dict(model, megatron_state_dict(ref))
        out, tangent = model.jvp(x, t, text, tx, tt)
        assert relative_error(out, expected) <= 1e-6, f"sp={sp}"
        assert relative_error(tangent, expected_tangent) <= 1e-6, f"sp={sp}"


def test_jvp_under_tensor_and_sequence_parallel():
    run_on_ranks(_check_tp_jvp, 2)
