"""The sample evaluation of the tiny default: its fields in a shortened run, determinism, the diversity measure
and the labelled grid."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from megatron_rcm.data import shapes
from megatron_rcm.training.evaluation import labeled_grid

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
SHORT = ["training.train_iters=6", "rcm.tangent_warmup=2", "logging.eval_interval=6", "logging.eval_samples=12",
         "logging.teacher_eval_steps=3", "checkpoint.save_at_end=false", "checkpoint.save_interval=0",
         "training.global_batch_size=4", "training.micro_batch_size=4"]
FIELDS = ("alignment", "feature_distance", "feature_distance_to_data", "spread", "spread_ratio", "off_palette",
          "travel", "motion")


def _eval_scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(run_dir, "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"] if tag.startswith("eval/")}


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    out = []
    for name in ("a", "b"):
        run_dir = str(tmp_path_factory.mktemp(name) / "run")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
               os.path.join(REPO, "examples", "pretrain_rcm.py"), *SHORT, f"run_dir={run_dir}"]
        p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        out.append(_eval_scalars(run_dir))
    return out


def test_shortened_tiny_default_logs_every_field_and_is_deterministic(two_runs):
    a, b = two_runs
    expected = {f"eval/teacher/{k}" for k in ("alignment", "feature_distance_to_data", "spread", "data_spread",
                                              "data_alignment", "off_palette", "travel", "motion")}
    expected |= {f"eval/{net}/{k}_{n}step" for net in ("ema", "student") for k in FIELDS for n in (1, 2, 4)}
    assert expected <= set(a), expected - set(a)
    assert a == b  # same seed: the same numbers, to the last bit
    steps = [s for s, _ in a["eval/ema/spread_4step"]]
    assert steps == [0, 6]
    (_, teacher_spread), = a["eval/teacher/spread"]
    assert teacher_spread > 0 and a["eval/teacher/data_alignment"][0][1] == 1.0
    for n in (1, 2, 4):
        for (_, spread), (_, ratio) in zip(a[f"eval/ema/spread_{n}step"], a[f"eval/ema/spread_ratio_{n}step"]):
            assert spread > 0 and ratio == pytest.approx(spread / teacher_spread, rel=1e-5)


def test_feature_spread_is_per_prompt_and_zero_for_identical_samples():
    feats = torch.tensor([[0.0, 0.0], [3.0, 4.0], [1.0, 1.0], [1.0, 1.0], [9.0, 9.0]])
    captions = ["p", "p", "q", "q", "r"]  # "r" has one sample: no pair, left out
    assert shapes.feature_spread(feats, captions) == pytest.approx((5.0 + 0.0) / 2)
    assert shapes.feature_spread(feats[2:4], captions[2:4]) == 0.0  # collapsed: spread 0
    with pytest.raises(ValueError, match="two or more"):
        shapes.feature_spread(feats[:1], captions[:1])


def test_labeled_grid_places_upscaled_frames_under_their_prompt():
    prompts = ["a red circle moving left", "a blue square moving up"]
    videos = torch.zeros(2, 3, 8, 16, 16)
    videos[1, 2] = 1.0  # the second prompt's video is blue (R = G = 127.5 -> 128, B = 255)
    videos[1, :, 7] = -1.0  # ... except its last frame, black
    img = np.asarray(labeled_grid({"teacher 32 steps": videos, "1 step": -videos}, prompts, upscale=3))
    h, w = img.shape[:2]
    assert h > 2 * 16 * 3 and w > 2 * 3 * 16 * 3  # two rows, two columns of three frames each
    blue = np.all(img == [128, 128, 255], axis=-1)
    rows, cols = np.nonzero(blue)
    # blue only in the first row (teacher), second column, two frames of 48 x 48 pixels each
    assert blue.sum() == 2 * 48 * 48
    assert rows.max() - rows.min() + 1 == 48
    black = np.all(img == [0, 0, 0], axis=-1)
    assert black[rows.min():rows.max() + 1, cols.max() + 1:].sum() >= 48 * 48  # the last frame, right of them
    with pytest.raises(ValueError, match="row '1 step'"):
        labeled_grid({"1 step": videos[:1]}, prompts)


def test_off_palette_share_is_zero_on_data_and_counts_speckle():
    videos, _ = shapes.ShapesDataset(seed=0).batch(range(4))
    assert shapes.off_palette_share(videos) == 0.0
    noisy = videos.clone()
    noisy[:, :, :, :8] = 0.5  # half of every frame grey-ish: 0.5 from the background, off every colour
    assert shapes.off_palette_share(noisy) == pytest.approx(0.5)


def test_travel_is_the_data_speed_on_data_and_zero_for_a_still_shape():
    config = shapes.ShapesConfig()
    videos, captions = shapes.ShapesDataset(config, seed=3).batch(range(16))
    assert shapes.travel(videos, captions) == pytest.approx(config.speed, abs=1e-5)
    assert shapes.travel(videos.flip(2), captions) == pytest.approx(-config.speed, abs=1e-5)  # played backwards
    still = videos[:, :, :1].expand_as(videos)
    assert shapes.travel(still, captions) == pytest.approx(0.0, abs=1e-5)
    # the caption decides the sign: the same videos under the opposite directions move at -speed
    opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}
    flipped = [shapes.caption(c, s, opposite[d]) for c, s, d in map(shapes.parse_caption, captions)]
    assert shapes.travel(videos, flipped) == pytest.approx(-config.speed, abs=1e-5)
    # motion is the speed in any direction: the wrong way round it still sees the data's speed, a still shape none
    assert shapes.motion(videos) == pytest.approx(config.speed, abs=1e-5)
    assert shapes.motion(videos.flip(2)) == pytest.approx(config.speed, abs=1e-5)
    assert shapes.motion(still) == pytest.approx(0.0, abs=1e-5)
