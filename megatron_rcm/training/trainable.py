"""One interface for "a trainable network + its optimizer + gradient synchronisation + LR schedule".

The loop sees only `Trainable`: `zero_grad()`, forward through `.wrapped`, `backward`, `step() -> StepResult`,
`sharded_state_dict()` / `checkpoint_state()` / `load_checkpoint()` (ShardedTensors under global names + JSON: the
training checkpoint reshards on load). Two implementations:

- `MegatronTrainable` (CUDA): megatron-core `DistributedDataParallel` (contiguous fp32 grad buffers) +
  `get_megatron_optimizer` (Adam, distributed optimizer over the DP group) + `OptimizerParamScheduler`.
- `TorchTrainable` (any device; the CPU/gloo path): the thinnest substitute, because megatron's DDP buffers, the
  distributed optimizer and the schedules allocate on CUDA (docs/architecture.md, "Training loop"): one flat all-reduce of the grads over the
  DP(xCP) group + `torch.optim.AdamW` with the same settings + the same `OptimizerParamScheduler`.

Both: loss normalisation "mean over DP x CP" (grads are averaged over that group), NaN/inf grads zeroed and counted
before the reduction, optional clipping (off by default), LR warm-up counted in this network's own steps.
Under pipeline parallelism each rank's network is its stage: the gradients of the modules every stage holds
(`pipeline_replicated`) are summed over the pipeline group before the data-parallel reduction (both are sums, and
the DP buffers' layouts differ between stages, so the PP sum must come first), and the grad norm is the whole
model's, the replicated modules counted once (on the first stage; megatron's norm skips `shared` parameters).
"""

import abc
import dataclasses
import math

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_rcm.checkpoint import io
from megatron_rcm.parallel.pipeline import sum_pipeline_grads
from megatron_rcm.parallel.state import pp_group
from megatron_rcm.training.config import OptimizerConfig


@dataclasses.dataclass
class StepResult:
    """What one optimizer step did."""

    grad_norm: float
    """L2 norm of the synchronised gradient (before clipping), over the whole model."""
    num_nan_grads: int
    """Gradient elements that were NaN/inf and were zeroed (summed over ranks)."""
    lr: float
    skipped: bool = False


def grad_sync_group():
    """Gradients of replicated parameters are averaged over data-parallel x context-parallel ranks."""
    return parallel_state.get_data_parallel_group(with_context_parallel=True)


def _scheduler(optimizer, lr: float, config: OptimizerConfig, train_iters: int) -> OptimizerParamScheduler:
    # constant LR after a linear warm-up; megatron's scheduler works on any optimizer with param_groups
    warmup = max(0, config.lr_warmup_iters)
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=lr, min_lr=lr, lr_warmup_steps=warmup,
        lr_decay_steps=max(train_iters, warmup + 1), lr_decay_style="constant",
        start_wd=config.weight_decay, end_wd=config.weight_decay, wd_incr_steps=max(train_iters, 1),
        wd_incr_style="constant")


class Trainable(abc.ABC):
    """A network with its optimizer and LR schedule. `wrapped` is what the with-grad passes call."""

    name: str
    module: torch.nn.Module
    """The bare network (for no-grad and JVP passes, EMA, export)."""
    wrapped: torch.nn.Module
    """What with-grad passes call: megatron-core's DDP wrapper on the megatron path, else `module` itself."""
    scheduler: OptimizerParamScheduler

    @abc.abstractmethod
    def zero_grad(self) -> None: ...

    @abc.abstractmethod
    def step(self, skip: bool = False) -> StepResult:
        """Synchronise grads over DP x CP, zero NaNs, (clip), advance the LR schedule and update.
        `skip=True` (a NaN loss somewhere): synchronise nothing, drop the grads, leave weights and schedule."""

    @abc.abstractmethod
    def sharded_state_dict(self, prefix: str, state: dict | None = None) -> dict:
        """This rank's ShardedTensors of the weights and the optimizer state under global names (`<prefix>model.<param>`,
        optimizer tensors sharded like their parameters), so that a checkpoint reshards on load. `state=None`: for a
        save (the live tensors); else the JSON state of the checkpoint to load, and the tensors are buffers to read
        into. Collective on the megatron path."""

    @abc.abstractmethod
    def checkpoint_state(self) -> dict:
        """The JSON-able rest: LR schedule, optimizer hyperparameters and step counts. Call after
        `sharded_state_dict(prefix)` of the same save."""

    @abc.abstractmethod
    def load_checkpoint(self, loaded: dict, prefix: str, state: dict) -> None:
        """Take the tensors read for `sharded_state_dict(prefix, state)` (keyed like it) and the JSON state."""

    @property
    def lr(self) -> float:
        return float(self.scheduler.get_lr(self.optimizer.param_groups[0]))


