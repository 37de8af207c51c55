"""The attention JVP forward for Hopper (sm_90), warp-specialised, in Gluon.

Same mathematics and outputs as :mod:`rcm_kernels.flash_attention_jvp` (see its docstring for the
online-softmax-with-tangents recurrences). What differs is the schedule, which Triton's compiler does not
produce for that kernel on Hopper:

* one producer warp loads every tile with TMA into a ring of shared-memory stages, signalled by
  mbarriers, so the compute warps issue no loads;
* two consumer warpgroups each own 64 query rows of the program's 128 and run independently (each waits
  for its own tensor-core groups only), so one's softmax overlaps the other's GEMMs;
* the consumers get 240 registers per thread (the producer gives its share back), which holds both
  ``64 x D`` fp32 accumulators, the score and score-tangent tiles and the 16-bit probability operands,
  which feed the second GEMMs straight from registers.

Tiles are read through 4-D TMA descriptors over ``[B, H, S, D]`` with any batch/head/sequence strides
(the DiT passes ``[S, B, H, D]`` views), so ragged sequence tails are zero-filled by the hardware and
only the score mask of the last key block remains.
"""

from __future__ import annotations

import functools

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

__all__ = ["hopper_kernel_supports", "flash_attention_jvp_hopper"]

_ROWS_PER_WARPGROUP = 64
_BLOCK_M = 2 * _ROWS_PER_WARPGROUP
# Registers per thread at launch, over the 12 warps (3 warpgroups) the partitions occupy: 168 * 12 * 32 fills
# the 64K register file; the producer then drops to 24 and the consumers rise to 240.
_MAXNREG = 168


