"""Shared helpers for Wan tests: a seeded diffusers reference model and its megatron-rcm twin."""

import pytest
import torch
from diffusers import WanTransformer3DModel

from megatron_rcm.checkpoint import wan as wan_keys
from megatron_rcm.models.wan import PRESETS


def diffusers_wan(preset="wan-tiny", seed: int = 0, dtype=torch.float32) -> WanTransformer3DModel:
    """A diffusers Wan model (preset name or WanConfig) with every parameter randomised (default init leaves norms
    at 1 and biases small)."""
    cfg = PRESETS[preset] if isinstance(preset, str) else preset
    torch.manual_seed(seed)
    model = WanTransformer3DModel(**{k: v for k, v in cfg.to_diffusers().items() if k != "_class_name"})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.to(dtype).eval()


def megatron_state_dict(model: WanTransformer3DModel) -> dict:
    return wan_keys.hf_to_mcore(model.state_dict(), model.config.num_attention_heads)


def inputs(batch=2, frames=3, height=6, width=8, seed=1, dtype=torch.float32, text_len=5, channels=4, text_dim=16):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, channels, frames, height, width, generator=g, dtype=dtype)
    timestep = torch.rand(batch, generator=g, dtype=dtype) * 1000
    text = torch.randn(batch, text_len, text_dim, generator=g, dtype=dtype)
    return latents, timestep, text


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A diffusers folder of the tiny Wan reference model (a fixture: import it into a test module)."""
    path = tmp_path_factory.mktemp("wan") / "hf"
    diffusers_wan().save_pretrained(path)
    return path


def corrupted_copy(hf_dir, tmp_path, edit):
    """A copy of the diffusers folder `hf_dir` whose state dict `edit` changed in place."""
    from safetensors.torch import load_file, save_file

    out = tmp_path / "bad"
    out.mkdir()
    (out / "config.json").write_text((hf_dir / "config.json").read_text())
    sd = load_file(hf_dir / "diffusion_pytorch_model.safetensors")
    edit(sd)
    save_file(sd, out / "diffusion_pytorch_model.safetensors")
    return out
