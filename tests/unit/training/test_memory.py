"""The memory estimator's arithmetic on the tiny config against a hand count, its activation terms against
saved-tensor counts of the real tiny model, its anchor (the 1.3B scale probe measured on one H200), the CLI on
every shipped config, and the pre-flight refusal."""

import dataclasses
import glob
import json
import os

import pytest
import torch

from megatron_rcm.training import memory
from megatron_rcm.models import get_preset
from megatron_rcm.training.config import ConfigError, load_config

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
GiB = 2**30


def _hand_count(c):
    """Wan DiT parameters by (part, fp32): the layer list of diffusers' WanTransformer3DModel."""
    h, f, p = c.hidden_size, c.ffn_dim, c.patch_size[0] * c.patch_size[1] * c.patch_size[2]
    block_lo = (2 * h + 3 * h * h + 3 * h + h * h + h       # self-attention q/k norms, qkv, proj
                + 2 * h + h * h + h + 2 * h * h + 2 * h + h * h + h  # cross-attention q/k norms, q, kv, proj
                + f * h + f + h * f + h)                   # MLP
    block_hi = 6 * h + 2 * h                               # modulation, cross-attention LayerNorm
    pre_lo = h * c.in_channels * p + h + c.text_dim * h + h + h * h + h  # patch and text embeddings
    pre_hi = c.freq_dim * h + h + h * h + h + 6 * h * h + 6 * h          # time embedding, time projection
    post_hi = c.out_channels * p * h + c.out_channels * p + 2 * h        # head, head modulation
    lo = c.num_layers * block_lo + pre_lo
    hi = c.num_layers * block_hi + pre_hi + post_hi
    return lo, hi


def test_parameter_counts_match_a_hand_count_and_the_built_model():
    from megatron_rcm.models import build_model
    from megatron_rcm.models.loading import ARCHITECTURES

    _, c = get_preset("wan-shapes-tiny")
    lo, hi = _hand_count(c)
    table = memory.parameter_table("wan-shapes-tiny", "bfloat16")
    assert table.local(1, 1, 0, fp32=False) == lo and table.local(1, 1, 0, fp32=True) == hi
    real = build_model(ARCHITECTURES["wan"], c, torch.bfloat16, False, torch.device("cpu"))
    assert sum(p.numel() for p in real.parameters() if p.dtype == torch.bfloat16) == lo
    assert sum(p.numel() for p in real.parameters() if p.dtype == torch.float32) == hi
    # the parameter count of diffusers' WanTransformer3DModel at this config, counted on the meta device
    assert memory.parameter_table("wan2.1-t2v-1.3b", "bfloat16").total == 1_418_996_800
    assert memory.parameter_table("wan2.1-t2v-14b", "bfloat16").total == 14_288_491_584
    # TP 2 halves exactly the layers megatron shards: qkv/q/kv/fc1 weights and biases, proj/fc2 weights, q/k norms
    h, f = c.hidden_size, c.ffn_dim
    sharded = c.num_layers * (4 * h + 3 * h * h + 3 * h + h * h + h * h + h + 2 * h * h + 2 * h + h * h
                              + f * h + f + h * f)
    assert table.local(1, 1, 0) - table.local(2, 1, 0) == sharded / 2
    # PP 3: one block per stage; embeddings on the first stage, the head on the last
    lo_b, hi_b = (lo - _hand_count(dataclasses.replace(c, num_layers=0))[0]) / 3, \
        (hi - _hand_count(dataclasses.replace(c, num_layers=0))[1]) / 3
    pre_post = lo + hi - 3 * (lo_b + hi_b)
    assert table.local(1, 3, 1) == lo_b + hi_b
    assert table.local(1, 3, 0) + table.local(1, 3, 2) == pre_post + 2 * (lo_b + hi_b)


def test_resident_memory_of_the_tiny_config_is_the_hand_count():
    config = load_config(None, ["model.params_dtype=bfloat16"])
    _, c = get_preset(config.model.preset)
    lo, hi = _hand_count(c)
    n = lo + hi
    est = memory.estimate(config, world_size=2)  # DP 2, megatron grad sync, distributed optimizer
    weights = 2 * lo + 4 * hi
    expect = {"teacher_weights": weights, "student_weights": weights, "critic_weights": weights,
              "ema_weights": weights, "ema_fp32_shadow": 4 * n,
              "gradient_buffers": 2 * 4 * n,          # student + critic, fp32 buffers, not sharded
              "fp32_main_params": 2 * 4 * lo / 2,    # for the bf16 parameters only, sharded over DP 2
              "adam_state": 2 * 8 * n / 2,
              "cublas_workspace": 2 * 32 * 2**20}      # the main thread's and autograd's device thread's
    assert est.static == pytest.approx(expect, rel=0, abs=0)
    off = memory.estimate(load_config(None, ["model.params_dtype=bfloat16", "parallel.use_distributed_optimizer=false"]), 2)
    assert off.static["adam_state"] == 2 * 8 * n and off.static["fp32_main_params"] == 2 * 4 * lo