# Compile-time facts reach the partitions through shapes and tuple lengths: Triton 3.6 passes the
# partitions' arguments as IR values, so plain constexpr arguments would arrive as tensors.
@gluon.jit
def _producer(descs, bufs, bars, off_b, off_h, off_m, seq_k):
    q_desc = descs[0]
    q_tangent_desc = descs[1]
    k_desc = descs[2]
    v_desc = descs[3]
    q_s = bufs[0]
    q_tangent_s = bufs[1]
    k_s = bufs[2]
    v_s = bufs[3]
    q_bar, k_ready, v_ready, kv_empty = bars
    HAS_KV_TANGENT: gl.constexpr = len(bufs) == 6
    ROWS: gl.constexpr = q_desc.block_type.shape[2]
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[2]
    STAGES: gl.constexpr = k_s.type.shape[0]

    mbarrier.expect(q_bar, 4 * q_desc.block_type.nbytes)
    for w in gl.static_range(2):
        tma.async_copy_global_to_shared(q_desc, [off_b, off_h, off_m + w * ROWS, 0], q_bar, q_s.index(w))
        tma.async_copy_global_to_shared(q_tangent_desc, [off_b, off_h, off_m + w * ROWS, 0], q_bar,
                                        q_tangent_s.index(w))

    if HAS_KV_TANGENT:
        kv_bytes: gl.constexpr = 2 * k_desc.block_type.nbytes
    else:
        kv_bytes: gl.constexpr = k_desc.block_type.nbytes
    for j in range(gl.cdiv(seq_k, BLOCK_N)):
        stage = j % STAGES
        phase = (j // STAGES) & 1
        off_n = j * BLOCK_N
        # Both consumers must have released the stage (empty barriers start "completed" at parity 1).
        mbarrier.wait(kv_empty.index(stage), phase ^ 1)
        mbarrier.expect(k_ready.index(stage), kv_bytes)
        tma.async_copy_global_to_shared(k_desc, [off_b, off_h, off_n, 0], k_ready.index(stage), k_s.index(stage))
        if HAS_KV_TANGENT:
            tma.async_copy_global_to_shared(descs[4], [off_b, off_h, off_n, 0], k_ready.index(stage),
                                            bufs[4].index(stage))
        mbarrier.expect(v_ready.index(stage), kv_bytes)
        tma.async_copy_global_to_shared(v_desc, [off_b, off_h, off_n, 0], v_ready.index(stage), v_s.index(stage))
        if HAS_KV_TANGENT:
            tma.async_copy_global_to_shared(descs[5], [off_b, off_h, off_n, 0], v_ready.index(stage),
                                            bufs[5].index(stage))


@gluon.jit
def _consumer(bufs, bars, outs, off_b, off_h, off_m, seq_q, seq_k, sm_scale, WG: gl.constexpr):
    q_s = bufs[0]
    q_tangent_s = bufs[1]
    k_s = bufs[2]
    v_s = bufs[3]
    q_bar, k_ready, v_ready, kv_empty = bars
    O, O_TANGENT, LSE, MU, VSCALE, o_strides, o_tangent_strides, lse_strides, mu_strides = outs
    HAS_KV_TANGENT: gl.constexpr = len(bufs) == 6
    ROWS: gl.constexpr = q_s.type.shape[3]
    HEAD_DIM: gl.constexpr = q_s.type.shape[4]
    BLOCK_N: gl.constexpr = k_s.type.shape[3]
    STAGES: gl.constexpr = k_s.type.shape[0]

    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    s_rows: gl.constexpr = gl.SliceLayout(1, s_layout)
    s_cols: gl.constexpr = gl.SliceLayout(0, s_layout)
    o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)
    o_cols: gl.constexpr = gl.SliceLayout(0, o_layout)

    q = q_s.index(WG).reshape([ROWS, HEAD_DIM])
    q_tangent = q_tangent_s.index(WG).reshape([ROWS, HEAD_DIM])
    qk_scale = sm_scale * 1.4426950408889634

    m_i = gl.full([ROWS], float("-inf"), gl.float32, s_rows)
    l_i = gl.zeros([ROWS], gl.float32, s_rows)
    r_i = gl.zeros([ROWS], gl.float32, s_rows)
    acc_o = gl.zeros([ROWS, HEAD_DIM], gl.float32, o_layout)
    acc_t = gl.zeros([ROWS, HEAD_DIM], gl.float32, o_layout)
    zero_s = gl.zeros([ROWS, BLOCK_N], gl.float32, s_layout)
    offs_n = gl.arange(0, BLOCK_N, layout=s_cols)

    mbarrier.wait(q_bar, 0)
    n_blocks = gl.cdiv(seq_k, BLOCK_N)
    for j in range(n_blocks):
        stage = j % STAGES
        phase = (j // STAGES) & 1
        mbarrier.wait(k_ready.index(stage), phase)
        k_t = k_s.index(stage).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0))
        s = warpgroup_mma(q, k_t, zero_s, use_acc=False, is_async=True)
        ds = warpgroup_mma(q_tangent, k_t, zero_s, use_acc=False, is_async=True)
        if HAS_KV_TANGENT:
            k_tangent_t = bufs[4].index(stage).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0))
            ds = warpgroup_mma(q, k_tangent_t, ds, is_async=True)
        s, ds = warpgroup_mma_wait(0, deps=(s, ds))

        # Keys past the end were zero-filled by TMA; only their scores need masking.
        s = gl.where(gl.expand_dims(j * BLOCK_N + offs_n < seq_k, 0), s, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        p = gl.exp2(s * qk_scale - gl.expand_dims(m_new, 1))
        alpha = gl.exp2(m_i - m_new)
        l_i = l_i * alpha + gl.sum(p, 1)
        h = p * (ds * sm_scale)
        r_i = r_i * alpha + gl.sum(h, 1)
        m_i = m_new
        alpha_o = gl.expand_dims(gl.convert_layout(alpha, o_rows), 1)
        acc_o = acc_o * alpha_o
        acc_t = acc_t * alpha_o

        p16 = gl.convert_layout(p.to(v_s.dtype), p_layout)
        h16 = gl.convert_layout(h.to(v_s.dtype), p_layout)
        mbarrier.wait(v_ready.index(stage), phase)
        v = v_s.index(stage).reshape([BLOCK_N, HEAD_DIM])
        acc_o = warpgroup_mma(p16, v, acc_o, is_async=True)
        acc_t = warpgroup_mma(h16, v, acc_t, is_async=True)
        if HAS_KV_TANGENT:
            v_tangent = bufs[5].index(stage).reshape([BLOCK_N, HEAD_DIM])
            acc_t = warpgroup_mma(p16, v_tangent, acc_t, is_async=True)
        acc_o, acc_t = warpgroup_mma_wait(0, deps=(acc_o, acc_t))
        mbarrier.arrive(kv_empty.index(stage), count=1)

    # v and v_tangent may have been divided by a power of two before their conversion to fp16.
    vscale = gl.load(VSCALE)
    acc_o = acc_o * vscale
    acc_t = acc_t * vscale
    inv_l = 1.0 / l_i
    mu = r_i * inv_l
    lse = (m_i + gl.log2(l_i)) * 0.6931471805599453
    inv_l_o = gl.expand_dims(gl.convert_layout(inv_l, o_rows), 1)
    mu_o = gl.expand_dims(gl.convert_layout(mu, o_rows), 1)
    o = acc_o * inv_l_o
    o_tangent = acc_t * inv_l_o - mu_o * o

    rows_o = off_m + WG * ROWS + gl.arange(0, ROWS, layout=o_rows)
    cols_o = gl.arange(0, HEAD_DIM, layout=o_cols)
    mask_o = gl.expand_dims(rows_o < seq_q, 1) & gl.expand_dims(cols_o < HEAD_DIM, 0)
    o_off = (off_b * o_strides[0] + off_h * o_strides[1]
             + gl.expand_dims(rows_o, 1).to(gl.int64) * o_strides[2] + gl.expand_dims(cols_o, 0))
    o_tangent_off = (off_b * o_tangent_strides[0] + off_h * o_tangent_strides[1]
                     + gl.expand_dims(rows_o, 1).to(gl.int64) * o_tangent_strides[2] + gl.expand_dims(cols_o, 0))
    gl.store(O + o_off, o.to(O.dtype.element_ty), mask=mask_o)
    gl.store(O_TANGENT + o_tangent_off, o_tangent.to(O_TANGENT.dtype.element_ty), mask=mask_o)
    rows_s = off_m + WG * ROWS + gl.arange(0, ROWS, layout=s_rows)
    mask_s = rows_s < seq_q
    gl.store(LSE + off_b * lse_strides[0] + off_h * lse_strides[1] + rows_s * lse_strides[2], lse, mask=mask_s)
    gl.store(MU + off_b * mu_strides[0] + off_h * mu_strides[1] + rows_s * mu_strides[2], mu, mask=mask_s)


@gluon.jit
def _consumer_0(bufs, bars, outs, off_b, off_h, off_m, seq_q, seq_k, sm_scale):
    _consumer(bufs, bars, outs, off_b, off_h, off_m, seq_q, seq_k, sm_scale, 0)


@gluon.jit
def _consumer_1(bufs, bars, outs, off_b, off_h, off_m, seq_q, seq_k, sm_scale):
    _consumer(bufs, bars, outs, off_b, off_h, off_m, seq_q, seq_k, sm_scale, 1)


@gluon.jit
def _jvp_fwd_hopper_kernel(
    q_desc, q_tangent_desc, k_desc, k_tangent_desc, v_desc, v_tangent_desc,
    O, O_TANGENT, LSE, MU, VSCALE,
    stride_ob, stride_oh, stride_om,
    stride_tob, stride_toh, stride_tom,
    stride_lb, stride_lh, stride_lm,
    stride_mb, stride_mh, stride_mm,
    sm_scale, num_heads, seq_q, seq_k,
    HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
    HAS_KV_TANGENT: gl.constexpr,
    CONSUMER_REGS: gl.constexpr,
):
    ROWS: gl.constexpr = q_desc.block_type.shape[2]
    pid_m = gl.program_id(0)
    pid_bh = gl.program_id(1)
    off_b = pid_bh // num_heads
    off_h = pid_bh % num_heads
    off_m = pid_m * (2 * ROWS)

    q_s = gl.allocate_shared_memory(q_desc.dtype, [2] + q_desc.block_type.shape, q_desc.layout)
    q_tangent_s = gl.allocate_shared_memory(q_tangent_desc.dtype, [2] + q_tangent_desc.block_type.shape,
                                            q_tangent_desc.layout)
    k_s = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_s = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    kv_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(kv_empty.index(i), count=2)

    if HAS_KV_TANGENT:
        k_tangent_s = gl.allocate_shared_memory(k_tangent_desc.dtype, [STAGES] + k_tangent_desc.block_type.shape,
                                                k_tangent_desc.layout)
        v_tangent_s = gl.allocate_shared_memory(v_tangent_desc.dtype, [STAGES] + v_tangent_desc.block_type.shape,
                                                v_tangent_desc.layout)
        descs = (q_desc, q_tangent_desc, k_desc, v_desc, k_tangent_desc, v_tangent_desc)
        bufs = (q_s, q_tangent_s, k_s, v_s, k_tangent_s, v_tangent_s)
    else:
        descs = (q_desc, q_tangent_desc, k_desc, v_desc)
        bufs = (q_s, q_tangent_s, k_s, v_s)
    bars = (q_bar, k_ready, v_ready, kv_empty)
    outs = (O, O_TANGENT, LSE, MU, VSCALE, (stride_ob, stride_oh, stride_om), (stride_tob, stride_toh, stride_tom),
            (stride_lb, stride_lh, stride_lm), (stride_mb, stride_mh, stride_mm))
    consumer_args = (bufs, bars, outs, off_b, off_h, off_m, seq_q, seq_k, sm_scale)
    gl.warp_specialize([
        (_consumer_0, consumer_args),
        (_consumer_1, consumer_args),
        (_producer, (descs, bufs, bars, off_b, off_h, off_m, seq_k)),
    ], [4, 1], [CONSUMER_REGS, 24])


def _tma_strides(x: torch.Tensor) -> list[int]:
    # A dimension of size 1 is never stepped along, but TMA still wants its stride 16-byte aligned.
    return [s if n > 1 else x[0].numel() if i == 0 else x.shape[-1] for i, (n, s) in enumerate(zip(x.shape, x.stride()))]


def _descriptor(x: torch.Tensor, rows: int) -> TensorDescriptor:
    block = [1, 1, rows, x.shape[-1]]
    layout = gl.NVMMASharedLayout.get_default_for(block, gl.float16 if x.dtype == torch.float16 else gl.bfloat16)
    return TensorDescriptor(x, list(x.shape), _tma_strides(x), block, layout)


def hopper_kernel_supports(q, k, v, q_tangent, k_tangent, v_tangent, o, o_tangent) -> bool:
    """Whether :func:`flash_attention_jvp_hopper` takes these inputs (otherwise use the portable kernel)."""
    if not (q.is_cuda and torch.cuda.get_device_capability(q.device) == (9, 0)):
        return False
    if q.dtype not in (torch.bfloat16, torch.float16) or q.shape[-1] not in (64, 128):
        return False
    if (k_tangent is None) != (v_tangent is None) or o.stride(-1) != 1 or o_tangent.stride(-1) != 1:
        return False
    # TMA: 16-byte aligned base and strides, unit stride along the head dim.
    for x in (q, k, v, q_tangent, k_tangent, v_tangent):
        if x is None:
            continue
        if x.stride(-1) != 1 or x.data_ptr() % 16 or any((s * x.element_size()) % 16 for s in _tma_strides(x)[:-1]):
            return False
    return True


@functools.cache
def _unit_scale(device: torch.device) -> torch.Tensor:
    # The kernel always reads a value scale; inputs left in their dtype get this one, made once per device.
    return torch.ones(1, device=device)


def flash_attention_jvp_hopper(q, k, v, q_tangent, k_tangent, v_tangent, o, o_tangent, lse, mu, scale, vscale,
                               block_n: int = 64, stages: int = 2, consumer_regs: int = 240):
    """Launch the warp-specialised kernel; arguments as checked and prepared by ``flash_attention_jvp``
    (``v``/``v_tangent`` possibly already converted to fp16, ``vscale`` their power-of-two scale or None)."""
    B, H, Sq, D = q.shape
    Sk = k.shape[2]
    has_kv_tangent = k_tangent is not None
    descs = [_descriptor(x, _ROWS_PER_WARPGROUP if x is q or x is q_tangent else block_n)
             for x in (q, q_tangent, k, k_tangent if has_kv_tangent else k, v, v_tangent if has_kv_tangent else v)]
    grid = (triton.cdiv(Sq, _BLOCK_M), B * H)
    _jvp_fwd_hopper_kernel[grid](
        *descs,
        o, o_tangent, lse, mu, vscale if vscale is not None else _unit_scale(q.device),
        o.stride(0), o.stride(1), o.stride(2),
        o_tangent.stride(0), o_tangent.stride(1), o_tangent.stride(2),
        *lse.stride(), *mu.stride(),
        float(scale), H, Sq, Sk,
        HEAD_DIM=D, BLOCK_N=block_n, STAGES=stages,
        HAS_KV_TANGENT=has_kv_tangent,
        CONSUMER_REGS=consumer_regs,
        num_warps=4, maxnreg=_MAXNREG,
    )
    return o, o_tangent, lse, mu


def compile_for_sm90(head_dim: int = 128, block_n: int = 64, has_kv_tangent: bool = True, stages: int = 2,
                     consumer_regs: int = 240, dtype: str = "bf16"):
    """Compile the kernel for sm_90 without a GPU (ahead of time), for checks of its resources.

    Returns Triton's compiled kernel: ``.asm["ptx"]``, ``.metadata.shared`` (bytes of shared memory).
    """
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    value_dtype = "fp16" if dtype == "bf16" else dtype  # the precise mode's fp16 values

    def desc(rows, dt):
        block = [1, 1, rows, head_dim]
        layout = gl.NVMMASharedLayout.get_default_for(block, gl.bfloat16 if dt == "bf16" else gl.float16)
        return f"tensordesc<{dt}[{', '.join(map(str, block))}],{layout!r}>"

    constexprs = dict(HEAD_DIM=head_dim, BLOCK_N=block_n, STAGES=stages, HAS_KV_TANGENT=has_kv_tangent,
                      CONSUMER_REGS=consumer_regs)
    kinds = {"q_desc": desc(_ROWS_PER_WARPGROUP, dtype), "q_tangent_desc": desc(_ROWS_PER_WARPGROUP, dtype),
             "k_desc": desc(block_n, dtype), "k_tangent_desc": desc(block_n, dtype),
             "v_desc": desc(block_n, value_dtype), "v_tangent_desc": desc(block_n, value_dtype),
             "O": f"*{dtype}", "O_TANGENT": f"*{dtype}", "LSE": "*fp32", "MU": "*fp32", "VSCALE": "*fp32",
             "sm_scale": "fp32"}
    signature = {}
    for name in _jvp_fwd_hopper_kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in kinds:
            signature[name] = kinds[name]
        else:
            signature[name] = "i64" if name.startswith("stride") else "i32"
    source = GluonASTSource(fn=_jvp_fwd_hopper_kernel, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, maxnreg=_MAXNREG))