def _pipeline_sum(t: torch.Tensor) -> torch.Tensor:
    """`t` summed over the pipeline stages (in place; a no-op without pipeline parallelism)."""
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(t, group=pp_group())
    return t


def _count_and_zero_nonfinite(tensors) -> int:
    n = 0
    for g in tensors:
        bad = ~torch.isfinite(g)
        k = int(bad.sum())
        if k:
            g.masked_fill_(bad, 0.0)
            n += k
    return n


class TorchTrainable(Trainable):
    """Plain torch: grads in `param.grad`, one flat all-reduce (average) over DP x CP, AdamW."""

    def __init__(self, name: str, module: torch.nn.Module, lr: float, optimizer_config: OptimizerConfig,
                 train_iters: int):
        self.name, self.module, self.wrapped, self.optimizer_config = name, module, module, optimizer_config
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr,
                                           betas=(optimizer_config.adam_beta1, optimizer_config.adam_beta2),
                                           eps=optimizer_config.adam_eps, weight_decay=optimizer_config.weight_decay)
        self.scheduler = _scheduler(self.optimizer, lr, optimizer_config, train_iters)
        self.group = grad_sync_group()

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def _grads(self):
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        return [p.grad for p in self.params]

    def step(self, skip: bool = False) -> StepResult:
        if skip:
            self.zero_grad()
            return StepResult(float("nan"), 0, self.lr, skipped=True)
        grads = self._grads()
        nan = _pipeline_sum(torch.tensor([_count_and_zero_nonfinite(grads)], dtype=torch.float64))
        sum_pipeline_grads(self.module)
        flat = torch.cat([g.reshape(-1) for g in grads] + [nan.to(grads[0].device, grads[0].dtype)])
        world = dist.get_world_size(self.group)
        if world > 1:
            dist.all_reduce(flat, group=self.group)
            num_nan = int(flat[-1].item())
            flat = flat[:-1] / world
            offset = 0
            for g in grads:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
        else:
            num_nan = int(nan.item())
        grad_norm = _global_norm(self.params, grads)
        if self.optimizer_config.clip_grad > 0 and grad_norm > self.optimizer_config.clip_grad:
            for g in grads:
                g.mul_(self.optimizer_config.clip_grad / (grad_norm + 1e-6))
        self.scheduler.step(1)
        self.optimizer.step()
        self.zero_grad()
        return StepResult(grad_norm, num_nan, self.lr)

    _MOMENTS = ("exp_avg", "exp_avg_sq")

    def _named_params(self):
        trainable = {id(p) for p in self.params}
        return [(n, p) for n, p in self.module.named_parameters() if id(p) in trainable]

    def sharded_state_dict(self, prefix: str, state: dict | None = None) -> dict:
        loading = state is not None
        weights = {n: torch.empty_like(p) for n, p in self.module.named_parameters()} if loading else None
        out = io.sharded_state_dict(self.module, f"{prefix}model.", tensors=weights)
        named = [(n, p) for n, p in self._named_params() if (n in state["steps"] if loading
                                                               else p in self.optimizer.state)]
        for k in self._MOMENTS:  # AdamW's moments have their parameter's shape: sharded like it
            moments = {n: torch.empty_like(p) if loading else self.optimizer.state[p][k] for n, p in named}
            out.update(io.sharded_state_dict(self.module, f"{prefix}optim.{k}.", tensors=moments))
        return out

    def checkpoint_state(self) -> dict:
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        steps = {n: float(self.optimizer.state[p]["step"]) for n, p in self._named_params()
                 if p in self.optimizer.state}
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            # the JSON state is rank 0's: it must name every stage's parameters (collective over the stages)
            every = [None] * parallel_state.get_pipeline_model_parallel_world_size()
            dist.all_gather_object(every, steps, group=pp_group())
            steps = {n: v for stage in every for n, v in stage.items()}
        return {"scheduler": self.scheduler.state_dict(), "param_groups": groups, "steps": steps}

    @torch.no_grad()
    def load_checkpoint(self, loaded: dict, prefix: str, state: dict) -> None:
        for n, p in self.module.named_parameters():
            p.copy_(loaded[f"{prefix}model.{n}"])
        current = self.optimizer.state_dict()
        if len(state["param_groups"]) != len(current["param_groups"]):
            raise ValueError(f"{self.name}: the checkpoint has {len(state['param_groups'])} optimizer parameter "
                             f"groups, this run {len(current['param_groups'])}")
        groups = [{**saved, "params": g["params"]} for saved, g in zip(state["param_groups"], current["param_groups"])]
        index = {id(p): i for i, p in enumerate(p for g in self.optimizer.param_groups for p in g["params"])}
        optim_state = {}
        for n, p in self._named_params():
            if n in state["steps"]:
                optim_state[index[id(p)]] = {"step": torch.tensor(state["steps"][n], dtype=torch.float32),
                                             **{k: loaded[f"{prefix}optim.{k}.{n}"] for k in self._MOMENTS}}
        self.optimizer.load_state_dict({"state": optim_state, "param_groups": groups})
        self.scheduler.load_state_dict(state["scheduler"])


