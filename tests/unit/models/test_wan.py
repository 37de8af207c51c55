import json
import os

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from safetensors.torch import save_file
from wan_reference import diffusers_wan, inputs, megatron_state_dict, relative_error

from megatron_rcm.checkpoint.sharding import load_full_state_dict
from megatron_rcm.models import from_pretrained, save_diffusers, save_megatron
from megatron_rcm.models.wan import PRESETS, WanModel


@pytest.fixture(scope="module")
def pair():
    ref = diffusers_wan()
    ours = WanModel(PRESETS["wan-tiny"])
    load_full_state_dict(ours, megatron_state_dict(ref))
    return ref, ours


@pytest.mark.parametrize("shape", [(2, 3, 6, 8), (1, 1, 4, 4), (3, 5, 10, 6), (2, 2, 4, 12)])
def test_forward_matches_diffusers(pair, shape):
    ref, ours = pair
    b, f, h, w = shape
    x, t, text = inputs(b, f, h, w)
    with torch.no_grad():
        expected = ref(x, t, text, return_dict=False)[0]
        got = ours(x, t, text)
    assert got.shape == expected.shape == x.shape
    assert relative_error(got, expected) <= 1e-5


def test_backward_matches_diffusers(pair):
    ref, ours = pair
    x, t, text = inputs(2, 3, 6, 8)
    w = torch.randn_like(x)
    ref.zero_grad(), ours.zero_grad()
    (ref(x, t, text, return_dict=False)[0] * w).sum().backward()
    (ours(x, t, text) * w).sum().backward()
    ref_grads = megatron_state_dict_of_grads(ref)
    for name, p in ours.named_parameters():
        assert relative_error(p.grad, ref_grads[name]) <= 1e-4, name


def megatron_state_dict_of_grads(model):
    from megatron_rcm.checkpoint import wan as wan_keys

    return wan_keys.hf_to_mcore({n: p.grad for n, p in model.named_parameters()}, model.config.num_attention_heads)


@pytest.mark.parametrize("preset,count", [("wan2.1-t2v-1.3b", 1_418_996_800), ("wan2.1-t2v-14b", 14_288_491_584)])
def test_preset_parameter_counts(preset, count):
    with torch.device("meta"):
        model = WanModel(PRESETS[preset], params_dtype=torch.bfloat16, perform_initialization=False)
    assert sum(p.numel() for p in model.parameters()) == count


def test_bad_inputs_are_named(pair):
    _, ours = pair
    x, t, text = inputs()
    with pytest.raises(ValueError, match="latents must be"):
        ours(x[:, :3], t, text)
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        ours(x[..., :5, :], t, text)
    with pytest.raises(ValueError, match="timestep must be"):
        ours(x, t[:1], text)
    with pytest.raises(ValueError, match="text must be"):
        ours(x, t, text[..., :8])


def test_diffusers_megatron_diffusers_round_trip_is_bit_exact(tmp_path, pair):
    ref, _ = pair
    ref.save_pretrained(tmp_path / "hf")
    net = from_pretrained(str(tmp_path / "hf"), params_dtype=torch.float32)
    save_megatron(net, str(tmp_path / "mcore"))
    net2 = from_pretrained(str(tmp_path / "mcore"), params_dtype=torch.float32)
    save_diffusers(net2, str(tmp_path / "hf2"))
    back = type(ref).from_pretrained(tmp_path / "hf2")
    a, b = ref.state_dict(), back.state_dict()
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not [p for p in os.listdir(tmp_path) if "incomplete" in p]


def test_pipeline_folder_resolves_to_transformer(tmp_path, pair):
    ref, ours = pair
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    ref.save_pretrained(tmp_path / "pipe" / "transformer")
    net = from_pretrained(str(tmp_path / "pipe"), params_dtype=torch.float32)
    x, t, text = inputs()
    with torch.no_grad():
        assert torch.equal(net(x, t, text), ours(x, t, text))


# original Wan-AI release names, written from Wan-Video/Wan2.1's module layout (independent of our key maps);
# diffusers' own single-file converter checks it below
def to_original(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        k = (k.replace("condition_embedder.time_embedder.linear_1", "time_embedding.0")
             .replace("condition_embedder.time_embedder.linear_2", "time_embedding.2")
             .replace("condition_embedder.text_embedder.linear_1", "text_embedding.0")
             .replace("condition_embedder.text_embedder.linear_2", "text_embedding.2")
             .replace("condition_embedder.time_proj", "time_projection.1")
             .replace("attn1", "self_attn").replace("attn2", "cross_attn").replace(".to_out.0.", ".o.")
             .replace(".to_q.", ".q.").replace(".to_k.", ".k.").replace(".to_v.", ".v.")
             .replace("ffn.net.0.proj", "ffn.0").replace("ffn.net.2", "ffn.2").replace("proj_out", "head.head")
             .replace(".norm2.", ".norm3."))
        if k == "scale_shift_table":
            k = "head.modulation"
        k = k.replace("scale_shift_table", "modulation")
        out["model.diffusion_model." + k] = v
    return out


def test_original_release_import_equals_diffusers(tmp_path, pair):
    ref, ours = pair
    original = to_original(ref.state_dict())
    assert any(".norm3." in k for k in original)
    # diffusers' own single-file converter agrees that this is the original layout
    back = convert_wan_transformer_to_diffusers(dict(original))
    assert set(back) == set(ref.state_dict())
    assert all(torch.equal(back[k], v) for k, v in ref.state_dict().items())
    (tmp_path / "orig").mkdir()
    save_file({k: v.contiguous() for k, v in original.items()}, tmp_path / "orig" / "model.safetensors")
    cfg = PRESETS["wan-tiny"]
    (tmp_path / "orig" / "config.json").write_text(json.dumps(dict(
        model_type="t2v", dim=cfg.hidden_size, num_heads=cfg.num_attention_heads, ffn_dim=cfg.ffn_dim,
        num_layers=cfg.num_layers, in_dim=cfg.in_channels, out_dim=cfg.out_channels, freq_dim=cfg.freq_dim,
        text_dim=cfg.text_dim, eps=cfg.eps)))
    net = from_pretrained(str(tmp_path / "orig"), params_dtype=torch.float32)
    expected = dict(ours.named_parameters())
    for name, p in net.named_parameters():
        assert torch.equal(p, expected[name]), name
