"""Sample-quality evaluation of the tiny shapes default: is the student getting better, and does it stay diverse?

For fixed prompts and fixed noise, the student's (and the EMA's) 1-, 2- and 4-step samples are scored by
- `alignment`: share of the captioned attributes (colour, shape, direction) that the shapes classifier recognises;
- `feature_distance`: diagonal-Fréchet distance of classifier features to the teacher's multi-step samples of the
  same prompts and noise (lower is better);
- `feature_distance_to_data`: the same distance to real videos of the same prompts (what the eye judges: a student
  that is cleaner than a poor teacher is far from the teacher but close to the data);
- `spread`: mean pairwise feature distance between samples of the same prompt (different noise), i.e. diversity
  over noise; a mode-collapsed student has spread ~0 while its alignment can stay high. `spread_ratio` is it
  divided by the teacher's spread;
- `off_palette`: share of pixels in none of the data's colours (speckle; 0 on data), which the classifier's
  features ignore because it is trained with additive noise;
- `travel`: the speed (pixels per frame) at which the shape moves along its captioned direction (data: 1; a still
  or randomly wandering shape: ~0), the motion the classifier's direction accuracy only counts as hit or miss;
- `motion`: the speed of steady motion in any direction (data: 1): high with `travel` ~0 means the samples move,
  but not where the caption says.
The teacher's reference samples (and its own scores) are computed once per run.
"""

import os
from typing import Sequence

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


