"""The rCM step under context parallelism (gloo, float64): one student micro-batch (sCM + DMD) and one critic
micro-batch at CP=2 (x DP=2) and TP=2 x CP=2, all-to-all and ring, on a token count CP does not divide (padding),
give the single-process per-sample losses, and the parameter gradients summed over CP equal the single-process
ones. The reference runs once in a one-process world; all layouts share one four-process launch."""

import dataclasses
import os

import pytest
import torch

from megatron_rcm.parallel import run_on_ranks

pytestmark = pytest.mark.distributed

F64 = torch.float64
SHAPE = (2, 4, 3, 6, 6)  # [B, C, T, H, W]: 27 tokens at patch (1, 2, 2), padded at CP 2
NETS = ("teacher", "student", "critic")


def _config():
    from megatron_rcm.models.wan import PRESETS

    return PRESETS["wan-tiny-tp"]  # 4 heads: a2a at CP 2 and at TP 2 x CP 2


def _rcm():
    from megatron_rcm.diffusion import RCMConfig

    # DMD on from the start, loss weights of one so that every part shows in the total
    return RCMConfig(tangent_warmup=0, dmd_weight=1.0, student_update_freq=2, max_rollout_steps=3)


def _iterations(schedule):
    """A student and a critic iteration whose rollouts take at least two steps (noise re-drawn in between)."""
    found = {}
    for it in range(12):
        if schedule.rollout_steps(it) >= 2:
            found.setdefault(schedule.phase(it), it)
    return found


def _inputs():
    g = torch.Generator().manual_seed(11)
    x0 = torch.randn(SHAPE, generator=g, dtype=F64)
    text = torch.randn(SHAPE[0], 5, 16, generator=g, dtype=F64)
    neg = torch.randn(1, 5, 16, generator=g, dtype=F64)
    return x0, text, neg


def _build(state_dicts=None, **kw):
    from megatron_rcm.checkpoint.sharding import load_full_state_dict
    from megatron_rcm.models.wan import WanModel

    nets = {}
    for i, name in enumerate(NETS):
        torch.manual_seed(100 + i)
        net = WanModel(_config(), params_dtype=F64, **kw)
        with torch.no_grad():
            if state_dicts is None:  # distinct networks, no zero-initialised layer left
                for p in net.parameters():
                    p.add_(0.05 * torch.randn_like(p))
            else:
                load_full_state_dict(net, state_dicts[name])
        nets[name] = net.requires_grad_(name != "teacher")
    return nets


def _run_step(nets, cp_group):
    """Per phase: logged per-sample losses, this rank's backpropagated loss, and the trained network."""
    from megatron_rcm.diffusion import PhaseSchedule
    from megatron_rcm.training.step import RCMStep

    rc = _rcm()
    schedule = PhaseSchedule(rc)
    x0, text, neg = _inputs()
    step = RCMStep(rc, schedule, nets["teacher"], nets["student"], nets["critic"], neg_text=neg, cp_group=cp_group,
                   timestep_scale=1000.0)
    out = {}
    for phase, it in sorted(_iterations(schedule).items()):
        net = nets[phase]
        net.zero_grad()
        res = step.run(phase, step.micro_batch(x0, text, torch.Generator().manual_seed(1000 + it)), it)
        res.loss.sum().backward()
        out[phase] = res
    return out


def _reference(path):
    from safetensors.torch import save_file

    from megatron_rcm.parallel import initialize_parallel

    initialize_parallel()
    nets = _build()
    tensors = {f"{n}.{k}": v.detach().contiguous() for n, net in nets.items() for k, v in net.state_dict().items()
               if v is not None}
    for phase, res in _run_step(nets, None).items():
        for k, v in {**res.parts, "loss/total": res.total}.items():
            tensors[f"{phase}/{k}"] = v.detach()
        for k, p in nets[phase].named_parameters():
            tensors[f"grad.{phase}.{k}"] = p.grad.detach().clone()
    save_file(tensors, path)


def _relative(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _check_all(path):
    from safetensors.torch import load_file

    from megatron_rcm.checkpoint.sharding import gather_grads
    from megatron_rcm.parallel import cp_group, initialize_parallel
    from megatron_rcm.parallel.context import sum_context_parallel_grads

    ref = load_file(path)
    state_dicts = {n: {k[len(n) + 1:]: v for k, v in ref.items() if k.startswith(f"{n}.")} for n in NETS}
    plan = [(1, 2, "a2a", False), (1, 2, "ring", False), (2, 2, "a2a", True), (2, 2, "ring", False)]
    current = None
    for tp, cp, comm, sp in plan:
        if current != (tp, cp):  # megatron's groups are rebuilt over the same world
            initialize_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp)
            current = (tp, cp)
        label = f"TP={tp} CP={cp} {comm} sp={sp}"
        nets = _build(state_dicts, sequence_parallel=sp, cp_comm=comm)
        layout = nets["student"].token_layout(SHAPE)
        assert layout.split.comm == comm and layout.split.tokens % cp, label  # padding is exercised
        results = _run_step(nets, cp_group())
        assert set(results) == {"student", "critic"}, label
        for phase, res in results.items():
            logged = {**res.parts, "loss/total": res.total}
            assert set(logged) == {k.split("/", 1)[1] for k in ref if k.startswith(f"{phase}/")}, label
            for k, v in logged.items():
                assert _relative(v, ref[f"{phase}/{k}"]) <= 1e-6, (label, phase, k, v, ref[f"{phase}/{k}"])
            # the local losses add up to the whole sample's over the CP group
            local = res.loss.detach().clone()
            torch.distributed.all_reduce(local, group=cp_group())
            assert _relative(local, res.total) <= 1e-12, (label, phase)
            sum_context_parallel_grads(nets[phase], cp_group())
            grads = gather_grads(nets[phase])
            expected = {k[len(f"grad.{phase}."):]: v for k, v in ref.items() if k.startswith(f"grad.{phase}.")}
            assert set(grads) == set(expected), label
            for k, g in grads.items():
                assert _relative(g, expected[k]) <= 1e-5, (label, phase, k, _relative(g, expected[k]))


def test_step_under_context_parallelism_matches_one_process(tmp_path):
    path = str(tmp_path / "reference.safetensors")
    run_on_ranks(_reference, 1, path)
    assert os.path.isfile(path)
    run_on_ranks(_check_all, 4, path)
