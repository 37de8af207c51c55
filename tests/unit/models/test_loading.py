"""models/loading.py: `from_pretrained` on diffusers, pipeline, original-release and megatron-rcm folders, the
diffusers -> megatron-rcm -> diffusers round trip, and the errors that name a bad checkpoint's problem."""

import json
import os
import subprocess
import sys

import pytest
import torch
from cosmos_reference import diffusers_cosmos
from cosmos_reference import inputs as cosmos_inputs
from cosmos_reference import megatron_state_dict as cosmos_state_dict
from wan_reference import corrupted_copy as _corrupt, diffusers_wan, hf_dir, inputs, megatron_state_dict  # noqa: F401

from megatron_rcm.checkpoint import cosmos as cosmos_keys
from megatron_rcm.checkpoint.sharding import load_full_state_dict
from megatron_rcm.models import from_pretrained, save_diffusers, save_megatron
from megatron_rcm.models.cosmos import PRESETS as COSMOS_PRESETS
from megatron_rcm.models.cosmos import CosmosModel
from megatron_rcm.models.wan import PRESETS, WanModel


@pytest.fixture(scope="module")
def wan_pair():
    ref = diffusers_wan()
    ours = WanModel(PRESETS["wan-tiny"])
    load_full_state_dict(ours, megatron_state_dict(ref))
    return ref, ours


@pytest.fixture(scope="module")
def cosmos_pair():
    ref = diffusers_cosmos("cosmos-tiny")
    ours = CosmosModel(COSMOS_PRESETS["cosmos-tiny"])
    load_full_state_dict(ours, cosmos_state_dict(ref))
    return ref, ours


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="not a supported checkpoint"):
        from_pretrained(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        from_pretrained(str(tmp_path / "nope"))


def test_missing_tensor(hf_dir, tmp_path):
    bad = _corrupt(hf_dir, tmp_path, lambda sd: sd.pop("blocks.1.ffn.net.2.weight"))
    with pytest.raises(ValueError, match="blocks.1.mlp.linear_fc2.weight"):
        from_pretrained(str(bad))


def test_missing_fused_part(hf_dir, tmp_path):
    bad = _corrupt(hf_dir, tmp_path, lambda sd: sd.pop("blocks.0.attn1.to_k.bias"))
    with pytest.raises(ValueError, match="blocks.0.attn1.to_k.bias"):
        from_pretrained(str(bad))


def test_extra_tensor(hf_dir, tmp_path):
    bad = _corrupt(hf_dir, tmp_path, lambda sd: sd.update({"blocks.0.surprise": torch.zeros(3)}))
    with pytest.raises(ValueError, match="blocks.0.surprise"):
        from_pretrained(str(bad))


def test_shape_mismatch(hf_dir, tmp_path):
    def edit(sd):
        sd["proj_out.weight"] = sd["proj_out.weight"][:, :-1].contiguous()
    bad = _corrupt(hf_dir, tmp_path, edit)
    with pytest.raises(ValueError, match="shape mismatch for 'head.weight'"):
        from_pretrained(str(bad))


def test_wan_diffusers_megatron_diffusers_round_trip_is_bit_exact(tmp_path, wan_pair):
    ref, _ = wan_pair
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


def test_pipeline_folder_resolves_to_transformer(tmp_path, wan_pair):
    ref, ours = wan_pair
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    ref.save_pretrained(tmp_path / "pipe" / "transformer")
    net = from_pretrained(str(tmp_path / "pipe"), params_dtype=torch.float32)
    x, t, text = inputs()
    with torch.no_grad():
        assert torch.equal(net(x, t, text), ours(x, t, text))


def test_cosmos_diffusers_megatron_diffusers_round_trip_is_bit_exact(tmp_path, cosmos_pair):
    ref, ours = cosmos_pair
    ref.save_pretrained(tmp_path / "hf")
    net = from_pretrained(str(tmp_path / "hf"), params_dtype=torch.float32)
    assert isinstance(net, CosmosModel) and net.config == COSMOS_PRESETS["cosmos-tiny"]
    save_megatron(net, str(tmp_path / "mcore"))
    net2 = from_pretrained(str(tmp_path / "mcore"), params_dtype=torch.float32)
    save_diffusers(net2, str(tmp_path / "hf2"))
    back = type(ref).from_pretrained(tmp_path / "hf2")
    a, b = ref.state_dict(), back.state_dict()
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    x, t, text = cosmos_inputs(1, 2, 4, 4)
    with torch.no_grad():
        assert torch.equal(net2(x, t, text), ours(x, t, text))


def test_cosmos_original_release_pickle_imports_with_a_preset(tmp_path, cosmos_pair):
    """An original-release folder (`model.pt`, no config) converts with --preset and loads like the diffusers one."""
    ref, ours = cosmos_pair
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
