"""Context parallelism: the token split over the CP group and the collectives of self-attention under it.

The flattened token sequence (row-major (frame, height, width) patches) is padded to a multiple of the split and
cut into equal contiguous chunks, one per CP rank (`TokenSplit`). Padded tokens sit at the end of the sequence,
so only the last ranks hold them; attention drops them as keys (they never reach a real token) and the layers
are per-token otherwise, so a padded token cannot change a real one.

Self-attention under CP (`context_parallel_attention`, `context_parallel_attention_jvp`):

- **a2a** (Ulysses): one all-to-all turns (this rank's tokens, all local heads) into (all tokens, this rank's share
  of the heads); attention runs on the full sequence; one all-to-all back. q, k, v and their tangents travel
  stacked in one collective, o and its tangent in one on the way back.
- **ring**: each rank keeps its queries; the K/V blocks (stacked with their tangents) travel around the ring
  by point-to-point messages, the next block's transfer posted before the current block's attention runs;
  partial results are merged exactly by their log-sum-exp (`attention.merge_attention_pair`: `(o, lse)` for
  plain passes, `(o, o_tangent, lse, mu)` for the JVP pass). With autograd the ring has its own backward
  (`_RingAttention`): per K/V block the ordinary attention backward against the merged `o` and LSE, with the
  block's dK/dV travelling on around the ring back to their owner.

Gradients under CP follow megatron's convention: each rank's parameter gradients cover the tokens it holds and
are summed over the CP group (megatron's DDP reduces over data x context parallel ranks;
`sum_context_parallel_grads` does it where no DDP runs).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.distributed as dist

CP_COMMS = ("auto", "a2a", "ring")


@dataclasses.dataclass(frozen=True)
class TokenSplit:
    """How one pass's token sequence is split over the context-parallel group."""

    tokens: int
    """Real tokens per sample (the full, unpadded sequence)."""
    size: int
    """Context-parallel size."""
    rank: int
    """This rank's index in the CP group."""
    chunk: int
    """Tokens per CP rank (padding included)."""
    group: object = None
    """The CP process group (None at size 1)."""
    comm: str = "a2a"
    """'a2a' or 'ring': how self-attention crosses the ranks."""

    @property
    def padded(self) -> int:
        return self.chunk * self.size

    @property
    def start(self) -> int:
        """First (padded-sequence) token of this rank."""
        return self.rank * self.chunk

    def valid_in(self, rank: int) -> int:
        """Real tokens held by CP rank `rank`."""
        return max(0, min(self.chunk, self.tokens - rank * self.chunk))

    @property
    def valid(self) -> int:
        return self.valid_in(self.rank)

    def mask(self, device=None) -> torch.Tensor:
        """Bool [chunk]: which of this rank's tokens are real (False: padding)."""
        return torch.arange(self.start, self.start + self.chunk, device=device) < self.tokens

    def local(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's chunk of a full-sequence tensor along `dim` (padded with zeros as needed). Autograd: the
        full tensor's gradient is this chunk's, zeros elsewhere."""
        if x.shape[dim] != self.tokens:
            raise ValueError(f"expected {self.tokens} tokens along dim {dim}, got {tuple(x.shape)}")
        n = self.valid
        part = x.narrow(dim, min(self.start, self.tokens), n)
        if n == self.chunk:
            return part
        shape = list(x.shape)
        shape[dim] = self.chunk - n
        return torch.cat([part, x.new_zeros(shape)], dim=dim)

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """The full sequence (padding dropped) from every rank's chunk along `dim`, on every rank. Autograd: each
        rank takes its own chunk of the gradient (every rank computes the same loss of the complete output)."""
        if self.size == 1:
            return x.narrow(dim, 0, self.tokens)
        full = _GatherChunks.apply(x, dim, self)
        return full.narrow(dim, 0, self.tokens)


def token_split(tokens: int, size: int, rank: int, group, comm: str, multiple: int = 1) -> TokenSplit:
    """Contiguous chunks of ceil(tokens / size) rounded up to `multiple` (the TP size under sequence
    parallelism). Refuses a split that leaves a rank without a real token."""
    chunk = math.ceil(tokens / size)
    chunk = math.ceil(chunk / multiple) * multiple
    if size > 1 and chunk * (size - 1) >= tokens:
        raise ValueError(f"context-parallel size {size} is too large for {tokens} tokens: chunks of {chunk} leave "
                         f"rank {size - 1} without a real token; use a smaller context_parallel_size or more tokens")
    return TokenSplit(tokens, size, rank, chunk, group if size > 1 else None, comm)


def resolve_cp_comm(cp_comm: str, heads_per_tp_rank: int, cp: int) -> str:
    """'auto' -> 'a2a' when CP divides the heads of a tensor-parallel rank, else 'ring'; a2a on request
    needs that divisibility."""
    if cp_comm not in CP_COMMS:
        raise ValueError(f"cp_comm must be one of {CP_COMMS}, got {cp_comm!r}")
    if cp_comm == "auto":
        return "a2a" if heads_per_tp_rank % cp == 0 else "ring"
    if cp_comm == "a2a" and heads_per_tp_rank % cp:
        raise ValueError(f"cp_comm='a2a' needs the context-parallel size ({cp}) to divide the attention heads per "
                         f"tensor-parallel rank ({heads_per_tp_rank}); use cp_comm='ring' or 'auto'")
    return cp_comm


class _GatherChunks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, split):
        ctx.dim, ctx.split = dim, split
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(split.size)]
        dist.all_gather(parts, x, group=split.group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad):
        s = ctx.split
        return grad.narrow(ctx.dim, s.start, s.chunk).contiguous(), None, None


def sum_context_parallel_grads(model: torch.nn.Module, group) -> None:
    """Sum every parameter gradient over the CP group (what megatron's DDP does over data x context parallel
    ranks), for the CPU path and tests."""
    if group is None or dist.get_world_size(group) == 1:
        return
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, group=group)


# ---------------------------------------------------------------------------------------------------
# Ulysses all-to-all


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """Chunk i of dim 0 goes to rank i; chunk i of the result came from rank i."""
    x = x.contiguous()
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


def _seq_to_heads(x: torch.Tensor, split: TokenSplit) -> torch.Tensor:
    """[S_local, B, n, H, D] -> [S_padded, B, n, H / CP, D]."""
    s, b, n, h, d = x.shape
    x = x.reshape(s, b, n, split.size, h // split.size, d).permute(3, 0, 1, 2, 4, 5)
    return _all_to_all(x, split.group).flatten(0, 1)


def _heads_to_seq(x: torch.Tensor, split: TokenSplit) -> torch.Tensor:
    """[S_padded, B, n, H / CP, D] -> [S_local, B, n, H, D] (the inverse of `_seq_to_heads`)."""
    _, b, n, hc, d = x.shape
    x = _all_to_all(x.reshape(split.size, split.chunk, b, n, hc, d), split.group)
    return x.permute(1, 2, 3, 0, 4, 5).reshape(split.chunk, b, n, split.size * hc, d)


class _Ulysses(torch.autograd.Function):
    """One of the two all-to-alls; its backward is the other."""

    @staticmethod
    def forward(ctx, x, split, to_heads: bool):
        ctx.split, ctx.to_heads = split, to_heads
        return (_seq_to_heads if to_heads else _heads_to_seq)(x, split)

    @staticmethod
    def backward(ctx, grad):
        return (_heads_to_seq if ctx.to_heads else _seq_to_heads)(grad, ctx.split), None, None


def seq_to_heads(x, split: TokenSplit):
    """[S_local, B, n, H, D] (this rank's tokens, all local heads) -> [S_padded, B, n, H / CP, D]."""
    return _Ulysses.apply(x, split, True) if torch.is_grad_enabled() else _seq_to_heads(x, split)


def heads_to_seq(x, split: TokenSplit):
    """[S_padded, B, n, H / CP, D] -> [S_local, B, n, H, D]."""
    return _Ulysses.apply(x, split, False) if torch.is_grad_enabled() else _heads_to_seq(x, split)


# ---------------------------------------------------------------------------------------------------
# Ring


class _Ring:
    """Passes one tensor around the CP ring: `start(x)` posts the send to the next rank and the receive from
    the previous one; `wait()` returns what arrived."""

    def __init__(self, split: TokenSplit, tag: int = 0):
        ranks = dist.get_process_group_ranks(split.group)
        self.tag = tag
        self.next = ranks[(split.rank + 1) % split.size]
        self.prev = ranks[(split.rank - 1) % split.size]
        self.group = split.group
        self._reqs, self._buf = [], None

    def start(self, x: torch.Tensor) -> None:
        x = x.contiguous()
        self._buf = torch.empty_like(x)
        ops = [dist.P2POp(dist.isend, x, self.next, self.group, self.tag),
               dist.P2POp(dist.irecv, self._buf, self.prev, self.group, self.tag)]
        self._reqs = dist.batch_isend_irecv(ops)
        self._sent = x  # keep the send buffer alive until the transfer is done

    def wait(self) -> torch.Tensor:
        for r in self._reqs:
            r.wait()
        self._reqs, self._sent = [], None
        return self._buf


def _ring_blocks(kv: torch.Tensor, split: TokenSplit):
    """Yield (owner rank, K/V block) for every rank's block, this rank's first; the next block's transfer runs
    while the caller computes on the current one. `kv` is [n, B, H, S_local, D] (k, v and maybe tangents)."""
    ring = _Ring(split)
    cur = kv
    for step in range(split.size):
        if step + 1 < split.size:
            ring.start(cur)
        yield (split.rank - step) % split.size, cur
        if step + 1 < split.size:
            cur = ring.wait()


def _valid_keys(block: torch.Tensor, split: TokenSplit, owner: int) -> torch.Tensor | None:
    """The block's real keys (padding dropped along S, dim -2), or None when it has none."""
    n = split.valid_in(owner)
    if n == 0:
        return None
    return block if n == split.chunk else block[..., :n, :]


def ring_attention_jvp(q, k, v, q_tangent, k_tangent, v_tangent, split: TokenSplit, scale: float | None = None):
    """(o, o_tangent) of this rank's queries [B, H, S_local, D] over every rank's keys, K/V and their tangents passed
    around the ring in one message per step, partials merged by (lse, mu). No autograd."""
    from megatron_rcm.models.attention import attention_jvp, merge_attention_pair

    with torch.no_grad():
        kv = torch.stack([k, v, torch.zeros_like(k) if k_tangent is None else k_tangent,
                          torch.zeros_like(v) if v_tangent is None else v_tangent])
        acc = None
        for owner, block in _ring_blocks(kv, split):
            block = _valid_keys(block, split, owner)
            if block is None:
                continue
            part = attention_jvp(q, block[0], block[1], q_tangent, block[2], block[3], scale=scale,
                                 out_dtype=torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else None)
            acc = part if acc is None else merge_attention_pair(acc, part)
        return acc[0].to(q.dtype), acc[1].to(q.dtype)


def _ring_forward(q, k, v, split: TokenSplit, scale):
    """Merged (o [compute dtype], lse) of this rank's queries over all K/V blocks."""
    from megatron_rcm.models.attention import attention_with_lse, merge_attention_pair

    acc = None
    for owner, block in _ring_blocks(torch.stack([k, v]), split):
        block = _valid_keys(block, split, owner)
        if block is None:
            continue
        o, lse = attention_with_lse(q, block[0], block[1], scale=scale)
        part = (o, None, lse, None)
        acc = part if acc is None else merge_attention_pair(acc, part)
    return acc[0], acc[2]


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, split, scale):
        o, lse = _ring_forward(q, k, v, split, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.split, ctx.scale = split, scale
        return o.to(q.dtype)

    @staticmethod
    def backward(ctx, do):
        from megatron_rcm.models.attention import attention_block_backward

        q, k, v, o, lse = ctx.saved_tensors
        split, scale = ctx.split, ctx.scale
        dq = torch.zeros(q.shape, dtype=o.dtype, device=q.device)
        ring = _Ring(split)
        cur = torch.stack([k, v])  # this step's K/V block
        dkv = torch.zeros(cur.shape, dtype=o.dtype, device=q.device)  # its gradient, travelling with it
        for step in range(split.size):
            owner = (split.rank - step) % split.size
            if step + 1 < split.size:
                ring.start(cur)
            n = split.valid_in(owner)
            if n:
                kb, vb = cur[0, ..., :n, :], cur[1, ..., :n, :]
                dq_b, dk_b, dv_b = attention_block_backward(do, q, kb, vb, o, lse, scale=scale)
                dq += dq_b
                dkv[0, ..., :n, :] += dk_b
                dkv[1, ..., :n, :] += dv_b
            # the block's gradient follows it; after the last step it goes on to its owner, the next rank
            grad_ring = _Ring(split, tag=1)
            grad_ring.start(dkv)
            if step + 1 < split.size:
                cur = ring.wait()
            dkv = grad_ring.wait()
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None


def ring_attention(q, k, v, split: TokenSplit, scale: float | None = None):
    """o of this rank's queries [B, H, S_local, D] over every rank's keys; differentiable (ring backward)."""
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        return _RingAttention.apply(q, k, v, split, scale)
    with torch.no_grad():
        return _ring_forward(q, k, v, split, scale)[0].to(q.dtype)
