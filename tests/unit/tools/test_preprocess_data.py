"""tools/preprocess_data.py: its help, and two concurrent ranks under torchrun writing disjoint shards of one folder
with the values of the in-process run."""

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("nvidia.dali")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data"))
from _preprocessed import FRAMES, H, W, make_data, run  # noqa: E402

from megatron_rcm.data import latent_loader  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("pre"))


def test_preprocess_help_explains():
    out = subprocess.run([sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"), "--help"],
                         capture_output=True, text=True, check=True).stdout
    for words in ("--manifest", "torchrun", "resume", "skipped-rank", "480p = 832x480"):
        assert words in out


def test_preprocess_cli_under_torchrun(data, tmp_path):
    """Two concurrent ranks started by torchrun write disjoint shards into one folder."""
    out = tmp_path / "shards"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           os.path.join(REPO, "tools", "preprocess_data.py"), "--manifest", str(data / "manifest.jsonl"),
           "--model", str(data / "wan"), "--output", str(out), "--frames", str(FRAMES), "--height", str(H),
           "--width", str(W), "--samples-per-shard", "2", "--dtype", "float32", "--latent-dtype", "float32",
           "--max-text-length", "16", "--device", "cpu", "--no-progress"]
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 0/2: {'written': 2, 'existing': 0, 'samples': 4, 'skipped': 0}" in result.stderr
    assert "rank 1/2: {'written': 1, 'existing': 0, 'samples': 1, 'skipped': 1}" in result.stderr
    batch = next(latent_loader(out, batch_size=5, shuffle=False))
    assert batch["key"] == ["000000000", "000000001", "000000003", "000000004", "000000005"]
    # The same values as the in-process run (the CLI loads the same tiny models from the same folder).
    reference = tmp_path / "reference"
    run(data, reference)
    torch.testing.assert_close(batch["latent"], next(latent_loader(reference, batch_size=5, shuffle=False))["latent"])
