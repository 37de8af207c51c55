"""A procedural text-to-video set for CPU demos and tests: coloured shapes moving in captioned directions.

Every sample is a function of (seed, index) only, so the data position of a run is one integer and any number
of data-parallel ranks read disjoint, reproducible slices. Pixel space is the "latent" space here:
videos are `[3, frames, size, size]` in [-1, 1] on a grey (0) background.

Pieces:
- `ShapesDataset`: caption attributes (colour, shape, direction) -> video.
- `ShapesTextEncoder`: a fixed word-embedding table (the "tiny text encoder"); the empty caption (the negative
  prompt) encodes to zeros.
- `ShapesClassifier`: a small 3-D CNN trained on the generator's ground truth; it scores prompt alignment
  (does the sample show the captioned colour, shape and direction?) and gives the features of the
  feature distance between two sets of samples.
"""

import dataclasses
import itertools
import math

import numpy as np
import torch
import torch.nn.functional as F

COLORS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, -1.0, -1.0),
    "green": (-1.0, 1.0, -1.0),
    "blue": (-1.0, -1.0, 1.0),
    "yellow": (1.0, 1.0, -1.0),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
"""direction -> (d_row, d_col) per frame."""

ATTRIBUTES = {"color": tuple(COLORS), "shape": SHAPES, "direction": tuple(DIRECTIONS)}
PROMPTS: tuple[tuple[str, str, str], ...] = tuple(itertools.product(COLORS, SHAPES, DIRECTIONS))
"""Every (colour, shape, direction) triple; 48 prompts."""


def caption(color: str, shape: str, direction: str) -> str:
    return f"a {color} {shape} moving {direction}"


def parse_caption(text: str) -> tuple[str, str, str]:
    """(colour, shape, direction) of a caption written by `caption`; raises ValueError otherwise."""
    words = text.lower().split()
    if len(words) != 5 or words[0] != "a" or words[3] != "moving" or words[1] not in COLORS \
            or words[2] not in SHAPES or words[4] not in DIRECTIONS:
        raise ValueError(f"not a shapes caption: {text!r} (expected 'a <color> <shape> moving <direction>' with "
                         f"color in {list(COLORS)}, shape in {list(SHAPES)}, direction in {list(DIRECTIONS)})")
    return words[1], words[2], words[4]


@dataclasses.dataclass
class ShapesConfig:
    """Geometry of the procedural videos."""

    frames: int = 8
    """Frames per video."""
    size: int = 16
    """Height = width in pixels."""
    radius: int = 3
    """Half-size of a shape in pixels."""
    speed: int = 1
    """Pixels moved per frame."""


def _shape_mask(shape: str, rows: np.ndarray, cols: np.ndarray, r0: float, c0: float, radius: int) -> np.ndarray:
    dr, dc = rows - r0, cols - c0
    if shape == "circle":
        return dr * dr + dc * dc <= (radius + 0.3) ** 2
    if shape == "square":
        return (np.abs(dr) <= radius - 0.5) & (np.abs(dc) <= radius - 0.5)
    if shape == "triangle":  # apex up, base at the bottom
        return (dr >= -radius) & (dr <= radius) & (np.abs(dc) <= (dr + radius) / 2 + 0.25)
    raise ValueError(shape)


def start_ranges(direction: str, config: ShapesConfig) -> tuple[range, range]:
    """The first frame's possible (row, column) centres: along the motion the shape must stay inside for the whole
    clip, across it anywhere inside."""
    r, n, travel = config.radius, config.size, config.speed * (config.frames - 1)
    if 2 * r + 1 + travel > n:
        raise ValueError(f"a shape of radius {r} moving {travel} pixels does not fit in {n} pixels")

    def along(d):
        if d > 0:
            return range(r, n - r - travel)
        if d < 0:
            return range(r + travel, n - r)
        return range(r, n - r)
    d_row, d_col = DIRECTIONS[direction]
    return along(d_row), along(d_col)


def start_position(direction: str, rng: np.random.RandomState, config: ShapesConfig) -> tuple[int, int]:
    """(row, column) of the shape's centre in the first frame, drawn uniformly from `start_ranges` by `rng`."""
    rows, cols = start_ranges(direction, config)
    row0 = rng.randint(rows.start, rows.stop)
    return row0, rng.randint(cols.start, cols.stop)


