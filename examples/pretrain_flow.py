"""Train the tiny flow-matching teacher (and the prompt-alignment classifier) that the tiny rCM default distils.

The shipped assets in examples/assets/ were made with

    python examples/pretrain_flow.py --out examples/assets

(one CPU process, one thread; 18 minutes on a shared 2-core machine; final flow-matching loss ~0.10). The teacher is a Wan2.1-architecture DiT
(`megatron_rcm.training.config.TINY_SHAPES_MODEL`) trained by rectified-flow matching on the procedural
shapes set (`megatron_rcm.data.shapes`) with 10% caption dropout (so classifier-free guidance works against
the empty negative prompt). Written: `shapes-teacher/` (a megatron-rcm checkpoint, loadable with
`megatron_rcm.models.from_pretrained`) and `shapes-classifier.pt`.
"""

import argparse
import math
import os
import time

import torch


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="examples/assets", help="folder for shapes-teacher/ and shapes-classifier.pt")
    p.add_argument("--iterations", type=int, default=6000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--classifier-steps", type=int, default=250)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    from megatron_rcm.data.shapes import ShapesDataset, ShapesTextEncoder, train_classifier
    from megatron_rcm.models import WanModel, save_megatron
    from megatron_rcm.parallel import initialize_parallel, set_random_seed
    from megatron_rcm.training.config import TINY_SHAPES_DATA, TINY_SHAPES_MODEL

    initialize_parallel()
    set_random_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    dataset = ShapesDataset(TINY_SHAPES_DATA, seed=args.seed)
    encoder = ShapesTextEncoder(dim=TINY_SHAPES_MODEL.text_dim)

    clf_path = os.path.join(args.out, "shapes-classifier.pt")
    if not os.path.exists(clf_path):
        t0 = time.time()
        clf = train_classifier(dataset, steps=args.classifier_steps, seed=args.seed, log=print)
        torch.save(clf.state_dict(), clf_path)
        print(f"classifier saved to {clf_path} ({time.time() - t0:.0f} s)")

    model = WanModel(TINY_SHAPES_MODEL)
    print(f"teacher: {sum(p.numel() for p in model.parameters()):,} parameters")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    ema_loss = None
    for it in range(args.iterations):
        lr = args.lr * min(1.0, (it + 1) / 100) * (0.5 * (1 + math.cos(math.pi * it / args.iterations)) * 0.9 + 0.1)
        for g in opt.param_groups:
            g["lr"] = lr
        x0, caps = dataset.batch(range(it * args.batch_size, (it + 1) * args.batch_size))
        text = encoder.encode(caps)
        drop = torch.rand(args.batch_size, generator=gen) < args.caption_dropout
        text[drop] = 0.0
        # rectified-flow times: logit-normal (SD3) mixed with uniform, so that both ends are trained
        s = torch.sigmoid(torch.randn(args.batch_size, generator=gen))
        u = torch.rand(args.batch_size, generator=gen)
        s = torch.where(torch.rand(args.batch_size, generator=gen) < 0.2, u, s)
        eps = torch.randn(x0.shape, generator=gen)
        sb = s.view(-1, 1, 1, 1, 1)
        x_s = (1 - sb) * x0 + sb * eps
        v = model(x_s, 1000.0 * s, text)
        loss = ((v - (eps - x0)) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema_loss = loss.item() if ema_loss is None else 0.98 * ema_loss + 0.02 * loss.item()
        if it % 50 == 0 or it == args.iterations - 1:
            el = time.time() - t0
            print(f"iteration {it:6d}/{args.iterations} | loss {loss.item():.4f} (avg {ema_loss:.4f}) | lr {lr:.2e} | "
                  f"elapsed {el:.0f} s | ETA {el / (it + 1) * (args.iterations - it - 1):.0f} s", flush=True)
    save_megatron(model, os.path.join(args.out, "shapes-teacher"))
    print(f"teacher saved to {os.path.join(args.out, 'shapes-teacher')}")


if __name__ == "__main__":
    main()
