"""Toy rCM benchmark (CPU, a few minutes): distil a 2-D flow-matching teacher with sCM, DMD and rCM.

A small MLP teacher is trained by flow matching on a mixture of 8 Gaussians with unequal weights; students are
distilled from it with the *same* objective code (megatron_rcm.diffusion) under three weight settings
(sCM: dmd_weight = 0; DMD: scm_weight = 0; rCM: both, lambda swept). For 1, 2 and 4 student steps we report
precision (share of samples within 3 std of a mode), k-NN precision/recall (Kynkaenniemi et al. 2019),
modes covered, per-mode weight error (total variation between the sampled and true mode weights) and
sliced Wasserstein-2 to the data, next to the teacher's multi-step samplers.

    python tools/toy_rcm.py --out toy_rcm.json              # 3 seeds, mean +- std in "summary"

The output JSON is a function of the arguments (same machine and thread count): every draw, the networks' initial
weights included, comes from generators seeded by `--seed`; wall-clock timings go to stderr. The seeds run in
parallel processes (`--jobs`), which does not change the JSON. The defaults take ~5 minutes on 2 idle cores.
"""

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict

import torch
from torch import nn

from megatron_rcm.diffusion import (
    PhaseSchedule,
    PowerEMA,
    RCMConfig,
    TrigFlowWrapper,
    critic_inputs,
    critic_loss,
    dmd_gradient,
    dmd_loss,
    scm_loss,
    scm_targets,
    student_rollout,
    student_sample,
    teacher_sample,
)

TIMESTEP_SCALE = 1000.0

# ---------------------------------------------------------------------------------------------------------------
# Data: 8 Gaussians on a circle, weights proportional to 1..8
# ---------------------------------------------------------------------------------------------------------------

NUM_MODES = 8
RADIUS = 1.4
MODE_STD = 0.08
ANGLES = torch.arange(NUM_MODES, dtype=torch.float64) * (2 * math.pi / NUM_MODES)
CENTERS = RADIUS * torch.stack([torch.cos(ANGLES), torch.sin(ANGLES)], dim=1)
WEIGHTS = torch.arange(1, NUM_MODES + 1, dtype=torch.float64) / (NUM_MODES * (NUM_MODES + 1) / 2)


def sample_data(n: int, generator: torch.Generator) -> torch.Tensor:
    k = torch.multinomial(WEIGHTS, n, replacement=True, generator=generator)
    return (CENTERS[k] + MODE_STD * torch.randn(n, 2, generator=generator, dtype=torch.float64)).float()


# ---------------------------------------------------------------------------------------------------------------
# Velocity network (implements the objective's network protocol)
# ---------------------------------------------------------------------------------------------------------------


class ToyVelocity(nn.Module):
    """MLP velocity net v(x_s, timestep): Fourier features of s = timestep / 1000, SiLU MLP."""

    def __init__(self, hidden: int = 256, depth: int = 4, num_freqs: int = 16):
        super().__init__()
        self.register_buffer("freqs", torch.exp(torch.linspace(0, math.log(200.0), num_freqs)))
        layers, width = [], 2 + 2 * num_freqs
        for _ in range(depth - 1):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        layers.append(nn.Linear(width, 2))
        self.mlp = nn.Sequential(*layers)

    def forward(self, latents, timestep, text=None):
        s = (timestep / TIMESTEP_SCALE).to(latents.dtype)[:, None]
        emb = s * self.freqs
        return self.mlp(torch.cat([latents, torch.sin(emb), torch.cos(emb)], dim=1))

    def jvp(self, latents, timestep, text, latents_tangent, timestep_tangent):
        with torch.no_grad():
            return torch.func.jvp(lambda x, ts: self(x, ts, text), (latents, timestep), (latents_tangent, timestep_tangent))


