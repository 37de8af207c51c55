"""DiT models on megatron-core parallel layers (Wan2.1; Cosmos-Predict2) and their loading.

    from megatron_rcm.models import from_pretrained
    model = from_pretrained("Wan2.1-T2V-1.3B-Diffusers")        # pipeline folder or its transformer/ folder
    velocity = model(latents, timestep, text)                   # [B,C,T,H,W], [B] in 0..1000, [B,L,4096]
    velocity, tangent = model.jvp(latents, timestep, text, latents_tangent, timestep_tangent)

    # under context parallelism, on this rank's tokens only (models/dit.py)
    layout = model.token_layout(latents.shape)
    velocity_tokens = model.forward_tokens(layout.shard(latents), timestep, text, layout)
"""

from megatron_rcm.models.loading import (
    ARCHITECTURES,
    build_model,
    from_pretrained,
    inspect_checkpoint,
    save_diffusers,
    save_megatron,
)
from megatron_rcm.models.cosmos import PRESETS as COSMOS_PRESETS
from megatron_rcm.models.cosmos import CosmosConfig, CosmosModel
from megatron_rcm.models.dit import DiTModel, TokenLayout
from megatron_rcm.models.wan import PRESETS as WAN_PRESETS
from megatron_rcm.models.wan import WanConfig, WanModel

PRESETS = {name: ("wan", config) for name, config in WAN_PRESETS.items()}
PRESETS.update({name: ("cosmos", config) for name, config in COSMOS_PRESETS.items()})
"""name -> (architecture name, config)."""


def get_preset(name: str):
    """(architecture name, config) of a named preset."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]


__all__ = ["ARCHITECTURES", "PRESETS", "CosmosConfig", "CosmosModel", "DiTModel", "TokenLayout", "WanConfig",
           "WanModel", "build_model",
           "from_pretrained", "get_preset", "inspect_checkpoint", "save_diffusers", "save_megatron"]
