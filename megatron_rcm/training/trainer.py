"""The rCM training loop: student (trainable), teacher (frozen), critic (trainable, from the teacher), EMA.

One iteration = one phase (`PhaseSchedule`: student or critic) over `num_micro` micro-batches, then one optimizer
step of that phase's network. Per micro-batch the no-grad passes (teacher with CFG, the student's JVP, rollouts,
the DMD gradient from critic and teacher) and the single with-grad pass are separate calls, so that a pipeline
schedule can later replace the with-grad pass alone.

Random draws: iteration i, micro-batch m on data-parallel rank d use a generator seeded by (seed, i, d x M + m)
for M micro-batches per rank: the same on all TP/CP/PP ranks of a DP rank, different across DP ranks, independent
of restarts, and equal between N DP ranks and one rank accumulating N x M micro-batches. It is a CPU generator on
every device (draws are made on the CPU and copied to the GPU), so that a seed gives the same times and noise on
CPU and CUDA.
"""

import os
import shlex
import shutil
import signal
import sys
import time

import torch
import torch.distributed as dist

from megatron_rcm import diffusion as D
from megatron_rcm.dtypes import DTYPES
from megatron_rcm.checkpoint import io as checkpoint_io
from megatron_rcm.models import build_model, from_pretrained
from megatron_rcm.models.loading import ARCHITECTURES, config_to_dict, inspect_checkpoint, save_megatron
from megatron_rcm.parallel import state
from megatron_rcm.training import checkpointing, memory
from megatron_rcm.models import get_preset
from megatron_rcm.training.config import ConfigError, TrainingConfig, apply_kernels_config, check_ranges, dump_config
from megatron_rcm.training.data import build_batches
from megatron_rcm.training.flops import iteration_flops, tokens_per_sample
from megatron_rcm.training.logger import TrainingLogger, append_metrics
from megatron_rcm.training.recompute import enable_activation_checkpointing
from megatron_rcm.training.step import RCMStep
from megatron_rcm.training.trainable import make_trainable



