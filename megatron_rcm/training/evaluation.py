"""Sample-quality evaluation of the tiny shapes default: is the student getting better?

For fixed prompts and fixed noise, the student's (and the EMA's) 1-, 2- and 4-step samples are scored against the
teacher's multi-step samples by
- `alignment`: share of the captioned attributes (colour, shape, direction) that the shapes classifier recognises;
- `feature_distance`: diagonal-Fréchet distance of classifier features to the teacher's samples (lower is better).
The teacher's reference samples are computed once per run.
"""

import os

import numpy as np
import torch

from megatron_rcm.data import shapes
from megatron_rcm.diffusion import TrigFlowWrapper, student_sample, teacher_sample
from megatron_rcm.training.config import TrainingConfig


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """`[3, T, H, W]` in [-1, 1] -> `[T, H, W, 3]` uint8."""
    v = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return v.permute(1, 2, 3, 0).cpu().numpy()


def video_grid(videos: torch.Tensor, columns: int = 8, scale: int = 4, pad: int = 1) -> np.ndarray:
    """`[N, 3, T, H, W]` -> one `[T, H', W', 3]` uint8 grid video (nearest-neighbour upscaled)."""
    n, _, t, h, w = videos.shape
    rows = -(-n // columns)
    H, W = h * scale + pad, w * scale + pad
    grid = np.full((t, rows * H + pad, columns * W + pad, 3), 255, dtype=np.uint8)
    for i in range(n):
        f = to_uint8_frames(videos[i]).repeat(scale, axis=1).repeat(scale, axis=2)
        r, c = divmod(i, columns)
        grid[:, pad + r * H: pad + r * H + h * scale, pad + c * W: pad + c * W + w * scale] = f
    return grid


class ShapesEvaluator:
    """Scores samples of a TrigFlow-wrapped network on the shapes prompts."""

    def __init__(self, config: TrainingConfig, teacher: TrigFlowWrapper, encoder: shapes.ShapesTextEncoder,
                 classifier_path: str, device, sample_shape: tuple[int, ...]):
        lc, rc = config.logging, config.rcm
        if not os.path.isfile(classifier_path):
            raise FileNotFoundError(f"logging.classifier {classifier_path!r} does not exist (made by "
                                    f"examples/pretrain_flow.py)")
        self.classifier = shapes.ShapesClassifier()
        self.classifier.load_state_dict(torch.load(classifier_path, map_location="cpu"))
        self.classifier.eval()
        self.config = config
        self.prompts = shapes.eval_prompts(lc.eval_samples)
        self.text = encoder.encode(self.prompts).to(device)
        self.neg = encoder.negative(1).to(device)
        gen = torch.Generator().manual_seed(config.training.seed + 77)
        self.noise = torch.randn((lc.eval_samples, *sample_shape), generator=gen, dtype=torch.float64).to(device)
        self.teacher_samples = teacher_sample(teacher, self.noise, self.text, lc.teacher_eval_steps,
                                              lc.teacher_solver, lc.teacher_shift, rc.guidance, self.neg).float().cpu()
        self.teacher_features = shapes.features(self.classifier, self.teacher_samples)
        data = shapes.ShapesDataset(config.data.shapes(), seed=config.training.seed + 1)
        real, real_caps = data.batch(range(20_000_000, 20_000_000 + lc.eval_samples))
        self.real_features = shapes.features(self.classifier, real)
        self.teacher_metrics = {
            "alignment": shapes.alignment_score(self.classifier, self.teacher_samples, self.prompts),
            "feature_distance_to_data": shapes.feature_distance(self.teacher_features, self.real_features),
            "data_alignment": shapes.alignment_score(self.classifier, real, real_caps),
        }

    @torch.no_grad()
    def sample(self, net: TrigFlowWrapper, steps: int) -> torch.Tensor:
        rc = self.config.rcm
        gen = torch.Generator().manual_seed(self.config.training.seed + 99 + steps)  # CPU: same noise on any device
        return student_sample(net, self.noise, self.text, steps, rc.sigma_max, rc.student_mid_times, gen).float().cpu()

    def evaluate(self, net: TrigFlowWrapper, steps_list) -> tuple[dict[str, float], dict[int, torch.Tensor]]:
        """{'alignment_{n}step', 'feature_distance_{n}step'} and the samples per step count."""
        metrics, samples = {}, {}
        for n in steps_list:
            x = self.sample(net, n)
            samples[n] = x
            metrics[f"alignment_{n}step"] = shapes.alignment_score(self.classifier, x, self.prompts)
            metrics[f"feature_distance_{n}step"] = shapes.feature_distance(
                shapes.features(self.classifier, x), self.teacher_features)
        return metrics, samples
