"""The Megatron-style rCM training loop.

    from megatron_rcm.training import Trainer, load_config
    Trainer(load_config("examples/configs/wan2.1-t2v-1.3b-480p.yaml", ["model.teacher=..."])).train()
"""

from megatron_rcm.training.config import ConfigError, TrainingConfig, dump_config, load_config
from megatron_rcm.training.trainable import MegatronTrainable, StepResult, Trainable, TorchTrainable, make_trainable
from megatron_rcm.training.trainer import Trainer, validate

__all__ = ["ConfigError", "MegatronTrainable", "StepResult", "Trainable", "TorchTrainable", "Trainer",
           "TrainingConfig", "dump_config", "load_config", "make_trainable", "validate"]
