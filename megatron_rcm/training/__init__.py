"""The Megatron-style rCM training loop."""
