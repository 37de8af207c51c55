"""tools/convert_checkpoint.py on bad inputs: nothing unpickled beyond tensors, the source never replaced, one
line naming the file or argument; and a training checkpoint exported with its model card."""

import json
import os

import pytest
import torch
import yaml
from conftest import load_script, write_training_checkpoint

from megatron_rcm.models.loading import ARCHITECTURES, build_model, config_to_dict, save_megatron
from megatron_rcm.models.wan import PRESETS

convert = load_script("tools/convert_checkpoint.py")
TINY = PRESETS["wan-tiny"]


def run(capsys, *args):
    code = convert.main(list(args))
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A megatron-rcm checkpoint of a tiny Wan model, and a snapshot of its files."""
    path = tmp_path_factory.mktemp("src") / "mc"
    save_megatron(build_model(ARCHITECTURES["wan"], TINY, torch.float32), str(path))
    return path


def snapshot(path):
    return {os.path.relpath(os.path.join(d, f), path): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(path) for f in files}


@pytest.mark.parametrize("output", ["{src}", "{src}/", "{src}/../mc", "{link}", "{src}/inside", "{parent}"])
def test_output_that_is_inside_or_around_the_input_is_refused(capsys, source, tmp_path, output):
    link = tmp_path / "link"
    link.symlink_to(source, target_is_directory=True)
    before = snapshot(source)
    dst = output.format(src=source, link=link, parent=source.parent)
    code, err = run(capsys, "mcore-to-hf", "--model", "wan", "--transformer-only", "--overwrite", "--input",
                    str(source), "--output", dst)
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: ")
    assert any(w in err for w in ("is the input", "inside the input", "inside the output")), err
    assert snapshot(source) == before
    assert not [p for p in os.listdir(source.parent) if "incomplete" in p or ".old-" in p]


def test_overwrite_replaces_only_our_outputs(capsys, source, tmp_path):
    data = tmp_path / "notes"
    data.mkdir()
    (data / "thesis.txt").write_text("months of work")
    code, err = run(capsys, "mcore-to-hf", "--model", "wan", "--transformer-only", "--overwrite", "--input",
                    str(source), "--output", str(data))
    assert code == 2 and "not a checkpoint or diffusers folder" in err
    assert (data / "thesis.txt").read_text() == "months of work"
    out = tmp_path / "hf"
    assert run(capsys, "mcore-to-hf", "--model", "wan", "--transformer-only", "--input", str(source), "--output",
               str(out))[0] == 0
    first = snapshot(out)
    code, err = run(capsys, "mcore-to-hf", "--model", "wan", "--transformer-only", "--input", str(source),
                    "--output", str(out))
    assert code == 2 and "exists (pass --overwrite" in err and snapshot(out) == first
    # a failing replacement (bad sampler times reach no file) and a good one, which swaps in only when complete
    code, err = run(capsys, "mcore-to-hf", "--model", "wan", "--overwrite", "--mid-times", "1.0", "1.3", "--input",
                    str(source), "--output", str(out))
    assert code == 2 and "--mid-times" in err and snapshot(out) == first
    assert run(capsys, "mcore-to-hf", "--model", "wan", "--transformer-only", "--overwrite", "--dtype", "bf16",
               "--input", str(source), "--output", str(out))[0] == 0
    assert snapshot(out) != first and sorted(os.listdir(tmp_path)) == ["hf", "notes"]


def test_pickle_payload_is_refused(capsys, tmp_path, payload):
    marker = tmp_path / "pwned"
    bad = tmp_path / "rCM_student.pt"
    torch.save({"net.patch_embedding.weight": torch.zeros(24, 16), "net.x": payload(marker)}, bad)
    for command in ("hf-to-mcore", "mcore-to-hf"):
        code, err = run(capsys, command, "--model", "wan", "--input", str(bad), "--output", str(tmp_path / "out"))
        assert code == 2 and str(bad) in err and "refused" in err and len(err.splitlines()) == 1, err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_payload_in_a_training_checkpoint_is_refused(capsys, tmp_path, payload):
    """The distributed checkpoint's `.metadata` pickle replaced by one that would create a file."""
    import pickle

    net = build_model(ARCHITECTURES["wan"], TINY, torch.float32)
    ckpt = write_training_checkpoint(tmp_path / "run", 10, TINY, {f"ema.shadow.{k}": v.detach()
                                                                  for k, v in net.named_parameters()}, {})
    marker = tmp_path / "pwned"
    metadata = os.path.join(ckpt, "tensors", ".metadata")
    with open(metadata, "wb") as f:
        pickle.dump(payload(marker), f)
    for source in (tmp_path / "run", ckpt):
        code, err = run(capsys, "mcore-to-hf", "--model", "wan", "--input", str(source), "--output",
                        str(tmp_path / "out"))
        assert code == 2 and metadata in err and len(err.splitlines()) == 1, err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_missing_or_damaged_checkpoint_is_one_line(capsys, source, tmp_path):
    code, err = run(capsys, "mcore-to-hf", "--model", "wan", "--input", str(tmp_path / "absent"), "--output",
                    str(tmp_path / "out"))
    assert code == 2 and err == f"error: input {tmp_path / 'absent'} does not exist"
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for name, data in snapshot(source).items():
        os.makedirs(os.path.dirname(damaged / name), exist_ok=True)
        (damaged / name).write_bytes(data[: len(data) // 2] if name.endswith(".distcp") else data)
    code, err = run(capsys, "mcore-to-hf", "--model", "wan", "--transformer-only", "--input", str(damaged),
                    "--output", str(tmp_path / "out"))
    assert code == 2 and str(damaged) in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_training_checkpoint_exports_a_pipeline_with_its_card(capsys, tmp_path):
    """A training checkpoint: the EMA network, the run's sampler times and a card from its config.yaml."""
    from diffusers import WanTransformer3DModel

    net = build_model(ARCHITECTURES["wan"], TINY, torch.float32)
    ema = {k: v.detach() + 1.0 for k, v in net.named_parameters()}
    run_config = {"rcm": {"dmd_weight": 0.02, "scm_weight": 1.0, "sigma_max": 160.0, "student_mid_times": [1.4, 0.9]},
                  "model": {"teacher": "teachers/wan-tiny"}}
    write_training_checkpoint(tmp_path / "run", 600, TINY, {
        **{f"ema.shadow.{k}": v for k, v in ema.items()},
        **{f"student.model.{k}": v.detach() for k, v in net.named_parameters()}}, run_config,
        meta={"command": "torchrun --nproc_per_node=8 examples/pretrain_rcm.py --config wan.yaml"})
    out = tmp_path / "export"
    code, err = run(capsys, "mcore-to-hf", "--model", "wan", "--base-pipeline", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
                    "--input", str(tmp_path / "run"), "--output", str(out))
    assert code == 0, err
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert sched["sigma_max"] == 160.0 and sched["mid_times"] == [1.4, 0.9]
    card = (out / "README.md").read_text()
    for fact in ("Training iterations: 600", "lambda (DMD weight / sCM weight): 0.02", "teacher `teachers/wan-tiny`",
                 "Sampling steps: 1-3", "the EMA network", "convert_checkpoint.py mcore-to-hf",
                 "Trained with: `torchrun --nproc_per_node=8 examples/pretrain_rcm.py --config wan.yaml`"):
        assert fact in card, fact
    from megatron_rcm.checkpoint import wan as wan_keys

    expected = wan_keys.mcore_to_hf(ema, TINY.num_attention_heads)
    back = WanTransformer3DModel.from_pretrained(out / "transformer").state_dict()
    assert set(back) == set(expected) and all(torch.equal(back[k], v) for k, v in expected.items())
