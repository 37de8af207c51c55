"""The training config tree: YAML files, dotted overrides, unknown keys and wrong types are errors."""

import dataclasses
import glob
import os

import pytest
import yaml

from megatron_rcm.training.config import ConfigError, TrainingConfig, dump_config, load_config, to_dict

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "..", "examples", "configs")


def test_defaults_are_the_shipped_tiny_yaml():
    assert load_config(os.path.join(CONFIGS, "shapes-tiny.yaml")) == TrainingConfig()


@pytest.mark.parametrize("name", ["wan2.1-t2v-1.3b-480p", "wan2.1-t2v-14b-480p", "wan2.1-t2v-14b-720p"])
def test_wan_configs_carry_the_paper_hyper_parameters(name):
    c = load_config(os.path.join(CONFIGS, f"{name}.yaml"))
    big = "14b" in name
    assert c.model.preset == ("wan2.1-t2v-14b" if big else "wan2.1-t2v-1.3b")
    assert c.model.params_dtype == "bfloat16"
    assert c.training.global_batch_size == (64 if big else 256)
    assert c.training.train_iters == 10000
    assert (c.optimizer.student_lr, c.optimizer.critic_lr) == ((1e-6, 1e-7) if big else (2e-6, 4e-7))
    assert (c.optimizer.adam_beta1, c.optimizer.adam_beta2, c.optimizer.weight_decay) == (0.0, 0.999, 0.01)
    assert c.optimizer.clip_grad == 0.0 and c.optimizer.lr_warmup_iters == 100
    assert c.rcm.student_update_freq == (10 if big else 5)
    assert (c.rcm.dmd_weight, c.rcm.guidance, c.rcm.p_std) == (0.01, 5.0, 1.6)
    assert c.rcm.ema_sigma_rel == 0.05


def test_every_shipped_yaml_loads():
    files = glob.glob(os.path.join(CONFIGS, "*.yaml"))
    assert len(files) >= 4
    for f in files:
        load_config(f)


def test_overrides_parse_types_and_nest():
    c = load_config(None, ["training.train_iters=7", "rcm.student_mid_times=[1.5, 1.4, 1.0]", "run_dir=/x",
                           "logging.tensorboard=false", "optimizer.student_lr=3e-5", "training.nan_iterations=[2,3]"])
    assert c.training.train_iters == 7 and c.run_dir == "/x" and c.logging.tensorboard is False
    assert c.rcm.student_mid_times == (1.5, 1.4, 1.0) and c.training.nan_iterations == (2, 3)
    assert c.optimizer.student_lr == 3e-5


@pytest.mark.parametrize("override, message", [
    ("rcm.no_such_key=1", "unknown config key(s) ['rcm.no_such_key']"),
    ("nosection.x=1", "'nosection' is not a config section"),
    ("training.train_iters=abc", "training.train_iters: expected an integer"),
    ("rcm.rollout_steps_sampling=random", "rollout_steps_sampling"),
    ("training.train_iters", "not of the form"),
    ("logging.pass_timers=wall", "logging.pass_timers must be events or sync, got 'wall'"),
])
def test_bad_overrides_are_errors(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)


def test_unknown_key_in_a_file_is_an_error(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("training:\n  train_iter: 5\n")
    with pytest.raises(ConfigError, match="unknown config key 'training.train_iter'"):
        load_config(str(f))


def test_dump_round_trips(tmp_path):
    c = load_config(None, ["training.train_iters=9", "rcm.guidance=2.5"])
    f = tmp_path / "c.yaml"
    f.write_text(dump_config(c))
    assert load_config(str(f)) == c
    assert yaml.safe_load(dump_config(c)) == to_dict(c)


def test_help_lists_every_key_with_type_and_default(capsys):
    import dataclasses

    import yaml

    from megatron_rcm.training.config import TrainingConfig, config_help, field_docs

    def leaves(node, prefix=""):  # the defaults of the tree (a section's default factory, e.g. tiny_rcm)
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            if dataclasses.is_dataclass(value):
                yield from leaves(value, f"{prefix}{f.name}.")
            else:
                yield f"{prefix}{f.name}", value

    text = config_help()
    keys = list(leaves(TrainingConfig()))
    assert len(keys) > 50
    for key, default in keys:
        plain = list(default) if isinstance(default, tuple) else default
        shown = yaml.safe_dump(plain, default_flow_style=True).strip().removesuffix("...").strip()
        assert f"  {key} (" in text and f"default: {shown})" in text.split(f"  {key} (", 1)[1].split("\n")[0], key
    doc = field_docs(type(TrainingConfig().model))["teacher"]
    assert " ".join(doc.split()[:5]) in " ".join(text.split())


def test_print_config_round_trips(tmp_path, capsys):
    from megatron_rcm.cli import load
    from megatron_rcm.training.config import load_config

    overrides = ["training.train_iters=7", "model.params_dtype=bf16", "optimizer.student_lr=3e-5", "parallel.pipeline_layers=[2, 1]"]
    load("train").main(["--print-config", *overrides])
    path = tmp_path / "c.yaml"
    path.write_text(capsys.readouterr().out)
    assert load_config(str(path)) == load_config(None, overrides)
    assert load_config(str(path)).model.params_dtype == "bfloat16"


def test_kernels_section_sets_the_switches_and_the_environment_overrides(monkeypatch):
    from megatron_rcm.models.fusion import switch
    from megatron_rcm.training.config import KernelsConfig, apply_kernels_config

    # a private copy of the environment: what apply_kernels_config exports must not reach later tests
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if not k.startswith("RCM_")})
    os.environ["RCM_GELU_EPILOGUE"] = "1"  # set by the user: the config must not change it
    apply_kernels_config(load_config(None, ["kernels.fusion=false", "kernels.gelu_epilogue=false",
                                            "kernels.attention_backend=math"]).kernels)
    assert not switch("RCM_FUSION") and switch("RCM_QKV_KERNEL") and switch("RCM_GELU_EPILOGUE")
    assert os.environ["RCM_ATTENTION_BACKEND"] == "math"
    assert "RCM_JVP_KERNEL_CONFIG" not in os.environ  # empty key: the kernel's own rule
    # every key is read under its RCM_ name by the package or the kernels
    repo = os.path.join(CONFIGS, "..", "..")
    files = glob.glob(os.path.join(repo, "megatron_rcm", "**", "*.py"), recursive=True)
    sources = "".join(open(p).read() for p in files + glob.glob(os.path.join(repo, "rcm_kernels", "*.py")))
    for f in dataclasses.fields(KernelsConfig):
        assert f'"RCM_{f.name.upper()}"' in sources, f.name


def test_a_removed_key_says_what_to_do():
    with pytest.raises(ConfigError, match="rcm.timestep_scale: delete it; the network's own config"):
        load_config(None, ["rcm.timestep_scale=1000.0"])