def _saved_bytes(num_layers, checkpointing, size=32, batch=2, text=7, dtype=torch.bfloat16, ffn_dim=None):
    """Bytes autograd keeps for the backward of one with-grad forward of the tiny model (bf16), not parameters."""
    from megatron_rcm.models import build_model
    from megatron_rcm.models.loading import ARCHITECTURES
    from megatron_rcm.training.recompute import enable_activation_checkpointing

    _, c = get_preset("wan-shapes-tiny")
    c = dataclasses.replace(c, num_layers=num_layers, ffn_dim=ffn_dim or c.ffn_dim)
    model = build_model(ARCHITECTURES["wan"], c, dtype, False, torch.device("cpu"))
    if checkpointing:
        enable_activation_checkpointing(model)
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 8, size, size, generator=g)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, torch.rand(batch, generator=g) * 1000, torch.randn(batch, text, c.text_dim, generator=g))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(v for k, v in storages.items() if k not in params), c, batch * 8 * (size // 4) ** 2


def test_checkpointed_activation_terms_match_the_tiny_model():
    s3, c, token_samples = _saved_bytes(3, True)
    s6, _, _ = _saved_bytes(6, True)
    per_block = (s6 - s3) / 3 / token_samples
    assert per_block == memory.CHECKPOINT_INPUT_H * c.hidden_size  # the block input, one bf16 residual element
    outside = (s3 - 3 * per_block * token_samples) / token_samples
    assert outside == pytest.approx(memory.OUTSIDE_BLOCKS_H * c.hidden_size, rel=0.05)


def test_text_token_and_math_attention_terms_match_the_tiny_model():
    """float32 runs the math attention (on CUDA too): per block and text token it keeps the cross-attention's
    softmax row (heads x query tokens, fp32) and TEXT_BLOCK_H; outside the blocks TEXT_OUTSIDE_H."""
    (a3, c, _), (b3, _, _) = (_saved_bytes(3, False, size=16, text=n, dtype=torch.float32) for n in (64, 128))
    (a6, _, _), (b6, _, _) = (_saved_bytes(6, False, size=16, text=n, dtype=torch.float32) for n in (64, 128))
    per_text_token = (b3 - a3) / 64 / 2  # batch 2
    per_block = ((b6 - a6) - (b3 - a3)) / 3 / 64 / 2
    queries = 8 * (16 // 4) ** 2
    probs = c.num_attention_heads * queries * 4
    scale = 4 / 2  # float32 activations against the 2-byte coefficients
    # the remainder (4 bytes per token and block) is the norm's fp32 reciprocal RMS
    assert per_block - probs == pytest.approx(memory.TEXT_BLOCK_H * c.hidden_size * scale, rel=0.01)
    assert per_text_token - 3 * per_block == pytest.approx(memory.TEXT_OUTSIDE_H * c.hidden_size * scale, rel=0.01)


def test_math_path_block_terms_match_the_tiny_model():
    """float32 without checkpointing: per block and patch token the model keeps its softmax rows, the text terms,
    BLOCK_SAVED_F per MLP channel and BLOCK_SAVED_H_MATH per hidden channel (the MLP's share isolated by widening
    the MLP)."""
    def per_block(ffn_dim):
        (a, c, token_samples), (b, _, _) = (_saved_bytes(n, False, size=16, text=5, dtype=torch.float32,
                                                         ffn_dim=ffn_dim) for n in (3, 6))
        return (b - a) / 3 / token_samples, c

    (narrow, c), (wide, _) = per_block(128), per_block(256)
    scale = 4 / 2  # float32 activations against the 2-byte coefficients
    assert (wide - narrow) / 128 == memory.BLOCK_SAVED_F * scale
    probs = c.num_attention_heads * (128 + 5) * 4  # per query token: its softmax rows over patch and text keys
    text = 5 * memory.TEXT_BLOCK_H * c.hidden_size * scale / 128  # the 5 text tokens' share per patch token
    expect = (memory.BLOCK_SAVED_H_MATH * c.hidden_size + memory.BLOCK_SAVED_F * 128) * scale + probs + text
    assert narrow == pytest.approx(expect, rel=0.005)


def test_tiny_default_peak_is_the_sum_of_its_terms():
    """The tiny default on one GPU (float32, no checkpointing, micro-batch 8): the hand count of the terms."""
    config = load_config(None, ["rcm.tangent_warmup=0"])
    _, c = get_preset(config.model.preset)
    est = memory.estimate(config, 1)
    h, f, s, heads = c.hidden_size, c.ffn_dim, 128, c.num_attention_heads
    text = 5  # the shapes set's caption tokens (ShapesTextEncoder pads to 5, not to data.text_length)
    assert memory.text_tokens(config) == text and config.data.text_length == 512
    scale = 2  # float32
    block = (memory.BLOCK_SAVED_H_MATH * h + memory.BLOCK_SAVED_F * f) * scale
    probs = heads * s * (s + text) * 4
    per_sample = (c.num_layers * (s * block + text * memory.TEXT_BLOCK_H * h * scale + probs)
                  + s * memory.OUTSIDE_BLOCKS_H * h + text * memory.TEXT_OUTSIDE_H * h * scale)
    assert est.activations["student_with_grad"] == pytest.approx(16 * per_sample, rel=1e-12)  # sCM + DMD inputs
    assert est.activations["critic_with_grad"] == pytest.approx(8 * per_sample, rel=1e-12)
    assert est.static["cublas_workspace"] == 2 * 32 * 2**20
    static = sum(est.static.values())
    assert est.peak["student"] == static + 16 * per_sample and est.peak["critic"] == static + 8 * per_sample


def test_estimate_matches_the_measured_scale_probe():
    """benchmarks/RESULTS.md: Wan2.1-1.3B rCM iteration on one H200, 480p x 81, activation checkpointing, micro-batch 1:
    peaks 70.8 GiB (student step) / 64.6 GiB (critic step), torch.cuda.max_memory_allocated."""
    from megatron_rcm.training.scale_probe import PROBE

    config = load_config(None, PROBE + ["training.global_batch_size=1"])
    peak = memory.estimate(config, 1).peak_gib
    assert peak["student"] == pytest.approx(70.8, rel=0.05) and peak["critic"] == pytest.approx(64.6, rel=0.05)
    # the second measurement (benchmarks/RESULTS.md): 70.77 / 64.61 GiB
    assert peak["student"] == pytest.approx(70.77, rel=0.03) and peak["critic"] == pytest.approx(64.61, rel=0.03)
    no_ckpt = memory.estimate(load_config(None, PROBE + ["training.global_batch_size=1",
                                                         "model.activation_checkpointing=false"]), 1)
    assert not no_ckpt.fits(139.8 * GiB)  # the probe without checkpointing runs out of memory on the H200


def test_cli_prints_verdicts_for_every_shipped_config(capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("estimate_memory", os.path.join(REPO, "tools", "estimate_memory.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    configs = sorted(glob.glob(os.path.join(REPO, "examples", "configs", "*.yaml")))
    assert len(configs) >= 6
    for path in configs:
        tool.main(["--config", path])
        out = capsys.readouterr().out
        assert "80 GB GPU (79.2 GiB): " in out and "141 GB GPU (139.8 GiB): " in out, path
    tool.main(["--config", os.path.join(REPO, "examples", "configs", "wan2.1-t2v-14b-480p.yaml"), "--gpus", "64",
               "--gpu-memory", "80GiB", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert set(out["peak_gib"]) == {"student", "critic"} and out["layout"]["dp"] == 8
    assert out["fits"] == (out["needed_gib"] <= 80) and out["smallest_fitting"]


def test_preflight_refuses_a_layout_that_cannot_fit_in_one_line():
    path = os.path.join(REPO, "examples", "configs", "wan2.1-t2v-1.3b-480p.yaml")
    config = load_config(path, ["model.activation_checkpointing=false"])
    with pytest.raises(ConfigError) as e:
        memory.preflight(config, 1, 80 * GiB)
    msg = str(e.value)
    assert "\n" not in msg and "memory estimate" in msg and "a layout that fits: parallel." in msg
    assert "training.skip_memory_check=true" in msg
    suggested = msg.split("a layout that fits: ")[1].split(" (tools")[0].split()
    assert "model.activation_checkpointing=true" in suggested
    memory.preflight(load_config(path, suggested), 1, 80 * GiB)  # the suggestion passes
    memory.preflight(config, 1, None)  # no GPU: no check
    config.training.skip_memory_check = True  # the trainer's switch (read with getattr)
    memory.preflight(config, 1, 80 * GiB)


def _table_under_tp(expected_total, expected_sharded):
    from megatron_rcm.parallel import state

    state.initialize_parallel(2, 1, 1)  # the trainer's situation when it runs the pre-flight: TP 2 already set up
    memory._TABLES.clear()
    table = memory.parameter_table("wan-shapes-tiny", "float32")
    assert table.total == expected_total
    assert table.local(1, 1, 0) - table.local(2, 1, 0) == expected_sharded / 2


@pytest.mark.distributed
def test_parameter_table_is_the_full_model_under_tensor_parallelism():
    from megatron_rcm.parallel.launch import run_on_ranks

    table = memory.parameter_table("wan-shapes-tiny", "float32")
    run_on_ranks(_table_under_tp, 2, table.total, 2 * (table.local(1, 1, 0) - table.local(2, 1, 0)))


def test_cli_prints_measured_peaks_next_to_the_estimate(capsys, monkeypatch):
    """The --measure lines (the measurement itself needs a GPU: its result is given here)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("estimate_memory", os.path.join(REPO, "tools", "estimate_memory.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    monkeypatch.setattr(tool, "_measure", lambda config, n, breakdown: {"student": 0.125, "critic": 0.0625, "resident": 0.03125})
    tool.main(["--brief", "--measure", "6"])
    out = capsys.readouterr().out
    est = memory.estimate(load_config(None, []), 1)
    assert "measured between steps (memory_allocated): 0.031 GiB" in out
    assert f"measured peak, student step: 0.125 GiB | estimate {est.peak_gib['student']:.3f} GiB" in out
    assert f"estimate / measured {est.peak_gib['critic'] / 0.0625:.3f}" in out
    monkeypatch.setattr(tool, "_measure", lambda config, n, breakdown: {"student": "out of memory", "critic": "out of memory",
                                                             "error": "CUDA out of memory. Tried to allocate 2 GiB"})
    tool.main(["--brief", "--measure", "6"])
    out = capsys.readouterr().out
    assert "measured peak, student step: out of memory" in out and "CUDA out of memory. Tried" in out
    sites = {"critic": {"peak_above_start_gib": 0.5, "live_at_peak_gib": {"megatron_rcm/models/blocks.py:42 fwd": 0.25}}}
    monkeypatch.setattr(tool, "_measure", lambda config, n, breakdown: {"critic": 0.0625, "resident": 0.03125,
                                                                        "breakdown": sites})
    tool.main(["--brief", "--measure", "6", "--breakdown"])
    out = capsys.readouterr().out
    assert "critic step: 0.500 GiB above the start at its peak" in out
    assert "   256.00 MiB  megatron_rcm/models/blocks.py:42 fwd" in out


def test_peak_allocations_replays_the_allocator_trace():
    """What is live at a step's peak, by allocating line (the trace format of torch.cuda.memory._snapshot)."""
    here = [{"filename": "/x/site-packages/torch/nn/functional.py", "line": 9, "name": "linear"},
            {"filename": "/repo/megatron_rcm/models/blocks.py", "line": 42, "name": "forward"}]
    there = [{"filename": "/repo/megatron_rcm/training/step.py", "line": 7, "name": "student_grad"}]
    trace = [
        {"action": "alloc", "addr": 1, "size": 100, "frames": here},
        {"action": "alloc", "addr": 2, "size": 50, "frames": there},
        {"action": "free_requested", "addr": 1, "size": 100},
        {"action": "free_completed", "addr": 1, "size": 100},
        {"action": "alloc", "addr": 3, "size": 300, "frames": here},
        {"action": "alloc", "addr": 4, "size": 20, "frames": []},
        {"action": "free_completed", "addr": 9, "size": 64},  # a block from before the recording
        {"action": "free_completed", "addr": 3, "size": 300},
        {"action": "alloc", "addr": 5, "size": 10, "frames": there},
    ]
    peak, rows = memory.peak_allocations(trace)
    assert peak == 370  # 50 + 300 + 20, before the later frees
    assert rows == [("megatron_rcm/models/blocks.py:42 forward", 300), ("megatron_rcm/training/step.py:7 student_grad", 50),
                    ("(no stack)", 20)]
