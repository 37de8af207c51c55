"""Training batches per data-parallel rank, as micro-batches of (clean latents x0, text embedding).

The shapes source is a pure function of the sample index: the data position is the number of consumed samples,
and iteration i on DP rank d reads samples [consumed + d * per_rank, consumed + (d + 1) * per_rank). The file
sources (`latents`, `videos`) wrap `megatron_rcm.data.build_data_loader` and carry its resumable state.
"""

import os

import torch

from megatron_rcm.data.shapes import ShapesDataset, ShapesTextEncoder
from megatron_rcm.training.config import TrainingConfig


class _Batches:
    """What every source shares: this rank's micro-batch split of the global batch and the data position (consumed
    samples, the whole of a pure source's resumable state)."""

    def __init__(self, config: TrainingConfig, dp_rank: int, dp_size: int, device):
        t = config.training
        self.micro, self.num_micro = t.micro_batch_size, t.global_batch_size // (t.micro_batch_size * dp_size)
        self.per_rank = self.micro * self.num_micro
        self.global_batch, self.dp_rank, self.device = t.global_batch_size, dp_rank, device
        self.consumed_samples = 0

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict) -> None:
        self.consumed_samples = int(state["consumed_samples"])


class ShapesBatches(_Batches):
    """The procedural shapes set with the tiny text encoder."""

    def __init__(self, config: TrainingConfig, text_dim: int, dp_rank: int, dp_size: int, device):
        super().__init__(config, dp_rank, dp_size, device)
        self.dataset = ShapesDataset(config.data.shapes(), seed=config.training.seed)
        self.encoder = ShapesTextEncoder(dim=text_dim)

    def negative_text(self) -> torch.Tensor:
        return self.encoder.negative(1).to(self.device)

    def next(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        start = self.consumed_samples + self.dp_rank * self.per_rank
        out = []
        for m in range(self.num_micro):
            x0, caps = self.dataset.batch(range(start + m * self.micro, start + (m + 1) * self.micro))
            out.append((x0.to(self.device), self.encoder.encode(caps).to(self.device)))
        self.consumed_samples += self.global_batch
        return out


class LoaderBatches(_Batches):
    """Latent shards or encoded videos (megatron_rcm.data.build_data_loader), one loader per DP rank."""

    def __init__(self, config: TrainingConfig, dp_rank: int, dp_size: int, device):
        from megatron_rcm.checkpoint.negative_prompt import load_negative_embedding
        from megatron_rcm.data.sources import build_data_loader

        super().__init__(config, dp_rank, dp_size, device)
        d, t = config.data, config.training
        if not d.negative_text_embedding or not os.path.isfile(d.negative_text_embedding):
            raise FileNotFoundError(f"data.negative_text_embedding must name a .pt or .safetensors file with the "
                                    f"negative prompt's embedding [L, text_dim] (tools/encode_negative_prompt.py "
                                    f"writes one), got {d.negative_text_embedding!r}")
        self.loader = build_data_loader(d, batch_size=t.micro_batch_size, seed=t.seed, dp_rank=dp_rank,
                                        dp_size=dp_size, device=device)
        self.neg = load_negative_embedding(d.negative_text_embedding).float()  # never unpickles code

    def negative_text(self) -> torch.Tensor:
        neg = self.neg if self.neg.dim() == 3 else self.neg[None]
        return neg.to(self.device)

    def next(self):
        out = []
        for _ in range(self.num_micro):
            b = next(self.loader)
            out.append((b["latent"].to(self.device), b["text_embedding"].to(self.device)))
        self.consumed_samples += self.global_batch
        return out

    def state_dict(self) -> dict:
        return {**super().state_dict(), "loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.loader.load_state_dict(state["loader"])


class RandomBatches(_Batches):
    """Gaussian latents `[B, C, 1 + (frames - 1) / 4, height / 8, width / 8]` (the Wan VAE's factors) and random text
    embeddings: no files, for scale probes. Drawn on the CPU and copied, so they do not depend on the device."""

    def __init__(self, config: TrainingConfig, in_channels: int, text_dim: int, dp_rank: int, dp_size: int, device):
        super().__init__(config, dp_rank, dp_size, device)
        d = config.data
        self.shape = (in_channels, 1 + (d.frames - 1) // 4, d.height // 8, d.width // 8)
        self.text_shape = (d.text_length, text_dim)
        self.seed = config.training.seed

    def negative_text(self) -> torch.Tensor:
        return torch.zeros(1, *self.text_shape, device=self.device)

    def next(self):
        gen = torch.Generator().manual_seed(self.seed + self.consumed_samples + self.dp_rank)
        out = [(torch.randn((self.micro, *self.shape), generator=gen).to(self.device),
                torch.randn((self.micro, *self.text_shape), generator=gen).to(self.device))
               for _ in range(self.num_micro)]
        self.consumed_samples += self.global_batch
        return out


def build_batches(config: TrainingConfig, text_dim: int, dp_rank: int, dp_size: int, device, in_channels: int = 16):
    if config.data.source == "random":
        return RandomBatches(config, in_channels, text_dim, dp_rank, dp_size, device)
    if config.data.source == "shapes":
        return ShapesBatches(config, text_dim, dp_rank, dp_size, device)
    if config.data.source in ("latents", "videos"):
        return LoaderBatches(config, dp_rank, dp_size, device)
    raise ValueError(f"data.source must be shapes, latents, videos or random, got {config.data.source!r}")
