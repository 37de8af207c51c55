"""What each caption word is worth to the ideal denoiser of the tiny shapes set, per noise level.

The shapes set has finitely many equally likely videos (`shapes.all_videos`), so the posterior mean E[x0 | x_s,
caption] is an exact softmax over them. Printed per noise level s (rectified flow, x_s = (1 - s) x0 + s eps): the
ideal denoiser's mean squared x0 error with the whole caption and with one word left out, the error of the caption's
mean video alone (no look at x_s), and with `--teacher PATH` a trained teacher's error with its caption and with
the direction word flipped. A word matters where leaving it out raises the ideal error; a teacher that is far above
the ideal error, or above the caption mean, has not learned what the set allows.

    python benchmarks/shapes_oracle.py [--teacher examples/assets/shapes-teacher] [--samples 256]
"""

import argparse
import json

import torch

from megatron_rcm.data import shapes

WORDS = tuple(shapes.ATTRIBUTES)


def posterior_errors(videos, attributes, x0_index, x_s, s: float) -> dict:
    """Mean squared x0 error of the exact posterior mean given the caption's words (all, or all but one), and of
    the caption's mean video alone."""
    flat = videos.flatten(1).double()
    xs = x_s.flatten(1).double()
    # log p(x_s | video) up to a per-row constant
    logits = (2 * (1 - s) * xs @ flat.T - (1 - s) ** 2 * (flat ** 2).sum(-1)[None]) / (2 * s * s)
    truth = flat[x0_index]
    codes = torch.tensor([[list(values).index(a) for a, values in zip(attrs, shapes.ATTRIBUTES.values())]
                          for attrs in attributes])
    out = {}
    for left_out in (None, *WORDS):
        keep = [i for i, w in enumerate(WORDS) if w != left_out]
        same = (codes[x0_index][:, None, keep] == codes[None, :, keep]).all(-1)
        weights = logits.masked_fill(~same, float("-inf")).softmax(-1)
        name = "all words" if left_out is None else f"without {left_out}"
        out[name] = ((weights @ flat - truth) ** 2).mean().item()
        if left_out is None:
            mean_only = same.double() / same.double().sum(-1, keepdim=True)
            out["caption mean only"] = ((mean_only @ flat - truth) ** 2).mean().item()
    return out


@torch.no_grad()
def teacher_errors(model, encoder, x0, x_s, captions, s: float) -> dict:
    flip = {"left": "right", "right": "left", "up": "down", "down": "up"}
    t = torch.full((x0.shape[0],), 1000.0 * s)
    out = {}
    for name, caps in (("teacher", captions), ("teacher, direction flipped",
                                               [shapes.caption(c, k, flip[d]) for c, k, d in
                                                map(shapes.parse_caption, captions)])):
        x0_hat = x_s - s * model(x_s, t, encoder.encode(caps))
        out[name] = ((x0_hat - x0) ** 2).mean().item()
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="", help="a shapes teacher checkpoint to score beside the ideal denoiser")
    p.add_argument("--samples", type=int, default=256, help="clean videos drawn per noise level")
    p.add_argument("--noise", type=float, nargs="+", default=[0.6, 0.8, 0.85, 0.9, 0.95, 0.98])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    args = p.parse_args()

    from megatron_rcm.training.config import TINY_SHAPES_DATA, TINY_SHAPES_MODEL

    videos, attributes = shapes.all_videos(TINY_SHAPES_DATA)
    model = encoder = None
    if args.teacher:
        from megatron_rcm.models import from_pretrained
        from megatron_rcm.parallel import initialize_parallel

        initialize_parallel(backend="gloo")
        model = from_pretrained(args.teacher, params_dtype=torch.float32, device="cpu").eval()
        encoder = shapes.ShapesTextEncoder(dim=TINY_SHAPES_MODEL.text_dim)
    gen = torch.Generator().manual_seed(args.seed)
    rows = {}
    for s in args.noise:
        index = torch.randint(len(videos), (args.samples,), generator=gen)
        x0 = videos[index]
        x_s = (1 - s) * x0 + s * torch.randn(x0.shape, generator=gen)
        row = posterior_errors(videos, attributes, index, x_s, s)
        if model is not None:
            row.update(teacher_errors(model, encoder, x0, x_s, [shapes.caption(*attributes[i]) for i in index], s))
        rows[f"{s:g}"] = row
    if args.json:
        print(json.dumps(rows))
        return
    names = list(next(iter(rows.values())))
    print(f"{len(videos)} distinct videos; mean squared x0 error per noise level")
    print("| noise | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for s, row in rows.items():
        print(f"| {s} | " + " | ".join(f"{row[n]:.4f}" for n in names) + " |")


if __name__ == "__main__":
    main()
