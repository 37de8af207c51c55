"""The warp-specialised Hopper JVP kernel, compiled ahead of time for sm_90 on the CPU.

Its numerics are tested on an H100 (tests/gpu/test_flash_attention_jvp_gpu.py); here: it builds with the
installed Triton, and its resources stay where the schedule needs them: no register spills in any
partition, shared memory within an H100's 227 KiB, and the GEMMs run from registers and shared memory
as designed (wgmma count per loop).
"""

import os
import re
import subprocess

import pytest

triton = pytest.importorskip("triton")


def _ptxas_report(ptx: str, tmp_path) -> str:
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("Triton ships no ptxas here")
    src = tmp_path / "kernel.ptx"
    src.write_text(ptx)
    run = subprocess.run([ptxas, "-v", "-arch=sm_90a", str(src), "-o", str(tmp_path / "kernel.cubin")],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stderr


@pytest.mark.parametrize("head_dim,has_kv_tangent", [(128, True), (128, False), (64, True)])
def test_compiles_for_sm90_without_spills(head_dim, has_kv_tangent, tmp_path):
    from rcm_kernels.flash_attention_jvp_hopper import compile_for_sm90

    kernel = compile_for_sm90(head_dim=head_dim, has_kv_tangent=has_kv_tangent)
    ptx = kernel.asm["ptx"]
    assert kernel.metadata.shared <= 227 * 1024, kernel.metadata.shared
    report = _ptxas_report(ptx, tmp_path)
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", report)]
    assert spills and not any(spills), report
    # Producer down to 24 registers, both consumer warpgroups up to 240.
    assert re.search(r"setmaxnreg\.dec\.sync\.aligned\.u32\s+24;", ptx)
    assert len(re.findall(r"setmaxnreg\.inc\.sync\.aligned\.u32\s+240;", ptx)) >= 1
    # Per consumer and key block: q k^T, tq k^T (+ q tk^T) over head_dim / 16 steps; P v, H v (+ P tv)
    # over 64 / 16 steps.
    gemms = 2 + has_kv_tangent
    assert ptx.count("wgmma.mma_async") == 2 * gemms * (head_dim // 16 + 64 // 16)
