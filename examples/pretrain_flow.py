"""Train the tiny flow-matching teacher (and the prompt-alignment classifier) that the tiny rCM default distils.

The teacher is a Wan2.1-architecture DiT (`megatron_rcm.training.config.TINY_SHAPES_MODEL`) trained by
rectified-flow matching on the procedural shapes set (`megatron_rcm.data.shapes`) with 10% caption dropout (so
classifier-free guidance works against the empty negative prompt). What is saved is the power-function EMA of its
weights (EDM2; samples of the EMA are much cleaner than those of the last iterate). Written: `shapes-teacher/` (a
megatron-rcm checkpoint, loadable with `megatron_rcm.models.from_pretrained`) and `shapes-classifier.pt` (only if
missing). At the end the teacher's multi-step samples are scored as the rCM evaluation scores them (32-step UniPC,
the eval prompts and noise) for a few guidance scales.

Every batch is a function of (seed, iteration) only, so `--workers` (data rendering in background processes) and
the device do not change the stream. The shipped assets (examples/assets) and the command that made them are listed
in benchmarks/RESULTS.md ("Tiny default quality").
"""

import argparse
import dataclasses
import json
import math
import os
import time

import torch


HIGH_NOISE_BAND = (0.8, 1.0)
"""Noise levels at which the clip is too faint to show its own motion, so that the direction word is worth most
to an ideal denoiser (`benchmarks/shapes_oracle.py`)."""


class TeacherBatches(torch.utils.data.Dataset):
    """Item `it`: the clean videos, text embeddings and flow-matching draws of iteration `it`."""

    def __init__(self, data_config, text_dim: int, batch_size: int, caption_dropout: float, seed: int, length: int,
                 logit_mean: float = 0.0, high_noise_share: float = 0.0, low_noise_caption_dropout: float = 0.0):
        from megatron_rcm.data.shapes import ShapesDataset, ShapesTextEncoder

        self.dataset = ShapesDataset(data_config, seed=seed)
        self.encoder = ShapesTextEncoder(dim=text_dim)
        self.batch_size, self.caption_dropout, self.seed, self.length = batch_size, caption_dropout, seed, length
        self.logit_mean, self.high_noise_share = logit_mean, high_noise_share
        self.low_noise_caption_dropout = low_noise_caption_dropout

    def __len__(self):
        return self.length

    def __getitem__(self, it: int):
        b = self.batch_size
        x0, caps = self.dataset.batch(range(it * b, (it + 1) * b))
        text = self.encoder.encode(caps)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + it)
        text[torch.rand(b, generator=gen) < self.caption_dropout] = 0.0
        # rectified-flow times: logit-normal (SD3) mixed with uniform, so that both ends are trained
        s = torch.sigmoid(torch.randn(b, generator=gen) + self.logit_mean)
        s = torch.where(torch.rand(b, generator=gen) < 0.2, torch.rand(b, generator=gen), s)
        if self.high_noise_share > 0:  # the band where only the caption says where the shape goes
            band = HIGH_NOISE_BAND[0] + (HIGH_NOISE_BAND[1] - HIGH_NOISE_BAND[0]) * torch.rand(b, generator=gen)
            s = torch.where(torch.rand(b, generator=gen) < self.high_noise_share, band, s)
        eps = torch.randn(x0.shape, generator=gen)
        if self.low_noise_caption_dropout > 0:  # below the band no word helps: take away their noise there
            low = (s < HIGH_NOISE_BAND[0]) & (torch.rand(b, generator=gen) < self.low_noise_caption_dropout)
            text[low] = 0.0
        return x0, text, s, eps


@torch.no_grad()
def caption_effect(model, videos, captions, encoder, noise_level: float = 0.8, seed: int = 0) -> dict:
    """Per attribute, the mean squared change of the teacher's clean-sample prediction at `noise_level` when the
    caption's word for that attribute is replaced by the next value (colour red -> green, direction left -> right,
    ...): near 0 means the teacher ignores that word, whatever its samples look like."""
    from megatron_rcm.data import shapes

    device = next(model.parameters()).device
    x0 = videos.to(device)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed)).to(device)
    s = torch.full((x0.shape[0],), noise_level, device=device)
    xs = (1 - noise_level) * x0 + noise_level * eps

    def predict(caps):
        return xs - noise_level * model(xs, 1000.0 * s, encoder.encode(caps).to(device))

    base = predict(captions)
    out = {}
    for i, (name, values) in enumerate(shapes.ATTRIBUTES.items()):
        swapped = []
        for words in map(shapes.parse_caption, captions):
            words = list(words)
            words[i] = values[(values.index(words[i]) + 1) % len(values)]
            swapped.append(shapes.caption(*words))
        out[name] = float(f"{((predict(swapped) - base) ** 2).mean().item():.3g}")
    return out


