"""tools/toy_rcm.py: identical results for identical arguments, and the mean / std summary over seeds."""

import json

import pytest
import torch

from conftest import load_script

SHORT = ["--teacher-iters", "60", "--student-steps", "8", "--batch", "64", "--eval-samples", "300", "--warmup", "3",
         "--student-update-freq", "2", "--threads", "1"]


@pytest.fixture(scope="module")
def toy():
    return load_script("tools/toy_rcm.py")


def test_same_arguments_give_the_same_json_and_the_summary_is_over_seeds(toy, tmp_path, capsys):
    a = toy.main([*SHORT, "--seeds", "2", "--jobs", "1", "--out", str(tmp_path / "a.json")])
    b = toy.main([*SHORT, "--seeds", "2", "--jobs", "2", "--out", str(tmp_path / "b.json")])  # seeds in processes
    capsys.readouterr()
    assert (tmp_path / "a.json").read_text() == (tmp_path / "b.json").read_text()
    assert json.loads((tmp_path / "a.json").read_text()) == a == b
    assert sorted(a["seeds"]) == ["0", "1"]
    # different seeds: different teachers and students
    assert a["seeds"]["0"]["teacher"]["euler-100"] != a["seeds"]["1"]["teacher"]["euler-100"]
    for name in ("sCM", "DMD", "rCM (lambda=0.01)"):
        assert name in a["summary"]["students"]
        for steps in ("1-step", "2-step", "4-step"):
            got = a["summary"]["students"][name][steps]["sw2"]
            values = torch.tensor([a["seeds"][s]["students"][name][steps]["sw2"] for s in ("0", "1")], dtype=torch.float64)
            assert got["mean"] == pytest.approx(values.mean().item(), abs=1e-4)
            assert got["std"] == pytest.approx(values.std(unbiased=False).item(), abs=1e-4)
    assert a["seeds"]["0"]["students"]["rCM (lambda=0.01)"]["config"]["dmd_weight_mode"] == "per_sample"


def test_a_different_first_seed_changes_the_result(toy, capsys):
    a = toy.main([*SHORT, "--seeds", "1", "--methods", "teacher"])
    b = toy.main([*SHORT, "--seeds", "1", "--methods", "teacher", "--seed", "1"])
    capsys.readouterr()
    assert a["seeds"]["0"]["teacher"] != b["seeds"]["1"]["teacher"]
    assert b["seeds"]["1"]["teacher"] == toy.main([*SHORT, "--seeds", "2", "--methods", "teacher"])["seeds"]["1"]["teacher"]


def test_a_method_draws_the_same_numbers_whichever_methods_run_beside_it(toy, capsys):
    both = toy.main([*SHORT, "--seeds", "1", "--methods", "scm", "rcm"])
    alone = toy.main([*SHORT, "--seeds", "1", "--methods", "rcm"])
    capsys.readouterr()
    name = "rCM (lambda=0.01)"
    assert alone["seeds"]["0"]["students"][name] == both["seeds"]["0"]["students"][name]
    assert both["seeds"]["0"]["students"]["sCM"]["1-step"] != both["seeds"]["0"]["students"][name]["1-step"]
