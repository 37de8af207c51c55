"""dtypes.py: both spellings of every dtype resolve to one canonical name and torch dtype; anything else is refused
with both lists."""

import pytest
import torch

from megatron_rcm.dtypes import ALIASES, DTYPES, canonical, to_torch


@pytest.mark.parametrize("short,name,dtype", [("fp32", "float32", torch.float32), ("bf16", "bfloat16", torch.bfloat16),
                                              ("fp16", "float16", torch.float16), ("fp64", "float64", torch.float64),
                                              ("half", "float16", torch.float16), ("double", "float64", torch.float64)])
def test_both_spellings(short, name, dtype):
    assert canonical(short) == canonical(name) == name
    assert to_torch(short) is to_torch(name) is dtype


def test_every_alias_names_a_dtype():
    assert set(ALIASES.values()) <= set(DTYPES)


def test_unknown_names_are_refused_with_both_lists():
    with pytest.raises(ValueError, match=r"unknown dtype 'int8'; one of \['bfloat16', 'float16', 'float32', 'float64'\]"
                                         r" \(or \['bf16', 'double', 'float', 'fp16', 'fp32', 'fp64', 'half'\]\)"):
        to_torch("int8")
    with pytest.raises(ValueError, match="unknown dtype 'torch.float32'"):
        canonical("torch.float32")
