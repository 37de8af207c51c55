"""Pipeline parallelism: which blocks a stage owns, and the point-to-point chain between stages.

Stages are megatron-core's pipeline group (`initialize_parallel(pipeline_model_parallel_size=N)`): the ranks that
share their tensor / context / data-parallel coordinates, one per stage. Stage `s` owns a contiguous run of the
model's blocks (`stage_layers`). The public API (`model(latents, ...)`, `model.jvp(...)`) runs the stages as a
chain: each stage receives the residual stream from the previous one (`receive_activation`), runs its blocks and
sends the result on (`send_to_next_and_wait_output`); the last stage runs the head and broadcasts its output to
every stage, so every rank returns the complete result. With autograd, one backward on every rank (of the same
loss of that output) gives every stage's parameter gradients: the gradient of a stage's output travels back to
it from the next stage, and the gradient of its input goes on to the previous one.

Tensors travel with a small header (dtype and shape), so a receiver needs no shape agreed in advance (megatron's
schedules agree shapes instead; `models/dit.py` `stage_activation_shape` gives them).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_rcm.parallel.state import pp_group

_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.uint8)
_MAX_DIMS = 6


def stage_layers(num_layers: int, pp_size: int, pipeline_layers=None) -> list[int]:
    """Blocks per stage: `pipeline_layers` when given (checked), else balanced (the first stages take one more
    when the pipeline size does not divide the block count)."""
    if pipeline_layers is not None:
        layers = list(pipeline_layers)
        if (len(layers) != pp_size or any(not isinstance(n, int) or n < 1 for n in layers)
                or sum(layers) != num_layers):
            raise ValueError(f"pipeline_layers {layers} must give each of the {pp_size} pipeline stages at least one "
                             f"block and sum to num_layers={num_layers}")
        return layers
    if num_layers < pp_size:
        raise ValueError(f"{num_layers} blocks cannot fill {pp_size} pipeline stages; use a smaller "
                         f"pipeline_model_parallel_size")
    base, extra = divmod(num_layers, pp_size)
    return [base + (1 if s < extra else 0) for s in range(pp_size)]


def next_rank() -> int:
    """Global rank of the next stage (of this rank's pipeline group)."""
    return parallel_state.get_pipeline_model_parallel_next_rank()


def prev_rank() -> int:
    """Global rank of the previous stage."""
    return parallel_state.get_pipeline_model_parallel_prev_rank()


_HEADER = 3 + _MAX_DIMS
"""dtype, dims, whether the sender's tensor takes part in autograd, shape."""


def _header(tensor: torch.Tensor, grad: bool = False) -> torch.Tensor:
    if tensor.dtype not in _DTYPES or tensor.dim() > _MAX_DIMS:
        raise ValueError(f"cannot send a {tensor.dtype} tensor of {tensor.dim()} dims between pipeline stages")
    h = torch.full((_HEADER,), -1, dtype=torch.int64)
    h[0], h[1], h[2] = _DTYPES.index(tensor.dtype), tensor.dim(), int(grad)
    h[3:3 + tensor.dim()] = torch.tensor(tensor.shape, dtype=torch.int64)
    return h


def _empty_from(h: torch.Tensor, device) -> torch.Tensor:
    shape = [int(s) for s in h[3:3 + int(h[1])]]
    return torch.empty(shape, dtype=_DTYPES[int(h[0])], device=device)


def _device():
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def send_tensor(tensor: torch.Tensor, dst: int, grad: bool = False) -> None:
    """Send `tensor` (with its header) to global rank `dst` of the pipeline group; `grad`: tell the receiver that a
    gradient is expected back."""
    dev = tensor.device
    dist.send(_header(tensor, grad).to(dev), dst, group=pp_group())
    dist.send(tensor.detach().contiguous(), dst, group=pp_group())


def recv_tensor(src: int, with_flag: bool = False):
    """Receive a tensor sent by `send_tensor` from global rank `src` of the pipeline group (`with_flag`: and
    whether the sender's tensor takes part in autograd)."""
    dev = _device()
    h = torch.empty(_HEADER, dtype=torch.int64, device=dev)
    dist.recv(h, src, group=pp_group())
    h = h.cpu()
    tensor = _empty_from(h, dev)
    dist.recv(tensor, src, group=pp_group())
    return (tensor, bool(h[2])) if with_flag else tensor


def broadcast_from_last(tensor: torch.Tensor | None, with_flag: bool = False):
    """The last stage's `tensor` on every stage (`tensor` is ignored elsewhere); `with_flag`: and whether it takes
    part in autograd on the last stage."""
    src, dev = parallel_state.get_pipeline_model_parallel_last_rank(), _device()
    last = parallel_state.is_pipeline_last_stage()
    h = _header(tensor, tensor.requires_grad).to(dev) if last else torch.empty(_HEADER, dtype=torch.int64, device=dev)
    dist.broadcast(h, src, group=pp_group())
    h = h.cpu()
    out = tensor.detach().contiguous() if last else _empty_from(h, dev)
    dist.broadcast(out, src, group=pp_group())
    return (out, bool(h[2])) if with_flag else out


def receive_activation() -> torch.Tensor:
    """The previous stage's output. When it takes part in autograd there (and grad mode is on here), its gradient
    is sent back to the previous stage as soon as backward computes it."""
    prev = prev_rank()
    x, sender_grad = recv_tensor(prev, with_flag=True)
    if sender_grad and torch.is_grad_enabled():
        x.requires_grad_(True)
        x.register_hook(lambda g: send_tensor(g, prev))
    return x


class _ToNextStage(torch.autograd.Function):
    """Forward: send this stage's output to the next stage, then receive the last stage's broadcast result.
    Backward: the gradient of this stage's output comes from the next stage (the incoming gradient of the
    result is the same loss's on every rank, and the last stage already carries it)."""

    @staticmethod
    def forward(ctx, x):
        send_tensor(x, next_rank(), grad=True)
        return broadcast_from_last(None)

    @staticmethod
    def backward(ctx, grad):
        return recv_tensor(next_rank()).to(grad.device)


def send_to_next_and_wait_output(x: torch.Tensor) -> torch.Tensor:
    """Non-last stages: hand `x` to the next stage and return the last stage's (broadcast) output, differentiable
    towards `x` when `x` requires grad (otherwise a leaf that requires grad when the last stage's output does)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _ToNextStage.apply(x)
    send_tensor(x, next_rank())
    out, grad = broadcast_from_last(None, with_flag=True)
    if grad and torch.is_grad_enabled():
        # a frozen stage before trainable ones: the loss still takes part in autograd here, so that every rank
        # calls the same backward (nothing of this stage to differentiate)
        out.requires_grad_(True)
    return out


def sum_pipeline_grads(model: torch.nn.Module, group=None) -> None:
    """Sum the gradients of the parameters every stage holds a copy of (`pipeline_replicated`: the time and text
    embeddings, whose outputs every stage's blocks use) over the pipeline group. Call it after backward (under
    megatron's DDP: after `finish_grad_sync`) and before the optimizer step, so that the copies stay equal."""
    group = pp_group() if group is None else group
    if dist.get_world_size(group) == 1:
        return
    for p in model.parameters():
        if getattr(p, "pipeline_replicated", False):
            # under megatron's DDP the gradient lives in `main_grad` (its buffer), after its own reduction
            grad = getattr(p, "main_grad", None)
            if grad is None:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                grad = p.grad
            dist.all_reduce(grad, group=group)


def _broadcast_tensor(tensor: torch.Tensor | None, src: int) -> torch.Tensor:
    dev = _device()
    h = _header(tensor).to(dev) if dist.get_rank() == src else torch.empty(_HEADER, dtype=torch.int64, device=dev)
    dist.broadcast(h, src, group=pp_group())
    out = tensor.detach().contiguous().to(dev) if dist.get_rank() == src else _empty_from(h.cpu(), dev)
    dist.broadcast(out, src, group=pp_group())
    return out


def gather_pipeline_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every stage's tensors (by their global names) on every stage, in stage order; a name several stages hold
    (replicated parameters) keeps the first stage's copy. Names travel as JSON, tensors with their headers."""
    import json

    ranks = dist.get_process_group_ranks(pp_group())
    if len(ranks) == 1:
        return dict(sd)
    full = {}
    for src in ranks:
        mine = dist.get_rank() == src
        names = torch.frombuffer(bytearray(json.dumps(sorted(sd)).encode()), dtype=torch.uint8) if mine else None
        names = json.loads(bytes(_broadcast_tensor(names, src).cpu().tolist()).decode())
        for name in names:
            tensor = _broadcast_tensor(sd[name] if mine else None, src)
            full.setdefault(name, tensor.to(sd[name].device if mine and name in sd else tensor.device))
    return full
