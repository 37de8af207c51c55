from megatron_rcm.models.wan import WanConfig
from megatron_rcm.training import flops, scale_probe


def test_forward_flops_counts_each_matmul():
    cfg = WanConfig(num_attention_heads=2, attention_head_dim=4, ffn_dim=16, num_layers=3)
    h, s, L = 8, 10, 5
    per_layer = 2 * s * 4 * h * h + 4 * s * s * h + 2 * s * 2 * h * h + 2 * L * 2 * h * h + 4 * s * L * h \
        + 2 * s * 2 * h * 16
    assert flops.forward_flops(cfg, s, L) == 3 * per_layer
    fwd = 3 * per_layer
    attn = 3 * 4 * s * s * h
    assert flops.pass_flops(cfg, s, L, "critic", 2) == 5 * fwd
    assert flops.pass_flops(cfg, s, L, "student", 1) == 2 * fwd + 2 * (fwd - attn) + 3 * attn + fwd + 3 * fwd + 6 * fwd
    assert scale_probe.pass_flops is flops.pass_flops  # one source


def test_tokens_per_sample():
    cfg = WanConfig(patch_size=(1, 2, 2))
    assert flops.tokens_per_sample(cfg, (16, 21, 60, 104)) == 21 * 30 * 52


def test_scale_probe_help(capsys):
    scale_probe.main(["--help"])
    out = capsys.readouterr().out
    assert "Scale probe" in out and "data.source=random" in out
