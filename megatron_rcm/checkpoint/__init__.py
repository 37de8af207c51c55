"""Hugging Face <-> megatron checkpoint key maps and shard handling."""
