"""Per-GPU memory of an rCM run, estimated from the configuration alone (no weights, no GPU).

    est = estimate(load_config("examples/configs/wan2.1-t2v-14b-480p.yaml"), world_size=64)
    est.peak_gib  # {"student": ..., "critic": ...}: what torch.cuda.max_memory_allocated reports per step kind

What a GPU holds (what `trainer.py` keeps): four networks' weights (teacher, student, critic, the EMA's module
copy) in their dtypes; the EMA's fp32 shadow; for the student and the critic an fp32 gradient buffer (megatron DDP,
`grad_reduce_in_fp32`), fp32 main parameters for the low-precision ones and Adam's two moments, the last two
sharded over the data-parallel group by the distributed optimizer. Weights are sharded by TP (the layers megatron
marks `tensor_model_parallel`) and split over PP stages (contiguous blocks; embeddings on the first stage, the head
on the last; the worst stage is reported). Parameter counts come from the model built on the meta device.

Activations (the with-grad pass dominates): with activation checkpointing each block keeps its input (one residual
element per token) and the backward re-runs one block at a time; under selective recomputation
(`model.recompute_policy=selective`, training/recompute.py) it keeps its self- and cross-attention's outputs and
log-sum-exps too (`selective_self`: self-attention's only); without checkpointing each block keeps everything its
backward needs. Tokens are split 1/CP (the token sequence is split after patchify, docs/architecture.md "Context parallelism"); with sequence
parallelism the residual-stream tensors are split 1/TP too, the per-head and MLP tensors are split by TP always.
The student's with-grad pass runs the sCM and DMD inputs as one batch (2 x micro-batch); the teacher's CFG passes
run cond + uncond as one batch; the JVP pass carries a tangent next to each primal. The per-token byte counts
below were counted on the tiny model with saved-tensor hooks (block inputs, outside-block tensors) and fitted to the
Wan2.1-1.3B scale probe on one H200 (480p x 81, activation checkpointing: 70.8 / 64.6 GiB). Terms that matter
only for small models are counted from what the code allocates: the text tokens' activations, the math attention's
softmax probabilities (float32 / float64 models) and the cuBLAS workspace.
"""

import dataclasses
import math

from megatron_rcm.models import get_preset
from megatron_rcm.training.config import ConfigError, TrainingConfig

GiB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}

