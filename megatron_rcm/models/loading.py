"""`from_pretrained`: build a DiT in the current parallel layout from a diffusers folder, a diffusers pipeline
folder, an original release, or a megatron-rcm checkpoint; `save_megatron` / `save_diffusers` write them."""

import contextlib
import dataclasses
import os
import shutil
from typing import Callable

import torch

from megatron_rcm.checkpoint import hf, io, reference
from megatron_rcm.checkpoint import cosmos as cosmos_keys
from megatron_rcm.checkpoint import wan as wan_keys
from megatron_rcm.checkpoint.pipeline import PipelineExport, write_pipeline
from megatron_rcm.checkpoint.sharding import full_state_dict, load_full_state_dict
from megatron_rcm.models.cosmos import CosmosConfig, CosmosModel
from megatron_rcm.models.wan import WanConfig, WanModel
from megatron_rcm.parallel import state
from megatron_rcm.parallel.pipeline import gather_pipeline_state_dict


@dataclasses.dataclass(frozen=True)
class Architecture:
    """How one model family maps to diffusers and to its original release."""

    name: str
    config_cls: type
    model_cls: type
    hf_class_name: str
    hf_to_mcore: Callable[[dict, object], dict]
    mcore_to_hf: Callable[[dict, object], dict]
    original_to_hf: Callable[[dict], dict] | None = None
    config_from_original: Callable[[dict], object] | None = None


def _wan_config_from_original(original: dict):
    return WanConfig(num_attention_heads=original["num_heads"],
                     attention_head_dim=original["dim"] // original["num_heads"], ffn_dim=original["ffn_dim"],
                     num_layers=original["num_layers"], in_channels=original.get("in_dim", 16),
                     out_channels=original.get("out_dim", 16), freq_dim=original.get("freq_dim", 256),
                     text_dim=original.get("text_dim", 4096), eps=original.get("eps", 1e-6))


ARCHITECTURES: dict[str, Architecture] = {
    "wan": Architecture(
        name="wan", config_cls=WanConfig, model_cls=WanModel, hf_class_name="WanTransformer3DModel",
        hf_to_mcore=lambda sd, c: wan_keys.hf_to_mcore(sd, c.num_attention_heads),
        mcore_to_hf=lambda sd, c: wan_keys.mcore_to_hf(sd, c.num_attention_heads),
        original_to_hf=wan_keys.original_to_hf, config_from_original=_wan_config_from_original),
    "cosmos": Architecture(
        name="cosmos", config_cls=CosmosConfig, model_cls=CosmosModel, hf_class_name="CosmosTransformer3DModel",
        hf_to_mcore=lambda sd, c: cosmos_keys.hf_to_mcore(sd, c.num_attention_heads),
        mcore_to_hf=lambda sd, c: cosmos_keys.mcore_to_hf(sd, c.num_attention_heads),
        original_to_hf=cosmos_keys.original_to_hf),
}


def config_to_dict(config) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(config).items()}


def config_from_dict(arch: Architecture, d: dict):
    names = {f.name: f for f in dataclasses.fields(arch.config_cls)}
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise ValueError(f"unknown {arch.name} config keys {unknown}")
    return arch.config_cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()})


def architecture_of(model: torch.nn.Module) -> Architecture:
    for arch in ARCHITECTURES.values():
        if isinstance(model, arch.model_cls):
            return arch
    raise TypeError(f"no checkpoint architecture for {type(model).__name__}")


def _device_context(device):
    return torch.device(device) if device is not None else contextlib.nullcontext()


def build_model(arch: Architecture, config, params_dtype=torch.float32, sequence_parallel=False, device=None,
                perform_initialization=True, pipeline_layers=None, cp_comm: str = "auto"):
    """This rank's part of the model in the current parallel layout (its pipeline stage under PP; `cp_comm`: how
    self-attention crosses the context-parallel group, 'auto' | 'a2a' | 'ring')."""
    state.ensure_parallel()
    if device is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    with _device_context(device):
        return arch.model_cls(config, params_dtype=params_dtype, sequence_parallel=sequence_parallel,
                              perform_initialization=perform_initialization, cp_comm=cp_comm,
                              pipeline_layers=pipeline_layers)


