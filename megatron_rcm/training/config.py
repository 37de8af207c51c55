"""The training configuration: one dataclass tree, YAML files, dotted command-line overrides.

    config = load_config("examples/configs/wan2.1-t2v-1.3b-480p.yaml", ["training.train_iters=20"])

Sections: `model`, `parallel`, `rcm` (the objective, `megatron_rcm.diffusion.RCMConfig`), `optimizer`,
`training`, `data`, `logging`, `checkpoint`, `kernels`. Unknown keys (in a file or an override) are errors. The
resolved tree is written next to every checkpoint (`config.yaml`).
"""

import dataclasses
import os
import typing
from dataclasses import dataclass, field

import yaml

from megatron_rcm.data.sources import DataConfig
from megatron_rcm.diffusion.config import RCMConfig
from megatron_rcm.models import get_preset

TINY_SHAPES_MODEL = get_preset("wan-shapes-tiny")[1]
"""The tiny Wan-architecture DiT of the CPU default (`megatron_rcm.models.PRESETS["wan-shapes-tiny"]`)."""

TINY_SHAPES_DATA = DataConfig().shapes()
"""The shapes set of the CPU default (the `data` section's defaults)."""


def tiny_rcm() -> RCMConfig:
    """The objective of the tiny default: the paper's lambda (0.01, scale-free `per_sample` form), a short tangent
    warm-up and more frequent student steps for ~600 student iterations, and the reference's time settings moved to
    this data's scale (per-element std ~0.37 instead of 1; docs/architecture.md, "Quality of the tiny default"):
    p_D shift 2 for 5 and p_G mean -0.8 + 0.5 ln 8 + ln 0.37 = -0.76. The sampler's intermediate times (0.5, 0.25,
    0.1) are lower than the same-signal-to-noise image of (1.3, 1.0, 0.6), which is (0.93, 0.52, 0.25): the student
    refines its one-step sample at low noise instead of regenerating it (docs/architecture.md, "Distillation
    quality"; benchmarks/RESULTS.md)."""
    return RCMConfig(dmd_weight=0.01, p_mean=-0.76, p_std=1.6, guidance=3.0, dmd_time_shift=2.0,
                     student_mid_times=(0.5, 0.25, 0.1), tangent_warmup=100, student_update_freq=2,
                     ema_sigma_rel=0.1)


@dataclass
class ModelConfig:
    """The four networks: `teacher` (frozen), `student` and `critic` (initialised from the teacher), `ema`."""

    preset: str = "wan-shapes-tiny"
    """Architecture preset: a name of `megatron_rcm.models.PRESETS` (the CPU default: `wan-shapes-tiny`). The
    teacher checkpoint must match it."""
    teacher: str = "examples/assets/shapes-teacher"
    """Teacher checkpoint: a diffusers folder, a pipeline folder, an original release or a megatron-rcm checkpoint.
    Empty: random weights (scale probes only)."""
    params_dtype: str = "float32"
    """dtype of the large layers of every network (`bfloat16` at scale); time embedding, modulation, norms and
    head stay fp32."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism inside each tensor-parallel group."""
    critic_from_teacher: bool = True
    """Initialise the critic (fake score) from the teacher (the paper's choice); else from the student."""
    activation_checkpointing: bool = False
    """Recompute each transformer block in the backward of the with-grad passes (student and critic)."""
    recompute_policy: typing.Literal["full", "selective", "selective_self"] = "full"
    """With activation checkpointing, what each block keeps for its backward (training/recompute.py): `full` keeps
    its input and re-runs the whole block, attention included; `selective` keeps its input and its self- and
    cross-attention outputs with their log-sum-exps (SDPA / FlashAttention in half precision), and re-runs the rest
    (projections, norms, RoPE, MLP) but no attention forward; `selective_self` keeps self-attention's only (cross-
    attention over the text tokens is cheap to re-run). Same numbers; more memory, less time."""


