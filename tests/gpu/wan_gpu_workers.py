"""Worker functions for the multi-GPU tests (importable by spawned processes)."""

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "unit", "models"))


def check_tp_nccl():
    from wan_reference import diffusers_wan, inputs, megatron_state_dict

    from megatron_rcm.checkpoint.sharding import gather_grads, load_full_state_dict
    from megatron_rcm.models.wan import PRESETS, WanModel
    from megatron_rcm.parallel import initialize_parallel

    initialize_parallel(tensor_model_parallel_size=2)
    ref = diffusers_wan("wan-tiny-tp")
    full = megatron_state_dict(ref)
    x, t, text = (a.cuda() for a in inputs(2, 3, 6, 8))
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    ref = ref.cuda()
    w = torch.randn(x.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(3))
    expected = ref(x, t, text, return_dict=False)[0]
    (expected * w).sum().backward()
    from megatron_rcm.checkpoint import wan as wan_keys

    ref_grads = wan_keys.hf_to_mcore({n: p.grad for n, p in ref.named_parameters()}, 4)
    for sp in (False, True):
        model = WanModel(PRESETS["wan-tiny-tp"], sequence_parallel=sp).cuda()
        load_full_state_dict(model, full)
        out = model(x, t, text)
        assert ((out - expected).abs().max() / expected.abs().max()).item() <= 1e-4
        (out * w).sum().backward()
        for name, g in gather_grads(model).items():
            err = ((g - ref_grads[name]).abs().max() / ref_grads[name].abs().max()).item()
            assert err <= 1e-3, (sp, name, err)
