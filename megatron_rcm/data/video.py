"""DALI video loader: JSONL manifest -> batches of clips in [-1, 1] with their captions.

One loader per data-parallel rank. The TP / CP / PP ranks of one DP rank build the same loader
(same ``dp_rank``) and so see the same samples. Decoding runs on the GPU (NVDEC: H.264, HEVC, AV1,
VP8/9, MJPEG) when one is used, on the CPU (FFmpeg: VP8, VP9, MJPEG only) otherwise.

Exact resume: the DALI pipeline is built with ``enable_checkpointing=True``; ``state_dict()`` holds its
serialized state plus the loader's own bookkeeping, and ``load_state_dict()`` rebuilds the pipeline
from it, so the batches after a restart are the ones an uninterrupted run would have given.
"""

import base64
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import torch

from .manifest import ManifestEntry, read_manifest
from .validate import CPU_CODECS, GPU_CODECS, check_video, required_frames

logger = logging.getLogger(__name__)

#: (height, width) of the model resolution buckets.
RESOLUTION_BUCKETS = {"480p": (480, 832), "720p": (720, 1280), "tiny": (64, 64)}

_STATE_VERSION = 1


@dataclass(frozen=True)
class VideoLoaderConfig:
    """What a :class:`VideoLoader` produces; stored in its state to refuse resuming a different one."""

    frames: int
    """Frames per clip (F); Wan's VAE wants ``4k + 1``."""

    stride: int
    """Distance between consecutive frames of a clip, in source frames."""

    height: int
    """Output height; frames are resized to cover ``height x width`` and centre-cropped."""

    width: int
    """Output width."""

    batch_size: int
    """Clips per batch (per data-parallel rank)."""

    dp_rank: int = 0
    """This loader's data-parallel rank."""

    dp_size: int = 1
    """Number of data-parallel ranks; the manifest's videos are split between them."""

    seed: int = 0
    """Seed of the split over ranks and of DALI's shuffling."""

    step: int | None = None
    """Frames between the starts of consecutive clips of one video; None: ``frames * stride`` (clips do
    not overlap)."""

    shuffle: bool = True
    """Shuffle clips (DALI's buffer shuffle on top of a seeded permutation of the videos)."""

    shuffle_buffer: int = 64
    """DALI's shuffle buffer (``initial_fill``), in clips."""

    num_threads: int = 2
    """DALI CPU worker threads (also used to check the files)."""

    prefetch: int = 2
    """Batches DALI prepares ahead."""

    full_decode_check: bool = False
    """Decode every frame of every file before building the pipeline (slow, thorough). By default only
    the header is parsed, the packets counted and the first frame decoded; a file that still fails in
    DALI is found then by a full check of this rank's files."""

    def __post_init__(self):
        for name in ("frames", "stride", "height", "width", "batch_size", "dp_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.dp_rank < self.dp_size:
            raise ValueError(f"dp_rank {self.dp_rank} not in [0, {self.dp_size})")
        if self.step is not None and self.step < 1:
            raise ValueError(f"step must be >= 1, got {self.step}")


class NoUsableVideos(RuntimeError):
    """Every video of a rank was skipped; ``skipped`` lists ``(path, reason)``."""

    def __init__(self, message: str, skipped: list[tuple[str, str]]):
        super().__init__(message)
        self.skipped = skipped


def _resolve_device(device) -> torch.device:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"video_loader decodes on 'cpu' or 'cuda', got {device}")
    return device


def rank_entries(entries: list[ManifestEntry], *, dp_rank: int, dp_size: int, seed: int) -> list[ManifestEntry]:
    """The videos of one data-parallel rank: a seeded permutation of the manifest, dealt round-robin.

    The split is by video, before any file is checked, so that each rank checks only its own files and a
    bad file on one rank never shifts the samples of another.
    """
    order = torch.randperm(len(entries), generator=torch.Generator().manual_seed(seed)).tolist()
    return [entries[i] for i in order[dp_rank::dp_size]]


