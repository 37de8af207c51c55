"""Triton kernels of megatron-rcm (installed as `rcm_kernels`)."""
