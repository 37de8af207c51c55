"""Data: DALI video pipelines, precomputed-latent shards, synthetic data.

DALI is an optional dependency (extra ``dali``); it is imported only when a video pipeline is built.
"""

from .manifest import ManifestEntry, read_manifest, write_manifest
from .video import RESOLUTION_BUCKETS, VideoLoader, VideoLoaderConfig, video_loader

__all__ = [
    "ManifestEntry",
    "RESOLUTION_BUCKETS",
    "VideoLoader",
    "VideoLoaderConfig",
    "read_manifest",
    "video_loader",
    "write_manifest",
]
