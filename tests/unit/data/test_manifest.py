"""data/manifest.py: JSONL video manifests written and read back (key spellings, captions in files, relative paths
resolved against the manifest's folder), and every malformed line named by file and line."""

import json
import os

import pytest

from megatron_rcm.data.manifest import ManifestEntry, read_manifest, write_manifest


def test_round_trip_with_every_spelling(tmp_path):
    (tmp_path / "caps").mkdir()
    (tmp_path / "caps" / "c.txt").write_text("  a caption from a file \n")
    records = [
        {"path": "clips/a.webm", "caption": "ein Fuchs läuft durch den Schnee", "fps": 24, "num_frames": 121},
        {"video": "/data/b.mp4", "text": "second"},
        {"path": "c.webm", "caption_path": "caps/c.txt", "frames": 9},
        {"path": "d.webm", "prompt": "fourth", "fps": 12.5},
    ]
    manifest = tmp_path / "m.jsonl"
    write_manifest(manifest, records)
    assert "läuft" in manifest.read_text(encoding="utf-8")  # written as UTF-8, not escaped
    with open(manifest, "a") as f:
        f.write("\n   \n")  # blank lines are not rows
    root = str(tmp_path)
    assert read_manifest(manifest) == [
        ManifestEntry(0, os.path.join(root, "clips/a.webm"), "ein Fuchs läuft durch den Schnee", 24.0, 121),
        ManifestEntry(1, "/data/b.mp4", "second"),
        ManifestEntry(2, os.path.join(root, "c.webm"), "a caption from a file", None, 9),
        ManifestEntry(3, os.path.join(root, "d.webm"), "fourth", 12.5, None),
    ]


@pytest.mark.parametrize("line,error,message", [
    ("{not json", ValueError, r"m\.jsonl:2: not a JSON object"),
    ("[1, 2]", ValueError, r"m\.jsonl:2: expected a JSON object, got list"),
    ('{"caption": "no path"}', ValueError, r"m\.jsonl:2: no video path \(one of the keys \('path', 'video'\)\)"),
    ('{"path": "x.webm"}', ValueError, r"m\.jsonl:2: no caption for 'x\.webm'"),
    ('{"path": "x.webm", "caption_path": "gone.txt"}', FileNotFoundError, r"m\.jsonl:2: caption file not found"),
])
def test_a_bad_line_is_named(tmp_path, line, error, message):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"path": "ok.webm", "caption": "ok"}) + "\n" + line + "\n")
    with pytest.raises(error, match=message):
        read_manifest(manifest)


def test_missing_or_empty_manifest(tmp_path):
    with pytest.raises(FileNotFoundError, match="video manifest not found"):
        read_manifest(tmp_path / "absent.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="lists no videos"):
        read_manifest(tmp_path / "empty.jsonl")
