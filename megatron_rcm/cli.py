"""Console entry points: `megatron-rcm-train`, `megatron-rcm-convert`, `megatron-rcm-generate`.

Each runs the `main()` of the repository script of the same job (examples/pretrain_rcm.py, tools/convert_checkpoint.py,
examples/generate.py), so the scripts and the commands are one code path. The scripts are found next to the
package: a checkout or an editable install (`pip install -e .`).
"""

import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPTS = {"train": "examples/pretrain_rcm.py", "convert": "tools/convert_checkpoint.py",
           "generate": "examples/generate.py"}
"""Command -> the script (relative to the repository) whose main() it runs."""


def load(command: str):
    """The script of `command` as a module (not run)."""
    path = os.path.join(ROOT, SCRIPTS[command])
    if not os.path.isfile(path):
        sys.exit(f"error: {SCRIPTS[command]} not found next to the megatron_rcm package; install the repository "
                 f"with `pip install -e .`")
    name = "megatron_rcm_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _run(command: str, argv=None):
    result = load(command).main(argv)
    return result if isinstance(result, int) else 0


def train(argv=None):
    return _run("train", argv)


def convert(argv=None):
    return _run("convert", argv)


def generate(argv=None):
    return _run("generate", argv)