def train_teacher(iters: int, batch: int, generator: torch.Generator) -> ToyVelocity:
    # the initial weights come from `generator` as well (torch's global RNG would make runs differ)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(2**31, (1,), generator=generator)))
        net = ToyVelocity()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=iters, pct_start=0.05)
    for _ in range(iters):
        x0 = sample_data(batch, generator)
        eps = torch.randn(batch, 2, generator=generator)
        s = torch.rand(batch, generator=generator)
        x_s = (1 - s[:, None]) * x0 + s[:, None] * eps
        loss = ((net(x_s, TIMESTEP_SCALE * s) - (eps - x0)) ** 2).sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return net.requires_grad_(False)


# ---------------------------------------------------------------------------------------------------------------
# Distillation: the training loop a user writes, calling the objective's pieces
# ---------------------------------------------------------------------------------------------------------------


def distill(
    teacher_net, config: RCMConfig, student_steps: int, batch: int, lr: float, critic_lr: float, seed: int, beta1: float = 0.0
):
    """Run the objective for `student_steps` student updates (critic steps in between when DMD is on)."""
    gen = torch.Generator().manual_seed(seed)
    teacher = TrigFlowWrapper(teacher_net, TIMESTEP_SCALE)
    student_net = copy.deepcopy(teacher_net).requires_grad_(True)
    critic_net = copy.deepcopy(teacher_net).requires_grad_(True)
    student, critic = TrigFlowWrapper(student_net, TIMESTEP_SCALE), TrigFlowWrapper(critic_net, TIMESTEP_SCALE)
    opt_s = torch.optim.Adam(student_net.parameters(), lr=lr, betas=(beta1, 0.999))
    opt_c = torch.optim.Adam(critic_net.parameters(), lr=critic_lr, betas=(beta1, 0.999))
    ema = PowerEMA(student_net, config.ema_sigma_rel)
    schedule = PhaseSchedule(config)
    it, done = 0, 0
    while done < student_steps:
        x0 = sample_data(batch, gen)
        if schedule.is_student_step(it):
            loss = torch.zeros((), dtype=torch.float64)
            if config.uses_scm:
                targets = scm_targets(student, teacher, x0, None, None, config, schedule.tangent_warmup_ratio(it), gen)
            if schedule.dmd_active(it):
                x_r, t_r = student_rollout(student, x0, None, schedule.rollout_steps(it, gen), config, gen)
            if config.uses_scm and schedule.dmd_active(it):  # one with-grad forward for both inputs
                pred = student(torch.cat([targets.x_t, x_r]), torch.cat([targets.t, t_r]))
                F_theta, x0_theta = pred.F[:batch], pred.x0[batch:]
            elif config.uses_scm:
                F_theta = student(targets.x_t, targets.t).F
            else:
                x0_theta = student(x_r, t_r).x0
            if config.uses_scm:
                loss = loss + config.scm_weight * scm_loss(F_theta, targets).mean()
            if schedule.dmd_active(it):
                grad = dmd_gradient(teacher, critic, x0_theta.detach(), None, None, config, gen)
                loss = loss + config.dmd_weight * dmd_loss(x0_theta, grad).mean()
            opt_s.zero_grad(set_to_none=True)
            loss.backward()
            for p in student_net.parameters():  # no clipping (paper: crucial); NaN -> 0
                torch.nan_to_num_(p.grad, nan=0.0, posinf=0.0, neginf=0.0)
            opt_s.step()
            ema.update(student_net)
            done += 1
        else:
            inputs = critic_inputs(student, x0, None, schedule.rollout_steps(it, gen), config, gen)
            loss = config.critic_weight * critic_loss(critic(inputs.x_t, inputs.t).x0, inputs).mean()
            opt_c.zero_grad(set_to_none=True)
            loss.backward()
            for p in critic_net.parameters():
                torch.nan_to_num_(p.grad, nan=0.0, posinf=0.0, neginf=0.0)
            opt_c.step()
        it += 1
    ema_net = copy.deepcopy(student_net)
    ema.copy_to(ema_net)
    return ema_net.requires_grad_(False), it


# ---------------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------------


def _knn_radius(x: torch.Tensor, k: int) -> torch.Tensor:
    d = torch.cdist(x, x)
    return d.kthvalue(k + 1, dim=1).values  # +1: the point itself


