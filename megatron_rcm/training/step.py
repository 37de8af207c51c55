"""The rCM step: the passes of one micro-batch, as separate calls that a schedule (the loop today, a pipeline
schedule later) can drive.

Per micro-batch: `micro_batch(x0, text, generator)` fixes the layout, then

- student phase: `student_no_grad(mb, it)` (teacher CFG + student JVP -> sCM target; rollout + DMD gradient)
  and `student_grad(mb, targets)` (the one with-grad student forward over the sCM and DMD inputs together);
- critic phase: `critic_no_grad(mb, it)` (student rollout, re-noised) and `critic_grad(mb, inputs)`.

Networks have one name each: `teacher`, `student`, `critic` are the plain modules (no-grad and JVP calls);
`student_train` / `critic_train` are what the with-grad calls run (the module itself, or its DDP wrapper).

Under context parallelism (`cp_group` of size > 1) the latents stay sharded for the whole micro-batch: x0 is
turned into this rank's patch tokens once (`TokenLayout.shard`), every network call goes through the model's
sharded entry points (`forward_tokens` / `jvp_tokens`, behind `TokenNetwork`, which `TrigFlowWrapper` sees as a
velocity network on tokens), noise is this rank's slice of the full-sample draw (`TokenLayout.noise_fn`), and
per-sample sums, NaN masks and the DMD normaliser are made global over the CP group (`process_group_sum`), so that
the per-sample losses do not depend on the CP size. Padding tokens are zeros in every tensor of the objective
(the sharded entry points return zeros there), so they add nothing to any sum; only counts need the real size.

Every pass kind is timed (`timed`, synchronised on CUDA) and summed over the micro-batches of an iteration;
`pop_times()` hands the sums to the loop's iteration record (`time/<pass>`), which shows where a pipeline's
bubble goes: teacher_cfg, student_jvp, rollout, dmd_gradient, student_grad, critic_grad (the with-grad ones
include the backward when the loop times it under the same name).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
from typing import Callable, Optional

import torch

from megatron_rcm import diffusion as D
from megatron_rcm.training import schedules


def _forward_tokens(net) -> Callable:
    """The sharded entry point of a module, or of the module a DDP wrapper holds (megatron's DDP forwards to
    `module`; its gradient hooks sit on the parameters, so they run whichever entry point is called)."""
    entry = getattr(net, "forward_tokens", None)
    return entry if entry is not None else net.module.forward_tokens


class TokenNetwork:
    """A `diffusion.VelocityNetwork` on this rank's patch tokens: `net(tokens, timestep, text)` and `.jvp(...)`
    run the model's `forward_tokens` / `jvp_tokens` for `layout`, at whatever batch size they are called with
    (CFG and the student's with-grad pass concatenate batches).

    Args:
        module: the DiT (its `jvp_tokens` runs the JVP pass).
        layout: the micro-batch's `TokenLayout` (its batch size is replaced per call).
        call: what the plain call runs (default: `module`); the with-grad calls pass the trained network's wrapper.
    """

    def __init__(self, module: torch.nn.Module, layout, call=None):
        self.module, self.layout = module, layout
        self._forward = _forward_tokens(call if call is not None else module)

    def _layout(self, tokens: torch.Tensor):
        if tokens.shape[0] == self.layout.shape[0]:
            return self.layout
        return dataclasses.replace(self.layout, shape=(tokens.shape[0], *self.layout.shape[1:]))

    def __call__(self, tokens, timestep, text):
        coroutine = schedules.current_coroutine()
        if coroutine is not None:  # a micro-batch of a pipelined round: the schedule runs the call
            return coroutine.post(schedules.StageCall(self.module, tokens, timestep, text, self._layout(tokens)))
        return self._forward(tokens, timestep, text, self._layout(tokens))

    def jvp(self, tokens, timestep, text, tokens_tangent, timestep_tangent):
        coroutine = schedules.current_coroutine()
        if coroutine is not None:
            return coroutine.post(schedules.StageCall(self.module, tokens, timestep, text, self._layout(tokens),
                                                      jvp=True, tokens_tangent=tokens_tangent,
                                                      timestep_tangent=timestep_tangent))
        return self.module.jvp_tokens(tokens, timestep, text, self._layout(tokens), tokens_tangent, timestep_tangent)


class _Timed:
    """A network wrapper whose named methods are timed under a pass name (`methods`: method -> pass); everything
    else is the wrapper's."""

    def __init__(self, wrapper, timed, **methods):
        self._wrapper, self._timed, self._methods = wrapper, timed, methods

    def __getattr__(self, name):
        attr = getattr(self._wrapper, name)
        if name not in self._methods:
            return attr

        def call(*args, **kw):
            with self._timed(self._methods[name]):
                return attr(*args, **kw)

        return call


@dataclasses.dataclass
class MicroBatch:
    """One micro-batch as every pass of the step sees it."""

    x0: torch.Tensor
    """Clean latents [B, C, T, H, W], or this rank's tokens [B, S_local, C*p] under context parallelism."""
    text: Optional[torch.Tensor]
    generator: torch.Generator
    """Draws times, rollout lengths and noise; identical on the ranks of a CP group."""
    layout: object = None
    """The `TokenLayout` under context parallelism, else None."""
    noise_fn: Optional[D.NoiseFn] = None
    sum_fn: Optional[D.SumFn] = None
    numel: Optional[float] = None
    """Real elements of one sample (all shards), for the DMD normaliser; None: counted from the latents."""
    rollout_steps: int = 0
    """The rollout length N its no-grad passes drew (for the FLOP count)."""


@dataclasses.dataclass
class MicroBatchLoss:
    """What the with-grad call of a micro-batch returns."""

    loss: torch.Tensor
    """Per-sample `[B]` loss of this rank's tokens: what it backpropagates (its gradients, summed over the CP
    group, are those of the whole sample's loss)."""
    parts: dict
    """Logged per-sample losses `[B]` ('loss/scm', ...; detached), whole-sample values on every CP rank."""
    total: torch.Tensor
    """The whole-sample `loss` `[B]` (detached), for the logs."""


class RCMStep:
    """The passes of one rCM micro-batch.

    Args:
        config: the `diffusion.RCMConfig`.
        schedule: the `diffusion.PhaseSchedule` (DMD activity, tangent warm-up, rollout lengths).
        teacher / student / critic: the plain networks (critic None without the DMD regularizer).
        student_train / critic_train: what the with-grad calls run (default: the plain network).
        neg_text: the negative prompt's embedding for CFG (None: no guidance).
        cp_group: the context-parallel group (None or size 1: unsharded latents).
        timestep_scale: the networks' timestep units (their model config's `timestep_scale`: Wan 1000, Cosmos 1).
        pipeline: a pipeline schedule (`training.schedules`) under pipeline parallelism: `run_pipelined` drives
            the micro-batches of an iteration through it (the latents are then tokens, as under CP).
    """

    def __init__(self, config: D.RCMConfig, schedule: D.PhaseSchedule, teacher, student, critic=None,
                 student_train=None, critic_train=None, neg_text=None, cp_group=None, *, timestep_scale: float,
                 pipeline=None, pass_timers: str = "events"):
        self.config, self.schedule, self.neg_text = config, schedule, neg_text
        self.pass_timers = pass_timers  # `logging.pass_timers`, checked with the config
        self._events: list = []
        self.timestep_scale = timestep_scale
        self.teacher, self.student, self.critic = teacher, student, critic
        self.student_train = student_train if student_train is not None else student
        self.critic_train = critic_train if critic_train is not None else critic
        self.cp_group = cp_group
        self.pipeline = pipeline
        self.sum_fn = D.process_group_sum(cp_group)
        self.sharded = self.sum_fn is not None or pipeline is not None
        # the dtype each network runs in, as the plain wrapper finds it (a token adapter has no parameters)
        self._dtypes = {name: D.TrigFlowWrapper(net, timestep_scale).dtype for name, net in
                        (("teacher", teacher), ("student", student), ("critic", critic)) if net is not None}
        if not self.sharded:  # one set of wrappers for every micro-batch
            self._plain = self._wrappers(None)
        self.times: dict[str, float] = {}
        self.rollout_steps = 0
        """The rollout length N of the last micro-batch (for the FLOP count)."""

    @contextlib.contextmanager
    def timed(self, name: str):
        """Add the time of the block to pass `name`. On CUDA (`pass_timers="events"`) the GPU time between two
        CUDA events recorded around it, read in `pop_times`, so that timing does not stall the launch queue between
        passes; `"sync"` synchronises before and after instead and takes the wall time (what the per-pass numbers
        of benchmarks/RESULTS.md before 2026-12-04 used); on the CPU the wall time. Inside a pipelined round's
        coroutine it only names the pass: the schedule times the rounds (`schedules.run_lockstep`)."""
        coroutine = schedules.current_coroutine()
        if coroutine is not None:
            coroutine.passes.append(name)
            try:
                yield
            finally:
                coroutine.passes.pop()
            return
        if torch.cuda.is_available() and self.pass_timers == "events":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
                self._events.append((name, start, end))
            return
        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            sync()
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0

    def pop_times(self) -> dict[str, float]:
        """The seconds per pass since the last call, then reset (waits for the passes' CUDA events)."""
        for name, start, end in self._events:
            end.synchronize()
            self.times[name] = self.times.get(name, 0.0) + start.elapsed_time(end) / 1e3
        self._events = []
        out, self.times = self.times, {}
        return out

    # ------------------------------------------------------------------------------------------------------
    def _wrap(self, net, dtype, layout, call=None) -> D.TrigFlowWrapper:
        if layout is not None:
            net = TokenNetwork(net, layout, call)
        elif call is not None:
            net = call
        return D.TrigFlowWrapper(net, self.timestep_scale, dtype=dtype)

    def _wrappers(self, layout) -> dict:
        d = self._dtypes
        w = {"teacher": self._wrap(self.teacher, d["teacher"], layout),
             "student": self._wrap(self.student, d["student"], layout),
             "student_train": self._wrap(self.student, d["student"], layout, self.student_train)}
        if self.critic is not None:
            w["critic"] = self._wrap(self.critic, d["critic"], layout)
            w["critic_train"] = self._wrap(self.critic, d["critic"], layout, self.critic_train)
        return w

    def micro_batch(self, x0: torch.Tensor, text, generator: torch.Generator) -> MicroBatch:
        """The micro-batch of complete latents x0 [B, C, T, H, W] (every rank of a CP group passes the same);
        under CP, sharded once here."""
        if not self.sharded:
            return MicroBatch(x0, text, generator)
        layout = self.student.token_layout(x0.shape)
        return MicroBatch(layout.shard(x0), text, generator, layout, layout.noise_fn(generator), self.sum_fn,
                          float(math.prod(x0.shape[1:])))

    def networks(self, mb: MicroBatch) -> dict:
        """The TrigFlow wrappers of this micro-batch: 'teacher', 'student', 'critic', 'student_train',
        'critic_train'."""
        return self._plain if mb.layout is None else self._wrappers(mb.layout)

    def _global(self, mb: MicroBatch, values: dict) -> dict:
        """Whole-sample values of local per-sample sums, in one all-reduce."""
        if mb.sum_fn is None or not values:
            return values
        keys = list(values)
        total = mb.sum_fn(torch.stack([values[k] for k in keys]).flatten())
        return dict(zip(keys, total.reshape(len(keys), -1)))

    # ------------------------------------------------------------------------------------------------------
    # Student phase
    # ------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def student_no_grad(self, mb: MicroBatch, it: int) -> dict:
        """Teacher CFG + student JVP (sCM target); student rollout + DMD gradient (regularizer). No autograd.
        Returns {'scm': SCMTargets, 'dmd_input': (x_t, t), 'dmd': DMDGradient} (the parts that are on)."""
        rc, net, out, gen = self.config, self.networks(mb), {}, mb.generator
        if rc.uses_scm:
            student = _Timed(net["student"], self.timed, jvp="student_jvp")
            teacher = _Timed(net["teacher"], self.timed, guided="teacher_cfg")
            out["scm"] = D.scm_targets(student, teacher, mb.x0, mb.text, self.neg_text, rc,
                                       self.schedule.tangent_warmup_ratio(it), gen, noise_fn=mb.noise_fn,
                                       sum_fn=mb.sum_fn)
        if self.schedule.dmd_active(it):
            n = self.rollout_steps = mb.rollout_steps = self.schedule.rollout_steps(it, gen)
            with self.timed("rollout"):
                x, t = D.student_rollout(net["student"], mb.x0, mb.text, n, rc, gen, noise_fn=mb.noise_fn)
                x0_student = net["student"](x, t, mb.text).x0
            out["dmd_input"] = (x, t)
            with self.timed("dmd_gradient"):
                out["dmd"] = D.dmd_gradient(net["teacher"], net["critic"], x0_student, mb.text, self.neg_text, rc,
                                            gen, noise_fn=mb.noise_fn, sum_fn=mb.sum_fn, numel=mb.numel)
        return out

    def _student_grad_inputs(self, mb: MicroBatch, targets: dict):
        """(x_t, t, text, parts) of the one with-grad student call: the sCM and DMD inputs concatenated."""
        text = mb.text
        xs, ts, texts, parts = [], [], [], []
        if "scm" in targets:
            xs.append(targets["scm"].x_t), ts.append(targets["scm"].t), texts.append(text), parts.append("scm")
        if "dmd" in targets:
            x, t = targets["dmd_input"]
            xs.append(x), ts.append(t), texts.append(text), parts.append("dmd")
        return torch.cat(xs), torch.cat(ts), torch.cat(texts), parts

    def student_grad(self, mb: MicroBatch, targets: dict) -> MicroBatchLoss:
        """One with-grad student forward over the sCM and DMD inputs together."""
        x, t, text, parts = self._student_grad_inputs(mb, targets)
        with self.timed("student_grad"):
            pred = self.networks(mb)["student_train"](x, t, text)
        return self._student_loss(mb, targets, parts, pred)

    def _student_loss(self, mb: MicroBatch, targets: dict, parts: list, pred: D.TrigFlowPrediction) -> MicroBatchLoss:
        rc, text = self.config, mb.text
        b = text.shape[0]
        total = torch.zeros(b, dtype=torch.float64, device=text.device)
        losses = {}
        for i, name in enumerate(parts):
            if name == "scm":
                loss = D.scm_loss(pred.F[i * b:(i + 1) * b], targets["scm"], mb.sum_fn)
                total = total + rc.scm_weight * loss
            else:
                loss = D.dmd_loss(pred.x0[i * b:(i + 1) * b], targets["dmd"], mb.sum_fn)
                total = total + rc.dmd_weight * loss
            losses[f"loss/{name}"] = loss.detach()
        logged = self._global(mb, {**losses, "loss/total": total.detach()})
        return MicroBatchLoss(total, {k: logged[k] for k in losses}, logged["loss/total"])

    # ------------------------------------------------------------------------------------------------------
    # Critic phase
    # ------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def critic_no_grad(self, mb: MicroBatch, it: int) -> D.CriticInputs:
        """A student sample from an N-step rollout, re-noised at t_D (no autograd)."""
        n = self.rollout_steps = mb.rollout_steps = self.schedule.rollout_steps(it, mb.generator)
        with self.timed("rollout"):
            return D.critic_inputs(self.networks(mb)["student"], mb.x0, mb.text, n, self.config, mb.generator,
                                   noise_fn=mb.noise_fn)

    def critic_grad(self, mb: MicroBatch, inputs: D.CriticInputs) -> MicroBatchLoss:
        """One with-grad critic forward and its denoising loss."""
        with self.timed("critic_grad"):
            pred = self.networks(mb)["critic_train"](inputs.x_t, inputs.t, mb.text)
        return self._critic_loss(mb, inputs, pred)

    def _critic_loss(self, mb: MicroBatch, inputs: D.CriticInputs, pred: D.TrigFlowPrediction) -> MicroBatchLoss:
        loss = D.critic_loss(pred.x0, inputs, mb.sum_fn)
        total = self.config.critic_weight * loss
        logged = self._global(mb, {"loss/critic": loss.detach(), "loss/total": total.detach()})
        return MicroBatchLoss(total, {"loss/critic": logged["loss/critic"]}, logged["loss/total"])

    # ------------------------------------------------------------------------------------------------------
    def run(self, phase: str, mb: MicroBatch, it: int) -> MicroBatchLoss:
        """Both calls of `phase` ('student' or 'critic') for one micro-batch."""
        if phase == "student":
            return self.student_grad(mb, self.student_no_grad(mb, it))
        if phase == "critic":
            return self.critic_grad(mb, self.critic_no_grad(mb, it))
        raise ValueError(f"phase must be 'student' or 'critic', got {phase!r}")

    # ------------------------------------------------------------------------------------------------------
    # Under pipeline parallelism
    # ------------------------------------------------------------------------------------------------------
    def _grad_item(self, phase: str, mb: MicroBatch, out, backward_loss: Callable) -> schedules.GradItem:
        """The with-grad call of `phase` for one micro-batch as a schedule drives it: the TrigFlow maps around
        the trained network's stages (inputs on every stage, the prediction and loss on the last)."""
        net = self.networks(mb)
        if phase == "student":
            x, t, text, parts = self._student_grad_inputs(mb, out)
            wrapper, module, names = net["student_train"], self.student, tuple(f"loss/{p}" for p in parts)
            finish = functools.partial(self._student_loss, mb, out, parts)
        else:
            x, t, text = out.x_t, out.t, mb.text
            wrapper, module, names = net["critic_train"], self.critic, ("loss/critic",)
            finish = functools.partial(self._critic_loss, mb, out)
        tokens, timestep, maps = wrapper.network_inputs(x, t)
        layout = dataclasses.replace(mb.layout, shape=(tokens.shape[0], *mb.layout.shape[1:]))
        call = schedules.StageCall(module, tokens, timestep, text, layout, pass_name=f"{phase}_grad")
        return schedules.GradItem(call, lambda y: finish(wrapper.prediction(y, maps)), backward_loss, names,
                                  mb.text.shape[0])

    def run_pipelined(self, phase: str, mbs: list[MicroBatch], it: int, backward_loss: Callable) -> list:
        """Both calls of `phase` for all micro-batches of an iteration through the pipeline schedule: the no-grad
        passes as lockstep rounds (pipelined across micro-batches), then the with-grad passes 1F1B, whose
        backward (of `backward_loss(MicroBatchLoss)`) leaves the gradients in the parameters. Returns each
        micro-batch's `MicroBatchLoss` on every stage (its `loss` on the last stage only)."""
        no_grad = {"student": self.student_no_grad, "critic": self.critic_no_grad}[phase]
        outs = schedules.run_lockstep([functools.partial(no_grad, mb, it) for mb in mbs],
                                      self.pipeline.forward_only, mbs[0].x0.device, self.times)
        items = [self._grad_item(phase, mb, out, backward_loss) for mb, out in zip(mbs, outs)]
        with self.timed(f"{phase}_grad"):  # forwards and backwards
            return self.pipeline.forward_backward(items)