# Bytes per token and per unit of width (x hidden size h, x ffn width f), at 2-byte activations; scaled by
# activation bytes / 2 for wider dtypes.
CHECKPOINT_INPUT_H = 2.0
"""Activation checkpointing: the block input kept per block (one residual element)."""
SELECTIVE_ATTENTION_H = 2.0
SELECTIVE_ATTENTION_HEADS = 4.0
"""Selective recomputation, on top of the block input, per kept attention call (self and cross under `selective`,
self under `selective_self`): its output (one element of width h per query token, split by TP as the heads are) and
its log-sum-exp (one float32 per head and query token, not scaled by the activation dtype). Ring context
parallelism keeps one partial output and log-sum-exp per key/value block: CP times the self-attention's share.
Nothing for the math attention of float32 / float64 models (no fused op to keep: there it recomputes as `full`)."""
BLOCK_SAVED_H = 35.0
BLOCK_SAVED_F = 4.0
"""Without checkpointing: tensors one block keeps for its backward (norm inputs/outputs, q/k/v, attention output
and LSE, MLP hidden before and after GELU); with it, the working set of the one block being recomputed."""
BLOCK_SAVED_H_MATH = 52.4
"""BLOCK_SAVED_H of float32 / float64 models (`MATH_ATTENTION_DTYPES`, in the same 2-byte units): these run the
math attention and keep every elementwise intermediate at full width, on the GPU as on the CPU, where the fused
half-precision regions that BLOCK_SAVED_H was counted from keep less. Counted on the tiny model with saved-tensor
hooks (tests/unit/training/test_memory.py), the softmax probabilities and text terms left out (counted apart); the
tiny default's student / critic peaks on one H100 (2026-12-06) agree with it (benchmarks/RESULTS.md)."""
BLOCK_SAVED_H_SPLIT = 0.4
"""Share of BLOCK_SAVED_H in the residual stream (split by TP only under sequence parallelism); the rest is
per-head and split by TP always."""
OUTSIDE_BLOCKS_H = 14.0
"""Patch embedding, time conditioning and the fp32 head of a with-grad pass (counted on the tiny model)."""
FORWARD_LIVE_H = 8.0
FORWARD_LIVE_F = 4.0
"""Live working set of a no-grad forward (the residual, one block's q/k/v and MLP hidden at once)."""
JVP_FACTOR = 2.0
"""The JVP pass carries a tangent with each primal."""
TEXT_BLOCK_H = 12.0
TEXT_OUTSIDE_H = 6.5
"""Per text token (`text_tokens`: data.text_length, 5 for the shapes set) of a with-grad pass: each block's cross-attention keys and values
and their norm's tensors (six elements of width h); outside the blocks the text embedding's MLP (counted on the tiny model with saved-tensor hooks,
tests/unit/training/test_memory.py). Negligible at 480p (512 text tokens next to 32,760 patch tokens) and for the
tiny default (5 next to 128)."""
MATH_ATTENTION_DTYPES = ("float32", "float64")
"""Activations that `models.attention.attention` sends to its math path on CUDA too (the fused kernels are for half
precision): the path keeps each block's softmax probabilities (query tokens x keys x heads) for the backward, in
float32 (float64 for float64)."""
CUBLAS_WORKSPACE_BYTES = 8 * 4096 * 1024
"""One cuBLAS workspace, allocated through torch's caching allocator on a handle's first matmul and kept: torch's
default CUBLAS_WORKSPACE_CONFIG on Hopper (sm90) is `:4096:8` (8 x 4096 KiB; `:4096:2:16:8`, about 8 MiB, on other
GPUs; cuBLASLt shares it)."""
CUBLAS_WORKSPACES = 2
"""Workspaces per GPU: torch keeps one per (cuBLAS handle, stream), and handles are per thread. The passes run on
one stream, but autograd runs a CUDA backward on its own device thread, so the forward (and JVP) matmuls of the
main thread and the backward's matmuls hold one workspace each. Seen on one H100 (2026-12-06): the tiny default
keeps 0.072 GiB allocated between steps against 0.070 GiB counted with two workspaces (0.039 with one)."""
ALLOCATOR_OVERHEAD = 0.08
CUDA_CONTEXT_GIB = 0.75
"""Fit verdict: peak allocated + fragmentation (reserved - allocated) + CUDA context and library workspaces."""


@dataclasses.dataclass
class ParamTable:
    """Full-model parameter counts by part and kind (no parallel split)."""

    # elements by (part, tp_sharded, fp32): part in pre / block / post; "block" is per block
    counts: dict
    num_layers: int

    def local(self, tp: int, pp: int, stage: int, fp32: bool | None = None) -> float:
        """Elements on one GPU of PP stage `stage` (TP shards divided); fp32 selects the high-precision ones."""
        per_stage = math.ceil(self.num_layers / pp)
        blocks = min(per_stage, self.num_layers - stage * per_stage)
        total = 0.0
        for (part, sharded, is32), n in self.counts.items():
            if fp32 is not None and is32 != fp32:
                continue
            if part == "pre" and stage != 0 or part == "post" and stage != pp - 1:
                continue
            n = n / tp if sharded else n
            total += n * (blocks if part == "block" else 1)
        return total

    @property
    def total(self) -> int:
        return int(sum(n * (self.num_layers if k[0] == "block" else 1) for k, n in self.counts.items()))


_TABLES: dict = {}