def metrics(samples: torch.Tensor, data: torch.Tensor, k: int = 5, n_knn: int = 4000, n_proj: int = 256) -> dict:
    samples, data = samples.double(), data.double()
    n = samples.shape[0]
    finite = torch.isfinite(samples).all(1)
    samples = torch.where(finite[:, None], samples, torch.full_like(samples, 1e6))
    dist = torch.cdist(samples, CENTERS)
    nearest = dist.argmin(1)
    precise = dist.min(1).values < 3 * MODE_STD
    counts = torch.bincount(nearest, minlength=NUM_MODES).double()
    weights = counts / n
    # k-NN precision / recall (improved precision and recall), on subsets
    xs, xd = samples[:n_knn], data[:n_knn]
    rs, rd = _knn_radius(xs, k), _knn_radius(xd, k)
    d_sd = torch.cdist(xs, xd)
    knn_precision = (d_sd <= rd[None, :]).any(1).double().mean()
    knn_recall = (d_sd.T <= rs[None, :]).any(1).double().mean()
    # sliced Wasserstein-2 with shared random directions
    g = torch.Generator().manual_seed(1234)
    theta = torch.randn(2, n_proj, generator=g, dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    m = min(n, data.shape[0])
    ps, _ = (samples[:m] @ theta).sort(0)
    pd, _ = (data[:m] @ theta).sort(0)
    sw2 = ((ps - pd) ** 2).mean().sqrt()
    return {
        "precision": round(precise.double().mean().item(), 4),
        "knn_precision": round(knn_precision.item(), 4),
        "knn_recall": round(knn_recall.item(), 4),
        "modes_covered": int((weights >= 0.25 * WEIGHTS).sum().item()),
        "mode_weight_tv": round(0.5 * (weights - WEIGHTS).abs().sum().item(), 4),
        "min_mode_weight_ratio": round((weights / WEIGHTS).min().item(), 3),
        "sw2": round(sw2.item(), 4),
        "nonfinite": int((~finite).sum().item()),
    }


def evaluate_student(net, n: int, data: torch.Tensor, config: RCMConfig, seed: int) -> dict:
    model = TrigFlowWrapper(net, TIMESTEP_SCALE)
    out = {}
    for steps in (1, 2, 4):
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn(n, 2, generator=gen, dtype=torch.float64)
        x = student_sample(model, noise, None, steps, config.sigma_max, config.student_mid_times, gen)
        out[f"{steps}-step"] = metrics(x, data)
    return out


# ---------------------------------------------------------------------------------------------------------------


def run_seed(args, seed: int) -> tuple[dict, dict]:
    """Teacher and every student of one seed, scored against data drawn with that seed: (results, timings)."""
    gen = torch.Generator().manual_seed(seed)
    data = sample_data(args.eval_samples, torch.Generator().manual_seed(seed + 99)).double()
    base = dict(
        guidance=1.0,  # unconditional toy: no CFG
        p_mean=-0.8,  # image setting (T = 1 latent frame)
        p_std=1.6,
        tangent_warmup=args.warmup,
        student_update_freq=args.student_update_freq,
        dmd_weight_mode=args.dmd_weight_mode,
        student_mid_times=tuple(args.mid_times),
        ema_sigma_rel=args.ema_sigma_rel,
    )
    t0 = time.perf_counter()
    teacher_net = train_teacher(args.teacher_iters, args.teacher_batch, gen)
    timings = {"teacher_train_s": round(time.perf_counter() - t0, 1)}
    result = {}
    if "teacher" in args.methods:
        teacher = TrigFlowWrapper(teacher_net, TIMESTEP_SCALE)
        noise = torch.randn(args.eval_samples, 2, generator=torch.Generator().manual_seed(seed + 5), dtype=torch.float64)
        result["teacher"] = {
            "euler-100": metrics(teacher_sample(teacher, noise, None, 100, "euler"), data),
            "unipc-16": metrics(teacher_sample(teacher, noise, None, 16, "unipc"), data),
            "unipc-4": metrics(teacher_sample(teacher, noise, None, 4, "unipc"), data),
        }
    # name -> (config, seed offset); each run's offset is fixed, so a run draws the same numbers whichever other
    # methods run beside it
    runs = {}
    if "scm" in args.methods:
        runs["sCM"] = RCMConfig(scm_weight=1.0, dmd_weight=0.0, **base), 1
    if "dmd" in args.methods:
        runs["DMD"] = RCMConfig(scm_weight=0.0, dmd_weight=args.dmd_weight, **{**base, "tangent_warmup": 0}), 2
    if "rcm" in args.methods:
        for j, lam in enumerate(args.lambdas):
            runs[f"rCM (lambda={lam:g})"] = RCMConfig(scm_weight=1.0, dmd_weight=lam, **base), 3 + j
    result["students"] = {}
    for name, (config, offset) in runs.items():
        t0 = time.perf_counter()
        net, iters = distill(teacher_net, config, args.student_steps, args.batch, args.lr, args.critic_lr,
                             seed + offset)
        timings[f"{name}_s"] = round(time.perf_counter() - t0, 1)
        result["students"][name] = {
            "config": {k: v for k, v in asdict(config).items()
                       if k in ("scm_weight", "dmd_weight", "dmd_weight_mode", "tangent_warmup", "student_update_freq")},
            "iterations": iters,
            **evaluate_student(net, args.eval_samples, data, config, seed=seed + 11),
        }
        print(f"seed {seed} {name}: {iters} iterations in {timings[f'{name}_s']:.1f}s", file=sys.stderr)
    return result, timings


SUMMARY_KEYS = ("precision", "knn_precision", "knn_recall", "modes_covered", "mode_weight_tv", "min_mode_weight_ratio", "sw2")


def summarize(per_seed: list[dict]) -> dict:
    """Mean and (population) standard deviation over seeds of every sampler's metrics: {"mean": .., "std": ..}."""

    def stats(values):
        x = torch.tensor(values, dtype=torch.float64)
        return {"mean": round(x.mean().item(), 4), "std": round(x.std(unbiased=False).item(), 4)}

    def over_seeds(get):
        return {m: stats([get(r)[m] for r in per_seed]) for m in SUMMARY_KEYS}

    first, out = per_seed[0], {}
    if "teacher" in first:
        out["teacher"] = {k: over_seeds(lambda r, k=k: r["teacher"][k]) for k in first["teacher"]}
    out["students"] = {
        name: {k: over_seeds(lambda r, name=name, k=k: r["students"][name][k]) for k in entry if k.endswith("-step")}
        for name, entry in first["students"].items()
    }
    return out


_NOT_IN_RESULT = ("--out", "--jobs")
"""Options that do not change the numbers: left out of the JSON's command."""


def _result_argv(argv: list[str], drop: tuple = ()) -> list[str]:
    """The command line without `--out PATH` and `--jobs N` (and the options in `drop`)."""
    names = _NOT_IN_RESULT + tuple(drop)
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in names:
            skip = True
        elif not a.startswith(tuple(f"{o}=" for o in names)):
            out.append(a)
    return out


def _run_seeds_in_processes(argv: list[str], seeds: list[int], jobs: int) -> list[tuple[dict, dict]]:
    """run_seed of each seed in its own process of this script (`--worker-seed`), `jobs` at a time. A seed's numbers
    depend only on its own generators and --threads, so the JSON is the same for any --jobs."""
    import concurrent.futures
    import subprocess

    common = _result_argv(argv, drop=("--seed", "--seeds"))

    def one(seed):
        cmd = [sys.executable, os.path.abspath(__file__), *common, "--worker-seed", str(seed)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"seed {seed} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        sys.stderr.write(proc.stderr)
        out = json.loads(proc.stdout)
        return out["result"], out["timings"]

    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:  # the threads only wait for the processes
        return list(pool.map(one, seeds))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher-iters", type=int, default=2000)
    parser.add_argument("--student-steps", type=int, default=2000, help="student updates per distillation run")
    parser.add_argument("--teacher-batch", type=int, default=512)
    parser.add_argument("--batch", type=int, default=256, help="batch of the distillation runs")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--critic-lr", type=float, default=3e-4)
    parser.add_argument("--warmup", type=int, default=200, help="tangent warm-up iterations")
    parser.add_argument("--student-update-freq", type=int, default=3,
                        help="one student update every N iterations, critic updates in between (DMD and rCM)")
    parser.add_argument("--methods", nargs="+", default=["teacher", "scm", "dmd", "rcm"], choices=["teacher", "scm", "dmd", "rcm"])
    parser.add_argument("--lambdas", type=float, nargs="+", default=[0.01],
                        help="rCM lambda (dmd_weight) values; default: the paper's 0.01, read as --dmd-weight-mode says")
    parser.add_argument("--dmd-weight-mode", default="per_sample", choices=["per_sample", "paper"],
                        help="rcm.dmd_weight_mode: per_sample (the default everywhere: lambda means at 2 elements what it means "
                             "at Wan's 2.1M) or paper (the reference's per-element scale)")
    parser.add_argument("--dmd-weight", type=float, default=0.01, help="weight of the pure-DMD run")
    parser.add_argument("--mid-times", type=float, nargs=3, default=[0.5, 0.25, 0.1],
                        help="rcm.student_mid_times: TrigFlow times of the student sampler's later steps (the tiny "
                             "default's; the reference's 1.3 1.0 0.6 re-noise a sample almost completely)")
    parser.add_argument("--ema-sigma-rel", type=float, default=0.05, help="rcm.ema_sigma_rel of the evaluated EMA")
    parser.add_argument("--eval-samples", type=int, default=10000)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per seed's process")
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    parser.add_argument("--seeds", type=int, default=3, help="seeds seed, seed + 1, ...: teacher and students per seed")
    parser.add_argument("--jobs", type=int, default=0,
                        help="seeds run at once, each in its own process with --threads threads (default: all of "
                             "them; on 2 cores 3 processes finish sooner than 2); the JSON does not depend on it")
    parser.add_argument("--out", type=str, default=None, help="JSON of the results (identical for identical arguments)")
    parser.add_argument("--worker-seed", type=int, default=None, help=argparse.SUPPRESS)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be >= 1")

    torch.set_num_threads(args.threads)
    if args.worker_seed is not None:  # one seed of a parent run (--jobs): its result and timings on stdout
        result, timings = run_seed(args, args.worker_seed)
        print(json.dumps({"result": result, "timings": timings}))
        return result
    t_start = time.perf_counter()
    load_start = os.getloadavg()[0]
    data = sample_data(args.eval_samples, torch.Generator().manual_seed(args.seed + 99)).double()
    result = {
        "command": " ".join(["tools/toy_rcm.py", *_result_argv(argv)]),
        "machine": f"CPU ({platform.processor() or platform.machine()}), torch threads {args.threads} per seed",
        "torch": torch.__version__,
        "args": {k: v for k, v in vars(args).items() if k not in ("out", "jobs", "worker_seed")},
        "data": {"modes": NUM_MODES, "radius": RADIUS, "mode_std": MODE_STD, "weights": [round(w, 4) for w in WEIGHTS.tolist()]},
        "reference_data_vs_data": metrics(sample_data(args.eval_samples, torch.Generator().manual_seed(7)), data),
    }
    seeds = list(range(args.seed, args.seed + args.seeds))
    jobs = min(args.jobs or len(seeds), len(seeds))
    if jobs > 1:
        outs = _run_seeds_in_processes(argv, seeds, jobs)
    else:
        outs = [run_seed(args, seed) for seed in seeds]
    per_seed = [r for r, _ in outs]
    timings = {f"seed {seed}": t for seed, (_, t) in zip(seeds, outs)}
    result["seeds"] = {str(s): r for s, r in zip(seeds, per_seed)}
    result["summary"] = summarize(per_seed)
    # wall-clock numbers go to stderr only, so that the JSON is a function of the arguments
    timings["total_s"] = round(time.perf_counter() - t_start, 1)
    timings["loadavg_1min"] = [round(load_start, 2), round(os.getloadavg()[0], 2)]
    print(json.dumps({"timings": timings}), file=sys.stderr)
    text = json.dumps(result, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main()
