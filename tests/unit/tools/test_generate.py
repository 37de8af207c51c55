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
    (["--teacher-steps", "0", "--upscale", "0"], "--teacher-steps must be >= 1, got 0; --upscale must be >= 1, got 0"),
])
def test_bad_arguments_are_one_line_before_any_work(tmp_path, args, expected):
    assert expected in fails(["--checkpoint", str(tmp_path / "absent"), "--out", str(tmp_path / "out"), *args])
    assert not (tmp_path / "out").exists()


def test_missing_checkpoint_names_it(tmp_path):
    assert fails(["--checkpoint", str(tmp_path / "absent")]) == f"error: --checkpoint {tmp_path / 'absent'} does not exist"
    assert f"--teacher {tmp_path / 'nope'} does not exist" in fails(["--checkpoint", str(tmp_path / "absent"),
                                                                     "--teacher", str(tmp_path / "nope")])


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
    timings = json.loads((tmp_path / "samples" / "timings.json").read_text())
    assert set(timings["steps"]) == {"1", "2"} and timings["teacher"] is None
    # the tiny model samples with the tiny default's intermediate times
    assert timings["mid_times"] == [0.5, 0.25, 0.1]


def test_grid_is_the_labeled_evaluation_grid_with_a_teacher_row(tmp_path):
    """grid.png is `labeled_grid` of exactly the videos sampled: the teacher's multi-step row, then the steps."""
    import numpy as np
    from PIL import Image

    from megatron_rcm.data import shapes
    from megatron_rcm.diffusion import TrigFlowWrapper, student_sample, teacher_sample
    from megatron_rcm.models.loading import ARCHITECTURES, build_model
    from megatron_rcm.training.config import TINY_SHAPES_DATA, TINY_SHAPES_MODEL
    from megatron_rcm.training.evaluation import labeled_grid

    def checkpoint(folder, seed):
        net = build_model(ARCHITECTURES["wan"], TINY_SHAPES_MODEL, torch.float32)
        g = torch.Generator().manual_seed(seed)
        ema = {k: torch.randn(p.shape, generator=g) * 0.1 for k, p in net.named_parameters()}
        write_training_checkpoint(folder, 10, TINY_SHAPES_MODEL, {f"ema.shadow.{k}": v for k, v in ema.items()}, {})
        net.load_state_dict(ema)
        return TrigFlowWrapper(net.eval(), 1000.0)

    student, teacher = checkpoint(tmp_path / "student", 0), checkpoint(tmp_path / "teacher", 1)
    try:
        generate.main(["--checkpoint", str(tmp_path / "student"), "--teacher", str(tmp_path / "teacher"),
                       "--teacher-steps", "3", "--steps", "1", "4", "--num-prompts", "3", "--out",
                       str(tmp_path / "s")])
    finally:
        destroy_parallel()
    prompts = (tmp_path / "s" / "prompts.txt").read_text().split("\n")[:-1]
    assert prompts == shapes.eval_prompts(3)
    text = shapes.ShapesTextEncoder(dim=TINY_SHAPES_MODEL.text_dim).encode(prompts)
    noise = torch.randn((3, 3, TINY_SHAPES_DATA.frames, TINY_SHAPES_DATA.size, TINY_SHAPES_DATA.size),
                        generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    from megatron_rcm.parallel import initialize_parallel

    initialize_parallel()
    with torch.no_grad():
        rows = {"teacher 3 steps": teacher_sample(teacher, noise, text, 3, "unipc", 1.0, 3.0, torch.zeros_like(text))}
        for n in (1, 4):
            rows[f"{n} step{'s' if n > 1 else ''}"] = student_sample(
                student, noise, text, n, 80.0, [0.5, 0.25, 0.1], torch.Generator().manual_seed(n))
    destroy_parallel()
    expected = np.asarray(labeled_grid({k: v.float() for k, v in rows.items()}, prompts, upscale=4))
    got = np.asarray(Image.open(tmp_path / "s" / "grid.png"))
    assert got.shape == expected.shape and got.shape[0] > 3 * 16 * 4 and got.shape[1] > 3 * 3 * 16 * 4
    assert np.array_equal(got, expected)
    assert not torch.equal(rows["teacher 3 steps"], rows["4 steps"])
    assert json.loads((tmp_path / "s" / "timings.json").read_text())["teacher"]["steps"] == 3
