"""Scale probe: time one rCM student step and one critic step of a full-size model with random weights.

    torchrun --nproc_per_node=1 -m megatron_rcm.training.scale_probe                 # Wan2.1-1.3B, 480p x 81 frames
    torchrun --nproc_per_node=2 -m megatron_rcm.training.scale_probe model.preset=wan2.1-t2v-14b \\
        parallel.tensor_model_parallel_size=2 model.sequence_parallel=true
    torchrun --nproc_per_node=1 -m megatron_rcm.training.scale_probe --profile runs/scale-probe/profile

Runs the real training loop (`Trainer.train_step`) on `data.source=random` (Gaussian latents of the VAE's shape,
random text embeddings), with the DMD regularizer active from the first iteration (tangent warm-up 0) so that a
student step does every pass: teacher CFG, student JVP, rollout, DMD gradient (critic + teacher CFG) and the
with-grad student pass. Reports per step: time, peak memory per GPU, and model TFLOP/s per GPU counted from the
passes' matmul FLOPs (`pass_flops`). Extra arguments are config overrides, and:

    --iterations N   iterations to time (default 6; the first two are warm-up and left out of the averages)
    --profile DIR    then profile one more iteration of each step kind with torch.profiler: a Chrome trace per
                     step kind and rank in DIR (<phase>.rank<r>.json), and a table per step kind of the trainer's
                     pass times (time/<pass>) with their share of the step and TFLOP/s (`flops_by_pass`), the
                     rest of the step (optimizer, EMA, loss reduction), the GPU kernel time by kind (attention,
                     GEMM, Triton, other) and the launch gaps (wall time minus kernel time). On CPU the split is
                     of the CPU time of the top-level aten ops.
"""

import os
import sys
import time

import torch
import torch.distributed as dist
from torch.autograd import DeviceType

from megatron_rcm.training.config import load_config
from megatron_rcm.training.flops import flops_by_pass, pass_flops
from megatron_rcm.training.flops import forward_flops  # noqa: F401  (re-exported: older imports)

PROBE = ["run_dir=runs/scale-probe", "model.preset=wan2.1-t2v-1.3b", "model.teacher=", "model.params_dtype=bfloat16",
         "model.activation_checkpointing=true", "data.source=random", "data.frames=81", "data.height=480",
         "data.width=832", "training.micro_batch_size=1", "training.train_iters=1000", "training.threads=0",
         "rcm.tangent_warmup=0", "rcm.student_update_freq=2", "logging.eval_interval=0", "logging.tensorboard=false",
         "logging.log_interval=1", "checkpoint.save_interval=0", "checkpoint.save_at_end=false",
         "checkpoint.save_on_signal=false"]

# Kernel kinds by name, first match wins (cutlass FMHA kernels are attention, not GEMM; `_jvp_fwd` names the
# JVP attention kernels of rcm_kernels/flash_attention_jvp*.py, which are Triton / Gluon but counted as attention).
KERNEL_KINDS = (("attention", ("flash", "fmha", "attention", "sdpa", "cudnn", "_jvp_fwd")),
                ("GEMM", ("gemm", "cutlass", "sm90_xmma", "nvjet", "cublas")),
                ("Triton", ("triton_",)))
# On CPU the matmuls are aten ops whose names say nothing of GEMM.
CPU_MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm", "aten::matmul",
               "aten::linear", "aten::einsum"}


def _options(argv: list) -> tuple[list, dict]:
    """Split the probe's own options (`--profile DIR`, `--iterations N`, also as `--opt=value`) off the config
    overrides."""
    options, rest, i = {}, [], 0
    while i < len(argv):
        name, eq, value = argv[i].partition("=")
        if name in ("--profile", "--iterations"):
            if not eq:
                if i + 1 >= len(argv):
                    raise SystemExit(f"{name} needs a value")
                i, value = i + 1, argv[i + 1]
            options[name[2:]] = value
        else:
            rest.append(argv[i])
        i += 1
    return rest, options


def kernel_kind(name: str) -> str:
    """'attention', 'GEMM', 'Triton' or 'other', from a kernel's (or a CPU op's) name."""
    low = name.lower()
    for kind, keys in KERNEL_KINDS:
        if any(k in low for k in keys):
            return kind
    return "GEMM" if name in CPU_MATMULS else "other"


def _top_level_aten(event) -> bool:
    if event.device_type != DeviceType.CPU or event.is_async or not event.name.startswith("aten::"):
        return False
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return False
        parent = parent.cpu_parent
    return True


def kernel_seconds(events, cuda: bool) -> dict[str, float]:
    """Seconds by kernel kind of profiler events: the GPU kernels (and copies) with CUDA, else the CPU time of the
    top-level aten ops (an op's children run inside it, so only the outermost are summed). Kernels of concurrent
    streams (NCCL beside compute) add up, so the launch gaps computed from this are a lower bound."""
    out = {"attention": 0.0, "GEMM": 0.0, "Triton": 0.0, "other": 0.0}
    for e in events:
        counted = e.device_type == DeviceType.CUDA if cuda else _top_level_aten(e)
        if counted:
            out[kernel_kind(e.name)] += e.time_range.elapsed_us() / 1e6
    return out