def all_videos(config: ShapesConfig) -> tuple[torch.Tensor, list[tuple[str, str, str]]]:
    """Every distinct video of the set, `[N, 3, T, H, W]`, with its (colour, shape, direction); each prompt's videos
    are equally likely under `ShapesDataset`, and the prompts are too."""
    videos, attributes = [], []
    for prompt in PROMPTS:
        rows, cols = start_ranges(prompt[2], config)
        for row0 in rows:
            for col0 in cols:
                videos.append(render_at(*prompt, row0, col0, config))
                attributes.append(prompt)
    return torch.from_numpy(np.stack(videos)), attributes


def render_at(color: str, shape: str, direction: str, row0: int, col0: int, config: ShapesConfig) -> np.ndarray:
    """One video `[3, frames, size, size]` float32 in [-1, 1] with the shape starting at (row0, col0)."""
    n, r = config.size, config.radius
    d_row, d_col = DIRECTIONS[direction]
    rows, cols = np.mgrid[0:n, 0:n].astype(np.float32)
    rgb = np.asarray(COLORS[color], dtype=np.float32)[:, None, None]
    video = np.zeros((3, config.frames, n, n), dtype=np.float32)
    for f in range(config.frames):
        mask = _shape_mask(shape, rows, cols, row0 + d_row * config.speed * f, col0 + d_col * config.speed * f, r)
        video[:, f] = np.where(mask[None], rgb, 0.0)
    return video


def render(color: str, shape: str, direction: str, rng: np.random.RandomState, config: ShapesConfig) -> np.ndarray:
    """One video `[3, frames, size, size]` float32 in [-1, 1]; the start position is drawn from `rng`."""
    return render_at(color, shape, direction, *start_position(direction, rng, config), config)


class ShapesDataset:
    """Sample `index` of the stream with seed `seed`: a uniformly drawn prompt and start position."""

    def __init__(self, config: ShapesConfig | None = None, seed: int = 0):
        self.config = config or ShapesConfig()
        self.seed = int(seed)
        self._videos: dict[tuple, np.ndarray] = {}

    def attributes(self, index: int) -> tuple[str, str, str]:
        return PROMPTS[self._rng(index).randint(len(PROMPTS))]

    def _rng(self, index: int) -> np.random.RandomState:
        # numpy's legacy RandomState is stable across versions: the stream never changes under a run
        return np.random.RandomState((self.seed * 1_000_003 + int(index)) % 2**32)

    def __getitem__(self, index: int) -> tuple[np.ndarray, str]:
        rng = self._rng(index)
        color, shape, direction = PROMPTS[rng.randint(len(PROMPTS))]
        key = (color, shape, direction, *start_position(direction, rng, self.config))
        # there are only a few thousand distinct videos (48 prompts x start positions): render each once
        video = self._videos.get(key)
        if video is None:
            video = self._videos[key] = render_at(*key, self.config)
            video.flags.writeable = False  # shared by every index that draws this video
        return video, caption(color, shape, direction)

    def batch(self, indices) -> tuple[torch.Tensor, list[str]]:
        """(videos `[B, 3, T, H, W]` float32, captions)."""
        items = [self[i] for i in indices]
        return torch.from_numpy(np.stack([v for v, _ in items])), [c for _, c in items]


class ShapesTextEncoder:
    """The tiny text encoder: each word of a caption maps to a fixed random vector (unit RMS), padded to
    `max_length` with zeros. The empty caption (the negative prompt) is all zeros. Not trained: it is a
    deterministic function of `seed` (numpy's stable RandomState), so it never needs to be shipped."""

    VOCAB = ("a", "moving", *COLORS, *SHAPES, *DIRECTIONS)

    MAX_LENGTH = 5
    """Text tokens per caption: the longest caption ('a <color> <shape> moving <direction>') has five words."""

    def __init__(self, dim: int = 16, max_length: int = MAX_LENGTH, seed: int = 0):
        self.dim, self.max_length = dim, max_length
        table = np.random.RandomState(seed).standard_normal((len(self.VOCAB), dim)).astype(np.float32)
        self.table = torch.from_numpy(table)
        self.index = {w: i for i, w in enumerate(self.VOCAB)}

    def encode(self, captions: list[str]) -> torch.Tensor:
        """`[B, max_length, dim]` float32."""
        out = torch.zeros(len(captions), self.max_length, self.dim)
        for b, text in enumerate(captions):
            words = text.lower().split()
            if len(words) > self.max_length:
                raise ValueError(f"caption {text!r} has more than {self.max_length} words")
            for i, w in enumerate(words):
                if w not in self.index:
                    raise ValueError(f"unknown word {w!r} in caption {text!r}; vocabulary: {list(self.VOCAB)}")
                out[b, i] = self.table[self.index[w]]
        return out

    def negative(self, batch_size: int = 1) -> torch.Tensor:
        """Embedding of the empty negative prompt `[B, max_length, dim]`."""
        return torch.zeros(batch_size, self.max_length, self.dim)


