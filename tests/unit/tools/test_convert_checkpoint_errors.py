"""tools/convert_checkpoint.py refuses damaged or mismatched inputs with an error that names the problem."""

import contextlib
import io
import os
import runpy
import sys
import types

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.join(ROOT, "tests", "unit", "models"))
from wan_reference import diffusers_wan  # noqa: E402


CONVERT = runpy.run_path(os.path.join(ROOT, "tools", "convert_checkpoint.py"))["main"]


def convert(*args) -> types.SimpleNamespace:
    """The converter's main() in this process (a subprocess per call costs seconds of imports)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = CONVERT(list(args))
    return types.SimpleNamespace(returncode=code, stderr=err.getvalue())


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("wan") / "hf"
    diffusers_wan().save_pretrained(path)
    return path


def _corrupt(hf_dir, tmp_path, edit):
    from safetensors.torch import load_file, save_file

    out = tmp_path / "bad"
    out.mkdir()
    (out / "config.json").write_text((hf_dir / "config.json").read_text())
    sd = load_file(hf_dir / "diffusion_pytorch_model.safetensors")
    edit(sd)
    save_file(sd, out / "diffusion_pytorch_model.safetensors")
    return out


def test_failed_conversion_leaves_no_output(hf_dir, tmp_path):
    bad = _corrupt(hf_dir, tmp_path, lambda sd: sd.pop("patch_embedding.bias"))
    r = convert("hf-to-mcore", "--model", "wan", "--input", str(bad), "--output", str(tmp_path / "out"))
    assert r.returncode == 2 and "patch_embedding.bias" in r.stderr
    assert sorted(os.listdir(tmp_path)) == ["bad"]


def test_converter_round_trip_cli(hf_dir, tmp_path):
    from diffusers import WanTransformer3DModel

    r = convert("hf-to-mcore", "--model", "wan", "--input", str(hf_dir), "--output", str(tmp_path / "mc"))
    assert r.returncode == 0, r.stderr
    r = convert("mcore-to-hf", "--model", "wan", "--transformer-only", "--input", str(tmp_path / "mc"), "--output",
                str(tmp_path / "hf"))
    assert r.returncode == 0, r.stderr
    a = WanTransformer3DModel.from_pretrained(hf_dir).state_dict()
    b = WanTransformer3DModel.from_pretrained(tmp_path / "hf").state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    r = convert("hf-to-mcore", "--model", "wan", "--input", str(hf_dir), "--output", str(tmp_path / "mc"))
    assert r.returncode == 2 and "exists" in r.stderr