def pass_table(record: dict, wall: float, flops: dict, world: int, kernels: dict, device: str) -> str:
    """The table of one profiled step: each timed pass of `record` (`time/<pass>`, seconds) with its share of the
    step's `wall` seconds and its model TFLOP (`flops`: all ranks) and TFLOP/s per GPU, the rest of the step, and
    the `kernels` seconds by kind with the launch gaps (`device`: 'GPU' or 'CPU', how they were measured)."""
    lines = [f"{'pass':30s} {'time (ms)':>10s} {'share':>7s} {'TFLOP':>9s} {'TFLOP/s per GPU':>16s}"]

    def row(name, seconds, fl=None):
        tf = f"{fl / 1e12:9.3f} {fl / seconds / world / 1e12 if seconds > 0 else float('nan'):16.1f}" \
            if fl is not None else f"{'':9s} {'':16s}"
        lines.append(f"{name:30s} {seconds * 1e3:10.1f} {seconds / wall:7.1%} {tf}")

    passes = [k for k in flops if f"time/{k}" in record]
    for k in passes:
        row(k, record[f"time/{k}"], flops[k])
    row("optimizer/EMA/other", wall - sum(record[f"time/{k}"] for k in passes))
    row("step", wall, sum(flops.values()))
    what = "GPU kernels" if device == "GPU" else "CPU aten ops"
    for kind, seconds in kernels.items():
        row(f"{what}: {kind}", seconds)
    row(f"launch gaps (wall - {'kernels' if device == 'GPU' else 'ops'})", wall - sum(kernels.values()))
    return "\n".join(lines)


def _timed_step(trainer, it: int, cuda: bool) -> tuple[dict, float]:
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    record = trainer.train_step(it)
    if cuda:
        torch.cuda.synchronize()
    return record, time.perf_counter() - t0


def main(argv=None):
    from megatron_rcm.training.trainer import Trainer, world_size_from_env

    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip() + "\n\nDefaults the probe sets (before the extra overrides):\n  " + "\n  ".join(PROBE))
        return
    argv, options = _options(argv)
    iterations = int(options.get("iterations", 6))
    overrides = PROBE + argv
    config = load_config(None, overrides)
    if not any(o.startswith("training.global_batch_size=") for o in overrides):
        # one micro-batch per data-parallel rank: a step is one sample's passes on each rank, no accumulation
        p = config.parallel
        dp = world_size_from_env() // (p.tensor_model_parallel_size * p.context_parallel_size
                                       * p.pipeline_model_parallel_size)
        config.training.global_batch_size = dp * config.training.micro_batch_size
    trainer = Trainer(config)
    c = trainer.model_config
    x0, text = trainer.batches.next()[0]
    trainer.batches.consumed_samples = 0
    tokens = x0[0, 0].numel() // (c.patch_size[0] * c.patch_size[1] * c.patch_size[2])
    world = dist.get_world_size()
    batch = config.training.global_batch_size
    results, phases = {}, []
    cuda = torch.cuda.is_available()
    for it in range(iterations):
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        record, dt = _timed_step(trainer, it, cuda)
        phase = record["phase"]
        if phase not in phases:
            phases.append(phase)
        n = trainer.schedule.rollout_steps(it)
        flops = pass_flops(c, tokens, text.shape[1], phase, n) * batch
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        line = (f"iteration {it} {phase:7s} (rollout N={n}): {dt:.2f} s | peak memory {peak:.1f} GiB | "
                f"model {flops / 1e12:.1f} TFLOP -> {flops / dt / world / 1e12:.1f} TFLOP/s per GPU")
        if trainer.rank == 0:
            print(line, flush=True)
        if it >= 2:  # first iterations include allocator warm-up and autotuning
            results.setdefault(phase, []).append((dt, flops))
    if trainer.rank == 0:
        for phase, rows in results.items():
            t = sum(r[0] for r in rows) / len(rows)
            fl = sum(r[1] for r in rows) / len(rows)
            print(f"{phase}: {t:.2f} s per step, {fl / t / world / 1e12:.1f} TFLOP/s per GPU "
                  f"({tokens} tokens, {world} rank(s), {torch.cuda.get_device_name() if cuda else 'CPU'})")
    if "profile" in options:
        _profile(trainer, options["profile"], iterations, phases, tokens, text.shape[1], batch, world, cuda)


def _profile(trainer, out_dir: str, start: int, phases: list, tokens: int, text_tokens: int, batch: int,
             world: int, cuda: bool) -> None:
    """One profiled iteration of each step kind in `phases`, from iteration `start` on (iterations of a kind already
    profiled are not run: the schedule depends on the index alone)."""
    from torch.profiler import ProfilerActivity, profile

    os.makedirs(out_dir, exist_ok=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    todo, it = list(phases), start
    while todo:
        phase = trainer.schedule.phase(it)
        if phase in todo:
            todo.remove(phase)
            with profile(activities=activities, record_shapes=False) as prof:
                record, wall = _timed_step(trainer, it, cuda)
            trace = os.path.join(out_dir, f"{phase}.rank{trainer.rank}.json")
            prof.export_chrome_trace(trace)
            n = trainer.schedule.rollout_steps(it)
            flops = {k: v * batch for k, v in
                     flops_by_pass(trainer.model_config, tokens, text_tokens, phase, n).items()}
            table = pass_table(record, wall, flops, world, kernel_seconds(prof.events(), cuda),
                               "GPU" if cuda else "CPU")
            if trainer.rank == 0:
                print(f"\n{phase} step, iteration {it} (rollout N={n}), profiled; trace {trace}\n{table}", flush=True)
        it += 1


if __name__ == "__main__":
    main()
