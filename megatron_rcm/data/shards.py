"""Shards of precomputed latents and text embeddings: webdataset-style tar files.

A shard folder holds::

    meta.json                     what every sample looks like (latent shape, text hidden size, dtypes, ...)
    shard-000000.tar              samples: <key>.safetensors (latent, text_embedding) + <key>.json
    shard-000000.idx.json         byte offsets of each member, so a reader seeks instead of scanning
    ...

Each tar is a plain POSIX tar (``tarfile``): any webdataset / Megatron-Energon reader can stream it.
Text embeddings are stored unpadded (``[length, hidden]``) and padded with zeros to ``text_max_length``
when read, as Wan pads them: a 50-token caption costs 50 rows, not 512.

Writers write ``<name>.tmp`` and rename it when complete, so a shard that exists is whole; a crashed run
redoes only the shards that do not exist yet.
"""

import io
import json
import math
import os
import tarfile
from dataclasses import asdict, dataclass, field

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

FORMAT = "megatron-rcm-latents"
VERSION = 1
META_FILE = "meta.json"


def shard_name(i: int) -> str:
    return f"shard-{i:06d}.tar"


def index_name(shard: str) -> str:
    return shard[: -len(".tar")] + ".idx.json"


@dataclass
class ShardMeta:
    """What every sample of a shard folder looks like; written once as ``meta.json``."""

    latent_shape: list[int]
    """``[C, T, H, W]`` of each sample's (normalised) latent."""

    text_hidden: int
    """Hidden size of the text embeddings (UMT5-XXL: 4096)."""

    text_max_length: int = 512
    """Length the embeddings are padded to when read."""

    latent_dtype: str = "bfloat16"
    text_dtype: str = "bfloat16"

    source: str = "videos"
    """``videos`` (encoded real clips) or ``teacher`` (teacher samples)."""

    samples_per_shard: int = 64
    num_shards: int = 0

    extra: dict = field(default_factory=dict)
    """Provenance: clip frames / stride / size, model folders, sampler settings, ..."""

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, d: dict) -> "ShardMeta":
        if d.get("format") != FORMAT or d.get("version") != VERSION:
            raise ValueError(
                f"not a {FORMAT} v{VERSION} meta.json: format={d.get('format')} version={d.get('version')}"
            )
        return cls(**{k: v for k, v in d.items() if k not in ("format", "version")})


def _atomic_write_bytes(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_meta(root: str, meta: ShardMeta) -> None:
    """Write ``meta.json``; if one exists it must describe the same data (a resumed run), else error."""
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, META_FILE)
    new = meta.to_json()
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        if old != new:
            raise ValueError(
                f"{path} describes different data than this run: existing {old}, this run {new}; "
                "write to a new folder or delete the old shards"
            )
        return
    _atomic_write_bytes(path, json.dumps(new, indent=1).encode())


def read_meta(root: str) -> ShardMeta:
    path = os.path.join(root, META_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"latent shard folder has no {META_FILE}: {root!r}")
    with open(path) as f:
        return ShardMeta.from_json(json.load(f))


