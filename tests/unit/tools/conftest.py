import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def load_script(relative: str):
    """A script of the repository (tools/, examples/) as a module, to call its functions in this process."""
    path = os.path.join(ROOT, relative)
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Payload:
    """A pickle that creates `marker` when unpickled (what a malicious checkpoint would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def payload():
    return Payload


def write_training_checkpoint(run_dir, iteration: int, model_config, tensors: dict, config: dict, meta=None) -> str:
    """A training checkpoint written by the trainer's own `checkpointing.save` in a one-process world, holding
    `tensors` (`ema.shadow.<param>`, `student.model.<param>`, full tensors); returns its directory."""
    import yaml
    from megatron.core.dist_checkpointing import ShardedTensor

    from megatron_rcm.models.loading import config_to_dict
    from megatron_rcm.parallel import destroy_parallel, initialize_parallel
    from megatron_rcm.training import checkpointing

    initialize_parallel()
    try:
        sharded = {k: ShardedTensor.from_rank_offsets(k, v.contiguous(), replica_id=0) for k, v in tensors.items()}
        layout = {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1, "context_parallel_size": 1}
        return checkpointing.save(str(run_dir), iteration, lambda: (sharded, {}), {}, {
            "model": "wan", "model_config": config_to_dict(model_config), "parallel": layout,
            "timestep_scale": 1000.0, **(meta or {})}, yaml.safe_dump(config))
    finally:
        destroy_parallel()