@dataclass
class ParallelConfig:
    """Model-parallel sizes; data-parallel size = world size / (TP x CP x PP)."""

    tensor_model_parallel_size: int = 1
    context_parallel_size: int = 1
    """Split every sample's tokens over this many ranks (latents stay sharded for the whole rCM iteration)."""
    cp_comm: str = "auto"
    """How self-attention crosses the context-parallel group: `a2a` (Ulysses; CP must divide the heads of a tensor-
    parallel rank), `ring` (any head count), or `auto` (a2a where it divides, else ring)."""
    pipeline_model_parallel_size: int = 1
    pipeline_layers: tuple[int, ...] = ()
    """Blocks per pipeline stage, first stage first (e.g. `[2, 1]`; must sum to the model's blocks); empty:
    balanced (the first stages take one more block where the pipeline size does not divide the count)."""
    pp_schedule: str = "auto"
    """What drives the micro-batches through the stages: `megatron` (megatron-core's `get_forward_backward_func`,
    1F1B; CUDA + NCCL), `gloo` (the same order of work over gloo P2P: the CPU path), `auto` (megatron on CUDA with
    NCCL, else gloo; without pipeline parallelism none: micro-batches one after another). Named explicitly, it
    also drives a PP=1 run (a check of the schedule on one device)."""
    backend: str = "auto"
    """`auto` (NCCL with CUDA, else gloo), `nccl` or `gloo`."""
    grad_sync: str = "auto"
    """Gradient synchronisation and optimizer: `megatron` (megatron-core DDP + distributed optimizer; CUDA only),
    `torch` (plain all-reduce over the DP group + torch AdamW; any device), `auto` (megatron on CUDA)."""
    use_distributed_optimizer: bool = True
    """With `megatron` grad sync: shard optimizer state over the DP group (ZeRO-1)."""


@dataclass
class OptimizerConfig:
    """Adam for the student and the critic (each with its own optimizer and LR schedule)."""

    student_lr: float = 5e-5
    """Tiny default; the paper: 2e-6 (Wan 1.3B), 1e-6 (14B)."""
    critic_lr: float = 1e-4
    """Tiny default; the paper: 4e-7 (Wan 1.3B), 1e-7 (14B)."""
    adam_beta1: float = 0.0
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    weight_decay: float = 0.01
    lr_warmup_iters: int = 20
    """Linear LR warm-up, counted in each network's own steps."""
    clip_grad: float = 0.0
    """Gradient-norm clipping; 0 = off (the paper: no clipping is crucial)."""


@dataclass
class TrainingLoopConfig:
    """Iterations, batches, seeds."""

    train_iters: int = 1200
    global_batch_size: int = 16
    """Samples per iteration over all DP ranks; must be divisible by micro_batch_size x DP size."""
    micro_batch_size: int = 8
    seed: int = 1234
    """Base seed; every random draw of iteration i on DP rank d comes from a CPU generator seeded by (seed, i, d)
    (the same numbers on CPU and GPU)."""
    threads: int = 1
    """torch threads per process on CPU (0: leave torch's default)."""
    nan_iterations: tuple[int, ...] = ()
    """Fault injection for tests: the loss of these iterations is made NaN (the step must be skipped)."""
    resume: bool = True
    """Continue from `<run_dir>/checkpoints/latest`. false: start from the teacher; refused when the run directory
    already holds checkpoints (use a new run_dir)."""
    resume_from: str = ""
    """Continue from this checkpoint directory instead of the one `latest` names."""
    resume_fallback: bool = True
    """When the newest checkpoint is damaged (a truncated or missing file), resume from the newest complete older one
    (and say so); false: refuse."""
    allow_config_change: bool = False
    """Accept (and log) a resume with a different micro-batch size, dtype or model than the checkpoint's."""
    skip_memory_check: bool = False
    """Start even when the memory estimate (`tools/estimate_memory.py`) says the layout does not fit the GPUs."""