def build_video_pipeline(
    files: list[str],
    labels: list[int],
    *,
    frames: int,
    stride: int,
    step: int,
    height: int,
    width: int,
    batch_size: int,
    device_id: int | None,
    seed: int,
    shuffle: bool,
    shuffle_buffer: int = 64,
    num_threads: int = 2,
    prefetch: int = 2,
    checkpoint: bytes | None = None,
    pad_last_batch: bool = False,
):
    """A DALI pipeline giving (video [B, 3, F, H, W] float in [-1, 1], label [B, 1], first frame [B, 1]).

    ``device_id=None`` decodes on the CPU. Frames are resized (linear, antialiased) to cover
    ``height x width`` keeping the aspect ratio, then centre-cropped and scaled to [-1, 1].
    """
    from nvidia.dali import fn, pipeline_def, types

    decode_device = "cpu" if device_id is None else "gpu"

    @pipeline_def(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device_id,
        seed=seed,
        prefetch_queue_depth=prefetch,
        enable_checkpointing=True,
        checkpoint=checkpoint,
    )
    def pipeline():
        video, label, first_frame = fn.experimental.readers.video(
            device=decode_device,
            filenames=files,
            labels=labels,
            sequence_length=frames,
            stride=stride,
            step=step,
            random_shuffle=shuffle,
            initial_fill=shuffle_buffer,
            enable_frame_num=True,
            pad_last_batch=pad_last_batch,
            seed=seed,
            name="reader",
        )
        video = fn.resize(
            video, resize_x=width, resize_y=height, mode="not_smaller", interp_type=types.INTERP_LINEAR
        )
        video = fn.crop_mirror_normalize(
            video,
            crop=(height, width),
            dtype=types.FLOAT,
            mean=[127.5],
            std=[127.5],
            output_layout="CFHW",
        )
        return video, label, first_frame

    pipe = pipeline()
    pipe.build()
    return pipe