def _stage_state_dict(net: torch.nn.Module, full_sd: dict, source: str) -> dict:
    """Under pipeline parallelism: the tensors of this stage out of a full-model state dict (names are global).
    Names of no stage (a wrong checkpoint) stay, so the stage's check reports them."""
    if state.pp_size() == 1:
        return full_sd
    own = set(dict(net.named_parameters()))
    stage_only = ("blocks",) + net._first_stage_modules + net._last_stage_modules
    other_stage = lambda k: k not in own and k.split(".")[0] in stage_only
    return {k: v for k, v in full_sd.items() if not other_stage(k)}


def _load_megatron(net: torch.nn.Module, directory: str) -> None:
    if state.pp_size() == 1:
        io.load_model(net, directory)
        return
    from megatron_rcm.checkpoint.sharding import check_state_dict

    shapes = {k: torch.empty(s, device="meta") for k, s in io.tensor_shapes(directory).items()}
    mine = dict(net.named_parameters())
    check_state_dict(net, {k: v for k, v in shapes.items() if k in mine}, f"checkpoint {directory}")
    empty = {n: torch.empty_like(p) for n, p in mine.items()}
    loaded = io.load_sharded(io.sharded_state_dict(net, tensors=empty), directory)
    with torch.no_grad():
        for name, p in mine.items():
            p.copy_(loaded[name])


ORIGINAL_PICKLE = "model.pt"
"""File name of the original Cosmos-Predict2 release weights (a torch pickle without a config)."""


def inspect_checkpoint(path: str, model: str | None = None, preset: str | None = None,
                       network: str | None = None):
    """Return (architecture, config, kind, directory) for a checkpoint directory or file, or raise a clear error.

    kind is 'megatron', 'diffusers', 'original' or 'reference' (a `.pt` / `.pth` file of the rCM reference
    implementation; `directory` is then that file and `network` picks 'ema' or 'net' in it). An original
    Cosmos-Predict2 release (`model.pt`, no config) needs `preset` to name its architecture."""
    if reference.is_reference_file(path):
        return _inspect_reference(path, model, preset, network)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
    header = io.read_header(path)
    if header is not None:
        arch = ARCHITECTURES[header["model"]]
        kind, directory, config = "megatron", path, config_from_dict(arch, header["config"])
    else:
        directory = hf.resolve_model_dir(path)
        stored = hf.read_config(directory) or {}
        by_class = {a.hf_class_name: a for a in ARCHITECTURES.values()}
        if stored.get("_class_name") in by_class:
            arch = by_class[stored["_class_name"]]
            kind, config = "diffusers", arch.config_cls.from_diffusers(stored)
        elif "dim" in stored and "num_heads" in stored and model in (None, "wan"):
            arch = ARCHITECTURES["wan"]
            kind, config = "original", arch.config_from_original(stored)
        elif os.path.isfile(os.path.join(directory, ORIGINAL_PICKLE)) and preset is not None:
            from megatron_rcm.models import get_preset

            name, config = get_preset(preset)
            arch, kind = ARCHITECTURES[name], "original"
        elif os.path.isfile(os.path.join(directory, ORIGINAL_PICKLE)):
            raise ValueError(f"{path} looks like an original Cosmos-Predict2 release ({ORIGINAL_PICKLE}, no config): "
                             f"name its architecture with a preset (e.g. cosmos-predict2-2b-t2i)")
        else:
            expected = ", ".join(a.hf_class_name for a in ARCHITECTURES.values())
            raise ValueError(
                f"{path} is not a supported checkpoint: expected a diffusers model folder (config.json with "
                f"_class_name in {{{expected}}}), a diffusers pipeline folder (model_index.json + transformer/), "
                f"an original Wan-AI release (config.json with dim/num_heads + safetensors), a megatron-rcm "
                f"checkpoint ({io.HEADER}) or an rCM reference .pt/.pth file")
    if model is not None and arch.name != model:
        raise ValueError(f"{path} holds a {arch.name} model, not {model}")
    return arch, config, kind, directory