@dataclass
class LoggingConfig:
    """Console, TensorBoard and sample evaluation."""

    log_interval: int = 10
    tensorboard: bool = True
    eval_interval: int = 200
    """Every this many iterations (and at the first and last): 1/2/4-step samples of the EMA and the student,
    prompt-alignment score and feature distance against the teacher's multi-step samples. 0 = off."""
    eval_samples: int = 192
    """Samples per evaluation: each prompt at least twice in a row with different noise (192: all 48 prompts four
    times), so that the spread over noise of each prompt is measured."""
    eval_student_steps: tuple[int, ...] = (1, 2, 4)
    teacher_eval_steps: int = 32
    """Steps of the teacher's reference sampler."""
    teacher_solver: str = "unipc"
    teacher_shift: float = 1.0
    classifier: str = "examples/assets/shapes-classifier.pt"
    """Prompt-alignment classifier of the shapes set (made by examples/pretrain_flow.py)."""
    pass_timers: str = "events"
    """Per-pass times (`time/<pass>`) on CUDA: `events` (GPU time between CUDA events, read once per step; no stall
    between passes) or `sync` (synchronise around every pass and take the wall time)."""


@dataclass
class CheckpointConfig:
    """Training checkpoints (`<run_dir>/checkpoints/iter_XXXXXXX`, `latest` pointer)."""

    save_interval: int = 400
    """0 = only at the end and on a signal."""
    keep_last: int = 2
    """Older checkpoints are deleted (0 = keep all)."""
    save_on_signal: bool = True
    """Save and exit on SIGTERM / SIGUSR1 (Slurm pre-emption)."""
    save_at_end: bool = True
    exit_after_iteration: int = 0
    """Test hook: stop (without saving) after this iteration, as a crash would. 0 = off."""
    exit_during_export: bool = False
    """Test hook: die (exit status 1) once the final EMA export has begun, as a kill would."""


@dataclass
class KernelsConfig:
    """Which CUDA kernels and fusions the DiT uses (CPU runs use none of them). Each key has an environment variable,
    `RCM_<KEY>` in capitals (`RCM_ATTENTION_BACKEND`, `RCM_FUSION`, ...), that overrides it when set, so that a timing
    run can flip one without a config; `apply_kernels_config` exports the keys the environment does not set, for
    the modules that read them (models/attention.py, models/fusion.py, models/blocks.py, rcm_kernels/)."""

    attention_backend: str = "auto"
    """Plain (non-JVP) half-precision attention on CUDA: `auto` (FlashAttention-3 on Hopper when installed, else SDPA
    with cuDNN first), `sdpa`, `cudnn`, `flash`, `efficient`, `math`, `flash_attn`, `flash_attn_3`."""
    fusion: bool = True
    """torch.compile the elementwise regions between GEMMs (norms, modulations, RoPE, gates)."""
    residual_norm_fusion: bool = True
    """Join a residual update and the norm after it into one compiled region."""
    fusion_tuning: bool = False
    """Autotune the compiled regions' launch parameters (slower first call)."""
    qkv_kernel: bool = True
    """The Triton kernel for q/k RMS norm + RoPE of self-attention."""
    gelu_epilogue: bool = True
    """GELU fused into the MLP's first GEMM epilogue."""
    jvp_kernel_config: str = ""
    """Launch configuration of the FlashAttention JVP kernel (`rcm_kernels/flash_attention_jvp.py` `parse_config`
    syntax); empty: the built-in rule."""
    jvp_warp_specialized: bool = True
    """Use the warp-specialised Hopper JVP kernel on sm_90 (false: the portable kernel)."""


