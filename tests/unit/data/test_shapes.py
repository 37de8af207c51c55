"""The procedural shapes set, its text encoder and the feature distance."""

import numpy as np
import pytest
import torch

from megatron_rcm.data import shapes


def test_samples_are_a_function_of_seed_and_index():
    a, b = shapes.ShapesDataset(seed=3), shapes.ShapesDataset(seed=3)
    va, ca = a.batch([5, 9, 1000])
    vb, cb = b.batch([5, 9, 1000])
    assert torch.equal(va, vb) and ca == cb
    vc, _ = shapes.ShapesDataset(seed=4).batch([5, 9, 1000])
    assert not torch.equal(va, vc)


def test_video_shows_the_captioned_colour_and_motion():
    cfg = shapes.ShapesConfig()
    video = shapes.render("red", "square", "right", np.random.RandomState(0), cfg)
    assert video.shape == (3, cfg.frames, cfg.size, cfg.size) and video.min() >= -1 and video.max() <= 1
    mask = video[0] > 0.5  # red channel on
    assert np.all(video[1][mask] == -1) and np.all(video[2][mask] == -1)
    cols = [np.nonzero(mask[f].any(axis=0))[0].mean() for f in range(cfg.frames)]
    np.testing.assert_allclose(np.diff(cols), cfg.speed)  # moves right by `speed` pixels per frame
    rows = [np.nonzero(mask[f].any(axis=1))[0].mean() for f in range(cfg.frames)]
    np.testing.assert_allclose(np.diff(rows), 0)


def test_text_encoder_and_captions():
    enc = shapes.ShapesTextEncoder(dim=16)
    e = enc.encode(["a red circle moving left", "a red circle moving up"])
    assert e.shape == (2, 5, 16)
    assert torch.equal(e[0, :4], e[1, :4]) and not torch.equal(e[0, 4], e[1, 4])
    assert torch.count_nonzero(enc.negative(2)) == 0
    assert shapes.parse_caption("a blue triangle moving down") == ("blue", "triangle", "down")
    with pytest.raises(ValueError, match="not a shapes caption"):
        shapes.parse_caption("a purple circle moving left")
    with pytest.raises(ValueError, match="unknown word"):
        enc.encode(["a purple circle"])


def test_feature_distance_is_zero_on_equal_sets_and_grows_with_a_shift():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, 8, generator=g, dtype=torch.float64)
    assert shapes.feature_distance(a, a) == 0.0
    # diagonal Frechet: ||mu_a - mu_b||^2 + sum (s_a - s_b)^2
    assert shapes.feature_distance(a, a + 1.0) == pytest.approx(8.0)
    assert shapes.feature_distance(a, 2 * a) == pytest.approx(float(((a.mean(0)) ** 2).sum()
                                                                     + (a.std(0, unbiased=False) ** 2).sum()))


def test_eval_prompts_cover_every_prompt():
    assert sorted(shapes.eval_prompts(48)) == sorted(shapes.caption(*p) for p in shapes.PROMPTS)


def test_all_videos_are_the_sets_distinct_videos():
    cfg = shapes.ShapesConfig()
    videos, attributes = shapes.all_videos(cfg)
    rows, cols = shapes.start_ranges("left", cfg)
    assert len(videos) == len(shapes.PROMPTS) * len(rows) * len(cols) == len(attributes)
    flat = videos.flatten(1)
    assert len(torch.unique(flat, dim=0)) == len(videos)
    data = shapes.ShapesDataset(cfg, seed=3)
    for i in range(40):
        video, text = data[i]
        match = (flat == torch.from_numpy(video).flatten()).all(-1).nonzero().flatten().tolist()
        assert len(match) == 1 and shapes.caption(*attributes[match[0]]) == text
