"""Full (unsharded) state dicts <-> tensor-parallel shards, using megatron-core's partition attributes."""

import torch
import torch.distributed as dist

from megatron_rcm.parallel import state


def _partition_dim(param) -> int | None:
    if getattr(param, "tensor_model_parallel", False):
        return param.partition_dim
    return None


def check_state_dict(model: torch.nn.Module, full_sd: dict[str, torch.Tensor], source: str) -> None:
    """Raise one error naming every missing, extra or mis-shaped tensor before anything is loaded."""
    tp = state.tp_size()
    params = dict(model.named_parameters())
    problems = []
    missing = sorted(set(params) - set(full_sd))
    extra = sorted(set(full_sd) - set(params))
    if missing:
        problems.append(f"missing tensors: {missing[:8]}{' ...' if len(missing) > 8 else ''} ({len(missing)} in all)")
    if extra:
        problems.append(f"unexpected tensors: {extra[:8]}{' ...' if len(extra) > 8 else ''} ({len(extra)} in all)")
    for name, p in params.items():
        if name not in full_sd:
            continue
        expected = list(p.shape)
        d = _partition_dim(p)
        if d is not None:
            expected[d] *= tp
        if list(full_sd[name].shape) != expected:
            problems.append(f"shape mismatch for {name!r}: checkpoint {tuple(full_sd[name].shape)}, "
                            f"model {tuple(expected)}")
    if problems:
        raise ValueError(f"{source} does not match the model:\n  " + "\n  ".join(problems))


@torch.no_grad()
def load_full_state_dict(model: torch.nn.Module, full_sd: dict[str, torch.Tensor], source: str = "checkpoint"):
    """Copy a full state dict into a (possibly tensor-parallel) model: each rank takes its slice."""
    check_state_dict(model, full_sd, source)
    tp, rank = state.tp_size(), state.tp_rank()
    for name, p in model.named_parameters():
        value = full_sd[name]
        d = _partition_dim(p)
        if d is not None and tp > 1:
            value = value.chunk(tp, dim=d)[rank]
        p.copy_(value.to(p.dtype))


def _gather_tp(param, t: torch.Tensor) -> torch.Tensor:
    """The full tensor of a tensor-parallel slice `t` of `param` (every rank of the TP group gets it)."""
    d, tp = _partition_dim(param), state.tp_size()
    if d is None or tp == 1:
        return t.clone()
    parts = [torch.empty_like(t) for _ in range(tp)]
    dist.all_gather(parts, t.contiguous(), group=state.tp_group())
    return torch.cat(parts, dim=d)


@torch.no_grad()
def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Gather a tensor-parallel model's parameters into full tensors (on every rank of the TP group)."""
    return {name: _gather_tp(p, p.detach()) for name, p in model.named_parameters()}


def gather_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full gradients of a tensor-parallel model (for tests and diagnostics)."""
    return {name: _gather_tp(p, p.grad.detach()) for name, p in model.named_parameters() if p.grad is not None}