def write_shard(path: str, samples: list[dict]) -> None:
    """Write ``samples`` (``key``, ``latent``, ``text_embedding``, optional ``info`` dict) as one tar.

    Written to ``<path>.tmp`` with its index, then renamed: the index first, the tar last, so an
    existing tar always has its index.
    """
    tmp = path + ".tmp"
    index = []
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for sample in samples:
            key = sample["key"]
            tensors = {
                "latent": sample["latent"].detach().contiguous().cpu(),
                "text_embedding": sample["text_embedding"].detach().contiguous().cpu(),
            }
            members = {
                "safetensors": save_safetensors(tensors),
                "json": json.dumps({"key": key, **sample.get("info", {})}, ensure_ascii=False).encode(),
            }
            entry = {"key": key}
            for ext, payload in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                info.mtime = 0  # reproducible bytes
                tar.addfile(info, io.BytesIO(payload))
                # The data ends the archive so far, padded to whole 512-byte blocks.
                entry[ext] = [tar.offset - math.ceil(info.size / tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE, info.size]
            index.append(entry)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    _atomic_write_bytes(index_name(path), json.dumps(index).encode())
    os.replace(tmp, path)


def read_index(path: str) -> list[dict]:
    """Member offsets of a shard: from its ``.idx.json``, or by scanning the tar headers."""
    idx = index_name(path)
    if os.path.isfile(idx):
        with open(idx) as f:
            return json.load(f)
    entries: dict[str, dict] = {}
    with tarfile.open(path, "r") as tar:
        for member in tar:
            key, _, ext = member.name.partition(".")
            entries.setdefault(key, {"key": key})[ext] = [member.offset_data, member.size]
    return list(entries.values())


def read_sample(path: str, entry: dict, handle=None) -> tuple[dict, dict]:
    """``(tensors, info)`` of one sample of shard ``path``."""
    close = handle is None
    handle = handle or open(path, "rb")
    try:
        handle.seek(entry["safetensors"][0])
        tensors = load_safetensors(handle.read(entry["safetensors"][1]))
        info = {}
        if "json" in entry:
            handle.seek(entry["json"][0])
            info = json.loads(handle.read(entry["json"][1]))
    finally:
        if close:
            handle.close()
    return tensors, info


class LatentLoader:
    """Endless iterator of batches from a shard folder, for one data-parallel rank.

    Batches: ``latent`` ``[B, C, T, H, W]``, ``text_embedding`` ``[B, text_max_length, hidden]`` (zero
    padded), ``text_length`` ``[B]``, ``caption`` (list of str), ``key`` (list of str).

    Order: each epoch is a seeded permutation of all samples, dealt round-robin to the ranks and cut to
    the same length on every rank (so DP ranks step together). ``state_dict()`` is ``(epoch, position)``.
    Every sample is checked against ``meta.json``; a mismatch raises naming the shard and the sample.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        device="cpu",
        dtype: torch.dtype | None = torch.float32,
    ):
        self.root = os.fspath(root)
        self.meta = read_meta(self.root)
        self.batch_size, self.dp_rank, self.dp_size = batch_size, dp_rank, dp_size
        self.seed, self.shuffle = seed, shuffle
        self.device, self.dtype = torch.device(device), dtype
        self.shards = sorted(
            os.path.join(self.root, f) for f in os.listdir(self.root) if f.startswith("shard-") and f.endswith(".tar")
        )
        if not self.shards:
            raise FileNotFoundError(f"no shard-*.tar files in {self.root!r}")
        self._samples = [(s, e) for s in self.shards for e in read_index(s)]
        self.samples_per_rank = len(self._samples) // dp_size
        if self.samples_per_rank < 1:
            raise ValueError(f"{len(self._samples)} samples in {self.root!r} cannot feed {dp_size} DP ranks")
        self.epoch, self.position = 0, 0
        self._order = self._epoch_order(0)
        self._handles: dict[str, object] = {}

    def _epoch_order(self, epoch: int) -> list[int]:
        n = len(self._samples)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch)).tolist()
        else:
            order = list(range(n))
        return order[self.dp_rank :: self.dp_size][: self.samples_per_rank]

    def __len__(self) -> int:
        """Batches per epoch on this rank (the loader itself never stops)."""
        return math.ceil(self.samples_per_rank / self.batch_size)

    def __iter__(self):
        return self

    def _check(self, shard: str, key: str, tensors: dict) -> None:
        for name, expected in (
            ("latent", tuple(self.meta.latent_shape)),
            ("text_embedding", (None, self.meta.text_hidden)),
        ):
            if name not in tensors:
                raise ValueError(f"latent shard {shard}: sample {key!r} has no {name!r}")
            shape = tuple(tensors[name].shape)
            if len(shape) != len(expected) or any(e is not None and e != s for s, e in zip(shape, expected)):
                want = "x".join("L" if e is None else str(e) for e in expected)
                raise ValueError(
                    f"latent shard {shard}: sample {key!r} has {name} of shape {list(shape)}, expected [{want}] "
                    f"(from {os.path.join(self.root, META_FILE)})"
                )
        if tensors["text_embedding"].shape[0] > self.meta.text_max_length:
            raise ValueError(
                f"latent shard {shard}: sample {key!r} has {tensors['text_embedding'].shape[0]} text tokens "
                f"> text_max_length {self.meta.text_max_length}"
            )

    def _load(self, i: int) -> tuple[dict, dict]:
        shard, entry = self._samples[i]
        handle = self._handles.get(shard)
        if handle is None:
            if len(self._handles) >= 16:  # bound open files
                self._handles.pop(next(iter(self._handles))).close()
            handle = self._handles[shard] = open(shard, "rb")
        tensors, info = read_sample(shard, entry, handle)
        self._check(shard, entry["key"], tensors)
        return tensors, info

    def __next__(self) -> dict:
        latents, texts, lengths, captions, keys = [], [], [], [], []
        for _ in range(self.batch_size):
            if self.position >= len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._epoch_order(self.epoch)
            tensors, info = self._load(self._order[self.position])
            self.position += 1
            latents.append(tensors["latent"])
            texts.append(tensors["text_embedding"])
            lengths.append(tensors["text_embedding"].shape[0])
            captions.append(info.get("caption", ""))
            keys.append(info.get("key", ""))
        dtype = self.dtype
        text = torch.zeros(len(texts), self.meta.text_max_length, self.meta.text_hidden, dtype=dtype or texts[0].dtype)
        for i, t in enumerate(texts):
            text[i, : t.shape[0]] = t
        latent = torch.stack(latents)
        return {
            "latent": (latent.to(dtype) if dtype else latent).to(self.device),
            "text_embedding": text.to(self.device),
            "text_length": torch.tensor(lengths, dtype=torch.int64),
            "caption": captions,
            "key": keys,
        }

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "num_samples": len(self._samples)}

    def load_state_dict(self, state: dict) -> None:
        if state["num_samples"] != len(self._samples):
            raise ValueError(
                f"latent loader state is for {state['num_samples']} samples, {self.root!r} has {len(self._samples)}"
            )
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._epoch_order(self.epoch)

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()


def latent_loader(root: str | os.PathLike, *, batch_size: int, dp_rank: int = 0, dp_size: int = 1, seed: int = 0,
                  **options) -> LatentLoader:
    """Batches of precomputed latents + text embeddings from a shard folder (see :class:`LatentLoader`)."""
    return LatentLoader(root, batch_size=batch_size, dp_rank=dp_rank, dp_size=dp_size, seed=seed, **options)
