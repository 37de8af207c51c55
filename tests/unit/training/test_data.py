"""training/data.py: each data-parallel rank's micro-batches of the global batch (iteration i, rank d reads samples
consumed + d * per_rank onwards), the data position as the whole resumable state of the pure sources, the random
source's Wan-VAE shapes, and the latent-shard source carrying its loader's state and the negative prompt file."""

import pytest
import torch

from megatron_rcm.checkpoint.negative_prompt import save_negative_embedding
from megatron_rcm.data import latent_loader
from megatron_rcm.data.shapes import ShapesDataset, ShapesTextEncoder
from megatron_rcm.data.shards import ShardMeta, shard_name, write_meta, write_shard
from megatron_rcm.training.config import TrainingConfig
from megatron_rcm.training.data import LoaderBatches, RandomBatches, ShapesBatches, build_batches

TEXT_DIM = 16


def _config(source, **data):
    config = TrainingConfig()
    config.training.global_batch_size, config.training.micro_batch_size, config.training.seed = 8, 2, 3
    config.data.source = source
    for key, value in data.items():
        setattr(config.data, key, value)
    return config


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) and torch.equal(t, u) for (x, t), (y, u) in zip(a, b))


def test_shapes_ranks_read_their_slice_of_the_global_batch():
    config = _config("shapes")
    ranks = [build_batches(config, TEXT_DIM, r, 2, "cpu") for r in range(2)]
    assert all(isinstance(b, ShapesBatches) for b in ranks)
    dataset, encoder = ShapesDataset(config.data.shapes(), seed=3), ShapesTextEncoder(dim=TEXT_DIM)
    for it in range(2):
        for r, batches in enumerate(ranks):
            micro = batches.next()
            assert len(micro) == 2  # 8 samples = 2 ranks x 2 micro-batches x 2
            for m, (x0, text) in enumerate(micro):
                start = it * 8 + r * 4 + m * 2
                want, captions = dataset.batch(range(start, start + 2))
                assert torch.equal(x0, want) and torch.equal(text, encoder.encode(captions)), (it, r, m)
    assert [b.state_dict() for b in ranks] == [{"consumed_samples": 16}] * 2
    assert torch.equal(ranks[0].negative_text(), encoder.negative(1))


@pytest.mark.parametrize("source", ["shapes", "random"])
def test_resume_from_the_data_position(source):
    config = _config(source, frames=5, height=16, width=16, text_length=3)
    first = build_batches(config, TEXT_DIM, 1, 2, "cpu")
    first.next()
    state = first.state_dict()
    want = first.next()
    again = build_batches(config, TEXT_DIM, 1, 2, "cpu")
    again.load_state_dict(state)
    assert _same(again.next(), want)
    assert not _same(build_batches(config, TEXT_DIM, 1, 2, "cpu").next(), want)  # the first batch is another


def test_random_batches_have_the_wan_vae_shapes():
    config = _config("random", frames=9, height=32, width=48, text_length=7)
    batches = build_batches(config, TEXT_DIM, 0, 1, "cpu", in_channels=4)
    assert isinstance(batches, RandomBatches)
    micro = batches.next()
    assert len(micro) == 4
    assert all(x0.shape == (2, 4, 3, 4, 6) and text.shape == (2, 7, TEXT_DIM) for x0, text in micro)
    assert torch.equal(batches.negative_text(), torch.zeros(1, 7, TEXT_DIM))
    other_rank = build_batches(config, TEXT_DIM, 1, 2, "cpu", in_channels=4).next()
    assert not torch.equal(other_rank[0][0], micro[0][0])


def _shards(root):
    g = torch.Generator().manual_seed(0)
    write_meta(str(root), ShardMeta(latent_shape=[4, 1, 2, 2], text_hidden=TEXT_DIM, text_max_length=6,
                                    latent_dtype="float32", text_dtype="float32", samples_per_shard=8, num_shards=1))
    write_shard(str(root / shard_name(0)), [{"key": f"{i:09d}", "latent": torch.randn(4, 1, 2, 2, generator=g),
                                              "text_embedding": torch.randn(3, TEXT_DIM, generator=g)}
                                             for i in range(8)])


def test_latent_shards_through_their_loader(tmp_path):
    _shards(tmp_path / "shards")
    neg = torch.randn(6, TEXT_DIM, generator=torch.Generator().manual_seed(1))
    save_negative_embedding(neg, str(tmp_path / "neg.safetensors"))
    config = _config("latents", path=str(tmp_path / "shards"),
                     negative_text_embedding=str(tmp_path / "neg.safetensors"))
    batches = build_batches(config, TEXT_DIM, 1, 2, "cpu")
    assert isinstance(batches, LoaderBatches)
    assert torch.equal(batches.negative_text(), neg[None])
    loader = latent_loader(tmp_path / "shards", batch_size=2, dp_rank=1, dp_size=2, seed=3)
    want = [next(loader) for _ in range(2)]
    got = batches.next()
    assert all(torch.equal(x0, b["latent"]) and torch.equal(text, b["text_embedding"]) for (x0, text), b in
               zip(got, want))
    state = batches.state_dict()
    assert state["consumed_samples"] == 8 and "loader" in state
    resumed = build_batches(config, TEXT_DIM, 1, 2, "cpu")
    resumed.load_state_dict(state)
    assert _same(resumed.next(), batches.next())


def test_bad_sources_are_refused(tmp_path):
    config = _config("latents", path=str(tmp_path), negative_text_embedding=str(tmp_path / "absent.pt"))
    with pytest.raises(FileNotFoundError, match="data.negative_text_embedding must name a .pt or .safetensors file"):
        build_batches(config, TEXT_DIM, 0, 1, "cpu")
    config.data.source = "nope"
    with pytest.raises(ValueError, match="data.source must be shapes, latents, videos or random, got 'nope'"):
        build_batches(config, TEXT_DIM, 0, 1, "cpu")
