"""Data: DALI video pipelines, precomputed-latent shards, synthetic data.

DALI is an optional dependency (extra ``dali``); it is imported only when a video pipeline is built.
"""

from .manifest import ManifestEntry, read_manifest, write_manifest
from .sources import DataConfig, EncodedVideoLoader, build_data_loader
from .shards import LatentLoader, ShardMeta, latent_loader, read_meta, write_meta, write_shard
from .video import RESOLUTION_BUCKETS, NoUsableVideos, VideoLoader, VideoLoaderConfig, video_loader

__all__ = [
    "DataConfig",
    "EncodedVideoLoader",
    "build_data_loader",
    "LatentLoader",
    "ManifestEntry",
    "NoUsableVideos",
    "RESOLUTION_BUCKETS",
    "ShardMeta",
    "VideoLoader",
    "VideoLoaderConfig",
    "latent_loader",
    "read_manifest",
    "read_meta",
    "video_loader",
    "write_manifest",
    "write_meta",
    "write_shard",
]
