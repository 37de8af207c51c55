"""Pipeline schedules for the rCM step: every pass of an iteration's micro-batches through the pipeline stages.

Under pipeline parallelism an iteration runs in two phases (docs/architecture.md, "Pipeline schedules"):

1. **No-grad passes, pipelined across micro-batches.** Each micro-batch's no-grad work (teacher CFG, the student's
   JVP pass, rollouts of N dependent student calls, the DMD gradient, the critic's inputs) is ordinary sequential
   code with several network calls. It runs as a coroutine per micro-batch (`run_lockstep`): every coroutine runs
   until its next network call, the calls of all micro-batches form a *round*, and the round goes through the
   stages as a forward-only schedule (`forward_only`): stage s works on micro-batch m while stage s+1 works on
   m-1. A rollout's dependent calls are thus pipelined across micro-batches. The last stage's outputs are
   broadcast to every stage, so that every rank continues the same coroutines with the same numbers.
2. **The with-grad pass, 1F1B.** One with-grad call per micro-batch (`GradItem`), forward and backward
   interleaved one-forward-one-backward (`forward_backward`); the loss exists on the last stage only and its
   logged parts are broadcast to every stage afterwards.

Two implementations behind one interface: `MegatronSchedule` drives megatron-core's `get_forward_backward_func`
(needs CUDA: NCCL P2P, its buffers are allocated on the GPU); `GlooSchedule` is the CPU stand-in with the same
order of work, P2P over gloo (`torch.distributed.isend` / `recv` on the pipeline group). Both call the model's
`stage_forward` (models/dit.py), which runs one stage without communication.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from typing import Callable, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_rcm.parallel.pipeline import broadcast_from_last
from megatron_rcm.parallel.state import pp_group


# ---------------------------------------------------------------------------------------------------------------
# What a stage runs
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class StageCall:
    """One network call on this rank's tokens, as every stage sees it (every rank holds the same inputs).

    `module.stage_forward(tokens, timestep, text, layout, ...)` runs it stage by stage; `layout` is the call's own
    (its batch may be twice the micro-batch's under CFG)."""

    module: torch.nn.Module
    tokens: torch.Tensor
    timestep: torch.Tensor
    text: Optional[torch.Tensor]
    layout: object
    jvp: bool = False
    tokens_tangent: Optional[torch.Tensor] = None
    timestep_tangent: Optional[torch.Tensor] = None
    pass_name: str = ""
    """The pass kind it belongs to (for the per-pass times)."""

    def run_stage(self, hidden=None):
        return self.module.stage_forward(self.tokens, self.timestep, self.text, self.layout, hidden=hidden,
                                         jvp=self.jvp, tokens_tangent=self.tokens_tangent,
                                         timestep_tangent=self.timestep_tangent)

    def activation_shape(self) -> tuple[int, ...]:
        """What a non-last stage sends on."""
        return tuple(self.module.stage_activation_shape(self.layout, jvp=self.jvp))

    def output_shape(self) -> tuple[int, ...]:
        """What the last stage returns: velocity tokens [B, S_local, C_out*p] (twice, stacked, with `jvp`)."""
        config = self.module.config
        shape = (self.layout.shape[0], self.layout.split.chunk, config.out_channels * math.prod(config.patch_size))
        return (2, *shape) if self.jvp else shape


@dataclasses.dataclass
class GradItem:
    """The with-grad call of one micro-batch: `call` (its module is the trained network) and, on the last stage,
    `loss_fn(velocity_tokens) -> MicroBatchLoss`; `backward_loss(MicroBatchLoss) -> scalar` is what is
    backpropagated (the trainer's normalisation); `part_names`: the logged parts' keys, known on every stage;
    `batch`: the micro-batch's samples (each part is one value per sample)."""

    call: StageCall
    loss_fn: Callable
    backward_loss: Callable
    part_names: tuple[str, ...]
    batch: int


# ---------------------------------------------------------------------------------------------------------------
# Coroutines: each micro-batch's no-grad code, stopped at every network call
# ---------------------------------------------------------------------------------------------------------------
_local = threading.local()


def current_coroutine():
    """The lockstep coroutine this thread runs, or None (the main thread)."""
    return getattr(_local, "coroutine", None)


class _Coroutine:
    """A function run in its own thread, strictly alternating with the main thread: `resume` runs it until it
    posts its next `StageCall` (`post`, which returns the main thread's reply) or returns. Only one of the two
    threads runs at any time, so the whole is as deterministic as sequential code."""

    def __init__(self, fn: Callable, device: torch.device):
        self.fn, self.device = fn, device
        self.call: Optional[StageCall] = None
        self.passes: list[str] = []
        """The pass names the coroutine is inside (`RCMStep.timed` pushes them)."""
        self.done, self.value, self.error, self._reply = False, None, None, None
        self._go, self._back = threading.Semaphore(0), threading.Semaphore(0)
        self.thread = threading.Thread(target=self._main, daemon=True)
        self.thread.start()

    def _main(self):
        _local.coroutine = self
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # a new thread starts on device 0
        self._go.acquire()
        try:
            with torch.no_grad():
                self.value = self.fn()
        except BaseException as e:  # handed to the main thread
            self.error = e
        self.done = True
        self._back.release()

    def resume(self, reply=None) -> None:
        self._reply = reply
        self._go.release()
        self._back.acquire()

    def post(self, call: StageCall):
        call.pass_name = self.passes[-1] if self.passes else call.pass_name
        self.call = call
        self._back.release()
        self._go.acquire()
        self.call = None
        return self._reply


def run_lockstep(fns: list[Callable], execute: Callable[[list[StageCall]], list], device: torch.device,
                 times: Optional[dict] = None) -> list:
    """Run `fns[m]()` for every micro-batch as coroutines; in each round the network calls of all unfinished
    coroutines (in micro-batch order) go to `execute(calls) -> outputs` at once. Returns the functions' values.
    `times`: the wall time of each round is added to it under the calls' pass names (shared equally)."""
    coroutines = [_Coroutine(fn, device) for fn in fns]
    for c in coroutines:
        c.resume()
    while True:
        for c in coroutines:
            if c.error is not None:
                raise c.error
        live = [c for c in coroutines if not c.done]
        if not live:
            return [c.value for c in coroutines]
        calls = [c.call for c in live]
        t0 = time.perf_counter()
        outputs = execute(calls)
        if times is not None:
            share = (time.perf_counter() - t0) / len(calls)
            for call in calls:
                times[call.pass_name] = times.get(call.pass_name, 0.0) + share
        for c, out in zip(live, outputs):
            c.resume(out)


# ---------------------------------------------------------------------------------------------------------------
# The schedules
# ---------------------------------------------------------------------------------------------------------------
def _broadcast_outputs(calls: list[StageCall], outputs: Optional[list]) -> list:
    """The last stage's outputs of a round on every stage (one broadcast of their concatenation)."""
    shapes = [c.output_shape() for c in calls]
    flat = None
    if parallel_state.is_pipeline_last_stage():
        dtype = calls[0].tokens.dtype
        flat = torch.cat([(torch.stack(o) if c.jvp else o).reshape(-1).to(dtype) for c, o in zip(calls, outputs)])
    flat = broadcast_from_last(flat)
    out = []
    for c, shape, piece in zip(calls, shapes, flat.split([math.prod(s) for s in shapes])):
        y = piece.view(*shape)
        out.append((y[0], y[1]) if c.jvp else y)
    return out


def _broadcast_losses(items: list[GradItem], losses: Optional[list]) -> list:
    """The logged parts and totals of every micro-batch's loss (last stage) on every stage."""
    from megatron_rcm.training.step import MicroBatchLoss

    sizes = [(len(it.part_names) + 1) * it.batch for it in items]
    flat = None
    if parallel_state.is_pipeline_last_stage():
        flat = torch.cat([torch.cat([*(l.parts[k].double() for k in it.part_names), l.total.double()])
                          for it, l in zip(items, losses)])
    flat = broadcast_from_last(flat)
    out = []
    for it, piece, l in zip(items, flat.split(sizes), losses or [None] * len(items)):
        values = piece.view(len(it.part_names) + 1, -1)
        parts = {k: values[i] for i, k in enumerate(it.part_names)}
        out.append(MicroBatchLoss(l.loss if l is not None else None, parts, values[-1]))
    return out


class GlooSchedule:
    """The CPU stand-in for megatron's schedules (P2P over gloo; also runs on GPUs with a gloo group)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.first, self.last = parallel_state.is_pipeline_first_stage(), parallel_state.is_pipeline_last_stage()
        self.prev = None if self.first else parallel_state.get_pipeline_model_parallel_prev_rank()
        self.next = None if self.last else parallel_state.get_pipeline_model_parallel_next_rank()

    def _recv(self, shape, dtype, src) -> torch.Tensor:
        t = torch.empty(shape, dtype=dtype, device=self.device)
        dist.recv(t, src, group=pp_group())
        return t

    def forward_only(self, calls: list[StageCall]) -> list:
        """One round of no-grad calls through the stages, pipelined: sends are asynchronous, so a stage starts
        the next call as soon as it has sent the previous one on. Returns the outputs on every stage."""
        pending, outputs = [], []
        with torch.no_grad():
            for c in calls:
                hidden = None if self.first else self._recv(c.activation_shape(), c.tokens.dtype, self.prev)
                out = c.run_stage(hidden)
                if self.last:
                    outputs.append(out)
                else:
                    out = out.contiguous()
                    pending.append((dist.isend(out, self.next, group=pp_group()), out))
            for work, _ in pending:
                work.wait()
        return _broadcast_outputs(calls, outputs if self.last else None)

    def forward_backward(self, items: list[GradItem]) -> list:
        """1F1B over the micro-batches' with-grad calls: stage s runs `pp - s - 1` warm-up forwards, then
        alternates one forward and one backward, then drains the remaining backwards. Gradients accumulate in
        the parameters' `.grad` (or megatron DDP's `main_grad`). Returns every micro-batch's loss on every
        stage (`loss` only on the last)."""
        pp, rank, n = parallel_state.get_pipeline_model_parallel_world_size(), \
            parallel_state.get_pipeline_model_parallel_rank(), len(items)
        warmup = min(pp - rank - 1, n)
        saved, losses, pending = [], [], []

        def forward(i):
            item = items[i]
            x = None
            if not self.first:
                x = self._recv(item.call.activation_shape(), item.call.tokens.dtype, self.prev).requires_grad_(True)
            y = item.call.run_stage(x)
            if self.last:
                losses.append(item.loss_fn(y))
                y = item.backward_loss(losses[-1])  # the last stage backpropagates the scalar loss
            else:
                send = y.detach().contiguous()
                pending.append((dist.isend(send, self.next, group=pp_group()), send))
            saved.append((x, y))

        def backward():
            x, y = saved.pop(0)
            if self.last:
                y.backward()
            else:
                g = self._recv(y.shape, y.dtype, self.next)
                torch.autograd.backward(y, g)
            if not self.first:
                gx = x.grad if x.grad is not None else torch.zeros_like(x)
                gx = gx.contiguous()
                pending.append((dist.isend(gx, self.prev, group=pp_group()), gx))

        for i in range(warmup):
            forward(i)
        for i in range(warmup, n):
            forward(i)
            backward()
        for _ in range(warmup):
            backward()
        for work, _ in pending:
            work.wait()
        return _broadcast_losses(items, losses if self.last else None)


class _MegatronModel(torch.nn.Module):
    """What megatron's schedules see as the model: the config they read and `set_input_tensor`."""

    def __init__(self, module: torch.nn.Module, config):
        from megatron.core.enums import ModelType

        super().__init__()
        self.module, self.config = module, config
        self.model_type = ModelType.encoder_or_decoder

    def set_input_tensor(self, input_tensor) -> None:
        self.module.set_input_tensor(input_tensor)


