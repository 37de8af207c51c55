"""Triton and Gluon kernels of megatron-rcm (installed as `rcm_kernels`)."""

from .flash_attention_jvp import JVPKernelConfig, default_config, flash_attention_jvp, parse_config

__all__ = ["JVPKernelConfig", "default_config", "flash_attention_jvp", "parse_config"]