class ShapesClassifier(torch.nn.Module):
    """A small 3-D CNN: video `[B, 3, T, H, W]` -> logits per attribute and a feature vector."""

    def __init__(self, width: int = 24, feature_dim: int = 64):
        super().__init__()
        self.convs = torch.nn.Sequential(
            torch.nn.Conv3d(3, width, 3, padding=1), torch.nn.SiLU(),
            torch.nn.Conv3d(width, 2 * width, 3, stride=(1, 2, 2), padding=1), torch.nn.SiLU(),
            torch.nn.Conv3d(2 * width, 2 * width, 3, stride=2, padding=1), torch.nn.SiLU(),
        )
        self.features = torch.nn.Linear(2 * width, feature_dim)
        self.heads = torch.nn.ModuleDict({k: torch.nn.Linear(feature_dim, len(v)) for k, v in ATTRIBUTES.items()})

    def forward(self, video: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        h = self.convs(video.float())
        feats = F.silu(self.features(h.amax(dim=(2, 3, 4))))
        return {k: head(feats) for k, head in self.heads.items()}, feats


def attribute_targets(captions: list[str]) -> dict[str, torch.Tensor]:
    parsed = [parse_caption(c) for c in captions]
    return {k: torch.tensor([ATTRIBUTES[k].index(p[i]) for p in parsed]) for i, k in enumerate(ATTRIBUTES)}


def train_classifier(dataset: ShapesDataset, steps: int = 400, batch_size: int = 64, lr: float = 3e-3,
                     noise_std: float = 0.2, seed: int = 0, log=None) -> ShapesClassifier:
    """Fit the classifier on the generator's ground truth (with light noise so that imperfect samples still
    get a meaningful score). Deterministic given the arguments."""
    torch.manual_seed(seed)
    clf = ShapesClassifier()
    opt = torch.optim.Adam(clf.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        start = 10_000_000 + step * batch_size  # indices disjoint from the training stream's first 10M samples
        videos, caps = dataset.batch(range(start, start + batch_size))
        videos = videos + noise_std * torch.rand(()).item() * torch.randn(videos.shape, generator=gen)
        logits, _ = clf(videos)
        targets = attribute_targets(caps)
        loss = sum(F.cross_entropy(logits[k], targets[k]) for k in ATTRIBUTES)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if log is not None and (step % 100 == 0 or step == steps - 1):
            log(f"classifier step {step:5d} | loss {loss.item():.4f}")
    return clf.eval()


def _attribute_hits(classifier: ShapesClassifier, videos: torch.Tensor, captions: list[str]) -> torch.Tensor:
    """`[3, N]`: 1 where the classifier recognises the captioned colour / shape / direction of a sample."""
    logits, _ = classifier(videos.float().clamp(-1.5, 1.5))
    targets = attribute_targets(captions)
    return torch.stack([(logits[k].argmax(-1) == targets[k]).float() for k in ATTRIBUTES])


@torch.no_grad()
def alignment_score(classifier: ShapesClassifier, videos: torch.Tensor, captions: list[str]) -> float:
    """Mean share of the captioned attributes (colour, shape, direction) the classifier recognises, in [0, 1]."""
    return _attribute_hits(classifier, videos, captions).mean().item()


@torch.no_grad()
def attribute_accuracy(classifier: ShapesClassifier, videos: torch.Tensor, captions: list[str]) -> dict[str, float]:
    """The share of samples whose colour, shape and direction the classifier recognises, per attribute (chance:
    1/4, 1/3, 1/4); their mean is `alignment_score`."""
    return dict(zip(ATTRIBUTES, _attribute_hits(classifier, videos, captions).mean(1).tolist()))


@torch.no_grad()
def features(classifier: ShapesClassifier, videos: torch.Tensor) -> torch.Tensor:
    return classifier(videos.float().clamp(-1.5, 1.5))[1].double()


def feature_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between two feature sets `[N, D]` under diagonal Gaussians (an FVD-like set distance
    that needs few samples): ||mu_a - mu_b||^2 + sum (s_a - s_b)^2."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = a.std(0, unbiased=False), b.std(0, unbiased=False)
    return float(((mu_a - mu_b) ** 2).sum() + ((s_a - s_b) ** 2).sum())


def feature_spread(feats: torch.Tensor, captions: list[str]) -> float:
    """Mean pairwise L2 distance between the features `[N, D]` of samples that share a caption (different noise),
    averaged over captions with at least two samples: the sample diversity per prompt (0 = mode collapse)."""
    groups: dict[str, list[int]] = {}
    for i, c in enumerate(captions):
        groups.setdefault(c, []).append(i)
    per_prompt = [torch.pdist(feats[idx].double()).mean() for idx in groups.values() if len(idx) > 1]
    if not per_prompt:
        raise ValueError("feature_spread needs at least one caption with two or more samples")
    return float(torch.stack(per_prompt).mean())


@torch.no_grad()
def off_palette_share(videos: torch.Tensor, tolerance: float = 0.25) -> float:
    """Share of the pixels of `[N, 3, T, H, W]` videos whose RGB value is farther than `tolerance` (max over the
    channels) from every colour the data uses (the grey background and the shape colours): 0 on data, high for
    speckle. The classifier, trained with additive noise, is blind to exactly that."""
    palette = torch.tensor([(0.0, 0.0, 0.0), *COLORS.values()], dtype=torch.float32)
    rgb = videos.float().movedim(1, -1).reshape(-1, 1, 3)
    far = ((rgb - palette[None]).abs().amax(dim=-1) > tolerance).all(dim=-1)
    return far.float().mean().item()


@torch.no_grad()
def velocity(videos: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """`[N, 2]`: the mean step per frame, in pixels (rows, columns), of the shape of `[N, 3, T, H, W]` videos. A
    frame's position is the circular mean of its pixels brighter than `threshold` (max over the channels; for a
    shape inside the frame it moves exactly as the plain mean does, and a sample's speckle at the opposite border
    does not drag it across the frame); each step between frames is taken the short way round, and frames with no
    bright pixel are left out."""
    mask = (videos.float().abs().amax(dim=1) > threshold).float()  # [N, T, H, W]
    steps = []
    for profile in (mask.sum(dim=3), mask.sum(dim=2)):  # [N, T, H] mass per row, [N, T, W] per column
        size = profile.shape[-1]
        angle = 2 * math.pi * torch.arange(size, dtype=torch.float32) / size
        phase = torch.atan2((profile * angle.sin()).sum(-1), (profile * angle.cos()).sum(-1))  # [N, T]
        seen = profile.sum(-1) > 0
        delta = torch.remainder(phase[:, 1:] - phase[:, :-1] + math.pi, 2 * math.pi) - math.pi
        pairs = (seen[:, 1:] & seen[:, :-1]).float()
        steps.append((delta * pairs).sum(1) / pairs.sum(1).clamp(min=1.0) * size / (2 * math.pi))
    return torch.stack(steps, dim=1)


def travel(videos: torch.Tensor, captions: list[str], threshold: float = 0.5) -> float:
    """Mean speed, in pixels per frame, at which the shape of `[N, 3, T, H, W]` videos moves along its captioned
    direction (`velocity` projected on it). The data gives `ShapesConfig.speed` (1); a sample that repeats one
    frame, whose shape wanders at random, or that moves the wrong way gives ~0 or less, however well the classifier
    scores its colour."""
    direction = torch.tensor([DIRECTIONS[parse_caption(c)[2]] for c in captions], dtype=torch.float32)  # [N, 2]
    return (velocity(videos, threshold) * direction).sum(1).mean().item()


def motion(videos: torch.Tensor, threshold: float = 0.5) -> float:
    """Mean speed, in pixels per frame, of steady motion in any direction (the length of `velocity`): next to
    `travel` it tells a sample that moves the wrong way (motion ~1, travel ~0) from one that does not move or only
    jitters (both ~0). The data gives `ShapesConfig.speed`."""
    return velocity(videos, threshold).norm(dim=1).mean().item()


def eval_prompts(n: int) -> list[str]:
    """`n` captions cycling through all prompts in a fixed order."""
    return [caption(*PROMPTS[(i * 7) % len(PROMPTS)]) for i in range(n)]


__all__ = ["ATTRIBUTES", "COLORS", "DIRECTIONS", "PROMPTS", "SHAPES", "ShapesClassifier", "ShapesConfig",
           "ShapesDataset", "ShapesTextEncoder", "alignment_score", "all_videos", "attribute_accuracy", "caption",
           "eval_prompts", "feature_distance", "feature_spread", "features", "motion", "off_palette_share",
           "parse_caption", "render", "render_at", "start_position", "start_ranges", "train_classifier", "travel",
           "velocity"]
