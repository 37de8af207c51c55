"""The Megatron-style rCM training loop.

    from megatron_rcm.training import Trainer, load_config
    Trainer(load_config("examples/configs/wan2.1-t2v-1.3b-480p.yaml", ["model.teacher=..."])).train()

Names are imported on first use (PEP 562): importing a light submodule such as `training.console` or
`training.config` must not pull in megatron-core (and its import-time warnings) before the console is set up.
"""

import importlib

_EXPORTS = {
    "ConfigError": "config", "TrainingConfig": "config", "dump_config": "config", "load_config": "config",
    "MegatronTrainable": "trainable", "StepResult": "trainable", "Trainable": "trainable",
    "TorchTrainable": "trainable", "make_trainable": "trainable",
    "Trainer": "trainer", "validate": "trainer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