def _inspect_reference(path: str, model: str | None, preset: str | None, network: str | None):
    if model not in (None, "wan"):
        raise ValueError(f"{path}: rCM reference files hold Wan models, not {model}")
    arch = ARCHITECTURES["wan"]
    if preset is not None:
        from megatron_rcm.models import get_preset

        name, config = get_preset(preset)
        if name != "wan":
            raise ValueError(f"preset {preset} is a {name} model; rCM reference files hold Wan models")
    else:
        sd = reference.select_network(reference.load_file(path), network, path)
        config = WanConfig(**reference.config_fields(sd, path))
    return arch, config, "reference", path


def read_full_state_dict(arch: Architecture, config, kind: str, directory: str,
                         network: str | None = None) -> dict[str, torch.Tensor]:
    """The full (unsharded) megatron-named state dict of a diffusers, original or reference checkpoint."""
    pickle = os.path.join(directory, ORIGINAL_PICKLE)
    if kind == "reference":
        sd = reference.to_original(reference.select_network(reference.load_file(directory), network, directory))
        kind = "original"
    elif kind == "original" and os.path.isfile(pickle):
        sd = reference.load_file(pickle)  # tensors only: never unpickle code from a downloaded file
    else:
        sd = hf.read_state_dict(directory)
    try:
        if kind == "original":
            sd = arch.original_to_hf(sd)
        return arch.hf_to_mcore(sd, config)
    except KeyError as e:
        raise ValueError(f"{directory} is not a valid {arch.name} checkpoint: {e.args[0]}") from None


def from_pretrained(path: str, *, params_dtype: torch.dtype = torch.bfloat16, sequence_parallel: bool = False,
                    device=None, model: str | None = None, preset: str | None = None,
                    network: str | None = None, pipeline_layers=None, cp_comm: str = "auto") -> torch.nn.Module:
    """Load a DiT in the current parallel layout (a one-process layout is set up if none exists).

    `path`: a diffusers model folder (the `transformer` folder of a pipeline, or the pipeline folder itself), an
    original Wan-AI release folder, an original Cosmos-Predict2 release folder (`model.pt`; give `preset`), a
    megatron-rcm checkpoint, or a `.pt` / `.pth` file of the rCM reference (a released student: `network` 'ema' or
    'net', default the EMA if present; a teacher file). `model` ('wan', 'cosmos') checks the family.
    Under pipeline parallelism each rank builds and loads its stage (`pipeline_layers`: blocks per stage); under
    context parallelism `cp_comm` picks Ulysses (`a2a`) or `ring` self-attention (`auto`: a2a where CP divides the
    heads).
    """
    state.ensure_parallel()
    arch, config, kind, directory = inspect_checkpoint(path, model, preset, network)
    net = build_model(arch, config, params_dtype, sequence_parallel, device, perform_initialization=False,
                      pipeline_layers=pipeline_layers, cp_comm=cp_comm)
    if kind == "megatron":
        _load_megatron(net, directory)
    else:
        source = f"checkpoint {directory}"
        sd = read_full_state_dict(arch, config, kind, directory, network)
        load_full_state_dict(net, _stage_state_dict(net, sd, source), source)
    return net


def save_megatron(net: torch.nn.Module, path: str) -> None:
    """Write a megatron-rcm checkpoint of `net` (every rank calls this)."""
    arch = architecture_of(net)
    header = {"model": arch.name, "config": config_to_dict(net.config),
              "params_dtype": str(next(net.parameters()).dtype)}
    io.save_model(net, path, header)  # any layout: stages write their own blocks, the first the shared modules


