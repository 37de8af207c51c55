"""Import of the rCM reference implementation's files: released students (`net.` / `net_ema.` prefixes, a Linear
patch embedding over patchified tokens) and teacher `.pth` files, into our format and into diffusers."""

import os
import runpy

import pytest
import torch
from diffusers import WanTransformer3DModel

from megatron_rcm.models import from_pretrained
from megatron_rcm.models.wan import WanConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
# Wan2.1's 128-wide heads, so the architecture is read from the shapes; everything else tiny
CONFIG = WanConfig(num_attention_heads=2, attention_head_dim=128, ffn_dim=32, num_layers=2, in_channels=4,
                   out_channels=4, text_dim=16, freq_dim=16)


def diffusers_model(seed: int) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    model = WanTransformer3DModel(**{k: v for k, v in CONFIG.to_diffusers().items() if k != "_class_name"})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


# The reference's module names (NVlabs/rcm rcm/networks/wan2pt1.py, the Wan-Video layout), written out here
# independently of our key maps: diffusers name fragment -> reference fragment.
_NAMES = [("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
          ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
          ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
          ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
          ("condition_embedder.time_proj", "time_projection.1"), ("attn1", "self_attn"), ("attn2", "cross_attn"),
          (".to_out.0.", ".o."), (".to_q.", ".q."), (".to_k.", ".k."), (".to_v.", ".v."),
          ("ffn.net.0.proj", "ffn.0"), ("ffn.net.2", "ffn.2"), ("proj_out", "head.head"), (".norm2.", ".norm3.")]


def reference_layout(model: WanTransformer3DModel) -> dict:
    out = {}
    for k, v in model.state_dict().items():
        for a, b in _NAMES:
            k = k.replace(a, b)
        k = "head.modulation" if k == "scale_shift_table" else k.replace("scale_shift_table", "modulation")
        if k == "patch_embedding.weight":  # nn.Linear(in_dim * kt * kh * kw, dim)
            v = v.flatten(1)
        out[k] = v.clone()
    return out


def patchify(x: torch.Tensor, p=(1, 2, 2)) -> torch.Tensor:
    """b c (t kt) (h kh) (w kw) -> b (t h w) (c kt kh kw), the reference's rearrange written with views."""
    b, c, t, h, w = x.shape
    x = x.reshape(b, c, t // p[0], p[0], h // p[1], p[1], w // p[2], p[2])
    return x.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, (t // p[0]) * (h // p[1]) * (w // p[2]), -1)


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 2, 4, 6, generator=g), torch.tensor([900.0, 250.0]),
            torch.randn(2, 5, 16, generator=g))


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A training dump in the reference layout (student under net., EMA under net_ema.) and a released file
    (the EMA renamed to net., as the reference's DCP -> .pth script writes it)."""
    student, ema = diffusers_model(0), diffusers_model(1)
    root = tmp_path_factory.mktemp("rcm")
    full = {**{"net." + k: v for k, v in reference_layout(student).items()},
            **{"net_ema." + k: v for k, v in reference_layout(ema).items()}}
    torch.save(full, root / "dump.pt")
    torch.save({"net." + k: v for k, v in reference_layout(ema).items()}, root / "rCM_Wan2.1_T2V_tiny.pt")
    torch.save(reference_layout(student), root / "teacher.pth")
    return root, student, ema


def test_linear_patch_embedding_is_the_flattened_conv(release):
    _, student, _ = release
    x, _, _ = inputs()
    conv = student.patch_embedding
    tokens = torch.nn.functional.linear(patchify(x), reference_layout(student)["patch_embedding.weight"], conv.bias)
    with torch.no_grad():
        torch.testing.assert_close(tokens, conv(x).flatten(2).transpose(1, 2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("file,network,expected", [("dump.pt", None, "ema"), ("dump.pt", "ema", "ema"),
                                                   ("dump.pt", "net", "student"),
                                                   ("rCM_Wan2.1_T2V_tiny.pt", None, "ema"),
                                                   ("teacher.pth", None, "student")])
def test_import_matches_diffusers_and_our_model(release, tmp_path, file, network, expected):
    root, student, ema = release
    ref = {"ema": ema, "student": student}[expected]
    net = from_pretrained(str(root / file), params_dtype=torch.float32, network=network)
    assert net.config == CONFIG  # read from the shapes
    ref.save_pretrained(tmp_path / "hf")
    ours = from_pretrained(str(tmp_path / "hf"), params_dtype=torch.float32)
    x, t, text = inputs()
    with torch.no_grad():
        out = net(x, t, text)
        assert torch.equal(out, ours(x, t, text))  # the same weights, bit for bit
        torch.testing.assert_close(out, ref(x, t, text).sample, rtol=1e-5, atol=1e-5)


def test_wrong_network_or_file_is_a_clear_error(release, tmp_path):
    root, _, _ = release
    with pytest.raises(ValueError, match="has no net_ema.* tensors; it has net.* \\(--net\\)"):
        from_pretrained(str(root / "rCM_Wan2.1_T2V_tiny.pt"), network="ema")
    torch.save({"net.something.weight": torch.zeros(2)}, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match="odd.pt is not a Wan2.1 state dict of the rCM reference"):
        from_pretrained(str(tmp_path / "odd.pt"))
    (tmp_path / "garbage.pth").write_bytes(b"not a pickle at all")
    with pytest.raises(ValueError, match="garbage.pth was refused"):
        from_pretrained(str(tmp_path / "garbage.pth"))


CONVERT = runpy.run_path(os.path.join(ROOT, "tools", "convert_checkpoint.py"))["main"]


def test_converter_imports_into_megatron_and_diffusers(release, tmp_path, capsys):
    root, student, ema = release
    code = CONVERT(["hf-to-mcore", "--model", "wan", "--net", "--input", str(root / "dump.pt"), "--output",
                    str(tmp_path / "mc")])
    assert code == 0, capsys.readouterr().err
    code = CONVERT(["mcore-to-hf", "--model", "wan", "--transformer-only", "--input", str(tmp_path / "mc"),
                    "--output", str(tmp_path / "hf")])
    assert code == 0, capsys.readouterr().err
    back = WanTransformer3DModel.from_pretrained(tmp_path / "hf").state_dict()
    assert set(back) == set(student.state_dict())
    assert all(torch.equal(back[k], v) for k, v in student.state_dict().items())
    # straight into a diffusers pipeline folder (components named by the base model: nothing to copy)
    code = CONVERT(["mcore-to-hf", "--model", "wan", "--input", str(root / "rCM_Wan2.1_T2V_tiny.pt"), "--output",
                    str(tmp_path / "pipe"), "--base-pipeline", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"])
    assert code == 0, capsys.readouterr().err
    assert {"model_index.json", "scheduler", "transformer", "README.md"} <= set(os.listdir(tmp_path / "pipe"))
    back = WanTransformer3DModel.from_pretrained(tmp_path / "pipe" / "transformer").state_dict()
    assert all(torch.equal(back[k], v) for k, v in ema.state_dict().items())
    assert "rCM_Wan2.1_T2V_tiny.pt" in (tmp_path / "pipe" / "README.md").read_text()
