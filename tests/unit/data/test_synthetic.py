"""Teacher samples written as latent shards by tools/generate_synthetic_data.py (tiny random teacher)."""

import importlib.util
import os

import pytest
import torch

from megatron_rcm.data import latent_loader
from megatron_rcm.data.synthetic import sample_noise
from megatron_rcm.data.testing import TINY_SENTENCES, save_tiny_text_encoder
from megatron_rcm.diffusion import TrigFlowWrapper, euler_sample
from megatron_rcm.models import from_pretrained
from megatron_rcm.models.encoders import TextEncoderConfig, UMT5TextEncoder
from megatron_rcm.models.wan import PRESETS

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def load_tool():
    spec = importlib.util.spec_from_file_location("generate_synthetic_data",
                                                  os.path.join(REPO, "tools", "generate_synthetic_data.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from diffusers import WanTransformer3DModel

    root = tmp_path_factory.mktemp("syn")
    config = PRESETS["wan-tiny"].to_diffusers()
    config.pop("_class_name")
    torch.manual_seed(0)
    WanTransformer3DModel(**config).save_pretrained(root / "teacher")
    save_tiny_text_encoder(str(root / "text"), hidden=PRESETS["wan-tiny"].text_dim)
    (root / "prompts.txt").write_text("\n".join(TINY_SENTENCES[:3]) + "\n")
    return root


def test_teacher_shards_match_direct_sampling(tiny, tmp_path):
    tool = load_tool()
    argv = ["--prompts", str(tiny / "prompts.txt"), "--teacher", str(tiny / "teacher"), "--text-encoder",
            str(tiny / "text"), "--output", str(tmp_path / "out"), "--frames", "5", "--height", "32", "--width", "32",
            "--steps", "3", "--guidance", "2", "--samples-per-shard", "2", "--batch-size", "2", "--dtype", "float32",
            "--latent-dtype", "float32", "--max-text-length", "16", "--device", "cpu", "--no-progress"]
    assert tool.main(argv) == {"written": 2, "existing": 0, "samples": 3}
    assert tool.main(argv)["existing"] == 2  # resumed: nothing redone

    loader = latent_loader(tmp_path / "out", batch_size=3, shuffle=False)
    assert loader.meta.source == "teacher" and loader.meta.latent_shape == [4, 2, 4, 4]
    batch = next(loader)
    assert batch["caption"] == TINY_SENTENCES[:3]

    # Reference: the teacher's Euler sampler called directly on the same noise, text and negative prompt.
    net = from_pretrained(str(tiny / "teacher"), params_dtype=torch.float32, device="cpu")
    teacher = TrigFlowWrapper(net, timestep_scale=net.config.timestep_scale)
    text = UMT5TextEncoder.from_pretrained(tiny / "text", dtype=torch.float32, config=TextEncoderConfig(max_length=16))
    i = 2
    expected = euler_sample(teacher, sample_noise((4, 2, 4, 4), 0, i)[None], text([TINY_SENTENCES[i]]), 3,
                            shift=3.0, guidance=2.0, neg_text=text.negative_embedding())
    torch.testing.assert_close(batch["latent"][i], expected[0].float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batch["text_embedding"][i], text([TINY_SENTENCES[i]])[0])