@torch.no_grad()
def word_spread(model, encoder) -> dict:
    """Per attribute, the mean distance between its words' text embeddings after the teacher's text projection:
    near 0 means the projection has merged that attribute's words, so no later layer can tell them apart."""
    from megatron_rcm.data import shapes

    weight = model.text_embedding.linear_1.weight
    embedded = model.text_embedding(encoder.table.to(weight.device, weight.dtype)).float().cpu()
    out = {}
    for name, values in shapes.ATTRIBUTES.items():
        e = embedded[[encoder.index[v] for v in values]]
        n = len(values)
        out[name] = float(f"{(torch.cdist(e, e).sum() / (n * (n - 1))).item():.3g}")
    return out


@torch.no_grad()
def score_teacher(model, classifier_path: str, guidances, steps: int, num_prompts: int, seed: int) -> dict:
    """Alignment of the teacher's `steps`-step UniPC samples on the evaluation's prompts and noise, per guidance."""
    from megatron_rcm.data import shapes
    from megatron_rcm.diffusion import TrigFlowWrapper, teacher_sample
    from megatron_rcm.training.config import TINY_SHAPES_DATA, TINY_SHAPES_MODEL

    clf = shapes.ShapesClassifier()
    clf.load_state_dict(torch.load(classifier_path, map_location="cpu", weights_only=True))
    clf.eval()
    encoder = shapes.ShapesTextEncoder(dim=TINY_SHAPES_MODEL.text_dim)
    device = next(model.parameters()).device
    prompts = shapes.eval_prompts(num_prompts)
    d = TINY_SHAPES_DATA
    shape = (num_prompts, TINY_SHAPES_MODEL.in_channels, d.frames, d.size, d.size)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 77), dtype=torch.float64).to(device)
    text, neg = encoder.encode(prompts).to(device), encoder.negative(1).to(device)
    teacher = TrigFlowWrapper(model, 1000.0)
    real, captions = shapes.ShapesDataset(d, seed=seed).batch(range(20_000_000, 20_000_000 + 4 * num_prompts))
    out = {"data_alignment": round(shapes.alignment_score(clf, real, captions), 4),  # the classifier's ceiling
           "caption_effect": caption_effect(model, real, captions, encoder),
           "caption_effect_noise0.9": caption_effect(model, real, captions, encoder, noise_level=0.9),
           "word_spread": word_spread(model, encoder)}
    for w in guidances:
        x = teacher_sample(teacher, noise, text, steps, "unipc", 1.0, w, neg).float().cpu()
        per_attribute = shapes.attribute_accuracy(clf, x, prompts)  # their mean is the alignment: one classifier pass
        out[f"alignment_cfg{w:g}"] = round(sum(per_attribute.values()) / len(per_attribute), 4)
        out[f"attributes_cfg{w:g}"] = {k: round(v, 3) for k, v in per_attribute.items()}
        out[f"travel_cfg{w:g}"] = round(shapes.travel(x, prompts), 3)
        out[f"motion_cfg{w:g}"] = round(shapes.motion(x), 3)
    return out


