"""Cosmos-Predict2 DiT against diffusers' CosmosTransformer3DModel: forward, grads, counts, conversion, bad input."""

import os
import subprocess
import sys

import pytest
import torch
from cosmos_reference import (
    diffusers_cosmos,
    inputs,
    megatron_grads,
    megatron_state_dict,
    reference,
    relative_error,
)
from diffusers.loaders.single_file_utils import convert_cosmos_transformer_checkpoint_to_diffusers

from megatron_rcm.checkpoint import cosmos as cosmos_keys
from megatron_rcm.checkpoint.sharding import load_full_state_dict
from megatron_rcm.models import from_pretrained, save_diffusers, save_megatron
from megatron_rcm.models.cosmos import PRESETS, CosmosConfig, CosmosModel

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _pair(preset):
    ref = diffusers_cosmos(preset)
    ours = CosmosModel(PRESETS[preset])
    load_full_state_dict(ours, megatron_state_dict(ref))
    return ref, ours


@pytest.fixture(scope="module")
def pair():
    return _pair("cosmos-tiny")


@pytest.mark.parametrize("shape", [(2, 1, 6, 8), (3, 1, 4, 4), (2, 3, 6, 8), (1, 5, 4, 6)])
def test_forward_matches_diffusers(pair, shape):
    """Images (T=1) and videos, batch > 1."""
    ref, ours = pair
    x, t, text = inputs(*shape)
    with torch.no_grad():
        expected = reference(ref, x, t, text)
        got = ours(x, t, text)
    assert got.shape == expected.shape == x.shape
    assert relative_error(got, expected) <= 1e-5


def test_video_fps_padding_mask_and_per_frame_timestep_match_diffusers(pair):
    ref, ours = pair
    x, t, text = inputs(1, 4, 6, 8)
    g = torch.Generator().manual_seed(4)
    pad = (torch.rand(1, 1, 6, 8, generator=g) > 0.5).float()
    per_frame = torch.rand(1, 4, generator=g)
    with torch.no_grad():
        for kw in (dict(fps=16), dict(padding_mask=pad), dict(fps=30, padding_mask=pad)):
            expected = reference(ref, x, t, text, **kw)
            assert relative_error(ours(x, t, text, **kw), expected) <= 1e-5, kw
            assert relative_error(expected, reference(ref, x, t, text)) > 1e-3, kw  # the option matters
        expected = reference(ref, x, per_frame, text, fps=16)
        assert relative_error(ours(x, per_frame, text, fps=16), expected) <= 1e-5


@pytest.mark.parametrize("preset", ["cosmos-tiny-learnable", "cosmos-tiny-v2w"])
def test_learnable_position_and_video2world_match_diffusers(preset):
    ref, ours = _pair(preset)
    x, t, text = inputs(2, 3, 6, 8)
    kw = {}
    if preset.endswith("v2w"):
        # Video2World: a condition-mask channel and per-frame timesteps (conditioning frame at s ~ 1e-4)
        mask = torch.zeros(2, 1, 3, 6, 8)
        mask[:, :, :1] = 1
        kw = dict(condition_mask=mask, fps=16)
        t = torch.stack([torch.full((2,), 1e-4 / (1 + 1e-4)), t, t], dim=1)
    with torch.no_grad():
        expected = reference(ref, x, t, text, **kw)
        got = ours(x, t, text, **kw)
    assert relative_error(got, expected) <= 1e-5


def test_backward_matches_diffusers(pair):
    ref, ours = pair
    x, t, text = inputs(2, 3, 6, 8)
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    ref.zero_grad(), ours.zero_grad()
    (reference(ref, x, t, text) * w).sum().backward()
    (ours(x, t, text) * w).sum().backward()
    ref_grads = megatron_grads(ref)
    for name, p in ours.named_parameters():
        assert relative_error(p.grad, ref_grads[name]) <= 1e-4, name


@pytest.mark.parametrize("preset,count", [
    ("cosmos-predict2-2b-t2i", 1_956_405_248), ("cosmos-predict2-14b-t2i", 14_265_265_152),
    ("cosmos-predict2-2b-v2w", 1_956_413_440), ("cosmos-predict2-14b-v2w", 14_265_285_632)])
def test_preset_parameter_counts(preset, count):
    """T2I counts are diffusers' published ones; V2W counts were measured on diffusers' model (meta device)."""
    with torch.device("meta"):
        model = CosmosModel(PRESETS[preset], params_dtype=torch.bfloat16, perform_initialization=False)
    assert sum(p.numel() for p in model.parameters()) == count


