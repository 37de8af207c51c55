"""examples/generate.py: bad arguments and unsafe or damaged checkpoints are one line and exit non-zero; a
mid-training checkpoint samples on the CPU."""

import json
import os
import pickle

import pytest
import torch
from conftest import load_script, write_training_checkpoint

from megatron_rcm.parallel import destroy_parallel

generate = load_script("examples/generate.py")


def fails(argv) -> str:
    """The one-line message generate.py exits with."""
    try:
        with pytest.raises(SystemExit) as e:
            generate.main(argv)
    finally:
        destroy_parallel()
    message = str(e.value.code)
    assert e.value.code not in (0, None) and len(message.splitlines()) == 1 and message.startswith("error: ")
    return message


@pytest.mark.parametrize("args,expected", [
    (["--num-prompts", "0"], "--num-prompts must be >= 1, got 0"),
    (["--prompts"], "--prompts needs at least one non-empty prompt"),
    (["--steps", "5"], "--steps must be in 1..4"),
    (["--mid-times", "1.0", "1.3"], "--mid-times must be decreasing"),
    (["--sigma-max", "0"], "--sigma-max must be > 0"),
    (["--fps", "0", "--frames", "0"], "--fps must be >= 1, got 0; --frames must be >= 1, got 0"),
])
def test_bad_arguments_are_one_line_before_any_work(tmp_path, args, expected):
    assert expected in fails(["--checkpoint", str(tmp_path / "absent"), "--out", str(tmp_path / "out"), *args])
    assert not (tmp_path / "out").exists()


def test_missing_checkpoint_names_it(tmp_path):
    assert fails(["--checkpoint", str(tmp_path / "absent")]) == f"error: --checkpoint {tmp_path / 'absent'} does not exist"


def test_pickle_payloads_are_refused(tmp_path, payload):
    from megatron_rcm.training.config import TINY_SHAPES_MODEL

    marker = tmp_path / "pwned"
    bad = tmp_path / "rCM_student.pt"
    torch.save({"net.patch_embedding.weight": torch.zeros(64, 48), "net.x": payload(marker)}, bad)
    message = fails(["--checkpoint", str(bad), "--out", str(tmp_path / "out")])
    assert str(bad) in message and "refused" in message
    ckpt = write_training_checkpoint(tmp_path / "run", 5, TINY_SHAPES_MODEL, {"ema.shadow.head.bias": torch.zeros(48)},
                                     {})
    metadata = os.path.join(ckpt, "tensors", ".metadata")
    with open(metadata, "wb") as f:
        pickle.dump(payload(marker), f)
    assert metadata in fails(["--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "out")])
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_mid_training_checkpoint_samples_on_the_cpu(tmp_path):
    from megatron_rcm.models.loading import ARCHITECTURES, build_model
    from megatron_rcm.training.config import TINY_SHAPES_MODEL

    net = build_model(ARCHITECTURES["wan"], TINY_SHAPES_MODEL, torch.float32)
    g = torch.Generator().manual_seed(0)
    ema = {k: torch.randn(p.shape, generator=g) * 0.1 for k, p in net.named_parameters()}
    write_training_checkpoint(tmp_path / "run", 40, TINY_SHAPES_MODEL, {
        **{f"ema.shadow.{k}": v for k, v in ema.items()},
        **{f"student.model.{k}": v.detach() for k, v in net.named_parameters()}}, {})
    try:
        model, scale = generate.load_network(str(tmp_path / "run"), "ema", torch.float32)
    finally:
        destroy_parallel()
    assert scale == 1000.0
    for name, p in model.named_parameters():
        assert torch.equal(p, ema[name]), name
    generate.main(["--checkpoint", str(tmp_path / "run"), "--steps", "1", "2", "--num-prompts", "2", "--out",
                   str(tmp_path / "samples")])
    assert sorted(os.listdir(tmp_path / "samples")) == ["grid.png", "prompts.txt", "samples_1step.mp4",
                                                        "samples_2step.mp4", "timings.json"]
    assert set(json.loads((tmp_path / "samples" / "timings.json").read_text())["steps"]) == {"1", "2"}