def labeled_grid(rows: dict[str, torch.Tensor], prompts: list[str], upscale: int = 4,
                 frames: Sequence[int] | None = None, pad: int = 4):
    """A readable PNG-style grid: one row per entry of `rows` (label -> videos `[N, 3, T, H, W]` in [-1, 1], e.g.
    "teacher 32 steps", "1 step", ...), one column per prompt (the caption written above it). Each cell shows the
    chosen `frames` of the video side by side (default: first, middle, last, so the motion is visible), each
    upscaled `upscale` times with nearest-neighbour so that 16-pixel frames can be seen. Returns a `PIL.Image`."""
    from PIL import Image, ImageDraw, ImageFont

    if not rows:
        raise ValueError("labeled_grid needs at least one row")
    n = len(prompts)
    for label, videos in rows.items():
        if videos.dim() != 5 or videos.shape[0] < n:
            raise ValueError(f"labeled_grid: row {label!r} has shape {tuple(videos.shape)}; expected [>= {n} "
                             f"prompts, 3, T, H, W]")
    t, h, w = next(iter(rows.values())).shape[2:]
    frames = list(frames) if frames is not None else sorted({0, (t - 1) // 2, t - 1})
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def text_size(s: str) -> tuple[int, int]:
        box = probe.textbbox((0, 0), s, font=font)
        return box[2] - box[0], box[3] - box[1]

    def header_lines(prompt: str) -> list[str]:
        words = prompt.split()  # "a red circle" / "moving left"
        return [" ".join(words[:3]), " ".join(words[3:])] if len(words) > 3 else [prompt]

    line_h = max(text_size("Ag")[1], 8) + 2
    cell_w = len(frames) * w * upscale + (len(frames) - 1)
    cell_h = h * upscale
    label_w = max(text_size(label)[0] for label in rows) + 2 * pad
    header_h = 2 * line_h + pad
    width = label_w + n * (cell_w + pad) + pad
    height = header_h + len(rows) * (cell_h + pad) + pad
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for j, prompt in enumerate(prompts):
        x = label_w + j * (cell_w + pad)
        for k, line in enumerate(header_lines(prompt)):
            draw.text((x, pad + k * line_h), line, fill=(0, 0, 0), font=font)
    for i, (label, videos) in enumerate(rows.items()):
        y = header_h + i * (cell_h + pad)
        draw.text((pad, y + (cell_h - line_h) // 2), label, fill=(0, 0, 0), font=font)
        for j in range(n):
            video = to_uint8_frames(videos[j])
            strip = np.full((cell_h, cell_w, 3), 255, dtype=np.uint8)
            for k, f in enumerate(frames):
                x0 = k * (w * upscale + 1)
                strip[:, x0:x0 + w * upscale] = video[f].repeat(upscale, axis=0).repeat(upscale, axis=1)
            image.paste(Image.fromarray(strip), (label_w + j * (cell_w + pad), y))
    return image


class ShapesEvaluator:
    """Scores samples of a TrigFlow-wrapped network on the shapes prompts."""

    def __init__(self, config: TrainingConfig, teacher: TrigFlowWrapper, encoder: shapes.ShapesTextEncoder,
                 classifier_path: str, device, sample_shape: tuple[int, ...]):
        lc, rc = config.logging, config.rcm
        if not os.path.isfile(classifier_path):
            raise FileNotFoundError(f"logging.classifier {classifier_path!r} does not exist (made by "
                                    f"examples/pretrain_flow.py)")
        self.classifier = shapes.ShapesClassifier()
        self.classifier.load_state_dict(torch.load(classifier_path, map_location="cpu", weights_only=True))
        self.classifier.eval()
        self.config = config
        # every prompt at least twice in a row (different noise), so that the spread over noise exists at any size
        distinct = shapes.eval_prompts(-(-lc.eval_samples // 2))
        self.prompts = [distinct[i // 2] for i in range(lc.eval_samples)]
        self.text = encoder.encode(self.prompts).to(device)
        self.neg = encoder.negative(1).to(device)
        gen = torch.Generator().manual_seed(config.training.seed + 77)
        self.noise = torch.randn((lc.eval_samples, *sample_shape), generator=gen, dtype=torch.float64).to(device)
        self.teacher_samples = teacher_sample(teacher, self.noise, self.text, lc.teacher_eval_steps,
                                              lc.teacher_solver, lc.teacher_shift, rc.guidance, self.neg).float().cpu()
        self.teacher_features = shapes.features(self.classifier, self.teacher_samples)
        real = self._real_videos(config, self.prompts)
        self.real_features = shapes.features(self.classifier, real)
        self.teacher_metrics = {
            "alignment": shapes.alignment_score(self.classifier, self.teacher_samples, self.prompts),
            "feature_distance_to_data": shapes.feature_distance(self.teacher_features, self.real_features),
            "data_alignment": shapes.alignment_score(self.classifier, real, self.prompts),
            "spread": shapes.feature_spread(self.teacher_features, self.prompts),
            "off_palette": shapes.off_palette_share(self.teacher_samples),
            "travel": shapes.travel(self.teacher_samples, self.prompts),
            "motion": shapes.motion(self.teacher_samples),
            "data_spread": shapes.feature_spread(self.real_features, self.prompts),
        }

    @staticmethod
    def _real_videos(config: TrainingConfig, prompts: list[str]) -> torch.Tensor:
        """One real video per evaluation prompt (random start positions), from a stream no training run reads."""
        rng = np.random.RandomState(config.training.seed + 5)
        shapes_config = config.data.shapes()
        return torch.from_numpy(np.stack([shapes.render(*shapes.parse_caption(p), rng, shapes_config)
                                          for p in prompts]))

    @torch.no_grad()
    def sample(self, net: TrigFlowWrapper, steps: int) -> torch.Tensor:
        rc = self.config.rcm
        gen = torch.Generator().manual_seed(self.config.training.seed + 99 + steps)  # CPU: same noise on any device
        return student_sample(net, self.noise, self.text, steps, rc.sigma_max, rc.student_mid_times, gen).float().cpu()

    def score(self, x: torch.Tensor, suffix: str = "") -> dict[str, float]:
        """The metrics of samples `x` of the evaluation's prompts, keys ending in `suffix`."""
        feats = shapes.features(self.classifier, x)
        spread = shapes.feature_spread(feats, self.prompts)
        return {f"alignment{suffix}": shapes.alignment_score(self.classifier, x, self.prompts),
                f"feature_distance{suffix}": shapes.feature_distance(feats, self.teacher_features),
                f"feature_distance_to_data{suffix}": shapes.feature_distance(feats, self.real_features),
                f"off_palette{suffix}": shapes.off_palette_share(x),
                f"travel{suffix}": shapes.travel(x, self.prompts),
                f"motion{suffix}": shapes.motion(x),
                f"spread{suffix}": spread,
                f"spread_ratio{suffix}": spread / max(self.teacher_metrics["spread"], 1e-12)}

    def evaluate(self, net: TrigFlowWrapper, steps_list) -> tuple[dict[str, float], dict[int, torch.Tensor]]:
        """{'alignment_{n}step', 'feature_distance_{n}step', 'feature_distance_to_data_{n}step', 'spread_{n}step',
        'spread_ratio_{n}step'} and the samples per step count."""
        metrics, samples = {}, {}
        for n in steps_list:
            samples[n] = x = self.sample(net, n)
            metrics.update(self.score(x, f"_{n}step"))
        return metrics, samples

    def grid(self, samples: dict[int, torch.Tensor], columns: int = 8, upscale: int = 4):
        """`labeled_grid` of the first `columns` prompts (all different): the teacher's multi-step samples, then
        one row per student step count."""
        lc = self.config.logging
        rows = {f"teacher {lc.teacher_eval_steps} steps": self.teacher_samples}
        rows.update({f"{n} step{'s' if n > 1 else ''}": x for n, x in sorted(samples.items())})
        first = {}
        for i, p in enumerate(self.prompts):
            first.setdefault(p, i)
        index = list(first.values())[:columns]
        return labeled_grid({k: v[index] for k, v in rows.items()}, [self.prompts[i] for i in index], upscale)