def save_diffusers(net: torch.nn.Module, path: str, dtype: torch.dtype | None = None,
                   pipeline: PipelineExport | None = None) -> None:
    """Write `net` for diffusers (every rank calls this).

    Without `pipeline`: a model folder (config.json + safetensors) that `WanTransformer3DModel.from_pretrained` /
    `CosmosTransformer3DModel.from_pretrained` loads. With a `PipelineExport` (Wan only): a pipeline folder that
    `WanPipeline.from_pretrained` loads, with our `RCMScheduler` and a model card (`checkpoint/pipeline.py`)."""
    arch = architecture_of(net)
    if pipeline is not None and arch.name != "wan":
        raise ValueError(f"pipeline export is implemented for Wan students only, not {arch.name}; "
                         f"write the transformer folder alone (no pipeline / --transformer-only)")
    write_diffusers(arch, net.config, gather_pipeline_state_dict(full_state_dict(net)), path, dtype, pipeline)


def write_diffusers(arch: Architecture, config, sd: dict[str, torch.Tensor], path: str,
                    dtype: torch.dtype | None = None, pipeline: PipelineExport | None = None) -> None:
    """Write a full megatron-named state dict as a diffusers model folder or (with `pipeline`) pipeline folder,
    atomically (side directory renamed into place). Rank 0 writes; every rank calls it."""
    tmp = io.atomic_dir(path)
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        hf_sd = arch.mcore_to_hf(sd, config)
        hf_sd = {k: (v.to(dtype) if dtype is not None else v).cpu() for k, v in hf_sd.items()}

        def write_transformer(directory):
            hf.write_model_dir(directory, hf_sd, config.to_diffusers())

        try:
            if pipeline is None:
                write_transformer(tmp)
            else:
                write_pipeline(tmp, pipeline, config.hidden_size, write_transformer)
        except BaseException:  # nothing that looks like an export is left behind
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    io.commit_dir(tmp, path)


@dataclasses.dataclass
class TrainingNetwork:
    """One network of a training checkpoint, gathered in full on the CPU, with what the run knew about it."""

    arch: Architecture
    config: object
    state_dict: dict[str, torch.Tensor]
    """Full (unsharded) megatron-named tensors."""
    directory: str
    """The checkpoint (`.../checkpoints/iter_*`) it came from."""
    meta: dict
    """The checkpoint's meta.json (iteration, timestep_scale, ...)."""
    run_config: dict
    """The run's config.yaml as a dict ({} when absent)."""


def is_training_checkpoint(path: str) -> bool:
    """A run folder (with `checkpoints/`) or one training checkpoint (`meta.json`)."""
    return os.path.isdir(os.path.join(path, "checkpoints")) or os.path.isfile(os.path.join(path, "meta.json"))


def read_training_network(path: str, network: str = "ema") -> TrainingNetwork:
    """`network` ('ema' or 'student') of a run folder's newest checkpoint (the one `latest` names) or of one
    training checkpoint, at any parallel layout, in this process on the CPU; nothing read can run code
    (`training.checkpointing.read_network`)."""
    import json

    import yaml

    from megatron_rcm.training import checkpointing

    if not os.path.isfile(os.path.join(path, "meta.json")) and os.path.isdir(checkpointing.checkpoints_dir(path)):
        root = checkpointing.checkpoints_dir(path)
        name = checkpointing.read_pointer(root)
        if name is None:
            found = ", ".join(checkpointing.complete_checkpoints(root)) or "none"
            raise FileNotFoundError(f"{root} has no {checkpointing.LATEST} pointer (complete checkpoints: {found}); "
                                    f"pass one checkpoint directory")
        path = os.path.join(root, name)
    family, config_dict, sd = checkpointing.read_network(path, network=network)
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    arch = ARCHITECTURES[family]
    run_config = {}
    config_file = os.path.join(path, "config.yaml")
    if os.path.isfile(config_file):
        with open(config_file) as f:
            try:
                run_config = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ValueError(f"{config_file} is not valid YAML ({str(e).splitlines()[0]})") from None
    return TrainingNetwork(arch, config_from_dict(arch, config_dict), sd, path, meta, run_config)
