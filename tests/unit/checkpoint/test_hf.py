"""checkpoint/hf.py: diffusers model folders (config.json + safetensors) written and read back, in one file or in
shards with an index; a pipeline folder resolves to its transformer."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_rcm.checkpoint import hf


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(4, 8, generator=g),                        # 128 bytes
            "b.bias": torch.randn(16, generator=g).to(torch.bfloat16),         # 32 bytes
            "c": torch.arange(10, dtype=torch.int64)}                          # 80 bytes


def _assert_same(got, want):
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


def test_one_file_round_trip(tmp_path):
    sd, config = _tensors(), {"_class_name": "WanTransformer3DModel", "num_layers": 2}
    hf.write_model_dir(str(tmp_path), sd, config)
    assert sorted(os.listdir(tmp_path)) == ["config.json", hf.WEIGHTS]
    assert hf.read_config(str(tmp_path)) == config
    assert hf.safetensors_files(str(tmp_path)) == [str(tmp_path / hf.WEIGHTS)]
    _assert_same(hf.read_state_dict(str(tmp_path)), sd)


def test_shards_above_the_limit_with_an_index(tmp_path):
    sd = _tensors()
    hf.write_model_dir(str(tmp_path), sd, {}, max_shard_bytes=150)  # a.weight alone, then b.bias + c (112 bytes)
    first, second = (f"diffusion_pytorch_model-{i:05d}-of-00002.safetensors" for i in (1, 2))
    assert sorted(os.listdir(tmp_path)) == ["config.json", first, second, hf.INDEX]
    index = json.loads((tmp_path / hf.INDEX).read_text())
    assert index == {"metadata": {"total_size": 240}, "weight_map": {"a.weight": first, "b.bias": second, "c": second}}
    assert set(load_file(tmp_path / first)) == {"a.weight"}
    _assert_same(hf.read_state_dict(str(tmp_path)), sd)
    os.remove(tmp_path / second)
    with pytest.raises(FileNotFoundError, match=rf"names shard\(s\) that do not exist: \['{second}'\]"):
        hf.read_state_dict(str(tmp_path))


def test_bad_folders_are_named(tmp_path):
    assert hf.read_config(str(tmp_path)) is None
    with pytest.raises(FileNotFoundError, match="no .safetensors weights in"):
        hf.read_state_dict(str(tmp_path))
    save_file({"x": torch.zeros(2)}, tmp_path / "one.safetensors")
    save_file({"x": torch.ones(2)}, tmp_path / "two.safetensors")
    with pytest.raises(ValueError, match="tensor 'x' appears in more than one shard"):
        hf.read_state_dict(str(tmp_path))


def test_pipeline_folder_resolves_to_its_transformer(tmp_path):
    pipe = tmp_path / "pipe"
    (pipe / "transformer").mkdir(parents=True)
    assert hf.resolve_model_dir(str(pipe)) == str(pipe)  # no model_index.json: a model folder
    (pipe / "model_index.json").write_text("{}")
    assert hf.resolve_model_dir(str(pipe)) == str(pipe / "transformer")
    assert hf.resolve_model_dir(str(pipe), subfolder="vae") == str(pipe)  # no such component
