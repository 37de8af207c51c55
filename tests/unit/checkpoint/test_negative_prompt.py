"""checkpoint/negative_prompt.py: the negative prompt's embedding file, .pt or .safetensors, written atomically and read
without unpickling code; anything but one [L, text_dim] tensor is refused naming the file."""

import os

import pytest
import torch
from safetensors.torch import save_file

from megatron_rcm.checkpoint.negative_prompt import SAFETENSORS_KEY, load_negative_embedding, save_negative_embedding


def _embedding():
    return torch.randn(7, 12, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", ["neg.pt", "neg.safetensors"])
def test_round_trip(tmp_path, name):
    emb = _embedding()
    save_negative_embedding(emb, str(tmp_path / name))
    assert os.listdir(tmp_path) == [name]  # the side file was renamed into place
    assert torch.equal(load_negative_embedding(str(tmp_path / name)), emb)
    if name.endswith(".pt"):  # a plain tensor, as the rCM reference's neg_embed_path holds
        assert torch.equal(torch.load(tmp_path / name, weights_only=True), emb)


def test_a_batch_of_one_is_taken(tmp_path):
    emb = _embedding()
    torch.save(emb[None], tmp_path / "neg.pt")
    assert torch.equal(load_negative_embedding(str(tmp_path / "neg.pt")), emb)


def test_bad_embeddings_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"must be \[L, text_dim\], got \(12,\)"):
        save_negative_embedding(torch.zeros(12), str(tmp_path / "neg.pt"))
    assert os.listdir(tmp_path) == []
    save_file({"other": torch.zeros(2, 3)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match=f"has no tensor '{SAFETENSORS_KEY}'"):
        load_negative_embedding(str(tmp_path / "other.safetensors"))
    for name, value in (("dict.pt", {"emb": torch.zeros(2, 3)}), ("batch.pt", torch.zeros(2, 4, 3))):
        torch.save(value, tmp_path / name)
        with pytest.raises(ValueError, match=f"{name} does not hold a negative prompt embedding"):
            load_negative_embedding(str(tmp_path / name))