def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def validate(config: TrainingConfig, world_size: int) -> int:
    """Checks that need no process group and no file reads beyond the teacher's header; returns the DP size.
    Raises ConfigError / FileNotFoundError with a message that says what to change."""
    check_ranges(config)
    p, t = config.parallel, config.training
    mp = p.tensor_model_parallel_size * p.context_parallel_size * p.pipeline_model_parallel_size
    if min(p.tensor_model_parallel_size, p.context_parallel_size, p.pipeline_model_parallel_size) < 1:
        raise ConfigError("parallel sizes must be >= 1")
    if world_size % mp:
        raise ConfigError(f"world size {world_size} is not divisible by tensor ({p.tensor_model_parallel_size}) x "
                          f"context ({p.context_parallel_size}) x pipeline ({p.pipeline_model_parallel_size}) "
                          f"parallel sizes = {mp}")
    if p.context_parallel_size > 1:
        from megatron_rcm.parallel.context import resolve_cp_comm

        heads = get_preset(config.model.preset)[1].num_attention_heads
        if heads % p.tensor_model_parallel_size == 0:
            try:
                resolve_cp_comm(p.cp_comm, heads // p.tensor_model_parallel_size, p.context_parallel_size)
            except ValueError as e:
                raise ConfigError(f"parallel.cp_comm: {e}") from None
    dp = world_size // mp
    if t.micro_batch_size < 1 or t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(f"training.global_batch_size ({t.global_batch_size}) must be divisible by "
                          f"training.micro_batch_size ({t.micro_batch_size}) x data-parallel size ({dp}) = "
                          f"{t.micro_batch_size * dp}")
    check_pipeline(config, t.global_batch_size // (t.micro_batch_size * dp))
    if t.train_iters < 1:
        raise ConfigError("training.train_iters must be >= 1")
    if config.model.params_dtype not in DTYPES:
        raise ConfigError(f"model.params_dtype must be one of {sorted(DTYPES)}, got {config.model.params_dtype!r}")
    arch_name, preset = get_preset(config.model.preset)
    if preset.num_attention_heads % p.tensor_model_parallel_size:
        raise ConfigError(f"{preset.num_attention_heads} attention heads are not divisible by tensor parallel size "
                          f"{p.tensor_model_parallel_size}")
    check_teacher(config)
    check_data(config)
    return dp


def check_pipeline(config: TrainingConfig, num_micro: int) -> None:
    """The pipeline split before any work: every stage gets at least one block (an explicit
    `parallel.pipeline_layers` has one entry per stage and adds up to the model's blocks), and a data-parallel rank
    has at least as many micro-batches per iteration as there are stages (else 1F1B cannot fill the pipeline)."""
    p = config.parallel
    pp, layers = p.pipeline_model_parallel_size, list(p.pipeline_layers)
    blocks = get_preset(config.model.preset)[1].num_layers
    if layers:
        if len(layers) != pp or any(n < 1 for n in layers) or sum(layers) != blocks:
            raise ConfigError(f"parallel.pipeline_layers {layers} must give each of the {pp} pipeline stages "
                              f"(parallel.pipeline_model_parallel_size) at least one block and add up to the "
                              f"{blocks} blocks of model.preset {config.model.preset!r} (sum {sum(layers)})")
    elif blocks < pp:
        raise ConfigError(f"parallel.pipeline_model_parallel_size={pp} exceeds the {blocks} blocks of model.preset "
                          f"{config.model.preset!r}: every stage needs at least one block")
    if pp > 1 and num_micro < pp:
        t = config.training
        raise ConfigError(f"pipeline parallelism needs at least as many micro-batches per data-parallel rank as "
                          f"stages: training.global_batch_size ({t.global_batch_size}) / (training.micro_batch_size "
                          f"({t.micro_batch_size}) x data-parallel size) gives {num_micro} < "
                          f"parallel.pipeline_model_parallel_size={pp}; raise the global batch or lower the "
                          f"micro-batch size")


def check_data(config: TrainingConfig) -> None:
    d = config.data
    if d.source not in ("shapes", "latents", "videos", "random"):
        raise ConfigError(f"data.source must be shapes, latents, videos or random, got {d.source!r}")
    if d.source in ("latents", "videos"):
        if not d.path or not os.path.exists(d.path):
            raise FileNotFoundError(f"data.path: {d.path!r} does not exist (a latent shard folder or a video manifest)")
        if not d.negative_text_embedding or not os.path.isfile(d.negative_text_embedding):
            raise FileNotFoundError(f"data.negative_text_embedding: {d.negative_text_embedding!r} is not a file (the "
                                    f"negative prompt's text embedding [L, text_dim], saved with torch.save)")


def check_teacher(config: TrainingConfig) -> None:
    """The teacher path exists and holds the configured architecture."""
    path = config.model.teacher
    if not path:
        if config.data.source != "random":
            raise ConfigError("model.teacher is empty: a teacher checkpoint is required (random weights only with "
                              "data.source=random, for scale probes)")
        return
    if not os.path.exists(path):
        raise FileNotFoundError(f"model.teacher: {path!r} does not exist (the tiny default's teacher is made by "
                                f"examples/pretrain_flow.py)")
    arch_name, preset = get_preset(config.model.preset)
    arch, found, _, _ = inspect_checkpoint(path)
    if arch.name != arch_name or found != preset:
        a, b = config_to_dict(found), config_to_dict(preset)
        diff = {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
        raise ConfigError(f"model.teacher {path!r} does not match model.preset {config.model.preset!r}: "
                          f"(checkpoint, preset) differ in {diff}")


def check_resume(config: TrainingConfig, path: str) -> list[str]:
    """Refuse (ConfigError) to continue checkpoint `path` with a changed micro-batch size, dtype or model, unless
    `training.allow_config_change`; returns the accepted changes (to be logged)."""
    import yaml

    meta = checkpointing.verify(path)
    try:
        with open(os.path.join(path, "config.yaml")) as f:
            saved = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        raise checkpointing.CheckpointError(f"{os.path.join(path, 'config.yaml')}: unreadable ({e})") from None
    arch_name, preset = get_preset(config.model.preset)
    pairs = {"training.micro_batch_size": (saved.get("training", {}).get("micro_batch_size"),
                                           config.training.micro_batch_size),
             "model.params_dtype": (meta.get("params_dtype"), config.model.params_dtype),
             "model.preset": (saved.get("model", {}).get("preset"), config.model.preset),
             "model (family)": (meta.get("model"), arch_name),
             "model (config)": (meta.get("model_config"), config_to_dict(preset))}
    changed = [f"{k}: {a!r} -> {b!r}" for k, (a, b) in pairs.items() if a != b]
    if changed and not config.training.allow_config_change:
        raise ConfigError(f"checkpoint {path} was written with a different configuration ({'; '.join(changed)}); "
                          f"set training.allow_config_change=true to continue anyway, or use a new run_dir")
    return changed


def launch_command(argv: list[str] | None = None, env=None) -> str:
    """The command line of this run as one would type it again (the exported model card's "Trained with"): torchrun
    with this node's process count (and the node count) when torchrun started the process, whose own arguments the
    workers cannot see; else python. The script's path is made relative to the working directory."""
    argv = list(sys.argv if argv is None else argv)
    env = os.environ if env is None else env
    if argv and os.path.isabs(argv[0]):
        argv[0] = os.path.relpath(argv[0])
    if "TORCHELASTIC_RUN_ID" not in env:
        return shlex.join(["python", *argv])
    local, world = int(env.get("LOCAL_WORLD_SIZE", 1)), int(env.get("WORLD_SIZE", 1))
    nodes = [f"--nnodes={world // local}"] if world > local else []
    return shlex.join(["torchrun", *nodes, f"--nproc_per_node={local}", *argv])


class Trainer:
    def __init__(self, config: TrainingConfig):
        self.config = c = config
        self.dp_size = validate(c, world_size_from_env())
        apply_kernels_config(c.kernels)  # before any network runs; set RCM_* variables win
        rank = int(os.environ.get("RANK", "0"))
        self.lock = checkpointing.RunLock(c.run_dir)
        if rank == 0:
            self.lock.acquire()  # one job per run directory; the OS releases it when this process dies
        if "TORCHELASTIC_RUN_ID" in os.environ:
            checkpointing.die_with_parent()  # no worker outlives torchrun's agent
        notes: list[str] = []
        t = c.training
        self.resume_path = checkpointing.resolve(c.run_dir, t.resume, t.resume_from, t.resume_fallback, notes.append)
        if self.resume_path is not None:
            notes += [f"allow_config_change: continuing {self.resume_path} with {change}"
                      for change in check_resume(c, self.resume_path)]
        if c.training.threads > 0 and not torch.cuda.is_available():
            torch.set_num_threads(c.training.threads)
        backend = None if c.parallel.backend == "auto" else c.parallel.backend
        state.initialize_parallel(c.parallel.tensor_model_parallel_size, c.parallel.context_parallel_size,
                                  c.parallel.pipeline_model_parallel_size, backend=backend)
        self.rank = dist.get_rank()
        self.dp_rank = state.dp_rank()
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else \
            torch.device("cpu")
        # before any network is built: a layout that cannot fit the GPUs is one line, not an OOM minutes later
        memory.preflight(c, dist.get_world_size(), torch.cuda.get_device_properties(self.device).total_memory
                         if self.device.type == "cuda" else None)
        torch.manual_seed(c.training.seed)  # model init of random-weight runs; same on all ranks
        self.schedule = D.PhaseSchedule(c.rcm)
        self.log = TrainingLogger(c.run_dir, self.rank == 0, c.logging.tensorboard, c.training.train_iters,
                                  c.logging.log_interval)
        for note in notes:
            self.log.print(note)
        self._build_models()
        self.batches = build_batches(c, self.model_config.text_dim, self.dp_rank, self.dp_size, self.device,
                                     self.model_config.in_channels)
        self.neg_text = self.batches.negative_text()
        # the passes of one micro-batch (training/step.py); sharded over the CP group when it has several ranks
        self.step = RCMStep(c.rcm, self.schedule, self.teacher_module, self.student.module,
                            None if self.critic is None else self.critic.module, student_train=self.student.wrapped,
                            critic_train=None if self.critic is None else self.critic.wrapped, neg_text=self.neg_text,
                            cp_group=state.cp_group(), timestep_scale=self.model_config.timestep_scale,
                            pipeline=self._pipeline_schedule(), pass_timers=c.logging.pass_timers)
        self.iteration = 0
        self.evaluator = None
        self._signal_received = False  # set by the signal handler, at any time
        self._stop = False  # the decision all ranks agreed on in the last iteration's all-reduce
        self.records: list[dict] = []

    # ------------------------------------------------------------------------------------------------------
    def _build_models(self):
        c = self.config
        dtype = DTYPES[c.model.params_dtype]
        sp = c.model.sequence_parallel
        # every network is built as this rank's pipeline stage of the same split (names are the full model's)
        layers = list(c.parallel.pipeline_layers) or None
        arch_name, preset = get_preset(c.model.preset)
        self.arch, self.model_config = ARCHITECTURES[arch_name], preset
        if c.model.teacher:
            teacher = from_pretrained(c.model.teacher, params_dtype=dtype, sequence_parallel=sp, device=self.device,
                                      cp_comm=c.parallel.cp_comm, pipeline_layers=layers)
        else:
            teacher = build_model(self.arch, preset, dtype, sp, self.device, cp_comm=c.parallel.cp_comm,
                                  pipeline_layers=layers)
        teacher.requires_grad_(False).eval()

        def clone(src):
            net = build_model(self.arch, preset, dtype, sp, self.device, perform_initialization=False,
                              cp_comm=c.parallel.cp_comm, pipeline_layers=layers)
            net.load_state_dict(src.state_dict())
            return net

        student = clone(teacher).requires_grad_(True)
        critic = clone(teacher if c.model.critic_from_teacher else student).requires_grad_(True)
        if c.model.activation_checkpointing:
            enable_activation_checkpointing(student, c.model.recompute_policy)
            enable_activation_checkpointing(critic, c.model.recompute_policy)
        self.ema_module = clone(student).requires_grad_(False).eval()  # the EMA's weights for sampling/export
        o, t = c.optimizer, c.training
        self.student = make_trainable(c.parallel.grad_sync, "student", student, o.student_lr, o, t.train_iters,
                                      c.parallel.use_distributed_optimizer)
        self.critic = None
        if c.rcm.uses_dmd:
            self.critic = make_trainable(c.parallel.grad_sync, "critic", critic, o.critic_lr, o, t.train_iters,
                                         c.parallel.use_distributed_optimizer)
        self.teacher_module = teacher
        self.ema = D.PowerEMA(student, c.rcm.ema_sigma_rel)
        self.teacher = D.TrigFlowWrapper(teacher, preset.timestep_scale)  # the evaluation's teacher sampler

    def _pipeline_schedule(self):
        """The schedule that drives the micro-batches through the stages. None without pipeline parallelism
        unless `parallel.pp_schedule` names one (at PP=1 it then runs the same passes through it: a check of
        the schedule on one device)."""
        if state.pp_size() == 1 and self.config.parallel.pp_schedule == "auto":
            return None
        from megatron_rcm.training.schedules import build_schedule

        return build_schedule(self.device, DTYPES[self.config.model.params_dtype], self.config.parallel.pp_schedule)

    def generator(self, iteration: int, micro: int) -> torch.Generator:
        """Draws of micro-batch `micro` of this DP rank: seeded by its global micro-batch slot (DP rank x micro-batches
        per rank + micro), so that N DP ranks draw what one rank with N x the gradient accumulation draws. A CPU
        generator also on GPUs: the diffusion samplers draw on the generator's device and copy, so CPU and CUDA runs
        of one seed see the same numbers."""
        slot = self.dp_rank * self.batches.num_micro + micro
        seed = (self.config.training.seed * 1_000_003 + iteration * 10_007 + slot) % 2**63
        return torch.Generator().manual_seed(seed)

    # ------------------------------------------------------------------------------------------------------
    # One iteration
    # ------------------------------------------------------------------------------------------------------
    def train_step(self, it: int) -> dict:
        c = self.config
        phase = self.schedule.phase(it)
        trainable = self.student if phase == "student" else self.critic
        trainable.zero_grad()
        micro_batches = self.batches.next()
        local = len(micro_batches) * micro_batches[0][0].shape[0]
        # grads are averaged over DP x CP; CP ranks hold partial per-sample sums that must add up
        norm = state.cp_size() / local
        sums: dict[str, torch.Tensor] = {}
        flops = 0.0  # model FLOPs of this DP rank's samples (all its TP / CP / PP ranks together)
        nan = float("nan") if it in c.training.nan_iterations else 1.0  # fault injection (tests): skip the step

        def backward_loss(out):
            return out.loss.sum() * nan * norm  # this rank's share of the micro-batch's loss, normalised

        def account(x0, text, mb, out):
            nonlocal flops
            passes = set(self.step.times) | {f"{phase}_grad"}
            tokens = tokens_per_sample(self.model_config, x0.shape[1:])
            flops += x0.shape[0] * iteration_flops(self.model_config, tokens, text.shape[1], phase,
                                                   mb.rollout_steps, passes)
            for k, v in out.parts.items():
                sums[k] = sums.get(k, 0) + v.sum()
            sums["loss/total"] = sums.get("loss/total", 0) + out.total.sum() * nan  # the whole samples'

        mbs = [self.step.micro_batch(x0, text, self.generator(it, m)) for m, (x0, text) in enumerate(micro_batches)]
        if self.step.pipeline is not None:  # every micro-batch's passes through the pipeline schedule
            for (x0, text), mb, out in zip(micro_batches, mbs,
                                           self.step.run_pipelined(phase, mbs, it, backward_loss)):
                account(x0, text, mb, out)
        else:
            for (x0, text), mb in zip(micro_batches, mbs):
                out = self.step.run(phase, mb, it)
                with self.step.timed(f"{phase}_grad"):  # the backward of the with-grad pass, with its forward
                    backward_loss(out).backward()
                account(x0, text, mb, out)
        # one small all-reduce: global loss sums, NaN flag, signal flag
        keys = sorted(sums)
        flags = torch.tensor([0.0 if all(torch.isfinite(sums[k]) for k in keys) else 1.0,
                              float(self._signal_received)],
                             dtype=torch.float64)
        packed = torch.cat([torch.stack([sums[k].double().cpu() for k in keys]), flags])
        if dist.get_world_size() > 1:
            packed = packed.to(self.device)  # NCCL reduces device tensors only
            # losses: whole-sample values on every CP and TP rank already, so summed over data-parallel ranks only
            # (the same number at any TP / CP / DP split); flags: any rank anywhere
            losses, flags = packed[:-2].clone(), packed[-2:].clone()
            if state.dp_size() > 1:
                dist.all_reduce(losses, group=state.dp_group())
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            packed = torch.cat([losses, flags]).cpu()
        # a signal that arrives after this point is acted on after the next iteration, on every rank alike
        nan_loss, self._stop = bool(packed[-2] > 0), bool(packed[-1] > 0)
        with self.step.timed("optimizer"):  # grad sync over PP and DP, the update, the EMA
            result = trainable.step(skip=nan_loss)
            if phase == "student" and not result.skipped:
                self.ema.update(self.student.module)
        samples = c.training.global_batch_size
        record = {"phase": phase}
        for i, k in enumerate(keys):
            record[k] = float(packed[i]) / samples if not nan_loss else float("nan")
        record[f"grad_norm/{phase}"] = result.grad_norm
        record[f"lr/{phase}"] = result.lr
        record[f"nan_grads/{phase}"] = result.num_nan_grads
        record["skipped_iterations"] = int(result.skipped)
        self.iteration_flops = flops * state.dp_size()  # the logger's TFLOP/s; not a metric (no record key)
        # seconds per pass kind (this rank's; they differ run to run: metrics comparisons read loss/ and grad_norm/)
        record.update({f"time/{k}": v for k, v in sorted(self.step.pop_times().items())})
        if nan_loss:
            self.log.print(f"iteration {it + 1}: non-finite loss ({phase} phase) - step skipped, training goes on")
        return record

    # ------------------------------------------------------------------------------------------------------
    # Checkpoints
    # ------------------------------------------------------------------------------------------------------
    def _trainables(self):
        return [("student", self.student)] + ([("critic", self.critic)] if self.critic is not None else [])

    def _ema_sharded(self, empty: bool = False) -> dict:
        shadow = {n: torch.empty_like(v) for n, v in self.ema.shadow.items()} if empty else self.ema.shadow
        return checkpoint_io.sharded_state_dict(self.student.module, "ema.shadow.", tensors=shadow)

    def _collect(self) -> tuple[dict, dict]:
        """Every rank's ShardedTensors and rank 0's JSON state of a checkpoint."""
        sharded, state = {}, {}
        for name, trainable in self._trainables():
            sharded.update(trainable.sharded_state_dict(f"{name}."))
            state[name] = trainable.checkpoint_state()
        sharded.update(self._ema_sharded())
        state["ema"] = {"sigma_rel": self.ema.sigma_rel, "num_updates": self.ema.num_updates}
        state["consumed_samples"] = self.batches.consumed_samples
        return sharded, state

    def _layout(self) -> dict:
        return {"tensor_model_parallel_size": state.tp_size(), "pipeline_model_parallel_size": state.pp_size(),
                "context_parallel_size": state.cp_size()}

    def save(self) -> str:
        c = self.config
        meta = {"parallel": self._layout(), "data_parallel_size": self.dp_size, "model": self.arch.name,
                "model_config": config_to_dict(self.model_config), "params_dtype": c.model.params_dtype,
                "timestep_scale": self.model_config.timestep_scale, "command": launch_command()}
        rank_state = {"rng": checkpointing.rng_state(), "data": self.batches.state_dict(), "dp_rank": self.dp_rank}
        t0 = time.time()
        path = checkpointing.save(c.run_dir, self.iteration, self._collect, rank_state, meta, dump_config(c),
                                  c.checkpoint.keep_last)
        self.log.print(f"saved checkpoint {path} ({time.time() - t0:.1f} s)")
        return path

    def maybe_resume(self) -> bool:
        path = self.resume_path
        if path is None:
            return False
        meta, saved, rank_state = checkpointing.load_state(path)
        if self.critic is not None and "critic" not in saved:
            raise checkpointing.CheckpointError(f"checkpoint {path} has no critic but this run uses the DMD "
                                                f"regularizer")
        request = self._ema_sharded(empty=True)
        for name, trainable in self._trainables():
            request.update(trainable.sharded_state_dict(f"{name}.", saved[name]))
        loaded = checkpointing.load_tensors(path, request)
        for name, trainable in self._trainables():
            trainable.load_checkpoint(loaded, f"{name}.", saved[name])
        with torch.no_grad():
            for n, v in self.ema.shadow.items():
                v.copy_(loaded[f"ema.shadow.{n}"])
        self.ema.sigma_rel = float(saved["ema"]["sigma_rel"])
        self.ema.gamma = D.sigma_rel_to_gamma(self.ema.sigma_rel)
        self.ema.num_updates = int(saved["ema"]["num_updates"])
        self.iteration = int(saved["iteration"])
        if rank_state is not None and meta["parallel"] == self._layout():
            checkpointing.set_rng_state(rank_state["rng"])
            self.batches.load_state_dict(rank_state["data"])
        else:  # another layout: the data position is the number of samples consumed (exact for pure sources)
            self.batches.consumed_samples = int(saved["consumed_samples"])
        self.log.print(f"resumed from {path} at iteration {self.iteration} "
                       f"({self.batches.consumed_samples} samples consumed)")
        return True

    def export_ema(self, path: str) -> None:
        """The EMA as a megatron-rcm model checkpoint (loadable by `from_pretrained` and generate.py). Side
        directories of an export a kill interrupted are removed first."""
        if self.rank == 0:
            parent, base = os.path.split(os.path.abspath(path))
            for d in os.listdir(parent):
                if d.startswith(f"{base}.incomplete-") or d.startswith(f"{base}.old-"):
                    shutil.rmtree(os.path.join(parent, d), ignore_errors=True)
        if dist.get_world_size() > 1:
            dist.barrier()
        if self.config.checkpoint.exit_during_export:
            checkpoint_io.atomic_dir(path)  # the export has begun ...
            os._exit(1)  # ... and the job dies (test hook)
        self.ema.copy_to(self.ema_module)
        save_megatron(self.ema_module, path)

    def _has_export(self, path: str) -> bool:
        return os.path.isfile(os.path.join(path, checkpoint_io.HEADER))

    # ------------------------------------------------------------------------------------------------------
    # Evaluation (shapes set only: it needs the shapes classifier)
    # ------------------------------------------------------------------------------------------------------
    def evaluate(self, step: int) -> dict:
        c = self.config
        if c.logging.eval_interval <= 0 or c.data.source != "shapes":
            return {}
        from megatron_rcm.training.evaluation import ShapesEvaluator, video_grid

        # every rank evaluates (the networks' calls are collective over TP / CP / PP groups); rank 0 logs
        out = {}
        t0 = time.time()
        if self.evaluator is None:
            shape = (self.model_config.in_channels, c.data.frames, c.data.size, c.data.size)
            self.evaluator = ShapesEvaluator(c, self.teacher, self.batches.encoder, c.logging.classifier,
                                             self.device, shape)
            tm = self.evaluator.teacher_metrics
            self.log.print(f"eval teacher ({c.logging.teacher_eval_steps}-step {c.logging.teacher_solver}, "
                           f"CFG {c.rcm.guidance}): alignment {tm['alignment']:.3f} | feature distance to data "
                           f"{tm['feature_distance_to_data']:.4f} | (data alignment {tm['data_alignment']:.3f})")
            for k, v in tm.items():
                self.log.scalar(f"eval/teacher/{k}", v, step)
            self.log.video("samples/teacher", video_grid(self.evaluator.teacher_samples[:16]), step)
        self.ema.copy_to(self.ema_module)
        for name, module in (("ema", self.ema_module), ("student", self.student.module)):
            metrics, samples = self.evaluator.evaluate(D.TrigFlowWrapper(module, self.model_config.timestep_scale),
                                                       c.logging.eval_student_steps)
            for k, v in metrics.items():
                self.log.scalar(f"eval/{name}/{k}", v, step)
                out[f"{name}/{k}"] = v
            if name == "ema":
                for n, x in samples.items():
                    self.log.video(f"samples/ema_{n}step", video_grid(x[:16]), step)
                if self.log.writer is not None:
                    self.log.image("samples/ema_grid", self.evaluator.grid(samples), step)
            self.log.print(f"eval {name} at iteration {step}: " + " | ".join(
                f"{n}-step alignment {metrics[f'alignment_{n}step']:.3f} feature distance "
                f"{metrics[f'feature_distance_{n}step']:.4f} spread ratio {metrics[f'spread_ratio_{n}step']:.2f}"
                for n in c.logging.eval_student_steps))
        self.log.print(f"evaluation took {time.time() - t0:.1f} s")
        self.log.flush()
        if dist.get_world_size() > 1:
            dist.barrier()
        return out

    # ------------------------------------------------------------------------------------------------------
    def _on_signal(self, signum, frame):
        self._signal_received = True
        self.log.print(f"received signal {signum}: saving a checkpoint and exiting")

    def _append_metrics(self, record: dict) -> None:
        if self.rank == 0:
            append_metrics(self.config.run_dir, record)

    def train(self) -> list[dict]:
        """Run (or resume) the training; with `checkpoint.save_on_signal` SIGTERM / SIGUSR1 save and stop. The
        previous handlers come back on return: at shutdown Python would otherwise reset its handled signals to
        their default action, so a late repeat of the pre-emption signal (a launcher resends it) would kill a
        worker that has already saved."""
        previous = {}
        if self.config.checkpoint.save_on_signal:
            previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGUSR1)}
        try:
            return self._train()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _train(self) -> list[dict]:
        c = self.config
        resumed = self.maybe_resume()
        if self.rank == 0:  # after every check of the config and of the checkpoint it continues
            os.makedirs(c.run_dir, exist_ok=True)
            with open(os.path.join(c.run_dir, "config.yaml"), "w") as f:
                f.write(dump_config(c))
        n_params = sum(p.numel() for p in self.student.module.parameters())
        self.log.print(f"rCM: student/critic/teacher/ema of {n_params:,} parameters each (this rank) | "
                       f"world {dist.get_world_size()} = TP {state.tp_size()} x CP {state.cp_size()} x "
                       f"PP {state.pp_size()} x DP {self.dp_size} | global batch {c.training.global_batch_size} = "
                       f"micro {c.training.micro_batch_size} x {self.batches.num_micro} x DP {self.dp_size} | "
                       f"grad sync {type(self.student).__name__}")
        if self.iteration >= c.training.train_iters:
            export = os.path.join(c.run_dir, "ema")
            if c.checkpoint.save_at_end and not self._has_export(export):
                self.export_ema(export)  # the run ended before its export was complete
                self.log.print(f"run in {c.run_dir} is complete ({self.iteration} iterations) but had no complete "
                               f"EMA export: exported the EMA to {export}")
            else:
                self.log.print(f"run in {c.run_dir} is complete ({self.iteration} iterations); nothing to do")
            self.log.close()
            return self.records
        if not resumed:
            self.evaluate(0)
        interval = c.logging.eval_interval
        self.log.start(self.iteration)
        while self.iteration < c.training.train_iters:
            it = self.iteration
            record = self.train_step(it)
            self.iteration = it + 1
            self.records.append({"iteration": self.iteration, **record})
            self._append_metrics(self.records[-1])
            self.log.iteration(it, record, c.training.global_batch_size, self.iteration_flops)
            if interval > 0 and self.iteration % interval == 0 and self.iteration < c.training.train_iters:
                t_eval = time.time()
                self.evaluate(self.iteration)
                self.log.start_time += time.time() - t_eval  # keep the ETA about training
                self.log.window_start += time.time() - t_eval
            if c.checkpoint.save_interval > 0 and self.iteration % c.checkpoint.save_interval == 0 \
                    and self.iteration < c.training.train_iters:
                self.save()
            if self._stop:
                self.save()
                self.log.print(f"exiting after iteration {self.iteration} on a signal; re-run the same command to "
                               f"resume")
                self.log.close()
                return self.records
            if c.checkpoint.exit_after_iteration and self.iteration == c.checkpoint.exit_after_iteration:
                self.log.print(f"exit_after_iteration={self.iteration}: stopping without a checkpoint (test hook)")
                self.log.close()
                return self.records
        self.evaluate(self.iteration)
        if c.checkpoint.save_at_end:
            self.save()
            self.export_ema(os.path.join(c.run_dir, "ema"))
            self.log.print(f"exported the EMA to {os.path.join(c.run_dir, 'ema')}")
        self.log.close()
        return self.records