def parameter_table(preset_name: str, params_dtype: str) -> ParamTable:
    """Counts of the model built on the meta device (cached). Under an initialised tensor-parallel layout the
    built shapes are this rank's shards; the sharded ones are scaled back to the full model."""
    key = (preset_name, params_dtype)
    if key in _TABLES:
        return _TABLES[key]
    import torch
    from megatron.core import parallel_state

    from megatron_rcm.models import build_model
    from megatron_rcm.models.loading import ARCHITECTURES
    from megatron_rcm.dtypes import DTYPES

    arch_name, model_config = get_preset(preset_name)
    model = build_model(ARCHITECTURES[arch_name], model_config, DTYPES[params_dtype], False, torch.device("meta"))
    built_tp = parallel_state.get_tensor_model_parallel_world_size()
    counts: dict = {}
    for name, p in model.named_parameters():
        if name.startswith("blocks."):
            if not name.startswith("blocks.0."):
                continue
            part = "block"
        else:
            part = "post" if name.startswith("head") else "pre"
        sharded = bool(getattr(p, "tensor_model_parallel", False))
        k = (part, sharded, p.dtype == torch.float32)
        counts[k] = counts.get(k, 0) + p.numel() * (built_tp if sharded else 1)
    table = ParamTable(counts, model_config.num_layers)
    _TABLES[key] = table
    return table


@dataclasses.dataclass
class Layout:
    """A parallel layout and the per-GPU work it gives."""

    tp: int
    cp: int
    pp: int
    dp: int
    sequence_parallel: bool
    distributed_optimizer: bool
    activation_checkpointing: bool
    micro_batch: int
    num_micro: int
    recompute_policy: str = "full"
    """What a checkpointed block keeps (`model.recompute_policy`): `full`, `selective` or `selective_self`."""

    @property
    def recompute(self) -> str:
        """`off` or the recompute policy."""
        return self.recompute_policy if self.activation_checkpointing else "off"

    def describe(self) -> str:
        return (f"TP {self.tp}{' +SP' if self.sequence_parallel else ''} x CP {self.cp} x PP {self.pp} x DP {self.dp}"
                f" | micro-batch {self.micro_batch} x {self.num_micro}"
                f" | activation checkpointing {self.recompute}"
                f" | distributed optimizer {'on' if self.distributed_optimizer else 'off'}")

    def overrides(self) -> str:
        policy = f" model.recompute_policy={self.recompute_policy}" if self.activation_checkpointing else ""
        return (f"parallel.tensor_model_parallel_size={self.tp} parallel.context_parallel_size={self.cp} "
                f"parallel.pipeline_model_parallel_size={self.pp} model.sequence_parallel="
                f"{str(self.sequence_parallel).lower()} model.activation_checkpointing="
                f"{str(self.activation_checkpointing).lower()}{policy} training.micro_batch_size={self.micro_batch}")


@dataclasses.dataclass
class Estimate:
    """Per-GPU bytes of one layout (worst PP stage)."""

    layout: Layout
    tokens: int
    """Patch tokens of one sample (before the CP split)."""
    parameters: int
    """Parameters of one network (full model)."""
    static: dict
    """Resident for the whole run: weights, EMA, gradients, optimizer state, the cuBLAS workspace (bytes)."""
    activations: dict
    """Peak activation bytes of each pass kind."""
    peak: dict
    """step kind -> bytes at the peak (static + the step's worst pass)."""
    gpu_memory: float | None = None

    @property
    def peak_gib(self) -> dict:
        return {k: v / GiB for k, v in self.peak.items()}

    @property
    def needed(self) -> float:
        """Bytes the GPU must have: the worst peak + allocator overhead + CUDA context."""
        return max(self.peak.values()) * (1 + ALLOCATOR_OVERHEAD) + CUDA_CONTEXT_GIB * GiB

    def fits(self, gpu_memory: float) -> bool:
        return self.needed <= gpu_memory

    def to_dict(self, gpu_memory: float | None = None) -> dict:
        out = {"layout": dataclasses.asdict(self.layout), "tokens_per_sample": self.tokens,
               "parameters_per_network": self.parameters,
               "static_gib": {k: v / GiB for k, v in self.static.items()},
               "activations_gib": {k: v / GiB for k, v in self.activations.items()},
               "peak_gib": self.peak_gib, "needed_gib": self.needed / GiB}
        if gpu_memory:
            out["gpu_memory_gib"] = gpu_memory / GiB
            out["fits"] = self.fits(gpu_memory)
        return out


