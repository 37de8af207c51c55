"""Diffusers pipeline folders of a distilled Wan student: `model_index.json`, `transformer/`, `scheduler/` (our
`RCMScheduler` with the student's times), the base model's text encoder, tokenizer and VAE (copied or linked
from a local base pipeline folder, else named in `model_index.json` and the model card), and a `README.md`."""

import dataclasses
import json
import os
import shutil
from typing import Sequence

PIPELINE_CLASS = "WanPipeline"
SCHEDULER_LIBRARY = "megatron_rcm.diffusion.pipeline_scheduler"
SCHEDULER_CLASS = "RCMScheduler"
BASE_COMPONENTS = ("text_encoder", "tokenizer", "vae")
BASE_MODEL_KEY = "_rcm_base_model"
"""model_index.json key naming where components that are not in the folder come from (diffusers ignores `_` keys)."""

# diffusers' Wan2.1 T2V pipelines, by transformer width; their text encoder, tokenizer and VAE are shared
DEFAULT_BASE_MODELS = {1536: "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", 5120: "Wan-AI/Wan2.1-T2V-14B-Diffusers"}
# the component entries of those pipelines' model_index.json
DEFAULT_COMPONENT_CLASSES = {"text_encoder": ["transformers", "UMT5EncoderModel"],
                             "tokenizer": ["transformers", "T5TokenizerFast"],
                             "vae": ["diffusers", "AutoencoderKLWan"]}


@dataclasses.dataclass
class PipelineExport:
    """What goes into a pipeline folder besides the transformer."""

    base_model: str = ""
    """The base (teacher) pipeline: a local diffusers pipeline folder, whose text encoder, tokenizer and VAE are
    copied (or linked, see `link_components`), or a Hub name recorded in model_index.json and the model card for the
    user to load those components from. Empty: the diffusers Wan2.1 pipeline of the transformer's width."""

    link_components: bool = False
    """Symlink the local base pipeline's components instead of copying them (the export then needs that folder)."""

    sigma_max: float = 80.0
    """Initial noise level of the student sampler."""

    mid_times: Sequence[float] = (1.3, 1.0, 0.6)
    """The student sampler's intermediate TrigFlow times (1-4 steps use a prefix)."""

    num_train_timesteps: int = 1000
    """The transformer's timestep units (Wan: 1000)."""

    card: dict = dataclasses.field(default_factory=dict)
    """Model-card facts known from the training run: `dmd_weight`, `scm_weight`, `iterations`, `command`,
    `source`, `network` (ema / student), `teacher`, `export_command`; missing ones are left out of the card."""


def scheduler_config(export: PipelineExport) -> dict:
    import diffusers

    return {"_class_name": SCHEDULER_CLASS, "_diffusers_version": diffusers.__version__,
            "num_train_timesteps": export.num_train_timesteps, "sigma_max": float(export.sigma_max),
            "mid_times": [float(t) for t in export.mid_times]}


def resolve_base(export: PipelineExport, hidden_size: int) -> tuple[str, str | None]:
    """(base name for the card, local base pipeline folder or None)."""
    base = export.base_model or DEFAULT_BASE_MODELS.get(hidden_size, "")
    if base and os.path.isdir(base):
        missing = [c for c in BASE_COMPONENTS if not os.path.isdir(os.path.join(base, c))]
        if missing or not os.path.isfile(os.path.join(base, "model_index.json")):
            raise FileNotFoundError(f"base pipeline folder {base} lacks model_index.json or {missing}: give a diffusers "
                                    f"Wan pipeline folder (model_index.json, text_encoder/, tokenizer/, vae/)")
        return os.path.basename(os.path.normpath(base)), base
    if not base:
        raise ValueError(f"no default base pipeline for a Wan transformer of width {hidden_size}: name one "
                         f"(--base-pipeline / PipelineExport.base_model)")
    return base, None