def _to_torch(tensor_list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    from nvidia.dali.plugin.pytorch import feed_ndarray

    tensor = tensor_list.as_tensor()
    out = torch.empty(tuple(tensor.shape()), dtype=dtype, device=device)
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
    feed_ndarray(tensor, out, cuda_stream=stream)
    return out


def _to_list(tensor_list) -> list[int]:
    if hasattr(tensor_list, "as_cpu"):
        tensor_list = tensor_list.as_cpu()
    return [int(tensor_list.at(i).reshape(-1)[0]) for i in range(len(tensor_list))]


class VideoLoader:
    """Endless iterator of batches ``{"video", "caption", "index", "first_frame"}`` for one DP rank.

    - ``video``: float32 ``[B, 3, F, H, W]`` in [-1, 1], on ``device``.
    - ``caption``: list of B strings.
    - ``index``: int64 ``[B]``, the manifest rows of the clips.
    - ``first_frame``: int64 ``[B]``, the source frame each clip starts at.

    Bad files (missing, unreadable, unsupported codec, too short) are skipped before the pipeline is
    built and listed in :attr:`skipped`; a file that passes the cheap check but makes DALI fail is found by
    a full decode of this rank's files, skipped too, and the pipeline is rebuilt (the rank's epoch then
    starts over).
    """

    def __init__(self, manifest: str | os.PathLike | list[ManifestEntry], config: VideoLoaderConfig, device=None):
        self.config = config
        self.device = _resolve_device(device)
        if isinstance(manifest, list):  # entries already read (e.g. one shard's rows during preprocessing)
            self.manifest, self._entries = "<entries>", list(manifest)
        else:
            self.manifest = os.fspath(manifest)
            self._entries = read_manifest(self.manifest)
        self._by_index = {e.index: e for e in self._entries}
        self._mine = rank_entries(self._entries, dp_rank=config.dp_rank, dp_size=config.dp_size, seed=config.seed)
        self._codecs = GPU_CODECS if self.device.type == "cuda" else CPU_CODECS
        self._min_frames = required_frames(config.frames, config.stride)
        self.skipped: list[tuple[str, str]] = []
        """(path, reason) of every file this rank skipped."""
        self._excluded: set[int] = set()
        self._fully_checked: set[int] = set()
        self._rebuilds = 0
        self._batches = 0
        self._check(self._mine, full_decode=config.full_decode_check)
        self._pipe = self._build()

    # -- bookkeeping -------------------------------------------------------------------------------

    @property
    def num_skipped(self) -> int:
        """Number of files of this rank skipped as unusable."""
        return len(self.skipped)

    @property
    def usable_indices(self) -> set[int]:
        """Manifest rows of this rank's videos not (yet) skipped."""
        return {e.index for e in self._usable()}

    @property
    def samples_per_epoch(self) -> int:
        """Clips this rank's pipeline gives per pass over its videos."""
        return int(self._pipe.reader_meta("reader")["epoch_size"])

    def __len__(self) -> int:
        """Batches per epoch of this rank (the loader itself never stops)."""
        return math.ceil(self.samples_per_epoch / self.config.batch_size)

    def _usable(self) -> list[ManifestEntry]:
        return [e for e in self._mine if e.index not in self._excluded]

    def _skip(self, entry: ManifestEntry, reason: str) -> None:
        self._excluded.add(entry.index)
        self.skipped.append((entry.path, reason))
        logger.warning("video loader (dp rank %d): skipping %s: %s", self.config.dp_rank, entry.path, reason)

    def _check(self, entries: list[ManifestEntry], *, full_decode: bool) -> int:
        """Check ``entries`` (in parallel) and skip the bad ones; returns how many were skipped."""
        todo = [e for e in entries if e.index not in self._excluded]

        def check(entry):
            return check_video(
                entry.path,
                min_frames=self._min_frames,
                codecs=self._codecs,
                num_frames=None if full_decode else entry.num_frames,
                full_decode=full_decode,
            )

        with ThreadPoolExecutor(max(1, self.config.num_threads)) as pool:
            results = list(pool.map(check, todo))
        bad = 0
        for entry, result in zip(todo, results):
            if full_decode:
                self._fully_checked.add(entry.index)
            if not result.ok:
                self._skip(entry, result.reason)
                bad += 1
        return bad

    def _build(self, checkpoint: bytes | None = None):
        config = self.config
        usable = self._usable()
        if not usable:
            raise NoUsableVideos(
                f"no usable videos for dp rank {config.dp_rank} of {config.dp_size} in {self.manifest!r} "
                f"({len(self._mine)} listed, {self.num_skipped} skipped; first reasons: {self.skipped[:3]})",
                list(self.skipped),
            )
        return build_video_pipeline(
            [e.path for e in usable],
            [e.index for e in usable],
            frames=config.frames,
            stride=config.stride,
            step=config.step or config.frames * config.stride,
            height=config.height,
            width=config.width,
            batch_size=config.batch_size,
            device_id=self.device.index if self.device.type == "cuda" else None,
            # Distinct per rank and per rebuild, fixed by the config: a resumed run rebuilds the same.
            seed=(config.seed * 1_000_003 + config.dp_rank * 7919 + self._rebuilds) % (2**31 - 1),
            shuffle=config.shuffle,
            shuffle_buffer=config.shuffle_buffer,
            num_threads=config.num_threads,
            prefetch=config.prefetch,
            checkpoint=checkpoint,
        )

    # -- iteration ---------------------------------------------------------------------------------

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        while True:
            try:
                video, label, first_frame = self._pipe.run()
                break
            except Exception as error:  # noqa: BLE001 - DALI reports decode failures as plain errors
                self._recover(error)
        index = _to_list(label)
        self._batches += 1
        return {
            "video": _to_torch(video, torch.float32, self.device).clamp_(-1.0, 1.0),  # GPU resize can round past 255
            "caption": [self._by_index[i].caption for i in index],
            "index": torch.tensor(index, dtype=torch.int64),
            "first_frame": torch.tensor(_to_list(first_frame), dtype=torch.int64),
        }

    def _recover(self, error: Exception) -> None:
        """DALI failed on a file the cheap check passed: find it by decoding every file, skip it, rebuild."""
        logger.warning(
            "video loader (dp rank %d): DALI failed (%s); decoding this rank's files to find the bad one",
            self.config.dp_rank,
            str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__,
        )
        unchecked = [e for e in self._usable() if e.index not in self._fully_checked]
        if self._check(unchecked, full_decode=True) == 0:
            raise error
        del self._pipe
        self._rebuilds += 1
        self._pipe = self._build()

    # -- exact resume ------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The loader's position: DALI's pipeline checkpoint plus the files skipped so far."""
        return {
            "version": _STATE_VERSION,
            "config": asdict(self.config),
            "num_videos": len(self._entries),
            "excluded": sorted(self._excluded),
            "fully_checked": sorted(self._fully_checked),
            "skipped": list(self.skipped),
            "rebuilds": self._rebuilds,
            "batches": self._batches,
            "dali_checkpoint": base64.b64encode(self._pipe.checkpoint()).decode("ascii"),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where the loader that wrote ``state`` stopped."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"video loader state version {state.get('version')} != {_STATE_VERSION}")
        mine = asdict(self.config)
        if state["config"] != mine or state["num_videos"] != len(self._entries):
            raise ValueError(
                "video loader state was written by a different loader: "
                f"{state['config']} over {state['num_videos']} videos, this one is {mine} over "
                f"{len(self._entries)} videos"
            )
        self._excluded = set(state["excluded"])
        self._fully_checked = set(state["fully_checked"])
        self.skipped = [tuple(s) for s in state["skipped"]]
        self._rebuilds = state["rebuilds"]
        self._batches = state["batches"]
        del self._pipe
        self._pipe = self._build(checkpoint=base64.b64decode(state["dali_checkpoint"]))


def video_loader(
    manifest: str | os.PathLike,
    *,
    frames: int,
    stride: int,
    height: int,
    width: int,
    batch_size: int,
    dp_rank: int = 0,
    dp_size: int = 1,
    seed: int = 0,
    device=None,
    **options,
) -> VideoLoader:
    """Batches of video clips and captions for one data-parallel rank, decoded by DALI.

    Args:
        manifest: JSONL file, one ``{"path", "caption"[, "fps", "num_frames"]}`` per line
            (see :mod:`megatron_rcm.data.manifest`).
        frames: frames per clip. stride: source frames between clip frames.
        height, width: output size (resize to cover, centre crop); see :data:`RESOLUTION_BUCKETS`.
        batch_size: clips per batch on this rank.
        dp_rank, dp_size: this rank's data-parallel coordinates (TP/CP/PP ranks pass their DP rank).
        seed: seed of the split over ranks and of the shuffling.
        device: where to decode and put the batch: None (the GPU if there is one, else the CPU),
            "cpu", "cuda" or "cuda:N".
        options: further :class:`VideoLoaderConfig` fields (``step``, ``shuffle``, ``num_threads``, ...).

    Returns:
        A :class:`VideoLoader`: endless iterator of dicts with ``video`` [B, 3, F, H, W] float in [-1, 1]
        and ``caption`` (list of str), ``state_dict()`` / ``load_state_dict()`` for exact resume and
        ``num_skipped`` / ``skipped`` for the files it had to skip.
    """
    config = VideoLoaderConfig(
        frames=frames,
        stride=stride,
        height=height,
        width=width,
        batch_size=batch_size,
        dp_rank=dp_rank,
        dp_size=dp_size,
        seed=seed,
        **options,
    )
    return VideoLoader(manifest, config, device=device)