def sample_tokens(config: TrainingConfig) -> int:
    """Patch tokens of one training sample: pixel-space shapes clips, else Wan-VAE latents (4x time, 8x space)."""
    _, model_config = get_preset(config.model.preset)
    d = config.data
    if d.source == "shapes":
        grid = (d.frames, d.size, d.size)
    else:
        grid = (1 + (d.frames - 1) // 4, d.height // 8, d.width // 8)
    return math.prod(g // p for g, p in zip(grid, model_config.patch_size))


def text_tokens(config: TrainingConfig) -> int:
    """Text tokens of one sample: the shapes set's tiny encoder pads to its caption length (5), not to
    `data.text_length`; every other source pads to `data.text_length` (umT5's 512)."""
    if config.data.source == "shapes":
        from megatron_rcm.data.shapes import ShapesTextEncoder

        return ShapesTextEncoder.MAX_LENGTH
    return config.data.text_length


def layout_of(config: TrainingConfig, world_size: int) -> Layout:
    p, t = config.parallel, config.training
    mp = p.tensor_model_parallel_size * p.context_parallel_size * p.pipeline_model_parallel_size
    if world_size % mp:
        raise ConfigError(f"world size {world_size} is not divisible by TP x CP x PP = {mp}")
    dp = world_size // mp
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(f"training.global_batch_size ({t.global_batch_size}) is not divisible by micro-batch "
                          f"({t.micro_batch_size}) x DP ({dp})")
    return Layout(p.tensor_model_parallel_size, p.context_parallel_size, p.pipeline_model_parallel_size, dp,
                  config.model.sequence_parallel, p.use_distributed_optimizer, config.model.activation_checkpointing,
                  t.micro_batch_size, t.global_batch_size // (t.micro_batch_size * dp), config.model.recompute_policy)


def _megatron_grad_sync(config: TrainingConfig) -> bool:
    """The GPU path (estimates are for GPUs): megatron DDP unless `torch` grad sync is asked for."""
    return config.parallel.grad_sync != "torch"


def _static(config: TrainingConfig, table: ParamTable, lay: Layout, stage: int) -> dict:
    wb = DTYPE_BYTES[config.model.params_dtype]
    hi = max(wb, 4)
    n_lo = table.local(lay.tp, lay.pp, stage, fp32=False)
    n_hi = table.local(lay.tp, lay.pp, stage, fp32=True)
    n = n_lo + n_hi
    weights = n_lo * wb + n_hi * hi
    trained = 2 if config.rcm.uses_dmd else 1  # student and (with the DMD regularizer) the critic
    megatron = _megatron_grad_sync(config)
    grads = n * 4 if megatron else weights
    main = n_lo * 4 if megatron and wb < 4 else 0.0
    adam = n * 8 if megatron else n_lo * 2 * wb + n_hi * 2 * hi
    shard = lay.dp if megatron and lay.distributed_optimizer else 1
    return {"teacher_weights": weights, "student_weights": weights,
            "critic_weights": weights if config.rcm.uses_dmd else 0.0,
            "ema_weights": weights, "ema_fp32_shadow": n * 4,
            "gradient_buffers": trained * grads, "fp32_main_params": trained * main / shard,
            "adam_state": trained * adam / shard, "cublas_workspace": CUBLAS_WORKSPACES * CUBLAS_WORKSPACE_BYTES}


def _ring_attention(config: TrainingConfig, lay: Layout, heads: int) -> bool:
    """Whether self-attention crosses the CP group as a ring (parallel.cp_comm resolved as the trainer does)."""
    from megatron_rcm.parallel.context import resolve_cp_comm

    if lay.cp == 1:
        return False
    try:
        return resolve_cp_comm(config.parallel.cp_comm, heads // lay.tp, lay.cp) == "ring"
    except ValueError:  # a2a asked for where it cannot run: the trainer refuses the layout
        return True


def selective_attention_bytes(config: TrainingConfig, lay: Layout) -> float:
    """Bytes per query token that one block keeps beyond its input under the layout's recompute policy (one
    sample): `selective` the self- and cross-attention outputs and log-sum-exps, `selective_self` self-attention's;
    0 under `full`, without checkpointing, and for the math attention of float32 / float64."""
    if lay.recompute not in ("selective", "selective_self") or config.model.params_dtype in MATH_ATTENTION_DTYPES:
        return 0.0
    _, model_config = get_preset(config.model.preset)
    h, heads = model_config.hidden_size, model_config.num_attention_heads
    scale = DTYPE_BYTES[config.model.params_dtype] / 2
    per_call = (SELECTIVE_ATTENTION_H * h * scale + SELECTIVE_ATTENTION_HEADS * heads) / lay.tp
    self_attention = per_call * (lay.cp if _ring_attention(config, lay, heads) else 1)  # CP partials on a ring
    return self_attention + (per_call if lay.recompute == "selective" else 0.0)


def _activations(config: TrainingConfig, lay: Layout, tokens: int, stage: int) -> dict:
    """Peak activation bytes per pass kind on the GPU of PP stage `stage`."""
    _, model_config = get_preset(config.model.preset)
    h, L = model_config.hidden_size, model_config.num_layers
    f = getattr(model_config, "ffn_dim", 0) or int(h * getattr(model_config, "mlp_ratio", 4))
    scale = max(DTYPE_BYTES[config.model.params_dtype], 2) / 2
    s = tokens / lay.cp
    blocks = min(math.ceil(L / lay.pp), L - stage * math.ceil(L / lay.pp))
    res = lay.tp if lay.sequence_parallel else 1  # residual-stream split
    saved_h = BLOCK_SAVED_H_MATH if config.model.params_dtype in MATH_ATTENTION_DTYPES else BLOCK_SAVED_H
    block = (saved_h * h * (BLOCK_SAVED_H_SPLIT / res + (1 - BLOCK_SAVED_H_SPLIT) / lay.tp)
             + BLOCK_SAVED_F * f / lay.tp) * scale
    outside = OUTSIDE_BLOCKS_H * h / res * ((stage == 0) + (stage == lay.pp - 1)) / 2
    in_flight = min(lay.pp, lay.num_micro)  # 1F1B: the first stage holds up to PP micro-batches

    text = text_tokens(config)
    text_block = TEXT_BLOCK_H * h / lay.tp * scale  # per text token; the keys and values are split by heads
    text_outside = TEXT_OUTSIDE_H * h * scale * (stage == 0)
    if config.model.params_dtype in MATH_ATTENTION_DTYPES:
        # softmax probabilities of the self-attention (keys: the whole sample) and the cross-attention (text)
        probs = (model_config.num_attention_heads / lay.tp * s * (tokens + text)
                 * max(DTYPE_BYTES[config.model.params_dtype], 4))
    else:
        probs = 0.0

    attention = s * selective_attention_bytes(config, lay)

    def with_grad(batch):
        per_block = s * block + text * text_block + probs
        if lay.activation_checkpointing:
            kept = (s * (blocks * CHECKPOINT_INPUT_H * h / res * scale + outside) + text * text_outside
                    + blocks * attention)
            # the block being recomputed reads its kept attention results: counted once, in `kept`
            return batch * (in_flight * kept + per_block - attention)
        return batch * in_flight * (blocks * per_block + s * outside + text * text_outside)

    live = (FORWARD_LIVE_H * h / res + FORWARD_LIVE_F * f / lay.tp) * scale
    mb = lay.micro_batch
    student_batch = 2 * mb if config.rcm.uses_dmd else mb
    out = {"student_with_grad": with_grad(student_batch), "critic_with_grad": with_grad(mb),
           "teacher_cfg": s * 2 * mb * live}
    if config.rcm.uses_scm:
        out["student_jvp"] = s * mb * live * JVP_FACTOR
    return out


def estimate(config: TrainingConfig, world_size: int, layout: Layout | None = None) -> Estimate:
    """The per-GPU estimate of `config` on `world_size` GPUs (or of `layout` with the config's model and data)."""
    lay = layout or layout_of(config, world_size)
    table = parameter_table(config.model.preset, config.model.params_dtype)
    tokens = sample_tokens(config)
    best = None
    for stage in sorted({0, lay.pp - 1}):
        static = _static(config, table, lay, stage)
        act = _activations(config, lay, tokens, stage)
        base = sum(static.values())
        student = max(v for k, v in act.items() if k != "critic_with_grad")
        peak = {"student": base + student}
        if config.rcm.uses_dmd:
            peak["critic"] = base + act["critic_with_grad"]
        est = Estimate(lay, tokens, table.total, static, act, peak)
        if best is None or max(est.peak.values()) > max(best.peak.values()):
            best = est
    return best


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


_RECOMPUTE_ORDER = ((False, "full"), (True, "selective"), (True, "selective_self"), (True, "full"))
"""(activation_checkpointing, recompute_policy) from the least recomputation to the most."""


def candidate_layouts(config: TrainingConfig, gpus: int) -> list[Layout]:
    """Layouts of `gpus` GPUs for this model and global batch: TP dividing the heads (at most 8, one node), CP and
    PP powers of two, micro-batch 1, 2, 4, activation checkpointing off or on with each recompute policy, sequence
    parallelism with TP > 1."""
    _, model_config = get_preset(config.model.preset)
    t = config.training
    out = []
    for tp in [d for d in _divisors(model_config.num_attention_heads) if d <= min(8, gpus)]:
        for cp in (1, 2, 4, 8, 16):
            for pp in (1, 2, 4, 8):
                if gpus % (tp * cp * pp) or pp > model_config.num_layers:
                    continue
                dp = gpus // (tp * cp * pp)
                for mb in (1, 2, 4):
                    if t.global_batch_size % (mb * dp):
                        continue
                    for ac, policy in _RECOMPUTE_ORDER:
                        out.append(Layout(tp, cp, pp, dp, tp > 1, config.parallel.use_distributed_optimizer, ac, mb,
                                          t.global_batch_size // (mb * dp), policy))
    return out


def smallest_fitting(config: TrainingConfig, gpus: int, gpu_memory: float, limit: int = 5) -> list[Estimate]:
    """Layouts that fit, fewest model-parallel GPUs first (then the least recomputation: none, selective,
    selective_self, full; larger micro-batches, less memory): the cheapest in communication and recomputation."""
    fitting = [e for e in (estimate(config, gpus, lay) for lay in candidate_layouts(config, gpus))
               if e.fits(gpu_memory)]
    rank = {policy if ac else "off": i for i, (ac, policy) in enumerate(_RECOMPUTE_ORDER)}
    fitting.sort(key=lambda e: (e.layout.tp * e.layout.cp * e.layout.pp, rank[e.layout.recompute],
                                -e.layout.micro_batch, e.layout.pp, e.layout.cp, e.needed))
    return fitting[:limit]


def preflight(config: TrainingConfig, world_size: int, gpu_memory_bytes: float | None) -> None:
    """Refuse a layout whose estimate does not fit the GPUs (ConfigError, one line with the estimate and a layout
    that fits); nothing on CPU or with `training.skip_memory_check=true`."""
    if not gpu_memory_bytes or getattr(config.training, "skip_memory_check", False):
        return
    est = estimate(config, world_size)
    if est.fits(gpu_memory_bytes):
        return
    kind = max(est.peak, key=est.peak.get)
    better = smallest_fitting(config, world_size, gpu_memory_bytes, limit=1)
    hint = (f"a layout that fits: {better[0].layout.overrides()}" if better else
            f"no layout of {world_size} GPUs fits: use more GPUs")
    raise ConfigError(f"memory estimate {est.needed / GiB:.1f} GiB per GPU ({kind} step, {est.layout.describe()}) "
                      f"exceeds the GPU's {gpu_memory_bytes / GiB:.1f} GiB; {hint} (tools/estimate_memory.py "
                      f"explains the estimate; training.skip_memory_check=true runs anyway)")


def _allocation_site(frames: list) -> str:
    """Where an allocation was made: the innermost frame in this package (file:line function), else the innermost."""
    for f in frames:
        if "megatron_rcm" in f.get("filename", ""):
            path = f["filename"].split("megatron_rcm", 1)[1].lstrip("/")
            return f"megatron_rcm/{path}:{f.get('line', 0)} {f.get('name', '')}"
    return f"{frames[0].get('filename', '?').rsplit('/', 1)[-1]}:{frames[0].get('line', 0)} {frames[0].get('name', '')}" \
        if frames else "(no stack)"


def peak_allocations(trace: list[dict], top: int = 12) -> tuple[int, list[tuple[str, int]]]:
    """(peak bytes above the start, [(site, bytes live at the peak), ...] largest first) of a CUDA caching-allocator
    trace (`torch.cuda.memory._snapshot()["device_traces"][device]` of one step, recorded with
    `_record_memory_history`): allocations count from `alloc` to `free_completed`; blocks allocated before the
    recording started are not in it (they are the step's resident bytes)."""
    current, peak, peak_at = 0, 0, -1
    for i, e in enumerate(trace):
        if e["action"] == "alloc":
            current += e["size"]
            if current > peak:
                peak, peak_at = current, i
        elif e["action"] == "free_completed":
            current -= e["size"]
    live: dict = {}
    for e in trace[:peak_at + 1]:
        if e["action"] == "alloc":
            live[e["addr"]] = (e["size"], _allocation_site(e.get("frames", [])))
        elif e["action"] == "free_completed":
            live.pop(e["addr"], None)  # freed blocks of the earlier part of the step, or of before the recording
    by_site: dict = {}
    for size, site in live.values():
        by_site[site] = by_site.get(site, 0) + size
    return peak, sorted(by_site.items(), key=lambda kv: -kv[1])[:top]


def _record_allocations(torch) -> None:
    """Start torch's allocation history afresh (with Python stacks), for `peak_allocations`."""
    try:
        torch.cuda.memory._record_memory_history(max_entries=1_000_000, stacks="python", clear_history=True)
    except TypeError:  # an older torch without `clear_history`: stop and start again (may keep older entries)
        torch.cuda.memory._record_memory_history(enabled=None)
        torch.cuda.memory._record_memory_history(max_entries=1_000_000, stacks="python")


def measure(config: TrainingConfig, iterations: int = 6, breakdown: bool = False) -> dict:
    """Measured peak bytes per step kind on this process's GPU: the real `Trainer.train_step` (what the scale probe
    runs), `torch.cuda.max_memory_allocated` per iteration (reset before each), the largest per kind, leaving out each
    kind's first iteration (Adam's state is created in its first step) where there is a later one; 'resident': what
    was allocated before the last step; with `breakdown`, 'breakdown': per step kind the `peak_allocations` of its
    last step (the allocation history is recorded from the second iteration on). Run it with the world size of the
    estimate (e.g. under torchrun)."""
    import torch

    from megatron_rcm.training.trainer import Trainer

    if not torch.cuda.is_available():
        raise RuntimeError("measuring the peak memory needs a GPU")
    trainer = Trainer(config)
    peaks: dict = {}
    resident = 0
    sites: dict = {}
    for it in range(iterations):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        resident = torch.cuda.memory_allocated()
        record = breakdown and it > 0  # each kind's latest step is kept
        if record:
            _record_allocations(torch)
        phase = trainer.train_step(it)["phase"]
        torch.cuda.synchronize()
        peaks.setdefault(phase, []).append(torch.cuda.max_memory_allocated())
        if record:
            trace = torch.cuda.memory._snapshot()["device_traces"][torch.cuda.current_device()]
            torch.cuda.memory._record_memory_history(enabled=None)
            sites[phase] = peak_allocations(trace)
    out = {phase: max(v[1:] if len(v) > 1 else v) for phase, v in peaks.items()}
    # what stays allocated between steps (weights, optimizer state, workspaces): splits the peaks into the static
    # terms and the activations when an estimate misses
    out["resident"] = resident
    if breakdown:
        out["breakdown"] = sites
    return out
