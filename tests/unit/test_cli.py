"""cli.py: the console entry points setup.py declares, each running its script (train, convert, generate)."""

import ast
import os

import pytest

from megatron_rcm import cli

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_setup_declares_the_three_commands():
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    eps = ast.literal_eval(next(k.value for k in call.keywords if k.arg == "entry_points"))
    scripts = dict(s.replace(" ", "").split("=") for s in eps["console_scripts"])
    assert scripts == {"megatron-rcm-train": "megatron_rcm.cli:train",
                       "megatron-rcm-convert": "megatron_rcm.cli:convert",
                       "megatron-rcm-generate": "megatron_rcm.cli:generate"}
    for target in scripts.values():
        assert callable(getattr(cli, target.split(":")[1]))


@pytest.mark.parametrize("command,text", [("train", "--print-config"), ("convert", "hf-to-mcore"),
                                          ("generate", "usage")])
def test_commands_run_the_scripts(command, text, capsys):
    with pytest.raises(SystemExit) as e:
        getattr(cli, command)(["--help"])
    assert e.value.code == 0
    assert text in capsys.readouterr().out


def test_train_print_config(capsys):
    assert cli.train(["--print-config", "training.train_iters=3"]) == 0
    assert "train_iters: 3" in capsys.readouterr().out
