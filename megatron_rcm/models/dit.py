"""The DiT skeleton shared by Wan and Cosmos: the run from patch tokens to the head, written once.

A pass runs in five steps, each here or in a model hook:

1. **Patch tokens.** Latents `[B, C, T, H, W]` become tokens `[B, S, C*pt*ph*pw]` (`patchify`: tokens row-major
   (t, h, w), features (c, pt, ph, pw)). This one layout serves both models' inputs and outputs, so that the
   training loop's elementwise maths run on tokens whatever the model.
2. **Token split** (`TokenLayout`): under context parallelism each CP rank keeps one contiguous chunk of the
   (padded) sequence; under sequence parallelism the residual stream is split again over the TP group.
   RoPE tables and token-shaped extras are split the same way; text is not (cross-attention stays local).
3. **Embedding and conditioning** (model hooks `_embed`, `_conditioning`, `_context`, `_rope_angles`).
4. **Blocks**: `block(x, x_tangent, cond, rope, context, cp)`; `cp` (a `TokenSplit`) tells self-attention how to cross
   the CP ranks (a2a or ring, parallel/context.py).
5. **Head** (model hook `_head`, on this CP rank's tokens), then the CP gather where a complete output is asked
   for.

`model(latents, ...)` / `model.jvp(...)` take and return complete tensors on every rank. `forward_tokens` /
`jvp_tokens` take and return this rank's tokens only (`TokenLayout.shard` / `gather` convert), for the training
loop, so that no rank holds a full-sequence activation of any block.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import torch
from megatron.core import tensor_parallel

from megatron_rcm.models import tangent as T
from megatron_rcm.models.blocks import build_parallel_config
from megatron_rcm.parallel import pipeline, state
from megatron_rcm.parallel.context import TokenSplit, resolve_cp_comm, token_split


def pack_stage_tensor(x: torch.Tensor, x_tangent: torch.Tensor | None) -> torch.Tensor:
    """What travels between pipeline stages: the residual stream [S, B, h], or in the JVP pass activation and
    tangent stacked along the batch, [S, 2B, h] (megatron's schedules' (sequence, micro-batch, hidden) buffers
    then carry the pair with micro_batch_size 2B)."""
    return x if x_tangent is None else torch.cat([x, x_tangent.to(x.dtype)], dim=1)


def unpack_stage_tensor(t: torch.Tensor, tangent: bool):
    """The inverse of `pack_stage_tensor`: (x, x_tangent or None)."""
    return tuple(t.chunk(2, dim=1)) if tangent else (t, None)


def _zero_padding(y, y_tangent, split: TokenSplit):
    """Head output tokens with padding set to zero, so that per-sample sums over tokens need no mask."""
    if split.valid == split.chunk:
        return y, y_tangent
    keep = split.mask(y.device)[None, :, None]
    return y * keep, (None if y_tangent is None else y_tangent * keep)


def patchify(x: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """[B, C, T, H, W] -> [B, S, C*pt*ph*pw]: tokens row-major (t, h, w), features (c, pt, ph, pw)."""
    b, c, f, h, w = x.shape
    pt, ph, pw = patch
    x = x.reshape(b, c, f // pt, pt, h // ph, ph, w // pw, pw).permute(0, 2, 4, 6, 1, 3, 5, 7)
    return x.reshape(b, (f // pt) * (h // ph) * (w // pw), c * pt * ph * pw)


def unpatchify(y: torch.Tensor, grid: tuple[int, int, int], patch: tuple[int, int, int]) -> torch.Tensor:
    """The inverse of `patchify`: [B, S, C*pt*ph*pw] -> [B, C, T, H, W]."""
    b = y.shape[0]
    pt, ph, pw = patch
    y = y.reshape(b, *grid, -1, pt, ph, pw).permute(0, 4, 1, 5, 2, 6, 3, 7)
    return y.reshape(b, -1, grid[0] * pt, grid[1] * ph, grid[2] * pw)


@dataclasses.dataclass(frozen=True)
class TokenLayout:
    """Where a sample's patch tokens live under context parallelism, for callers of the sharded entry points.

    `shard(latents)` -> this rank's tokens `[B, S_local, C*p]` (padding zero); `gather(tokens)` -> complete
    latents on every rank; `mask` marks this rank's real tokens (False: padding, which every loss must ignore;
    the sharded entry points return zeros there, so per-sample sums over tokens need no mask, but counts do:
    `real_tokens`); `noise_fn(generator)` draws noise that is this rank's slice of the same full-sample draw."""

    shape: tuple[int, ...]
    """Full latent shape [B, C, T, H, W] of the pass (C: the latent channels the model takes or returns)."""
    patch: tuple[int, int, int]
    split: TokenSplit

    @property
    def grid(self) -> tuple[int, int, int]:
        return tuple(s // p for s, p in zip(self.shape[2:], self.patch))

    @property
    def real_tokens(self) -> int:
        """Real tokens of this rank (the sum over the CP group is the sample's token count)."""
        return self.split.valid

    def mask(self, device=None) -> torch.Tensor:
        """Bool [S_local]: real tokens of this rank."""
        return self.split.mask(device)

    def shard(self, latents: torch.Tensor) -> torch.Tensor:
        """Full [B, C, T, H, W] (any C) -> this rank's tokens [B, S_local, C*p]."""
        return self.split.local(patchify(latents, self.patch), dim=1)

    def gather(self, tokens: torch.Tensor) -> torch.Tensor:
        """This rank's tokens [B, S_local, C*p] -> the full [B, C, T, H, W] on every rank."""
        return unpatchify(self.split.gather(tokens, dim=1), self.grid, self.patch)

    def noise_fn(self, generator: torch.Generator, dtype=torch.float64):
        """A `diffusion.reduce.NoiseFn` for sharded tokens: draws the full-sample noise [B, C, T, H, W] from the
        (CP-synchronised) generator, as an unsharded run would, and keeps this rank's tokens."""

        def _noise(like: torch.Tensor) -> torch.Tensor:
            c = like.shape[-1] // math.prod(self.patch)
            shape = (like.shape[0], c, *self.shape[2:])
            full = torch.randn(shape, generator=generator, dtype=dtype, device=generator.device)
            return self.shard(full).to(like.device)

        return _noise


@dataclasses.dataclass(frozen=True)
class PipelineStage:
    """This rank's pipeline stage: which blocks it owns (global indices [first_layer, first_layer + num_layers))
    and whether it holds the patch embedding (first) and the head (last)."""

    rank: int
    size: int
    layers: tuple[int, ...]
    """Blocks per stage (all stages)."""

    @property
    def first_layer(self) -> int:
        return sum(self.layers[:self.rank])

    @property
    def num_layers(self) -> int:
        return self.layers[self.rank]

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.size - 1


class StageBlocks(torch.nn.Module):
    """The blocks of one pipeline stage under their global names (`blocks.{i}` for block i of the full model), so
    that checkpoints by name do not depend on the pipeline layout. Iterates and indexes locally."""

    def __init__(self, blocks, first: int):
        super().__init__()
        for i, block in enumerate(blocks):
            self.add_module(str(first + i), block)

    def __iter__(self):
        return iter(self._modules.values())

    def __len__(self):
        return len(self._modules)

    def __getitem__(self, i: int):
        return list(self._modules.values())[i]


class DiTModel(torch.nn.Module):
    """Skeleton of a DiT on megatron-core layers; Wan and Cosmos fill in the hooks.

    `cp_comm` ('auto' | 'a2a' | 'ring') picks how self-attention crosses the context-parallel group
    ('auto': a2a when the CP size divides the heads of a tensor-parallel rank, else ring).
    Under CP every rank's parameter gradients cover its own tokens: sum them over the CP group (megatron's DDP
    over data x context parallel ranks does; `parallel.context.sum_context_parallel_grads` elsewhere).

    Under pipeline parallelism (megatron's pipeline group) this rank builds its stage only (`self.stage`): a
    contiguous run of blocks (`pipeline_layers`: blocks per stage, default balanced), the patch embedding on the
    first stage and the head on the last; the time and text embeddings on every stage (marked
    `pipeline_replicated`: sum their gradients over the pipeline group, `parallel.pipeline.sum_pipeline_grads`).
    Parameter names are the full model's.
    """

    _first_stage_modules: tuple[str, ...] = ()
    """Modules only the first pipeline stage holds (the patch embedding)."""
    _last_stage_modules: tuple[str, ...] = ()
    """Modules (or parameters) only the last pipeline stage holds (the head)."""

    def __init__(self, config, params_dtype: torch.dtype, sequence_parallel: bool, perform_initialization: bool,
                 cp_comm: str = "auto", pipeline_layers=None):
        super().__init__()
        state.ensure_parallel()
        self.config = config
        self.parallel_config = build_parallel_config(params_dtype, sequence_parallel, perform_initialization)
        self.sequence_parallel = self.parallel_config.sequence_parallel
        self.high_dtype = torch.promote_types(params_dtype, torch.float32)
        self.cp_comm = cp_comm
        self._check_cp_comm()
        self._rope_cache = {}
        pp = state.pp_size()
        if pipeline_layers is not None and pp == 1 and list(pipeline_layers) != [config.num_layers]:
            raise ValueError(f"pipeline_layers {list(pipeline_layers)} given without pipeline parallelism "
                             f"(pipeline_model_parallel_size=1); leave it unset")
        self.stage = PipelineStage(state.pp_rank(), pp,
                                   tuple(pipeline.stage_layers(config.num_layers, pp, pipeline_layers)))
        self._input_tensor = None

    def _build_blocks(self, make_block):
        """This stage's blocks under their global names (a plain ModuleList without pipeline parallelism)."""
        st = self.stage
        if st.size == 1:
            return torch.nn.ModuleList(make_block() for _ in range(st.num_layers))
        return StageBlocks([make_block() for _ in range(st.num_layers)], st.first_layer)

    def _finish_stage(self) -> None:
        """Subclasses call this at the end of construction: marks the parameters every stage holds a copy of."""
        if self.stage.size == 1:
            return
        own = ("blocks",) + self._first_stage_modules + self._last_stage_modules
        for name, p in self.named_parameters():
            if name.split(".")[0] not in own:
                p.pipeline_replicated = True
                # megatron's optimizer leaves `shared` parameters out of the grad norm: the copies of later
                # stages (equal to the first's after the pipeline sum) count once
                p.shared = not self.stage.is_first

    def set_input_tensor(self, input_tensor) -> None:
        """What megatron's pipeline schedules call before a non-first stage's forward: the previous stage's output
        (a tensor, or a one-element list), read by the next `stage_forward`."""
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0] if input_tensor else None
        self._input_tensor = input_tensor

    # ---------------------------------------------------------------------------------------------- hooks
    def _check_inputs(self, latents, timestep, text, **kw) -> tuple[int, int, int]:
        """Validate the (full-shape) inputs; returns the token grid."""
        raise NotImplementedError

    def _extra_tokens(self, shape, device, **kw) -> torch.Tensor | None:
        """Full-shape input channels [B, k, T, H, W] appended to latents of `shape` (no tangent), or None."""
        return None

    def _embed(self, tokens, tokens_tangent):
        """Patch embedding of [B, S_local, C_in*p] tokens -> [B, S_local, h] (and tangent)."""
        raise NotImplementedError

    def _conditioning(self, timestep, timestep_tangent, batch: int, grid, split: TokenSplit, **kw):
        """Whatever the blocks and the head need of the time (and token-shaped extras) for this rank's tokens."""
        raise NotImplementedError

    def _context(self, text, dtype):
        """Cross-attention states [L, B, width] (not split)."""
        raise NotImplementedError

    def _rope_angles(self, grid, **kw) -> torch.Tensor:
        """RoPE angles [S, head_dim/2] (float64) of the full sequence."""
        raise NotImplementedError

    def _head(self, x, x_tangent, cond, split: TokenSplit):
        """Head on this CP rank's tokens [S_local, B, h] -> [B, S_local, C_out*p] in the patchify layout."""
        raise NotImplementedError

    # ---------------------------------------------------------------------------------------------- layout
    def _check_cp_comm(self) -> str:
        heads, tp = self.config.num_attention_heads, self.parallel_config.tensor_model_parallel_size
        if heads % tp:  # the attention blocks raise the clear error
            return self.cp_comm
        return resolve_cp_comm(self.cp_comm, heads // tp, state.cp_size())

    def _split(self, grid) -> TokenSplit:
        tokens = math.prod(grid)
        tp, cp = self.parallel_config.tensor_model_parallel_size, state.cp_size()
        if self.sequence_parallel and cp == 1 and tokens % tp:
            raise ValueError(f"sequence parallelism needs the token count ({tokens}) divisible by TP={tp}")
        multiple = tp if self.sequence_parallel else 1
        return token_split(tokens, cp, state.cp_rank(), state.cp_group(), self._check_cp_comm(), multiple)

    def token_layout(self, shape, channels: int | None = None) -> TokenLayout:
        """The layout of a pass on latents of `shape` [B, C, T, H, W] (`channels`: replace C, e.g. the output's)."""
        shape = tuple(shape)
        if channels is not None:
            shape = (shape[0], channels, *shape[2:])
        grid = tuple(s // p for s, p in zip(shape[2:], self.config.patch_size))
        return TokenLayout(shape, tuple(self.config.patch_size), self._split(grid))

    def _sp_range(self, split: TokenSplit, sequence_parallel_shard: bool) -> tuple[int, int]:
        """(first token, count) in the full padded sequence of this rank's residual stream (SP shard) or of its
        CP chunk."""
        if sequence_parallel_shard and self.sequence_parallel:
            n = split.chunk // self.parallel_config.tensor_model_parallel_size
            return split.start + state.tp_rank() * n, n
        return split.start, split.chunk

    def split_tokens(self, x: torch.Tensor, split: TokenSplit) -> torch.Tensor:
        """A full-sequence token-shaped tensor [S, ...] -> this rank's residual-stream tokens (CP chunk, then the
        sequence-parallel shard)."""
        x = split.local(x, dim=0)
        if self.sequence_parallel:
            x = tensor_parallel.scatter_to_sequence_parallel_region(x)
        return x

    def _rope(self, grid, split: TokenSplit, device, **kw):
        key = (grid, tuple(sorted(kw.items())), device, split.start, split.chunk)
        if key not in self._rope_cache:
            ang = split.local(self._rope_angles(grid, device=device, **kw), dim=0)
            ang = ang.to(self.high_dtype)[:, None, None, :]
            self._rope_cache = {key: (torch.cos(ang), torch.sin(ang))}
        return self._rope_cache[key]

    # ---------------------------------------------------------------------------------------------- the run
    def _grid(self, full) -> tuple[int, int, int]:
        return tuple(s // p for s, p in zip(full[2:], self.config.patch_size))

    def _embed_tokens(self, tokens, tokens_tangent, full, split: TokenSplit, **kw):
        """First stage: patch tokens of this CP rank [B, S_local, C*p] -> residual stream [S_res, B, h]."""
        dtype = self.parallel_config.params_dtype
        tokens = tokens.to(dtype)
        tokens_tangent = None if tokens_tangent is None else tokens_tangent.to(dtype)
        extra = self._extra_tokens(full, tokens.device, **kw)
        if extra is not None:
            extra = split.local(patchify(extra.to(dtype), self.config.patch_size), dim=1)
            tokens = torch.cat([tokens, extra], dim=-1)
            if tokens_tangent is not None:
                tokens_tangent = torch.cat([tokens_tangent, torch.zeros_like(extra)], dim=-1)
        x, x_tangent = self._embed(tokens, tokens_tangent)
        to_seq = lambda z: None if z is None else z.transpose(0, 1).contiguous()  # [S_local, B, h]
        x, x_tangent = to_seq(x), to_seq(x_tangent)
        if self.sequence_parallel:
            x = tensor_parallel.scatter_to_sequence_parallel_region(x)
            x_tangent = None if x_tangent is None else tensor_parallel.scatter_to_sequence_parallel_region(x_tangent)
        return x, x_tangent

    def _head_tokens(self, x, x_tangent, cond, split: TokenSplit):
        """Last stage: residual stream -> head output [B, S_local, C_out*p]."""
        if self.sequence_parallel:
            # the head runs replicated on the CP chunk: its gradient must be split, not reduce-scattered
            x = tensor_parallel.gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False)
            x_tangent = None if x_tangent is None else tensor_parallel.gather_from_sequence_parallel_region(
                x_tangent, tensor_parallel_output_grad=False)
        return self._head(x, x_tangent, cond, split)

    def _stage_run(self, tokens, tokens_tangent, x, x_tangent, timestep, timestep_tangent, text, full,
                   split: TokenSplit, **kw):
        """This pipeline stage of a pass: patch tokens (first stage) or the previous stage's residual stream
        (`x`, `x_tangent`) -> the residual stream after this stage's blocks, or the head output on the last stage.
        `full` is the full latent shape [B, C, T, H, W]."""
        grid = self._grid(full)
        if self.stage.is_first:
            x, x_tangent = self._embed_tokens(tokens, tokens_tangent, full, split, **kw)
        cond = self._conditioning(timestep, timestep_tangent, full[0], grid, split, **kw)
        context = self._context(text, self.parallel_config.params_dtype)
        rope = self._rope(grid, split, x.device, **self._rope_kwargs(**kw))
        cp = split if split.size > 1 else None
        for block in self.blocks:
            x, x_tangent = block(x, x_tangent, cond, rope, context, cp)
        if not self.stage.is_last:
            return x, x_tangent
        return self._head_tokens(x, x_tangent, cond, split)

    def _tokens_run(self, tokens, tokens_tangent, timestep, timestep_tangent, text, full, split: TokenSplit, **kw):
        """Patch tokens of this CP rank [B, S_local, C*p] -> head output [B, S_local, C_out*p] (and tangents),
        on every pipeline stage (the stages run as a chain, the last one's output broadcast)."""
        if self.stage.size == 1:
            return self._stage_run(tokens, tokens_tangent, None, None, timestep, timestep_tangent, text, full, split,
                                   **kw)
        tangent = timestep_tangent is not None
        x = x_tangent = None
        if not self.stage.is_first:
            x = pipeline.receive_activation()
            x, x_tangent = unpack_stage_tensor(x, tangent)
        out = pack_stage_tensor(*self._stage_run(tokens, tokens_tangent, x, x_tangent, timestep, timestep_tangent,
                                                 text, full, split, **kw))
        if self.stage.is_last:
            pipeline.broadcast_from_last(out)
        else:
            out = pipeline.send_to_next_and_wait_output(out)
        return unpack_stage_tensor(out, tangent)

    def _rope_kwargs(self, **kw) -> dict:
        """The call's keyword arguments that change the RoPE tables."""
        return {}

    def _run(self, latents, timestep, text, latents_tangent, timestep_tangent, **kw):
        grid = self._check_inputs(latents, timestep, text, **kw)
        split = self._split(grid)
        p = tuple(self.config.patch_size)
        dtype = self.parallel_config.params_dtype
        tokens = split.local(patchify(latents.to(dtype), p), dim=1)
        tokens_tangent = None if latents_tangent is None else split.local(patchify(latents_tangent.to(dtype), p), dim=1)
        y, y_tangent = self._tokens_run(tokens, tokens_tangent, timestep, timestep_tangent, text, tuple(latents.shape),
                                        split, **kw)
        if y_tangent is not None and split.size > 1:
            # the output and its tangent in one gather
            both = split.gather(torch.cat([y, y_tangent], dim=0), dim=1)
            y, y_tangent = both.chunk(2, dim=0)
        else:
            y = split.gather(y, dim=1)
            y_tangent = None if y_tangent is None else split.gather(y_tangent, dim=1)
        out = unpatchify(y, grid, p).to(latents.dtype)
        return out, (None if y_tangent is None else unpatchify(y_tangent, grid, p).to(latents.dtype))

    def _sharded_run(self, tokens, timestep, text, layout: TokenLayout, tokens_tangent, timestep_tangent, **kw):
        c = tokens.shape[-1] // math.prod(layout.patch)
        full = (layout.shape[0], c, *layout.shape[2:])
        self._check_inputs(torch.empty(full, device="meta"), timestep, text, **kw)
        split = layout.split
        if tokens.dim() != 3 or tokens.shape[:2] != (layout.shape[0], split.chunk):
            raise ValueError(f"tokens must be this rank's [B={layout.shape[0]}, {split.chunk}, C*p] "
                             f"(TokenLayout.shard), got {tuple(tokens.shape)}")
        y, y_tangent = _zero_padding(
            *self._tokens_run(tokens, tokens_tangent, timestep, timestep_tangent, text, full, split, **kw), split)
        return y.to(tokens.dtype), (None if y_tangent is None else y_tangent.to(tokens.dtype))

    # ---------------------------------------------------------------------------------------------- sharded API
    def forward_tokens(self, tokens, timestep, text, layout: TokenLayout, **kw):
        """This rank's tokens [B, S_local, C*p] (`layout.shard(latents)`) -> its velocity tokens
        [B, S_local, C_out*p], zeros on padding. Per-sample sums of the result are local: all-reduce them over
        the CP group (`diffusion.reduce.process_group_sum(parallel.cp_group())`)."""
        return self._sharded_run(tokens, timestep, text, layout, None, None, **kw)[0]

    def jvp_tokens(self, tokens, timestep, text, layout: TokenLayout, tokens_tangent=None, timestep_tangent=None,
                   **kw):
        """(velocity tokens, tangent) of this rank, as `forward_tokens`; always without autograd."""
        with torch.no_grad():
            tokens_tangent, timestep_tangent = T.input_tangents(tokens, timestep, tokens_tangent, timestep_tangent)
            return self._sharded_run(tokens, timestep, text, layout, tokens_tangent, timestep_tangent, **kw)

    # ---------------------------------------------------------------------------------------------- stage API
    def stage_activation_shape(self, layout: TokenLayout, jvp: bool = False) -> tuple[int, ...]:
        """Shape of what a non-last stage sends on (megatron's schedules' `tensor_shape`): the residual stream
        [S_res, B, h] (S_res: this rank's CP chunk, divided by TP under sequence parallelism), [S_res, 2B, h] in
        the JVP pass (activation and tangent stacked along the batch)."""
        s = layout.split.chunk // (self.parallel_config.tensor_model_parallel_size if self.sequence_parallel else 1)
        return (s, layout.shape[0] * (2 if jvp else 1), self.config.hidden_size)

    def stage_forward(self, tokens, timestep, text, layout: TokenLayout, hidden=None, jvp: bool = False,
                      tokens_tangent=None, timestep_tangent=None, **kw):
        """One pipeline stage of a sharded pass, for a pipeline schedule to drive (no communication here).

        `tokens`: this rank's patch tokens (`layout.shard(latents)`; read on the first stage only, may be None
        elsewhere). `hidden`: the previous stage's output on later stages (default: what `set_input_tensor`
        gave). Returns, on a non-last stage, the activation for the next stage (`[S_res, B, h]`, or `[S_res, 2B,
        h]` with its tangent when `jvp`); on the last stage what `forward_tokens` / `jvp_tokens` return
        (velocity tokens, zeros on padding; with `jvp` the pair). `jvp` runs without autograd; every stage
        needs `timestep_tangent` there (default zeros), only the first `tokens_tangent`."""
        st = self.stage
        if hidden is None and not st.is_first:
            hidden = self._input_tensor
            if hidden is None:
                raise ValueError(f"pipeline stage {st.rank} needs the previous stage's output: pass hidden= or call "
                                 f"set_input_tensor first")
        full = tuple(layout.shape)
        self._check_inputs(torch.empty(full, device="meta"), timestep, text, **kw)
        with torch.no_grad() if jvp else contextlib.nullcontext():
            if not jvp:
                tokens_tangent = timestep_tangent = None
            else:
                timestep_tangent = (torch.zeros_like(timestep, dtype=torch.promote_types(timestep.dtype, torch.float32))
                                    if timestep_tangent is None else timestep_tangent)
                tokens_tangent = (torch.zeros_like(tokens) if tokens_tangent is None else tokens_tangent) \
                    if st.is_first else None
            x = x_tangent = None
            if not st.is_first:
                x, x_tangent = unpack_stage_tensor(hidden, jvp)
            elif tokens.dim() != 3 or tokens.shape[:2] != (full[0], layout.split.chunk):
                raise ValueError(f"tokens must be this rank's [B={full[0]}, {layout.split.chunk}, C*p] "
                                 f"(TokenLayout.shard), got {tuple(tokens.shape)}")
            out = self._stage_run(tokens, tokens_tangent, x, x_tangent, timestep, timestep_tangent, text, full,
                                  layout.split, **kw)
            if not st.is_last:
                return pack_stage_tensor(*out)
            y, y_tangent = _zero_padding(*out, layout.split)
            dtype = self.parallel_config.params_dtype if tokens is None else tokens.dtype
            y = y.to(dtype)
            return (y, y_tangent.to(dtype)) if jvp else y