class MegatronSchedule:
    """megatron-core's `get_forward_backward_func` (1F1B without interleaving; forward-only for the no-grad
    rounds) on CUDA. Shapes are exchanged per micro-batch (`variable_seq_lengths`): calls of one round differ in
    batch (CFG, JVP pairs)."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        from megatron.core.model_parallel_config import ModelParallelConfig

        self.device = device
        self.config = ModelParallelConfig(
            tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
            pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
            context_parallel_size=parallel_state.get_context_parallel_world_size(),
            pipeline_dtype=dtype, params_dtype=dtype, variable_seq_lengths=True)
        # a TransformerConfig field the schedules read (TransformerConfig itself refuses variable_seq_lengths
        # without MoE's all-to-all dispatcher): the loss function's loss is backpropagated as it is, with no
        # division by the micro-batch count
        self.config.calculate_per_token_loss = True

    def _run(self, items: list, forward_only: bool, stage_call: Callable, on_output: Callable):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        first = stage_call(items[0])
        model = _MegatronModel(first.module, self.config)
        order = iter(range(len(items)))

        def forward_step(data_iterator, model):
            i = next(data_iterator)
            out = stage_call(items[i]).run_stage()  # later stages read what set_input_tensor gave

            def loss_func(output):
                return on_output(i, output)

            return out, loss_func

        get_forward_backward_func()(forward_step_func=forward_step, data_iterator=order, model=[model],
                                    num_microbatches=len(items), seq_length=first.layout.split.chunk,
                                    micro_batch_size=first.layout.shape[0], forward_only=forward_only)

    def forward_only(self, calls: list[StageCall]) -> list:
        outputs = [None] * len(calls)

        def keep(i, output):
            outputs[i] = output
            return torch.zeros((), device=self.device), torch.ones((), dtype=torch.int, device=self.device), {}

        with torch.no_grad():
            self._run(calls, True, lambda c: c, keep)
        return _broadcast_outputs(calls, outputs)

    def forward_backward(self, items: list[GradItem]) -> list:
        losses = [None] * len(items)

        def loss(i, output):
            losses[i] = items[i].loss_fn(output)
            return items[i].backward_loss(losses[i]), torch.ones((), dtype=torch.int, device=self.device), {}

        self._run(items, False, lambda it: it.call, loss)
        return _broadcast_losses(items, losses)


def build_schedule(device: torch.device, dtype: torch.dtype, kind: str = "auto"):
    """`MegatronSchedule` on CUDA with an NCCL pipeline group, else `GlooSchedule` (`kind`: auto | megatron |
    gloo)."""
    if kind == "auto":
        kind = "megatron" if device.type == "cuda" and dist.get_backend(pp_group()) == "nccl" else "gloo"
    if kind == "megatron":
        return MegatronSchedule(device, dtype)
    if kind == "gloo":
        return GlooSchedule(device)
    raise ValueError(f"pipeline schedule must be auto, megatron or gloo, got {kind!r}")
