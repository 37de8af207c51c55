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
from wan_reference import corrupted_copy as _corrupt, diffusers_wan, hf_dir  # noqa: E402,F401


CONVERT = runpy.run_path(os.path.join(ROOT, "tools", "convert_checkpoint.py"))["main"]


def convert(*args) -> types.SimpleNamespace:
    """The converter's main() in this process (a subprocess per call costs seconds of imports)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = CONVERT(list(args))
    return types.SimpleNamespace(returncode=code, stderr=err.getvalue())


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
