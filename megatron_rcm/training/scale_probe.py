"""Scale probe: time one rCM student step and one critic step of a full-size model with random weights.

    torchrun --nproc_per_node=1 -m megatron_rcm.training.scale_probe                 # Wan2.1-1.3B, 480p x 81 frames
    torchrun --nproc_per_node=2 -m megatron_rcm.training.scale_probe model.preset=wan2.1-t2v-14b \\
        parallel.tensor_model_parallel_size=2 model.sequence_parallel=true

Runs the real training loop (`Trainer.train_step`) on `data.source=random` (Gaussian latents of the VAE's shape,
random text embeddings), with the DMD regularizer active from the first iteration (tangent warm-up 0) so that a
student step does every pass: teacher CFG, student JVP, rollout, DMD gradient (critic + teacher CFG) and the
with-grad student pass. Reports per step: time, peak memory per GPU, and model TFLOP/s per GPU counted from the
passes' matmul FLOPs (`pass_flops`). Extra arguments are config overrides.
"""

import sys
import time

import torch
import torch.distributed as dist

from megatron_rcm.training.config import load_config
from megatron_rcm.training.flops import forward_flops, pass_flops  # noqa: F401  (re-exported: older imports)

PROBE = ["run_dir=runs/scale-probe", "model.preset=wan2.1-t2v-1.3b", "model.teacher=", "model.params_dtype=bfloat16",
         "model.activation_checkpointing=true", "data.source=random", "data.frames=81", "data.height=480",
         "data.width=832", "training.micro_batch_size=1", "training.train_iters=1000", "training.threads=0",
         "rcm.tangent_warmup=0", "rcm.student_update_freq=2", "logging.eval_interval=0", "logging.tensorboard=false",
         "logging.log_interval=1", "checkpoint.save_interval=0", "checkpoint.save_at_end=false",
         "checkpoint.save_on_signal=false"]


def main(argv=None):
    from megatron_rcm.training.trainer import Trainer, world_size_from_env

    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip() + "\n\nDefaults the probe sets (before the extra overrides):\n  " + "\n  ".join(PROBE))
        return
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
    results = {}
    cuda = torch.cuda.is_available()
    for it in range(6):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        record = trainer.train_step(it)
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        phase = record["phase"]
        n = trainer.schedule.rollout_steps(it)
        flops = pass_flops(c, tokens, text.shape[1], phase, n) * config.training.global_batch_size
        line = (f"iteration {it} {phase:7s} (rollout N={n}): {dt:.2f} s | peak memory "
                f"{torch.cuda.max_memory_allocated() / 2**30 if cuda else float('nan'):.1f} GiB | model {flops / 1e12:.1f} TFLOP -> "
                f"{flops / dt / world / 1e12:.1f} TFLOP/s per GPU")
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


if __name__ == "__main__":
    main()
