"""The one dtype map of the project: config keys, command-line flags and tools all resolve names here.

The config spells dtypes as torch does (`float32`, `bfloat16`, ...); command lines also accept the short forms
(`fp32`, `bf16`, ...), which `canonical` turns into the long one at the edge.
"""

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
"""Canonical name -> torch dtype (the spelling of `model.params_dtype` and of everything stored)."""

ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp64": "float64",
           "half": "float16", "float": "float32", "double": "float64"}
"""Short spellings accepted on command lines."""


def canonical(name: str) -> str:
    """The canonical name of `name` (either spelling); ValueError names both lists when it is neither."""
    name = ALIASES.get(name, name)
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; one of {sorted(DTYPES)} (or {sorted(ALIASES)})")
    return name


def to_torch(name: str) -> torch.dtype:
    """The torch dtype of `name` (either spelling)."""
    return DTYPES[canonical(name)]
