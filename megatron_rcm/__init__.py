"""megatron-rcm: rCM distillation of large video/image diffusion transformers on megatron-core."""

__version__ = "0.1.0"
