"""examples/pretrain_flow.py: a few iterations with architecture overrides save a teacher of that architecture,
and the score it prints per guidance has the per-attribute accuracies whose mean is the alignment."""

import json
import os
import subprocess
import sys

import torch
from conftest import ROOT, load_script

from megatron_rcm.parallel import destroy_parallel, initialize_parallel


def test_overrides_reach_the_saved_teacher_and_the_score_is_per_attribute(tmp_path):
    out = tmp_path / "assets"
    cmd = [sys.executable, os.path.join(ROOT, "examples/pretrain_flow.py"), "--out", str(out), "--iterations", "4",
           "--batch-size", "4", "--classifier-steps", "2", "--eval-guidance", "1", "2", "--num-layers", "2",
           "--heads", "2", "--head-dim", "32", "--ffn-dim", "64", "--device", "cpu"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (out / "shapes-classifier.pt").exists()
    scores = json.loads(run.stdout.strip().splitlines()[-1])
    assert scores["iterations"] == 4
    for w in ("1", "2"):
        per_attribute = scores[f"attributes_cfg{w}"]
        assert sorted(per_attribute) == ["color", "direction", "shape"]
        assert abs(sum(per_attribute.values()) / 3 - scores[f"alignment_cfg{w}"]) < 2e-3
        assert abs(scores[f"travel_cfg{w}"]) < 5  # pixels per frame, in a 16-pixel frame
    from megatron_rcm.models import from_pretrained

    initialize_parallel(backend="gloo")
    try:
        model = from_pretrained(str(out / "shapes-teacher"), params_dtype=torch.float32, device="cpu")
    finally:
        destroy_parallel()
    c = model.config
    assert (c.num_layers, c.num_attention_heads, c.attention_head_dim, c.ffn_dim) == (2, 2, 32, 64)
    assert sorted(scores["caption_effect"]) == ["color", "direction", "shape"]
    assert min(scores["caption_effect"].values()) > 0  # a random teacher reads every word
    assert sorted(scores["word_spread"]) == ["color", "direction", "shape"]
    assert min(scores["word_spread"].values()) > 0.5  # ... and its text projection keeps the words apart


class _ReadsOneWord(torch.nn.Module):
    """A stand-in teacher whose velocity depends on the caption only through its word at `position`."""

    def __init__(self, position):
        super().__init__()
        self.position = position
        self.weight = torch.nn.Parameter(torch.ones(()))

    def forward(self, x, t, text):
        return x * 0 + self.weight * text[:, self.position].sum(-1).view(-1, 1, 1, 1, 1)


def test_caption_effect_is_zero_exactly_for_the_words_a_teacher_ignores():
    from megatron_rcm.data import shapes

    caption_effect = load_script("examples/pretrain_flow.py").caption_effect
    videos, captions = shapes.ShapesDataset(seed=0).batch(range(24))
    encoder = shapes.ShapesTextEncoder()
    for position, read in ((1, "color"), (2, "shape"), (4, "direction")):  # 'a <color> <shape> moving <direction>'
        effect = caption_effect(_ReadsOneWord(position), videos, captions, encoder)
        assert effect[read] > 1e-3
        assert all(v == 0 for k, v in effect.items() if k != read)


def test_high_noise_share_moves_that_share_of_the_batch_into_the_band():
    from megatron_rcm.data.shapes import ShapesConfig

    module = load_script("examples/pretrain_flow.py")
    lo, hi = module.HIGH_NOISE_BAND
    plain = module.TeacherBatches(ShapesConfig(), 16, 512, 0.1, 0, 1)[0][2]
    banded = module.TeacherBatches(ShapesConfig(), 16, 512, 0.1, 0, 1, high_noise_share=1.0)[0][2]
    assert ((banded >= lo) & (banded <= hi)).all()
    assert ((plain >= lo) & (plain <= hi)).float().mean() < 0.3
    half = module.TeacherBatches(ShapesConfig(), 16, 4096, 0.1, 0, 1, high_noise_share=0.5)[0][2]
    assert 0.5 < ((half >= lo) & (half <= hi)).float().mean() < 0.7  # half the batch, plus the plain draws' share


def test_low_noise_caption_dropout_empties_captions_below_the_band_only():
    from megatron_rcm.data.shapes import ShapesConfig

    module = load_script("examples/pretrain_flow.py")
    plain = module.TeacherBatches(ShapesConfig(), 16, 256, 0.1, 0, 1)[0]
    dropped = module.TeacherBatches(ShapesConfig(), 16, 256, 0.1, 0, 1, low_noise_caption_dropout=1.0)[0]
    assert torch.equal(plain[2], dropped[2]) and torch.equal(plain[3], dropped[3])  # same times and noise
    empty = dropped[1].abs().sum((1, 2)) == 0
    low = dropped[2] < module.HIGH_NOISE_BAND[0]
    assert empty[low].all()
    assert torch.equal(dropped[1][~low], plain[1][~low])  # the band keeps its captions (and the plain dropout)
