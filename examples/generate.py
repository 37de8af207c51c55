"""Sample a distilled student in 1-4 steps: mp4 per step count (PyAV) + a PNG grid, with timings.

    python examples/generate.py --checkpoint runs/rcm-shapes-tiny --steps 1 2 4 --num-prompts 8 --out samples/ \\
        --teacher examples/assets/shapes-teacher
    python examples/generate.py --checkpoint <Wan pipeline folder or converted student> \\
        --wan-pipeline <Wan2.1-T2V-1.3B-Diffusers folder> --prompts "a cat surfing" --steps 4 --frames 81

`--checkpoint` is a training run folder (its latest checkpoint), one training checkpoint (`.../iter_0000600`), a
megatron-rcm model folder (e.g. `<run_dir>/ema`), a diffusers / original Wan folder (HF-converted), or a `.pt` /
`.pth` file of the rCM reference implementation. From training checkpoints and reference files `--net` picks `ema`
(default) or `student` (the reference's `net.*`); training checkpoints at any parallel layout are read on the CPU.
Nothing is unpickled beyond tensors. The tiny shapes model is recognised by its
architecture and uses the shapes text encoder and pixel space; Wan models need `--wan-pipeline` (text encoder,
tokenizer, VAE).

`grid.png` is the training run's evaluation grid (`evaluation.labeled_grid`): one column per prompt with its caption,
one row per step count (with `--teacher`, the teacher's multi-step samples of the same noise on top), first /
middle / last frame per cell, upscaled `--upscale` times (nearest).
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    from megatron_rcm.dtypes import canonical

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--net", choices=("ema", "student"), default="ema", help="which network of a training checkpoint")
    p.add_argument("--prompts", nargs="*", default=None)
    p.add_argument("--num-prompts", type=int, default=8, help="shapes model without --prompts: this many prompts")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--sigma-max", type=float, default=80.0)
    p.add_argument("--mid-times", type=float, nargs="+", default=None,
                   help="the student sampler's intermediate TrigFlow times; default: the tiny default's (0.5, 0.25, "
                        "0.1) for the shapes model, the reference's (1.3, 1.0, 0.6) for Wan")
    p.add_argument("--teacher", default="", help="a teacher (any --checkpoint kind): its multi-step samples of the "
                                                  "same prompts and noise are the grid's first row")
    p.add_argument("--teacher-steps", type=int, default=32)
    p.add_argument("--teacher-solver", choices=("unipc", "euler"), default="unipc")
    p.add_argument("--guidance", type=float, default=3.0, help="the teacher's CFG scale (empty negative prompt)")
    p.add_argument("--upscale", type=int, default=None, help="grid cells upscaled this many times (nearest); "
                                                             "default 4 for the shapes model, 1 for Wan")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="samples")
    p.add_argument("--fps", type=int, default=8)
    p.add_argument("--dtype", default="float32", type=canonical, choices=("float32", "bfloat16"))
    p.add_argument("--wan-pipeline", default="", help="Wan diffusers pipeline folder (text_encoder/, tokenizer/, vae/)")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    return p.parse_args(argv)


def load_network(path: str, net: str, dtype: torch.dtype):
    """(model, timestep_scale) from any supported checkpoint kind; nothing is unpickled beyond tensors."""
    from megatron_rcm.checkpoint.sharding import load_full_state_dict
    from megatron_rcm.models import from_pretrained
    from megatron_rcm.models.loading import build_model, is_training_checkpoint, read_training_network

    if not os.path.exists(path):
        raise FileNotFoundError(f"--checkpoint {path} does not exist")
    if not is_training_checkpoint(path):
        # rCM reference files: `ema` takes net_ema.* when present, else net.* (released files hold the EMA there)
        model = from_pretrained(path, params_dtype=dtype, network={"ema": None, "student": "net"}[net])
        return model.eval(), float(model.config.timestep_scale)
    found = read_training_network(path, net)
    model = build_model(found.arch, found.config, dtype, perform_initialization=False)
    load_full_state_dict(model, found.state_dict, f"the {net} network of {found.directory}")
    return model.eval(), float(found.meta.get("timestep_scale", model.config.timestep_scale))


def check_args(args) -> None:
    """Every bad argument is one line before any work (a non-zero exit)."""
    problems = []
    mid_times = args.mid_times if args.mid_times is not None else [1.3, 1.0, 0.6]
    if args.num_prompts < 1:
        problems.append(f"--num-prompts must be >= 1, got {args.num_prompts}")
    if args.prompts is not None and not [p for p in args.prompts if p.strip()]:
        problems.append("--prompts needs at least one non-empty prompt")
    if any(not 1 <= s <= len(mid_times) + 1 for s in args.steps):
        problems.append(f"--steps must be in 1..{len(mid_times) + 1} (one more than --mid-times), got "
                        f"{args.steps}")
    if args.sigma_max <= 0:
        problems.append(f"--sigma-max must be > 0, got {args.sigma_max}")
    if any(not 0 < t < 1.5707963267948966 for t in mid_times) or mid_times != sorted(mid_times, reverse=True):
        problems.append(f"--mid-times must be decreasing TrigFlow times in (0, pi/2), got {mid_times}")
    if args.teacher and not os.path.exists(args.teacher):
        problems.append(f"--teacher {args.teacher} does not exist")
    for name in ("fps", "frames", "height", "width", "teacher_steps"):
        if getattr(args, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.upscale is not None and args.upscale < 1:
        problems.append(f"--upscale must be >= 1, got {args.upscale}")
    if problems:
        sys.exit("error: " + "; ".join(problems))


def write_mp4(path: str, frames: np.ndarray, fps: int) -> None:
    """`[T, H, W, 3]` uint8 -> H.264 mp4 (sizes padded to even numbers, as yuv420p needs)."""
    import av

    t, h, w, _ = frames.shape
    frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    with av.open(path, mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_grid(out_dir: str, rows: dict[str, torch.Tensor], prompts: list[str], upscale: int) -> str:
    """The PNG grid (`evaluation.labeled_grid`, as the training run's TensorBoard image): one row per entry of
    `rows` (label -> videos `[N, 3, T, H, W]`, e.g. the teacher's multi-step samples, then one row per step count),
    one column per prompt, its caption above it; first / middle / last frame per cell. Returns its path."""
    from megatron_rcm.training.evaluation import labeled_grid

    path = os.path.join(out_dir, "grid.png")
    labeled_grid(rows, prompts, upscale=upscale).save(path)
    return path


def step_label(n: int) -> str:
    return f"{n} step{'s' if n > 1 else ''}"


def main(argv=None):
    args = parse_args(argv)
    from megatron_rcm.data import shapes
    from megatron_rcm.diffusion import TrigFlowWrapper, student_sample, teacher_sample
    from megatron_rcm.parallel import destroy_parallel, initialize_parallel
    from megatron_rcm.training.config import TINY_SHAPES_DATA, TINY_SHAPES_MODEL, tiny_rcm
    from megatron_rcm.dtypes import to_torch
    from megatron_rcm.training.evaluation import video_grid

    check_args(args)
    initialize_parallel()
    dtype = to_torch(args.dtype)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        model, scale = load_network(args.checkpoint, args.net, dtype)
        teacher = load_network(args.teacher, "ema", dtype) if args.teacher else None
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    model = model.to(device)
    wrapper = TrigFlowWrapper(model, scale)
    is_shapes = model.config == TINY_SHAPES_MODEL
    if teacher is not None and teacher[0].config != model.config:
        sys.exit(f"error: --teacher {args.teacher} is a different architecture from --checkpoint {args.checkpoint}")
    mid_times = args.mid_times or list(tiny_rcm().student_mid_times if is_shapes else (1.3, 1.0, 0.6))
    upscale = args.upscale or (4 if is_shapes else 1)
    vae = None
    if is_shapes:
        prompts = args.prompts or shapes.eval_prompts(args.num_prompts)
        try:
            text = shapes.ShapesTextEncoder(dim=model.config.text_dim).encode(prompts).to(device)
        except ValueError as e:
            sys.exit(f"error: {e}")
        shape = (model.config.in_channels, TINY_SHAPES_DATA.frames, TINY_SHAPES_DATA.size, TINY_SHAPES_DATA.size)
    else:
        from megatron_rcm.models.encoders import UMT5TextEncoder, WanVAE

        if not args.wan_pipeline or not args.prompts:
            sys.exit("error: a Wan model needs --wan-pipeline (text encoder, tokenizer, VAE) and --prompts")
        prompts = args.prompts
        try:
            encoder = UMT5TextEncoder.from_pretrained(args.wan_pipeline, dtype=dtype, device=device)
            vae = WanVAE.from_pretrained(args.wan_pipeline, dtype=dtype, device=device)
            shape = vae.latent_shape(args.frames, args.height, args.width)
        except (OSError, ValueError) as e:
            sys.exit(f"error: --wan-pipeline {args.wan_pipeline}: {str(e).strip().splitlines()[0]}")
        text = encoder(prompts).to(device)
    os.makedirs(args.out, exist_ok=True)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    noise = torch.randn((len(prompts), *shape), generator=gen, dtype=torch.float64, device=device)
    student_sample(wrapper, noise[:1], text[:1], 1, args.sigma_max, mid_times)  # warm-up: not timed
    rows, timings, teacher_timing = {}, {}, None
    if teacher is not None:
        t0 = time.perf_counter()
        neg = torch.zeros_like(text) if is_shapes else encoder([""] * len(prompts)).to(device)
        x = teacher_sample(TrigFlowWrapper(teacher[0].to(device), teacher[1]), noise, text, args.teacher_steps,
                           args.teacher_solver, 1.0, args.guidance, neg)
        videos = (vae.decode(x.to(dtype)) if vae is not None else x).float().cpu()
        teacher_timing = {"sampling_s": time.perf_counter() - t0, "steps": args.teacher_steps, "videos": len(prompts)}
        rows[f"teacher {args.teacher_steps} steps"] = videos
        print(f"teacher {args.teacher_steps}-step ({args.teacher_solver}, CFG {args.guidance}): {len(prompts)} videos "
              f"in {teacher_timing['sampling_s']:.3f} s")
    for n in args.steps:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        x = student_sample(wrapper, noise, text, n, args.sigma_max, mid_times,
                           torch.Generator(device=device).manual_seed(args.seed + n))
        if device.type == "cuda":
            torch.cuda.synchronize()
        t_net = time.perf_counter() - t0
        videos = (vae.decode(x.to(dtype)) if vae is not None else x).float().cpu()
        t_all = time.perf_counter() - t0
        timings[n] = {"sampling_s": t_net, "with_decode_s": t_all, "videos": len(prompts)}
        path = os.path.join(args.out, f"samples_{n}step.mp4")
        write_mp4(path, video_grid(videos, columns=min(8, len(prompts)), scale=upscale), args.fps)
        rows[step_label(n)] = videos
        print(f"{n}-step: {len(prompts)} videos in {t_net:.3f} s ({t_net / len(prompts) * 1000:.1f} ms/video, "
              f"{t_all:.3f} s with decoding) -> {path}")
    grid_path = write_grid(args.out, rows, prompts, upscale)
    with open(os.path.join(args.out, "prompts.txt"), "w") as f:
        f.write("\n".join(prompts) + "\n")
    with open(os.path.join(args.out, "timings.json"), "w") as f:
        json.dump({"device": str(device), "mid_times": mid_times, "steps": timings, "teacher": teacher_timing}, f,
                  indent=2)
    print(f"grid (first / middle / last frame; {', '.join(rows)}; one column per prompt) -> {grid_path}")
    destroy_parallel()


if __name__ == "__main__":
    main()