def write_pipeline(tmp: str, export: PipelineExport, hidden_size: int, write_transformer) -> None:
    """Fill the (side) directory `tmp`: `write_transformer(tmp/transformer)` writes the model folder."""
    from megatron_rcm.diffusion.pipeline_scheduler import RCMScheduler

    config = scheduler_config(export)
    RCMScheduler.from_config(config)  # a bad sigma_max / mid_times fails here, not when a user loads the export
    base_name, local = resolve_base(export, hidden_size)
    os.makedirs(os.path.join(tmp, "transformer"))
    write_transformer(os.path.join(tmp, "transformer"))
    os.makedirs(os.path.join(tmp, "scheduler"))
    with open(os.path.join(tmp, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    index = {"_class_name": PIPELINE_CLASS, "_diffusers_version": config["_diffusers_version"],
             "boundary_ratio": None, "expand_timesteps": False,
             "scheduler": [SCHEDULER_LIBRARY, SCHEDULER_CLASS],
             "transformer": ["diffusers", "WanTransformer3DModel"], "transformer_2": [None, None]}
    if local is not None:
        with open(os.path.join(local, "model_index.json")) as f:
            base_index = json.load(f)
        for c in BASE_COMPONENTS:
            src, dst = os.path.abspath(os.path.join(local, c)), os.path.join(tmp, c)
            if export.link_components:
                os.symlink(src, dst, target_is_directory=True)
            else:
                shutil.copytree(src, dst, symlinks=False)
            index[c] = base_index.get(c, DEFAULT_COMPONENT_CLASSES[c])
    else:
        # not in the folder: the user passes them to from_pretrained (the card shows how)
        index.update({c: [None, None] for c in BASE_COMPONENTS})
        index[BASE_MODEL_KEY] = base_name
    with open(os.path.join(tmp, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)
    with open(os.path.join(tmp, "README.md"), "w") as f:
        f.write(model_card(export, base_name, local is not None))


def model_card(export: PipelineExport, base_name: str, components_included: bool) -> str:
    c = export.card
    steps = len(export.mid_times) + 1
    facts = [f"- Base model: `{base_name}`" + (f" (teacher `{c['teacher']}`)" if c.get("teacher") else ""),
             f"- Sampling steps: 1-{steps} (rCM consistency sampler)",
             f"- sigma_max: {export.sigma_max:g} (t_0 = arctan sigma_max); intermediate TrigFlow times "
             f"{', '.join(f'{t:g}' for t in export.mid_times)}"]
    if c.get("dmd_weight") is not None:
        scm = c.get("scm_weight") or 1.0
        facts.append(f"- lambda (DMD weight / sCM weight): {c['dmd_weight'] / scm:g}")
    if c.get("iterations") is not None:
        facts.append(f"- Training iterations: {c['iterations']}")
    if c.get("network"):
        facts.append(f"- Weights: the {c['network']} network")
    if c.get("source"):
        facts.append(f"- Exported from: `{c['source']}`")
    if c.get("command"):
        facts.append(f"- Trained with: `{c['command']}`")
    if c.get("export_command"):
        facts.append(f"- Exported with: `{c['export_command']}`")
    if components_included:
        load = ('pipe = WanPipeline.from_pretrained("THIS_FOLDER", torch_dtype=torch.bfloat16)')
    else:
        load = (f'base = "{base_name}"\n'
                'pipe = WanPipeline.from_pretrained(\n'
                '    "THIS_FOLDER", torch_dtype=torch.bfloat16,\n'
                '    text_encoder=UMT5EncoderModel.from_pretrained(base, subfolder="text_encoder", '
                'torch_dtype=torch.bfloat16),\n'
                '    tokenizer=AutoTokenizer.from_pretrained(base, subfolder="tokenizer"),\n'
                '    vae=AutoencoderKLWan.from_pretrained(base, subfolder="vae", torch_dtype=torch.float32))')
    times = ", ".join(f"{1000 * s:.1f}" for s in _flow_times(export))
    return f"""---
library_name: diffusers
pipeline_tag: text-to-video
base_model: {base_name}
tags: [rcm, wan, text-to-video, few-step]
---

# rCM few-step student of {base_name}

A Wan2.1 text-to-video transformer distilled with rCM (sCM + DMD) for 1-{steps}-step sampling, exported by
megatron-rcm.

{chr(10).join(facts)}

## Sampling with diffusers

The scheduler is `RCMScheduler` from megatron-rcm (`pip install megatron-rcm`): the {steps}-step times are
{times} on the 0-1000 scale, and fewer steps use a prefix of them. Import it before loading, so that diffusers
can resolve the `scheduler` entry of `model_index.json`; use `guidance_scale=1` (the student is distilled with
guidance).

```python
import torch
from diffusers import AutoencoderKLWan, WanPipeline
from transformers import AutoTokenizer, UMT5EncoderModel
from megatron_rcm.diffusion.pipeline_scheduler import RCMScheduler  # noqa: F401  (resolves the scheduler entry)

{load}
pipe.scheduler.generator = torch.Generator().manual_seed(0)  # fresh noise of the re-noising steps
video = pipe("a cat surfing a wave", num_inference_steps={steps}, guidance_scale=1.0, num_frames=81,
             height=480, width=832).frames[0]
```
"""


def _flow_times(export: PipelineExport) -> list[float]:
    from megatron_rcm.diffusion.pipeline_scheduler import rcm_flow_times

    return rcm_flow_times(len(export.mid_times) + 1, export.sigma_max, export.mid_times)[:-1]
