#!/usr/bin/env python3
"""Cosmos-Predict2 DiT forward (and JVP pass) time and peak memory: megatron-rcm next to diffusers, same weights,
one GPU, both in the same process.

  python benchmarks/cosmos_forward.py --out cosmos_forward.json

Cases (random weights from diffusers' init, bf16, batch 1, 512 T5 tokens, `torch.no_grad()`):
  image  cosmos-predict2-2b-t2i at 1360x768 -> latent 16x1x96x170 (4,080 tokens), timestep s = 0.5, as diffusers'
         Cosmos2TextToImagePipeline calls it (all-zero padding mask).
  video  cosmos-predict2-2b-v2w at 1280x704x93 -> latent 16x24x88x160 (84,480 tokens), as diffusers'
         Cosmos2VideoToWorldPipeline calls it: condition mask on the first latent frame, per-frame timesteps (that
         frame at s = 1e-4 / (1 + 1e-4)), fps 16, all-zero padding mask.
diffusers runs with its default attention dispatch and with SDPA forced to cuDNN; ours with its own backend choice.
"""

import argparse
import enum
import time
import types
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402
from timing import save, timed, timing_line  # noqa: E402
import torch.nn.functional as F  # noqa: E402

CASES = {
    "image": dict(preset="cosmos-predict2-2b-t2i", latent=(16, 1, 96, 170)),
    "video": dict(preset="cosmos-predict2-2b-v2w", latent=(16, 24, 88, 160)),
}
TINY_CASES = {  # --tiny: the same code path on the test presets (checks the script on a CPU)
    "image": dict(preset="cosmos-tiny", latent=(4, 1, 6, 8)),
    "video": dict(preset="cosmos-tiny-v2w", latent=(4, 3, 6, 8)),
}


def _torchvision_resize_fallback():
    """diffusers' Cosmos forward resizes the padding mask with torchvision; without it, give it the nearest-neighbour
    tensor resize torchvision would run (the mask here is at the latent size, where it is the identity)."""
    from diffusers.models.transformers import transformer_cosmos

    if hasattr(transformer_cosmos, "transforms"):
        return
    mode = enum.Enum("InterpolationMode", {"NEAREST": "nearest"})
    transformer_cosmos.transforms = types.SimpleNamespace(
        InterpolationMode=mode,
        functional=types.SimpleNamespace(resize=lambda img, size, interpolation=None: F.interpolate(
            img, size=list(size), mode="nearest")))


def run_case(case: dict, name: str, iters: int, skip_jvp: bool, dev: torch.device) -> dict:
    from diffusers import CosmosTransformer3DModel
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from megatron_rcm.checkpoint import cosmos as cosmos_keys
    from megatron_rcm.checkpoint.sharding import load_full_state_dict
    from megatron_rcm.models.cosmos import PRESETS, CosmosModel

    model_config = PRESETS[case["preset"]]
    torch.manual_seed(0)
    t0 = time.time()
    with torch.device(dev):
        ref = CosmosTransformer3DModel(**{k: v for k, v in model_config.to_diffusers().items() if k != "_class_name"})
    ref = ref.to(torch.bfloat16).eval()
    ours = CosmosModel(model_config, params_dtype=torch.bfloat16, perform_initialization=False).to(dev)
    load_full_state_dict(ours, cosmos_keys.hf_to_mcore(ref.state_dict(), model_config.num_attention_heads))
    ours.eval()
    build_s = time.time() - t0

    c, f, h, w = case["latent"]
    x = torch.randn(1, c, f, h, w, device=dev, dtype=torch.bfloat16)
    text = torch.randn(1, 512, model_config.text_embed_dim, device=dev, dtype=torch.bfloat16)
    pad = torch.zeros(1, 1, h, w, device=dev, dtype=torch.bfloat16)
    ours_kw, ref_kw = {}, dict(padding_mask=pad)
    if name == "video":
        mask = torch.zeros(1, 1, f, h, w, device=dev, dtype=torch.bfloat16)
        mask[:, :, :1] = 1
        t = torch.full((1, f), 0.5, device=dev)
        t[:, 0] = 1e-4 / (1 + 1e-4)
        ours_kw = dict(condition_mask=mask, fps=16)
        ref_kw.update(condition_mask=mask, fps=16)
        ref_t = t.to(torch.bfloat16)[:, None, :, None, None]  # the pipeline casts the timestep to bf16
    else:
        t = torch.tensor([0.5], device=dev)
        ref_t = t.to(torch.bfloat16)
    tokens = f * (h // 2) * (w // 2)
    res = {"preset": case["preset"], "latent": list(case["latent"]), "tokens": tokens, "build_s": build_s}

    def ref_fn():
        return ref(x, ref_t, text, return_dict=False, **ref_kw)[0]

    with torch.no_grad():
        res["diffusers_default"] = timed(ref_fn, iters)
        if dev.type == "cuda":
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                res["diffusers_cudnn"] = timed(ref_fn, iters)
        res["ours_forward"] = timed(lambda: ours(x, t, text, **ours_kw), iters)
        a = ref_fn().float()
        b = ours(x, t, text, **ours_kw).float()
        res["ours_vs_diffusers_rel_err"] = ((a - b).norm() / a.norm()).item()
    if not skip_jvp:
        tx, tt = torch.randn_like(x), torch.ones_like(t)
        t1 = time.time()
        ours.jvp(x, t, text, tx, tt, **ours_kw)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        res["ours_jvp_first_call_s"] = time.time() - t1
        res["ours_jvp"] = timed(lambda: ours.jvp(x, t, text, tx, tt, **ours_kw), iters)
    del ref, ours
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", choices=sorted(CASES), default=["image", "video"])
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--skip-jvp", action="store_true")
    p.add_argument("--tiny", action="store_true", help="tiny test presets (to check the script, e.g. on a CPU)")
    p.add_argument("--out")
    args = p.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cases = TINY_CASES if args.tiny else CASES

    from megatron_rcm.models.attention import attention_backend

    _torchvision_resize_fallback()
    gpu = dev.type == "cuda"
    major = torch.cuda.get_device_capability()[0] if gpu else 0
    results = {"device": torch.cuda.get_device_name() if gpu else "cpu", "torch": torch.__version__,
               "our_attention_backend": attention_backend(dev.type, major)}
    for name in args.cases:
        r = results[name] = run_case(cases[name], name, args.iters, args.skip_jvp, dev)
        print(f"[{name}] {r['preset']} latent {r['latent']} ({r['tokens']} tokens)")
        for k in ("diffusers_default", "diffusers_cudnn", "ours_forward", "ours_jvp"):
            if k in r:
                print("  " + timing_line(k, r[k]))
        print(f"  ours / diffusers_default = {r['ours_forward']['ms_median'] / r['diffusers_default']['ms_median']:.3f}"
              f"   rel. error (bf16, L2) {r['ours_vs_diffusers_rel_err']:.4f}", flush=True)
    save(results, args.out)


if __name__ == "__main__":
    main()