def test_preset_configs_are_diffusers_configs():
    """A config survives the trip through diffusers' config.json fields."""
    for name, cfg in PRESETS.items():
        assert CosmosConfig.from_diffusers(cfg.to_diffusers()) == cfg, name
    with pytest.raises(ValueError, match="Cosmos 2.5"):
        CosmosConfig.from_diffusers({**PRESETS["cosmos-tiny"].to_diffusers(), "use_crossattn_projection": True})


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
    with pytest.raises(ValueError, match="exceeds the model's max_size"):
        ours(torch.zeros(1, 4, 9, 2, 2), t[:1], text[:1])  # 9 frames > max_size 8 (tables cover 8)


def test_diffusers_megatron_diffusers_round_trip_is_bit_exact(tmp_path, pair):
    ref, ours = pair
    ref.save_pretrained(tmp_path / "hf")
    net = from_pretrained(str(tmp_path / "hf"), params_dtype=torch.float32)
    assert isinstance(net, CosmosModel) and net.config == PRESETS["cosmos-tiny"]
    save_megatron(net, str(tmp_path / "mcore"))
    net2 = from_pretrained(str(tmp_path / "mcore"), params_dtype=torch.float32)
    save_diffusers(net2, str(tmp_path / "hf2"))
    back = type(ref).from_pretrained(tmp_path / "hf2")
    a, b = ref.state_dict(), back.state_dict()
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    x, t, text = inputs(1, 2, 4, 4)
    with torch.no_grad():
        assert torch.equal(net2(x, t, text), ours(x, t, text))


def test_convert_tool_round_trip_is_bit_exact(tmp_path, pair):
    ref, _ = pair
    ref.save_pretrained(tmp_path / "hf")
    tool = [sys.executable, os.path.join(ROOT, "tools", "convert_checkpoint.py")]
    for cmd, src, dst in (("hf-to-mcore", "hf", "mcore"), ("mcore-to-hf", "mcore", "hf2")):
        r = subprocess.run([*tool, cmd, "--model", "cosmos", "--input", str(tmp_path / src), "--output",
                            str(tmp_path / dst)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
    back = type(ref).from_pretrained(tmp_path / "hf2")
    a, b = ref.state_dict(), back.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_original_release_names_agree_with_diffusers_converter(pair):
    """Our original <-> diffusers maps against diffusers' own single-file converter for Cosmos 2.0 checkpoints."""
    ref, ours = pair
    hf_sd = ref.state_dict()
    original = cosmos_keys.hf_to_original(hf_sd)
    assert "net.blocks.0.self_attn.q_proj.weight" in original and "net.x_embedder.proj.1.weight" in original
    # non-weight entries of the original release, dropped on import
    original.update({"net.pos_embedder.seq": torch.arange(4.0), "net.pos_embedder.dim_spatial_range": torch.zeros(2),
                     "net.pos_embedder.dim_temporal_range": torch.zeros(2), "net.accum_iteration": torch.tensor(3),
                     "net.blocks.0.self_attn._extra_state": torch.zeros(1)})
    theirs = convert_cosmos_transformer_checkpoint_to_diffusers(dict(original))
    mine = cosmos_keys.original_to_hf(original)
    assert set(theirs) == set(mine) == set(hf_sd)
    assert all(torch.equal(mine[k], hf_sd[k]) and torch.equal(theirs[k], hf_sd[k]) for k in hf_sd)
    ours_sd = cosmos_keys.hf_to_mcore(mine, ref.config.num_attention_heads)
    for name, p in ours.named_parameters():
        assert torch.equal(p, ours_sd[name]), name
    with pytest.raises(KeyError, match="surprise"):
        cosmos_keys.original_to_hf({"net.blocks.0.surprise.weight": torch.zeros(1)})


def test_original_release_pickle_imports_with_a_preset(tmp_path, pair):
    """An original-release folder (`model.pt`, no config) converts with --preset and loads like the diffusers one."""
    ref, ours = pair
    (tmp_path / "orig").mkdir()
    torch.save(cosmos_keys.hf_to_original(ref.state_dict()), tmp_path / "orig" / "model.pt")
    with pytest.raises(ValueError, match="name its architecture with a preset"):
        from_pretrained(str(tmp_path / "orig"), params_dtype=torch.float32)
    net = from_pretrained(str(tmp_path / "orig"), params_dtype=torch.float32, preset="cosmos-tiny")
    expected = dict(ours.named_parameters())
    for name, p in net.named_parameters():
        assert torch.equal(p, expected[name]), name
    tool = [sys.executable, os.path.join(os.path.dirname(__file__), "..", "..", "..", "tools", "convert_checkpoint.py")]
    r = subprocess.run([*tool, "hf-to-mcore", "--model", "cosmos", "--preset", "cosmos-tiny", "--input",
                        str(tmp_path / "orig"), "--output", str(tmp_path / "mcore")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    net = from_pretrained(str(tmp_path / "mcore"), params_dtype=torch.float32)
    for name, p in net.named_parameters():
        assert torch.equal(p, expected[name]), name