def _global_norm(params, grads) -> float:
    """L2 norm of the full gradient: tensor-parallel shards add up over the TP group; TP-replicated parameters
    carry complete grads on every TP rank (see models/blocks.py) and count once; pipeline stages add up, the
    modules every stage holds (equal grads after `sum_pipeline_grads`) counted on the first stage only."""
    sharded = torch.zeros((), dtype=torch.float64, device=grads[0].device if grads else "cpu")
    replicated = torch.zeros_like(sharded)
    later_stage = parallel_state.get_pipeline_model_parallel_rank() > 0
    for p, g in zip(params, grads):
        if later_stage and getattr(p, "pipeline_replicated", False):
            continue
        sq = g.double().pow(2).sum()
        if getattr(p, "tensor_model_parallel", False):
            sharded += sq
        else:
            replicated += sq
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(sharded, group=parallel_state.get_tensor_model_parallel_group())
    return math.sqrt(float(_pipeline_sum(sharded + replicated)))


class MegatronTrainable(Trainable):
    """megatron-core DDP + `get_megatron_optimizer` (Adam, optionally the distributed optimizer) on CUDA."""

    def __init__(self, name: str, module: torch.nn.Module, lr: float, optimizer_config: OptimizerConfig,
                 train_iters: int, use_distributed_optimizer: bool = True):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
        from megatron.core.optimizer import get_megatron_optimizer
        from megatron.core.transformer import TransformerConfig

        if not torch.cuda.is_available():
            raise RuntimeError("the megatron grad-sync path needs CUDA; use parallel.grad_sync=torch on CPU")
        self.name, self.module, self.optimizer_config = name, module, optimizer_config
        dtype = next(module.parameters()).dtype
        model_config = module.config
        transformer_config = TransformerConfig(
            num_layers=model_config.num_layers, hidden_size=model_config.hidden_size,
            num_attention_heads=model_config.num_attention_heads,
            tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
            context_parallel_size=parallel_state.get_context_parallel_world_size(),
            bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, params_dtype=dtype)
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                   use_distributed_optimizer=use_distributed_optimizer,
                                                   check_for_nan_in_grad=False)
        self.wrapped = DistributedDataParallel(config=transformer_config, ddp_config=ddp_config, module=module)
        megatron_optimizer_config = MegatronOptimizerConfig(
            optimizer="adam", lr=lr, min_lr=lr, weight_decay=optimizer_config.weight_decay,
            adam_beta1=optimizer_config.adam_beta1, adam_beta2=optimizer_config.adam_beta2,
            adam_eps=optimizer_config.adam_eps, clip_grad=optimizer_config.clip_grad, bf16=dtype == torch.bfloat16,
            fp16=dtype == torch.float16, params_dtype=dtype, use_distributed_optimizer=use_distributed_optimizer)
        self.optimizer = get_megatron_optimizer(megatron_optimizer_config, [self.wrapped])
        self.scheduler = _scheduler(self.optimizer, lr, optimizer_config, train_iters)
        self.use_distributed_optimizer = use_distributed_optimizer

    def zero_grad(self) -> None:
        self.wrapped.zero_grad_buffer()
        self.optimizer.zero_grad()

    def step(self, skip: bool = False) -> StepResult:
        if skip:
            self.zero_grad()
            return StepResult(float("nan"), 0, self.lr, skipped=True)
        grads = [p.main_grad for p in self.module.parameters() if p.requires_grad]
        nan = torch.tensor([float(_count_and_zero_nonfinite(grads))], device=grads[0].device)
        dist.all_reduce(nan, group=grad_sync_group())
        _pipeline_sum(nan)
        sum_pipeline_grads(self.module)  # on the local main_grad buffers, before DP reduces (or scatters) them
        self.wrapped.finish_grad_sync()  # averages over DP x CP (reduce-scatter with the distributed optimizer)
        self.scheduler.step(1)
        # The norm must come from step(): before it, the optimizer's main parameters hold no gradients yet (it
        # copies them in first), so get_grad_norm() here would read 0. ChainedOptimizer.step() returns the norm
        # whether or not it clips.
        ok, grad_norm, _ = self.optimizer.step()
        self.zero_grad()
        grad_norm = float("nan") if grad_norm is None else float(grad_norm)
        return StepResult(grad_norm, int(nan.item()), self.lr, skipped=not ok)

    _SHARDING = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}
    """Each parameter's optimizer state (fp32 main weights, Adam's moments) in megatron's canonical form: tensors of
    the parameter's shape under its global name (gathered over DP on save, sliced per rank on load), so a checkpoint
    reshards over TP and DP. megatron-core 0.19's per-rank flat-range form ('fully_sharded_model_space') is
    deprecated there and fails its own ShardedTensor check (flattened_range, seen on an H200). No `chained_N.`
    prefix: the key does not depend on which of the chained optimizers (param-group kinds) holds it."""

    def sharded_state_dict(self, prefix: str, state: dict | None = None) -> dict:
        loading = state is not None
        weights = {n: torch.empty_like(p) for n, p in self.module.named_parameters()} if loading else None
        out = io.sharded_state_dict(self.module, f"{prefix}model.", tensors=weights)
        # the optimizer finds its parameters in the model's sharded state dict by identity (keep_vars)
        model = io.sharded_state_dict(self.module, f"{prefix}model.", keep_vars=True)
        self._optim_sharded = self.optimizer.sharded_state_dict(model, is_loading=loading, metadata=self._SHARDING)
        for path, sh in _sharded_leaves(self._optim_sharded):
            out[f"{prefix}optim/{path}"] = sh
        return out

    def checkpoint_state(self) -> dict:
        return {"scheduler": self.scheduler.state_dict(), "optimizer": _without_sharded(self._optim_sharded)}

    def load_checkpoint(self, loaded: dict, prefix: str, state: dict) -> None:
        with torch.no_grad():
            for n, p in self.module.named_parameters():
                p.copy_(loaded[f"{prefix}model.{n}"])
        tensors = {path: loaded[f"{prefix}optim/{path}"] for path, _ in _sharded_leaves(self._optim_sharded)}
        self.optimizer.load_state_dict(_fill(self._optim_sharded, state["optimizer"], tensors))
        for o in self._distributed_parts():
            separate_adam_steps(o.optimizer)
        # No reload_model_params() here: it copies the (bf16) model parameters over the fp32 main parameters that
        # were just loaded; Megatron-LM calls it only when a checkpoint's optimizer state is not loaded.
        self.scheduler.load_state_dict(state["scheduler"])

    def _distributed_parts(self):
        # get_megatron_optimizer returns a ChainedOptimizer (one optimizer per param group kind)
        return getattr(self.optimizer, "chained_optimizers", [self.optimizer])


