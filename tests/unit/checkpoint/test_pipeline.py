"""A tiny Wan student exported as a diffusers pipeline folder runs in the stock `WanPipeline` with our scheduler and
reproduces our own 4-step sampler."""

import json
import os
from pathlib import Path

import pytest
import torch

from megatron_rcm.checkpoint.pipeline import BASE_MODEL_KEY, PipelineExport
from megatron_rcm.data.testing import TINY_SENTENCES, save_tiny_text_encoder, save_tiny_vae
from megatron_rcm.diffusion import TrigFlowWrapper, student_sample
from megatron_rcm.diffusion.pipeline_scheduler import RCMScheduler
from megatron_rcm.models.loading import ARCHITECTURES, build_model, save_diffusers
from megatron_rcm.models.wan import WanConfig

# in/out channels and text width fixed by the tiny VAE (z_dim 16) and text encoder (hidden 32)
TINY = WanConfig(num_attention_heads=2, attention_head_dim=12, ffn_dim=48, num_layers=2, in_channels=16,
                 out_channels=16, text_dim=32, freq_dim=16)
TEXT_LEN = 16


def random_student(seed=0):
    """Every parameter drawn from one seeded generator (megatron's init does not follow torch's seed; norms at 1 and
    zero biases would also hide mistakes)."""
    g = torch.Generator().manual_seed(seed)
    net = build_model(ARCHITECTURES["wan"], TINY, torch.float32, perform_initialization=False)
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g) + (1.0 if "norm.weight" in name else 0.0))
    return net.eval()


def save_base_pipeline(root) -> str:
    """A local base Wan pipeline folder under `root` (tiny VAE, text encoder, tokenizer, a teacher transformer)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import AutoTokenizer, UMT5EncoderModel

    parts = os.path.join(root, "parts")
    vae = save_tiny_vae(parts)
    save_tiny_text_encoder(parts)
    teacher = WanTransformer3DModel(**{k: v for k, v in TINY.to_diffusers().items() if k != "_class_name"})
    pipe = WanPipeline(tokenizer=AutoTokenizer.from_pretrained(os.path.join(parts, "tokenizer")),
                       text_encoder=UMT5EncoderModel.from_pretrained(os.path.join(parts, "text_encoder")), vae=vae,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), transformer=teacher)
    base = os.path.join(root, "Wan-tiny-Diffusers")
    pipe.save_pretrained(base)
    return base


@pytest.fixture(scope="module")
def base_pipeline(tmp_path_factory):
    return Path(save_base_pipeline(str(tmp_path_factory.mktemp("base"))))


def sample_both(export, base_pipeline, steps, batch=2, seed=3, device="cpu"):
    """(WanPipeline's latents, student_sample's) from the same noise and generator seed."""
    from diffusers import WanPipeline

    from megatron_rcm.models.encoders import TextEncoderConfig, UMT5TextEncoder

    net = random_student().to(device)
    pipe = WanPipeline.from_pretrained(export).to(device)
    assert isinstance(pipe.scheduler, RCMScheduler)
    prompts = TINY_SENTENCES[:batch]
    noise = torch.randn(batch, 16, 2, 4, 4, generator=torch.Generator().manual_seed(seed),
                        dtype=torch.float64).to(device)
    pipe.scheduler.generator = torch.Generator().manual_seed(seed + 1)
    theirs = pipe(prompt=prompts, num_inference_steps=steps, guidance_scale=1.0, height=32, width=32, num_frames=5,
                  latents=(noise * pipe.scheduler.init_noise_sigma).float(), max_sequence_length=TEXT_LEN,
                  output_type="latent").frames
    encoder = UMT5TextEncoder.from_pretrained(base_pipeline, dtype=torch.float32, device=device,
                                              config=TextEncoderConfig(max_length=TEXT_LEN))
    ours = student_sample(TrigFlowWrapper(net, 1000.0), noise, encoder(prompts).to(device), steps,
                          generator=torch.Generator().manual_seed(seed + 1))
    return theirs, ours


def test_wan_pipeline_reproduces_our_4_step_sample(tmp_path, base_pipeline):
    export = tmp_path / "student"
    save_diffusers(random_student(), str(export), pipeline=PipelineExport(
        base_model=str(base_pipeline), card={"dmd_weight": 0.01, "scm_weight": 1.0, "iterations": 600,
                                             "command": "pretrain_rcm.py --config wan.yaml"}))
    assert sorted(os.listdir(export)) == ["README.md", "model_index.json", "scheduler", "text_encoder", "tokenizer",
                                          "transformer", "vae"]
    card = (export / "README.md").read_text()
    assert "987.7, 782.7, 609.0, 406.2" in card and "lambda (DMD weight / sCM weight): 0.01" in card
    assert "Training iterations: 600" in card and "pretrain_rcm.py --config wan.yaml" in card
    theirs, ours = sample_both(export, base_pipeline, 4)
    assert ours.abs().max() > 0.1  # a real sample, not a degenerate one
    err = (theirs.double() - ours).abs().max().item()
    assert err < 1e-5, err
    # and the steps differ from each other: 2 steps is another sample
    theirs2, ours2 = sample_both(export, base_pipeline, 2)
    assert (theirs2.double() - ours2).abs().max().item() < 1e-5
    assert (ours2 - ours).abs().max().item() > 1e-2


def test_components_named_not_copied_without_a_local_base(tmp_path, base_pipeline):
    from diffusers import AutoencoderKLWan, WanPipeline
    from transformers import AutoTokenizer, UMT5EncoderModel

    export = tmp_path / "student"
    save_diffusers(random_student(), str(export), pipeline=PipelineExport(base_model="Wan-AI/Wan2.1-T2V-1.3B-Diffusers"))
    assert sorted(os.listdir(export)) == ["README.md", "model_index.json", "scheduler", "transformer"]
    index = json.loads((export / "model_index.json").read_text())
    assert index[BASE_MODEL_KEY] == "Wan-AI/Wan2.1-T2V-1.3B-Diffusers" and index["vae"] == [None, None]
    assert 'base = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"' in (export / "README.md").read_text()
    # the components come from the base, as the card says (here: the local tiny one)
    pipe = WanPipeline.from_pretrained(
        export, vae=AutoencoderKLWan.from_pretrained(base_pipeline / "vae"),
        text_encoder=UMT5EncoderModel.from_pretrained(base_pipeline / "text_encoder"),
        tokenizer=AutoTokenizer.from_pretrained(base_pipeline / "tokenizer"))
    assert isinstance(pipe.scheduler, RCMScheduler) and pipe.scheduler.timesteps.shape == (4,)


def test_pipeline_export_of_cosmos_is_refused(tmp_path):
    from megatron_rcm.models import get_preset

    name, config = get_preset("cosmos-tiny")
    net = build_model(ARCHITECTURES[name], config, torch.float32)
    with pytest.raises(ValueError, match="--transformer-only"):
        save_diffusers(net, str(tmp_path / "out"), pipeline=PipelineExport())
    assert os.listdir(tmp_path) == []
