"""rCM distillation (sCM + DMD-style score regularizer) of a Wan2.1 DiT, Megatron style.

    torchrun --nproc_per_node=2 examples/pretrain_rcm.py                      # the tiny CPU default
    torchrun --nproc_per_node=8 examples/pretrain_rcm.py --config examples/configs/wan2.1-t2v-1.3b-480p.yaml \\
        model.teacher=/path/to/Wan2.1-T2V-1.3B-Diffusers data.path=/path/to/latent_shards run_dir=runs/wan13b

Configuration: the dataclass tree of `megatron_rcm.training.config` (defaults = the tiny default) <- `--config`
YAML <- `key.sub=value` overrides. Re-running the same command with the same `run_dir` resumes from the latest
checkpoint (one job per run directory: a second launch into it stops at once). Outputs in `run_dir`: config.yaml,
metrics.jsonl, tensorboard/, checkpoints/, ema/ (the exported EMA).
"""

import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _repo_relative(path: str) -> str:
    """Shipped assets are named relative to the repository; accept them from any working directory."""
    if path and not os.path.isabs(path) and not os.path.exists(path) and os.path.exists(os.path.join(REPO, path)):
        return os.path.join(REPO, path)
    return path


def parse_args(argv=None):
    from megatron_rcm.training.config import config_help

    p = argparse.ArgumentParser(description=__doc__, epilog="config keys (key.sub=value):\n\n" + config_help(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML file (see examples/configs/)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config of this command line as YAML and exit (runs nothing)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. training.train_iters=100")
    return p.parse_args(argv)


def main(argv=None):
    from megatron_rcm.training.console import quiet  # first: library notices once, as one line of ours

    quiet()
    args = parse_args(argv)
    from megatron_rcm.training.config import ConfigError, dump_config, load_config

    try:
        config = load_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    if args.print_config:
        print(dump_config(config), end="")
        return
    config.model.teacher = _repo_relative(config.model.teacher)
    config.logging.classifier = _repo_relative(config.logging.classifier)

    from megatron_rcm.parallel import destroy_parallel
    from megatron_rcm.training.trainer import Trainer

    try:
        trainer = Trainer(config)
    except (ConfigError, FileNotFoundError, ValueError) as e:  # bad input found before any work
        sys.exit(f"error: {e}")
    try:
        trainer.train()
    except ValueError as e:  # a checkpoint that cannot be used (damaged, unsafe): named in one line
        from megatron_rcm.checkpoint.io import UnsafeCheckpointError
        from megatron_rcm.training.checkpointing import CheckpointError

        if not isinstance(e, (CheckpointError, UnsafeCheckpointError)):
            raise
        sys.exit(f"error: {e}")
    finally:
        destroy_parallel()


if __name__ == "__main__":
    main()