def architecture(args):
    """The tiny preset with the command line's overrides."""
    from megatron_rcm.training.config import TINY_SHAPES_MODEL

    changes = {k: v for k, v in (("num_layers", args.num_layers), ("ffn_dim", args.ffn_dim),
                                 ("num_attention_heads", args.heads), ("attention_head_dim", args.head_dim))
               if v is not None}
    return dataclasses.replace(TINY_SHAPES_MODEL, **changes)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="examples/assets", help="folder for shapes-teacher/ and shapes-classifier.pt")
    p.add_argument("--iterations", type=int, default=6000)
    p.add_argument("--time-limit", type=float, default=0.0,
                   help="seconds; if > 0 the LR schedule runs on max(iteration, time) progress and training stops "
                        "when either is used up (the log says how many iterations ran; --iterations of that number "
                        "reproduces the run without the limit)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema-sigma-rel", type=float, default=0.05, help="relative width of the saved power EMA")
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--logit-mean", type=float, default=0.0,
                   help="location of the logit-normal training times (negative: more of them at low noise)")
    p.add_argument("--high-noise-share", type=float, default=0.0,
                   help=f"share of each batch whose noise level is drawn uniformly from {HIGH_NOISE_BAND} instead")
    p.add_argument("--low-noise-caption-dropout", type=float, default=0.0,
                   help=f"probability of the empty caption for noise levels below {HIGH_NOISE_BAND[0]} (on top of "
                        "--caption-dropout)")
    p.add_argument("--init", default="", help="start from this teacher checkpoint instead of random weights")
    p.add_argument("--classifier-steps", type=int, default=250)
    p.add_argument("--eval-guidance", type=float, nargs="*", default=[1.0, 2.0, 3.0, 4.0],
                   help="guidance scales at which the saved teacher's 32-step samples are scored (none: skip)")
    p.add_argument("--num-layers", type=int, default=None,
                   help="override the tiny preset's blocks (a larger teacher needs a matching preset to be distilled)")
    p.add_argument("--ffn-dim", type=int, default=None, help="override the tiny preset's MLP width")
    p.add_argument("--heads", type=int, default=None, help="override the tiny preset's attention heads")
    p.add_argument("--head-dim", type=int, default=None,
                   help="override the tiny preset's channels per head (16; the width is heads x head dim, and RoPE "
                        "gives each of the frame, height and width axes a third of a head's channels)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workers", type=int, default=0, help="background processes rendering the training batches")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    from megatron_rcm.data.shapes import ShapesDataset, train_classifier
    from megatron_rcm.diffusion import PowerEMA
    from megatron_rcm.models import WanModel, from_pretrained, save_megatron
    from megatron_rcm.parallel import initialize_parallel, set_random_seed
    from megatron_rcm.training.config import TINY_SHAPES_DATA, TINY_SHAPES_MODEL

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    initialize_parallel(backend="gloo")  # one process, no collectives; the checkpoint is written from the CPU
    set_random_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)

    clf_path = os.path.join(args.out, "shapes-classifier.pt")
    if not os.path.exists(clf_path):
        t0 = time.time()
        clf = train_classifier(ShapesDataset(TINY_SHAPES_DATA, seed=args.seed), steps=args.classifier_steps,
                               seed=args.seed, log=print)
        torch.save(clf.state_dict(), clf_path)
        print(f"classifier saved to {clf_path} ({time.time() - t0:.0f} s)")

    torch.manual_seed(args.seed)
    if args.init:
        model = from_pretrained(args.init, params_dtype=torch.float32, device=device)
    else:
        model = WanModel(architecture(args)).to(device)
    ema = PowerEMA(model, args.ema_sigma_rel)
    print(f"teacher: {sum(p.numel() for p in model.parameters()):,} parameters on {device}")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)
    batches = TeacherBatches(TINY_SHAPES_DATA, TINY_SHAPES_MODEL.text_dim, args.batch_size, args.caption_dropout,
                             args.seed, args.iterations, args.logit_mean, args.high_noise_share,
                             args.low_noise_caption_dropout)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, num_workers=args.workers,
                                         prefetch_factor=8 if args.workers else None)
    t0 = time.time()
    ema_loss, it = None, 0
    for it, (x0, text, s, eps) in enumerate(loader):
        elapsed = time.time() - t0
        progress = max(it / args.iterations, elapsed / args.time_limit if args.time_limit > 0 else 0.0)
        if progress >= 1.0:
            break
        lr = args.lr * min(1.0, (it + 1) / 100) * (0.5 * (1 + math.cos(math.pi * progress)) * 0.9 + 0.1)
        for g in opt.param_groups:
            g["lr"] = lr
        x0, text, s, eps = (t.to(device, non_blocking=True) for t in (x0, text, s, eps))
        sb = s.view(-1, 1, 1, 1, 1)
        v = model((1 - sb) * x0 + sb * eps, 1000.0 * s, text)
        loss = ((v - (eps - x0)) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update(model)
        if it % 200 == 0 or it == args.iterations - 1:
            value = loss.item()
            ema_loss = value if ema_loss is None else 0.9 * ema_loss + 0.1 * value
            print(f"iteration {it:6d}/{args.iterations} | loss {value:.4f} (avg {ema_loss:.4f}) | lr {lr:.2e} | "
                  f"elapsed {elapsed:.0f} s", flush=True)
    iterations = it + 1 if it == args.iterations - 1 else it
    print(f"trained {iterations} iterations in {time.time() - t0:.0f} s")
    ema.copy_to(model)
    path = os.path.join(args.out, "shapes-teacher")
    # saved before the scoring, so that a failing evaluation loses no training; CPU tensors load on any machine
    save_megatron(model.cpu(), path)
    model.to(device)
    print(f"teacher (EMA, sigma_rel {args.ema_sigma_rel}) saved to {path}")
    if args.eval_guidance:
        scores = score_teacher(model, clf_path, args.eval_guidance, 32, 96, 1234)
        print(json.dumps({"iterations": iterations, **scores}), flush=True)

if __name__ == "__main__":
    main()