def apply_kernels_config(config: KernelsConfig) -> None:
    """Export `config` as the `RCM_*` variables the kernel modules read, leaving any variable already set (the
    environment overrides the config). Call before the first forward."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if value in ("auto", ""):  # the modules' own default
            continue
        os.environ.setdefault("RCM_" + f.name.upper(), ("1" if value else "0") if isinstance(value, bool) else value)


@dataclass
class TrainingConfig:
    """Everything one rCM run needs. The defaults are the tiny CPU default (examples/configs/shapes-tiny.yaml)."""

    run_dir: str = "runs/rcm-shapes-tiny"
    """Checkpoints, TensorBoard events, the resolved config. Re-running into the same folder resumes."""
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    rcm: RCMConfig = field(default_factory=tiny_rcm)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingLoopConfig = field(default_factory=TrainingLoopConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)


# ---------------------------------------------------------------------------------------------------------------
# dict / YAML / overrides
# ---------------------------------------------------------------------------------------------------------------


class ConfigError(ValueError):
    """A configuration that cannot run (unknown key, wrong type, inconsistent sizes)."""


def _coerce(value, tp, where: str):
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where + ".")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        item = args[0] if args else object
        return tuple(_coerce(v, item, where) for v in value)
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: expected one of {typing.get_args(tp)}, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-5" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if value is None:
            return ""
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


REMOVED_KEYS = {"rcm.timestep_scale": "delete it; the network's own config holds its timestep units "
                                     "(models/wan.py, models/cosmos.py `timestep_scale`: Wan 1000, Cosmos 1)"}
"""Keys of earlier versions, with what to do instead (a run's saved config.yaml may still hold them)."""


def from_dict(cls, data: dict, where: str = ""):
    """Build dataclass `cls` from a (nested) dict; unknown keys and wrong types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    moved = [f"{where}{k}: {REMOVED_KEYS[where + k]}" for k in unknown if where + k in REMOVED_KEYS]
    if moved:
        raise ConfigError("removed config key(s): " + "; ".join(moved))
    if unknown:
        raise ConfigError(f"unknown config key(s) {[f'{where}{k}' for k in unknown]}; "
                          f"valid keys{' of ' + where.rstrip('.') if where else ''}: {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}{k}") for k, v in data.items()}
    try:
        return cls(**{**_defaults(cls), **kwargs})
    except ValueError as e:
        raise ConfigError(f"{where.rstrip('.') or 'config'}: {e}") from None


def _defaults(cls) -> dict:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def to_dict(config) -> dict:
    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v
    return plain(config)


def apply_override(data: dict, override: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (numbers, booleans, lists)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} is not of the form key.sub=value")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            raise ConfigError(f"override {override!r}: {p!r} is not a config section")
        node = node[p]
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {override!r}: cannot parse the value ({e})") from None
    node[parts[-1]] = value


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainingConfig:
    """Defaults <- YAML file <- dotted overrides, validated (types, then `check_ranges`)."""
    data = to_dict(TrainingConfig())
    if path:
        try:
            with open(path) as f:
                file_data = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise ConfigError(f"{path}: YAML syntax error{where}: {getattr(e, 'problem', None) or e}") from None
        if not isinstance(file_data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        _merge(data, file_data, path)
    for o in overrides:
        apply_override(data, o)
    config = from_dict(TrainingConfig, data)
    from megatron_rcm.dtypes import ALIASES

    # both spellings accepted here, one stored (the resolved config.yaml, the trainer's lookup)
    config.model.params_dtype = ALIASES.get(config.model.params_dtype, config.model.params_dtype)
    check_ranges(config)
    return config


# (field, lowest allowed value) of every numeric field with a range (0 where "0 = off" is documented)
_RANGES = [
    ("parallel.tensor_model_parallel_size", 1), ("parallel.context_parallel_size", 1),
    ("parallel.pipeline_model_parallel_size", 1),
    ("optimizer.student_lr", 0.0), ("optimizer.critic_lr", 0.0), ("optimizer.adam_beta1", 0.0),
    ("optimizer.adam_beta2", 0.0), ("optimizer.adam_eps", 0.0), ("optimizer.weight_decay", 0.0),
    ("optimizer.lr_warmup_iters", 0), ("optimizer.clip_grad", 0.0),
    ("training.train_iters", 1), ("training.global_batch_size", 1), ("training.micro_batch_size", 1),
    ("training.seed", 0), ("training.threads", 0),
    ("data.text_length", 1), ("data.frames", 1), ("data.size", 1), ("data.radius", 1), ("data.speed", 0),
    ("data.height", 1), ("data.width", 1),
    ("logging.log_interval", 1), ("logging.eval_interval", 0), ("logging.eval_samples", 1),
    ("logging.teacher_eval_steps", 1), ("logging.eval_student_steps", 1),
    ("checkpoint.save_interval", 0), ("checkpoint.keep_last", 0), ("checkpoint.exit_after_iteration", 0),
]
_BELOW_ONE = {"optimizer.adam_beta1", "optimizer.adam_beta2"}
_POSITIVE = {"optimizer.adam_eps", "logging.teacher_shift"}


def check_ranges(config: TrainingConfig) -> None:
    """Every numeric field in its range, before any work: one ConfigError naming the field."""
    def value(field):
        node = config
        for part in field.split("."):
            node = getattr(node, part)
        return node

    for field, low in _RANGES:
        for v in (value(field) if isinstance(value(field), tuple) else (value(field),)):
            if v < low or (field in _BELOW_ONE and v >= 1) or (field in _POSITIVE and v <= 0):
                bound = "in [0, 1)" if field in _BELOW_ONE else "> 0" if field in _POSITIVE else f">= {low}"
                raise ConfigError(f"{field} must be {bound}, got {v!r}")
    if config.logging.teacher_shift <= 0:
        raise ConfigError(f"logging.teacher_shift must be > 0, got {config.logging.teacher_shift!r}")
    if not config.logging.eval_student_steps:
        raise ConfigError("logging.eval_student_steps must name at least one step count, got []")
    if config.logging.pass_timers not in ("events", "sync"):
        raise ConfigError(f"logging.pass_timers must be events or sync, got {config.logging.pass_timers!r}")
    if config.parallel.pp_schedule not in ("auto", "megatron", "gloo"):
        raise ConfigError(f"parallel.pp_schedule must be auto, megatron or gloo, got "
                          f"{config.parallel.pp_schedule!r}")


def _merge(base: dict, new: dict, where: str, prefix: str = "") -> None:
    for k, v in new.items():
        if k not in base:
            raise ConfigError(f"{where}: unknown config key {prefix + k!r}; valid keys"
                              f"{' of ' + prefix.rstrip('.') if prefix else ''}: {sorted(base)}")
        if isinstance(base[k], dict) and isinstance(v, dict):
            _merge(base[k], v, where, f"{prefix}{k}.")
        else:
            base[k] = v


def dump_config(config: TrainingConfig) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


# ---------------------------------------------------------------------------------------------------------------
# --help: every key with its type, default and docstring
# ---------------------------------------------------------------------------------------------------------------


def field_docs(cls) -> dict[str, str]:
    """The attribute docstrings of dataclass `cls` (the string literal under each field in its source)."""
    import ast
    import inspect
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body
    out = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            out[node.target.id] = " ".join(nxt.value.value.split())
    return out


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) if typing.get_origin(tp) is None else str(tp).replace("typing.", "")


def config_keys(cls=None, prefix: str = "", default=None):
    """(dotted key, type name, default, docstring) of every leaf of the config tree, in declaration order."""
    cls = cls or TrainingConfig
    default = default if default is not None else cls()
    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    for f in dataclasses.fields(cls):
        value = getattr(default, f.name)
        if dataclasses.is_dataclass(value):
            yield from config_keys(type(value), f"{prefix}{f.name}.", value)
        else:
            plain = list(value) if isinstance(value, tuple) else value
            yield f"{prefix}{f.name}", _type_name(hints[f.name]) or str(hints[f.name]), plain, docs.get(f.name, "")


def config_help(width: int = 116) -> str:
    """Every config key grouped by section: `key (type, default: value)` and its docstring."""
    import textwrap

    lines, section = [], None
    for key, tp, default, doc in config_keys():
        head = key.split(".")[0] if "." in key else ""
        if head != section:
            section = head
            cls = type(getattr(TrainingConfig(), head)) if head else TrainingConfig
            lines += ["", f"{head or 'top level'}: {' '.join((cls.__doc__ or '').split())}"]
        lines.append(f"  {key} ({tp}, default: {yaml.safe_dump(default, default_flow_style=True).strip()
                                                    .removesuffix('...').strip()})")
        if doc:
            lines += textwrap.wrap(doc, width, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines).lstrip("\n")
