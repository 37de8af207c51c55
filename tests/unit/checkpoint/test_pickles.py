"""checkpoint/pickles.py: a torch file we did not write loads when it holds tensors and plain containers only; one that
names another class is refused before anything in it runs."""

import pytest
import torch

from megatron_rcm.checkpoint.pickles import load_weights_only


class _Payload:
    """Unpickling this creates `marker`: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("zipfile", [True, False])
def test_tensors_and_containers_load(tmp_path, zipfile):
    data = {"w": torch.randn(3, 2, dtype=torch.float64), "meta": [1, 2.5, "x", None], "n": {"b": torch.arange(4)}}
    torch.save(data, tmp_path / "ok.pt", _use_new_zipfile_serialization=zipfile)  # legacy format: not memory-mapped
    got = load_weights_only(str(tmp_path / "ok.pt"))
    assert torch.equal(got["w"], data["w"]) and got["meta"] == data["meta"]
    assert torch.equal(got["n"]["b"], data["n"]["b"])


def test_a_payload_is_refused_naming_the_file(tmp_path):
    marker, path = tmp_path / "pwned", tmp_path / "bad.pt"
    torch.save({"w": torch.zeros(1), "x": _Payload(marker)}, path)
    with pytest.raises(ValueError, match=f"{path} was refused: not a plain tensor file"):
        load_weights_only(str(path))
    assert not marker.exists()


def test_a_missing_file_is_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"^{tmp_path / 'absent.pt'} does not exist$"):
        load_weights_only(str(tmp_path / "absent.pt"))
