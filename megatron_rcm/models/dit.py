"""The DiT skeleton shared by Wan and Cosmos: the run from patch tokens to the head, written once.

A pass runs in five steps, each here or in a model hook:

1. **Patch tokens.** Latents `[B, C, T, H, W]` become tokens `[B, S, C*pt*ph*pw]` (`patchify`: tokens row-major
   (t, h, w), features (c, pt, ph, pw)). This one layout serves both models' inputs and outputs, so that the
   training loop's elementwise maths run on tokens whatever the model.
2. **Token split** (`TokenLayout`): under context parallelism each CP rank keeps one contiguous chunk of the
   (padded) sequence; under sequence parallelism the residual stream is split again over the TP group.
   RoPE tables and token-shaped extras are split the same way; text is not (cross-attention stays local).
3. **Embedding and conditioning** (model hooks `_embed`, `_conditioning`, `_context`, `_rope_angles`).
4. **Blocks**: `block(x, tx, cond, rope, context, cp)`; `cp` (a `TokenSplit`) tells self-attention how to cross
   the CP ranks (a2a or ring, parallel/context.py).
5. **Head** (model hook `_head`, on this CP rank's tokens), then the CP gather where a complete output is asked
   for.

`model(latents, ...)` / `model.jvp(...)` take and return complete tensors on every rank. `forward_tokens` /
`jvp_tokens` take and return this rank's tokens only (`TokenLayout.shard` / `gather` convert), for the training
loop, so that no rank holds a full-sequence activation of any block.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from megatron.core import tensor_parallel

from megatron_rcm.models import tangent as T
from megatron_rcm.models.blocks import parallel_config
from megatron_rcm.parallel import state
from megatron_rcm.parallel.context import TokenSplit, resolve_cp_comm, token_split


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
    def local_tokens(self) -> int:
        return self.split.chunk

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


class DiTModel(torch.nn.Module):
    """Skeleton of a DiT on megatron-core layers; Wan and Cosmos fill in the hooks.

    `cp_comm` ('auto' | 'a2a' | 'ring') picks how self-attention crosses the context-parallel group
    ('auto': a2a when the CP size divides the heads of a tensor-parallel rank, else ring).
    Under CP every rank's parameter gradients cover its own tokens: sum them over the CP group (megatron's DDP
    over data x context parallel ranks does; `parallel.context.sum_context_parallel_grads` elsewhere).
    """

    def __init__(self, config, params_dtype: torch.dtype, sequence_parallel: bool, perform_initialization: bool,
                 cp_comm: str = "auto"):
        super().__init__()
        state.ensure_parallel()
        self.config = config
        self.cfg = parallel_config(params_dtype, sequence_parallel, perform_initialization)
        self.sequence_parallel = self.cfg.sequence_parallel
        self.high_dtype = torch.promote_types(params_dtype, torch.float32)
        self.cp_comm = cp_comm
        self._check_cp_comm()
        self._rope_cache = {}

    # ---------------------------------------------------------------------------------------------- hooks
    def _check_inputs(self, latents, timestep, text, **kw) -> tuple[int, int, int]:
        """Validate the (full-shape) inputs; returns the token grid."""
        raise NotImplementedError

    def _extra_tokens(self, shape, device, **kw) -> torch.Tensor | None:
        """Full-shape input channels [B, k, T, H, W] appended to latents of `shape` (no tangent), or None."""
        return None

    def _embed(self, tokens, ttokens):
        """Patch embedding of [B, S_local, C_in*p] tokens -> [B, S_local, h] (and tangent)."""
        raise NotImplementedError

    def _conditioning(self, timestep, ttimestep, batch: int, grid, split: TokenSplit, **kw):
        """Whatever the blocks and the head need of the time (and token-shaped extras) for this rank's tokens."""
        raise NotImplementedError

    def _context(self, text, dtype):
        """Cross-attention states [L, B, width] (not split)."""
        raise NotImplementedError

    def _rope_angles(self, grid, **kw) -> torch.Tensor:
        """RoPE angles [S, head_dim/2] (float64) of the full sequence."""
        raise NotImplementedError

    def _head(self, x, tx, cond, split: TokenSplit):
        """Head on this CP rank's tokens [S_local, B, h] -> [B, S_local, C_out*p] in the patchify layout."""
        raise NotImplementedError

    # ---------------------------------------------------------------------------------------------- layout
    def _check_cp_comm(self) -> str:
        heads, tp = self.config.num_attention_heads, self.cfg.tensor_model_parallel_size
        if heads % tp:  # the attention blocks raise the clear error
            return self.cp_comm
        return resolve_cp_comm(self.cp_comm, heads // tp, state.cp_size())

    def _split(self, grid) -> TokenSplit:
        tokens = math.prod(grid)
        tp, cp = self.cfg.tensor_model_parallel_size, state.cp_size()
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
            n = split.chunk // self.cfg.tensor_model_parallel_size
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
    def _tokens_run(self, tokens, ttokens, timestep, ttimestep, text, full, split: TokenSplit, **kw):
        """Patch tokens of this CP rank [B, S_local, C*p] -> head output [B, S_local, C_out*p] (and tangents).
        `full` is the full latent shape [B, C, T, H, W]."""
        b = tokens.shape[0]
        grid = tuple(s // p for s, p in zip(full[2:], self.config.patch_size))
        dtype = self.cfg.params_dtype
        tokens = tokens.to(dtype)
        ttokens = None if ttokens is None else ttokens.to(dtype)
        extra = self._extra_tokens(full, tokens.device, **kw)
        if extra is not None:
            extra = split.local(patchify(extra.to(dtype), self.config.patch_size), dim=1)
            tokens = torch.cat([tokens, extra], dim=-1)
            ttokens = None if ttokens is None else torch.cat([ttokens, torch.zeros_like(extra)], dim=-1)
        x, tx = self._embed(tokens, ttokens)
        to_seq = lambda z: None if z is None else z.transpose(0, 1).contiguous()  # [S_local, B, h]
        x, tx = to_seq(x), to_seq(tx)
        if self.sequence_parallel:
            x = tensor_parallel.scatter_to_sequence_parallel_region(x)
            tx = None if tx is None else tensor_parallel.scatter_to_sequence_parallel_region(tx)

        cond = self._conditioning(timestep, ttimestep, b, grid, split, **kw)
        context = self._context(text, dtype)
        rope = self._rope(grid, split, tokens.device, **self._rope_kwargs(**kw))
        cp = split if split.size > 1 else None
        for block in self.blocks:
            x, tx = block(x, tx, cond, rope, context, cp)

        if self.sequence_parallel:
            # the head runs replicated on the CP chunk: its gradient must be split, not reduce-scattered
            x = tensor_parallel.gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False)
            tx = None if tx is None else tensor_parallel.gather_from_sequence_parallel_region(
                tx, tensor_parallel_output_grad=False)
        return self._head(x, tx, cond, split)

    def _rope_kwargs(self, **kw) -> dict:
        """The call's keyword arguments that change the RoPE tables."""
        return {}

    def _run(self, latents, timestep, text, tlatents, ttimestep, **kw):
        grid = self._check_inputs(latents, timestep, text, **kw)
        split = self._split(grid)
        p = tuple(self.config.patch_size)
        dtype = self.cfg.params_dtype
        tokens = split.local(patchify(latents.to(dtype), p), dim=1)
        ttokens = None if tlatents is None else split.local(patchify(tlatents.to(dtype), p), dim=1)
        y, ty = self._tokens_run(tokens, ttokens, timestep, ttimestep, text, tuple(latents.shape), split, **kw)
        if ty is not None and split.size > 1:
            # the output and its tangent in one gather
            both = split.gather(torch.cat([y, ty], dim=0), dim=1)
            y, ty = both.chunk(2, dim=0)
        else:
            y = split.gather(y, dim=1)
            ty = None if ty is None else split.gather(ty, dim=1)
        out = unpatchify(y, grid, p).to(latents.dtype)
        return out, (None if ty is None else unpatchify(ty, grid, p).to(latents.dtype))

    def _sharded_run(self, tokens, timestep, text, layout: TokenLayout, ttokens, ttimestep, **kw):
        c = tokens.shape[-1] // math.prod(layout.patch)
        full = (layout.shape[0], c, *layout.shape[2:])
        self._check_inputs(torch.empty(full, device="meta"), timestep, text, **kw)
        split = layout.split
        if tokens.dim() != 3 or tokens.shape[:2] != (layout.shape[0], split.chunk):
            raise ValueError(f"tokens must be this rank's [B={layout.shape[0]}, {split.chunk}, C*p] "
                             f"(TokenLayout.shard), got {tuple(tokens.shape)}")
        y, ty = self._tokens_run(tokens, ttokens, timestep, ttimestep, text, full, split, **kw)
        if split.valid < split.chunk:
            # padding returns zeros, so that per-sample sums over tokens need no mask
            keep = split.mask(y.device)[None, :, None]
            y = y * keep
            ty = None if ty is None else ty * keep
        return y.to(tokens.dtype), (None if ty is None else ty.to(tokens.dtype))

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
            tt, tts = T.input_tangents(tokens, timestep, tokens_tangent, timestep_tangent)
            return self._sharded_run(tokens, timestep, text, layout, tt, tts, **kw)
