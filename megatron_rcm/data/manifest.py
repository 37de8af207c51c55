"""JSONL video manifests: one video and its caption per line.

Each line is a JSON object::

    {"path": "clips/0001.mp4", "caption": "a red fox runs through snow", "fps": 24, "num_frames": 121}

``path`` is resolved against the manifest's folder when it is relative. The caption is either inline
(``caption``) or in a text file (``caption_path``, resolved the same way). ``fps`` and ``num_frames`` are
optional: a known frame count saves probing the file for its length.
"""

import json
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class ManifestEntry:
    """One video of a manifest."""

    index: int
    """Row of the manifest (0-based, blank lines not counted); the stable id of the video."""

    path: str
    """Absolute path of the video file."""

    caption: str
    """The video's caption."""

    fps: float | None = None
    """Frame rate, when the manifest gives it."""

    num_frames: int | None = None
    """Number of frames, when the manifest gives it (then the loader does not count them)."""


_PATH_KEYS = ("path", "video")
_CAPTION_KEYS = ("caption", "text", "prompt")


def _first(record: dict, keys: tuple[str, ...]):
    for key in keys:
        if key in record:
            return record[key]
    return None


def read_manifest(manifest: str | os.PathLike) -> list[ManifestEntry]:
    """Parse a JSONL manifest.

    Raises:
        FileNotFoundError: the manifest or a ``caption_path`` file does not exist.
        ValueError: a line is not JSON, or has no path or no caption.
    """
    manifest = os.fspath(manifest)
    if not os.path.isfile(manifest):
        raise FileNotFoundError(f"video manifest not found: {manifest!r}")
    root = os.path.dirname(os.path.abspath(manifest))
    entries: list[ManifestEntry] = []
    with open(manifest, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            where = f"{manifest}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not a JSON object ({e})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
            path = _first(record, _PATH_KEYS)
            if not path:
                raise ValueError(f"{where}: no video path (one of the keys {_PATH_KEYS})")
            caption = _first(record, _CAPTION_KEYS)
            if caption is None and record.get("caption_path"):
                caption_path = os.path.join(root, record["caption_path"])
                if not os.path.isfile(caption_path):
                    raise FileNotFoundError(f"{where}: caption file not found: {caption_path!r}")
                with open(caption_path, encoding="utf-8") as cf:
                    caption = cf.read().strip()
            if caption is None:
                raise ValueError(
                    f"{where}: no caption for {path!r} (give one of the keys {_CAPTION_KEYS} or 'caption_path')"
                )
            num_frames = record.get("num_frames", record.get("frames"))
            fps = record.get("fps")
            entries.append(
                ManifestEntry(
                    index=len(entries),
                    path=os.path.join(root, path),
                    caption=str(caption),
                    fps=float(fps) if fps is not None else None,
                    num_frames=int(num_frames) if num_frames is not None else None,
                )
            )
    if not entries:
        raise ValueError(f"video manifest {manifest!r} lists no videos")
    return entries


def write_manifest(path: str | os.PathLike, records: list[dict]) -> None:
    """Write ``records`` (dicts with at least ``path`` and ``caption``) as a JSONL manifest."""
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
