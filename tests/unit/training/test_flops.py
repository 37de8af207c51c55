from megatron_rcm.models.wan import WanConfig
import pytest
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


def test_flops_by_pass_sums_to_pass_flops():
    cfg = WanConfig(num_attention_heads=2, attention_head_dim=4, ffn_dim=16, num_layers=3)
    for phase, n in (("student", 1), ("student", 3), ("critic", 2)):
        by_pass = flops.flops_by_pass(cfg, 10, 5, phase, n)
        assert sum(by_pass.values()) == flops.pass_flops(cfg, 10, 5, phase, n)
    assert list(flops.flops_by_pass(cfg, 10, 5, "student", 2)) == [
        "teacher_cfg", "student_jvp", "rollout", "dmd_gradient", "student_grad"]
    assert list(flops.flops_by_pass(cfg, 10, 5, "critic", 2)) == ["rollout", "critic_grad"]


def test_student_jvp_by_hand():
    # one layer, hidden 2, ffn 4, 3 tokens, 1 text token
    cfg = WanConfig(num_attention_heads=1, attention_head_dim=2, ffn_dim=4, num_layers=1)
    # linear layers and cross-attention (the JVP counts both twice); self-attention apart
    linear = 2 * 3 * 4 * 2 * 2 + 2 * 3 * 2 * 2 * 2 + 2 * 1 * 2 * 2 * 2 + 2 * 2 * 3 * 1 * 2 + 2 * 3 * 2 * 2 * 4
    self_attention = 2 * 2 * 3 * 3 * 2  # QK^T and PV
    assert linear == 280 and self_attention == 72
    assert flops.flops_by_pass(cfg, 3, 1, "student", 1)["student_jvp"] == 2 * linear + 3 * self_attention == 776
    assert flops.flops_by_pass(cfg, 3, 1, "critic", 4)["critic_grad"] == 3 * (linear + self_attention)


def test_tokens_per_sample():
    cfg = WanConfig(patch_size=(1, 2, 2))
    assert flops.tokens_per_sample(cfg, (16, 21, 60, 104)) == 21 * 30 * 52



def test_iteration_flops_counts_the_passes_that_ran():
    from megatron_rcm.models import get_preset
    from megatron_rcm.training.flops import flops_by_pass, iteration_flops, pass_flops

    config = get_preset("wan2.1-t2v-1.3b")[1]
    by = flops_by_pass(config, 32760, 512, "student", 2)
    everything = set(by) | {"optimizer"}
    assert iteration_flops(config, 32760, 512, "student", 2, everything) == pass_flops(config, 32760, 512,
                                                                                       "student", 2)
    # the tangent warm-up: sCM only, so the with-grad pass carries one input instead of two
    warm_up = {"teacher_cfg", "student_jvp", "student_grad"}
    assert iteration_flops(config, 32760, 512, "student", 0, warm_up) == pytest.approx(
        by["teacher_cfg"] + by["student_jvp"] + by["student_grad"] / 2)
    critic = flops_by_pass(config, 32760, 512, "critic", 3)
    assert iteration_flops(config, 32760, 512, "critic", 3, {"rollout", "critic_grad"}) == sum(critic.values())
