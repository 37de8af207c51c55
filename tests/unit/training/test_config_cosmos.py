"""The shipped Cosmos-Predict2 rCM configs: paper hyper-parameters and consistency with the model preset."""

import os

import pytest

from megatron_rcm.models import get_preset
from megatron_rcm.training.config import load_config

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "..", "examples", "configs")


@pytest.mark.parametrize("name", ["cosmos-predict2-2b-t2i", "cosmos-predict2-14b-t2i"])
def test_cosmos_configs(name):
    c = load_config(os.path.join(CONFIGS, f"{name}.yaml"))
    arch, model = get_preset(c.model.preset)
    assert arch == "cosmos" and c.model.preset == name
    # the objective calls the network in the network's own timestep units
    assert model.timestep_scale == 1.0  # the model config owns the timestep units
    assert (c.rcm.guidance, c.rcm.ema_sigma_rel, c.rcm.student_update_freq) == (4.5, 0.05, 5)
    assert (c.optimizer.student_lr, c.optimizer.critic_lr) == (1e-6, 2e-7)
    assert c.optimizer.clip_grad == 0.0 and (c.optimizer.adam_beta1, c.optimizer.adam_beta2) == (0.0, 0.999)
    assert (c.training.global_batch_size, c.training.train_iters) == (512, 30000)
    tp = c.parallel.tensor_model_parallel_size
    assert model.num_attention_heads % tp == 0
    tokens = c.data.frames * (c.data.height // 8 // 2) * (c.data.width // 8 // 2)  # VAE /8, patch 2
    assert not c.model.sequence_parallel or tokens % tp == 0