def _sharded_leaves(obj, path: str = ""):
    """(path, ShardedBase) of every sharded leaf of a nested optimizer state dict."""
    from megatron.core.dist_checkpointing.mapping import ShardedBase

    if isinstance(obj, ShardedBase):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _sharded_leaves(v, f"{path}/{k}" if path else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _sharded_leaves(v, f"{path}/{i}" if path else str(i))


def _without_sharded(obj):
    """The non-tensor rest of a nested optimizer state dict (sharded leaves become None)."""
    from megatron.core.dist_checkpointing.mapping import ShardedBase

    if isinstance(obj, ShardedBase):
        return None
    if isinstance(obj, dict):
        return {k: _without_sharded(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_without_sharded(v) for v in obj)
    return obj


def _fill(request, saved, tensors: dict, path: str = ""):
    """The structure of `request` (built for loading at this layout) with its sharded leaves replaced by the tensors
    read and its other leaves by the saved values at the same place (the request's own where none was saved)."""
    from megatron.core.dist_checkpointing.mapping import ShardedBase

    if isinstance(request, ShardedBase):
        return tensors[path]
    if isinstance(request, dict):
        saved = saved if isinstance(saved, dict) else {}
        return {k: _fill(v, saved.get(k), tensors, f"{path}/{k}" if path else str(k)) for k, v in request.items()}
    if isinstance(request, (list, tuple)):
        saved = saved if isinstance(saved, (list, tuple)) and len(saved) == len(request) else [None] * len(request)
        return type(request)(_fill(v, s, tensors, f"{path}/{i}" if path else str(i))
                             for i, (v, s) in enumerate(zip(request, saved)))
    return request if saved is None else saved


def separate_adam_steps(optimizer: torch.optim.Optimizer) -> None:
    """Give every parameter its own Adam step tensor. megatron-core 0.19's `DistributedOptimizer.load_state_dict`
    (torch Adam, no Apex / TE) puts one step tensor object into every parameter's state, and torch's Adam
    increments each parameter's step in place: one optimizer step after a resume then advanced the shared count
    once per parameter, and the bias correction of every later step was wrong (seen as a resumed run leaving the
    uninterrupted trajectory at its first step)."""
    for st in optimizer.state.values():
        if torch.is_tensor(st.get("step")):
            st["step"] = st["step"].detach().clone()


def make_trainable(kind: str, name: str, module, lr, optimizer_config: OptimizerConfig, train_iters: int,
                   use_distributed_optimizer: bool = True) -> Trainable:
    if kind == "auto":
        kind = "megatron" if torch.cuda.is_available() else "torch"
    if kind == "megatron":
        return MegatronTrainable(name, module, lr, optimizer_config, train_iters, use_distributed_optimizer)
    if kind == "torch":
        return TorchTrainable(name, module, lr, optimizer_config, train_iters)
    raise ValueError(f"parallel.grad_sync must be auto, megatron or torch, got {kind!r}")
