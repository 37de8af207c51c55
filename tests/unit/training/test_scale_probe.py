"""The scale probe on CPU at a tiny size: the iteration lines, and with --profile the per-pass tables and traces."""

import json
import re

import pytest

from megatron_rcm.parallel import destroy_parallel
from megatron_rcm.training import scale_probe

TINY = ["model.preset=wan-tiny", "data.frames=5", "data.height=32", "data.width=32", "data.text_length=8",
        "model.params_dtype=float32", "model.activation_checkpointing=false"]


def _table(out: str, phase: str) -> dict[str, list[str]]:
    """The rows of `phase`'s profiled table: name -> the numbers after it."""
    block = out.split(f"\n{phase} step, iteration ")[1].split("\n\n")[0]
    rows = {}
    for line in block.splitlines()[2:]:
        m = re.match(r"(.+?)\s{2,}(-?\d.*)$", line)
        if m:
            rows[m.group(1).strip()] = m.group(2).split()
    return rows


def test_probe_profiles_each_step_kind(tmp_path, capsys):
    profile = tmp_path / "profile"
    try:
        scale_probe.main(TINY + [f"run_dir={tmp_path / 'run'}", "--iterations", "2", "--profile", str(profile)])
    finally:
        destroy_parallel()
    out = capsys.readouterr().out
    assert "iteration 0 student" in out and "iteration 1 critic" in out
    passes = {"student": ["teacher_cfg", "student_jvp", "rollout", "dmd_gradient", "student_grad"],
              "critic": ["rollout", "critic_grad"]}
    for phase, names in passes.items():
        rows = _table(out, phase)
        for name in names:
            assert float(rows[name][0]) > 0, (phase, name)
        assert float(rows["step"][1].rstrip("%")) == pytest.approx(100.0)
        assert sum(float(rows[k][0]) for k in names + ["optimizer/EMA/other"]) == pytest.approx(
            float(rows["step"][0]), abs=0.1 * (len(names) + 2))  # rounded to 0.1 ms each
        for kind in ("attention", "GEMM", "Triton", "other"):
            assert f"CPU aten ops: {kind}" in rows
        assert float(rows["CPU aten ops: GEMM"][0]) > 0
        assert "launch gaps (wall - ops)" in rows
        with open(profile / f"{phase}.rank0.json") as f:
            assert json.load(f)["traceEvents"]


def test_help_mentions_the_options(capsys):
    scale_probe.main(["--help"])
    out = capsys.readouterr().out
    assert "--profile" in out and "--iterations" in out and "data.source=random" in out


def test_options_leave_the_overrides():
    assert scale_probe._options(["a=1", "--profile", "d", "--iterations=3", "b=2"]) == (
        ["a=1", "b=2"], {"profile": "d", "iterations": "3"})


def test_kernel_kinds():
    assert scale_probe.kernel_kind("void cutlass::fmha_fwd_kernel") == "attention"
    assert scale_probe.kernel_kind("_jvp_fwd_hopper_kernel") == "attention"
    assert scale_probe.kernel_kind("sm90_xmma_gemm_bf16bf16_bf16f32") == "GEMM"
    assert scale_probe.kernel_kind("nvjet_hsh_128x256") == "GEMM"
    assert scale_probe.kernel_kind("triton_per_fused_add_mul_0") == "Triton"
    assert scale_probe.kernel_kind("aten::addmm") == "GEMM"
    assert scale_probe.kernel_kind("elementwise_kernel") == "other"
