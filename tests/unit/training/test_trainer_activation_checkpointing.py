"""Activation checkpointing of the DiT blocks changes memory, not numbers (grads and JVP outputs)."""

import torch

from megatron_rcm.models import WanModel
from megatron_rcm.parallel import destroy_parallel, initialize_parallel
from megatron_rcm.training.config import TINY_SHAPES_MODEL
from megatron_rcm.training.trainer import enable_activation_checkpointing


def test_checkpointed_blocks_give_the_same_grads_and_jvp():
    initialize_parallel()
    try:
        torch.manual_seed(0)
        plain = WanModel(TINY_SHAPES_MODEL, params_dtype=torch.float64)
        ckpt = WanModel(TINY_SHAPES_MODEL, params_dtype=torch.float64, perform_initialization=False)
        ckpt.load_state_dict(plain.state_dict())
        enable_activation_checkpointing(ckpt)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(2, 3, 8, 16, 16, generator=g, dtype=torch.float64)
        t = torch.tensor([100.0, 800.0], dtype=torch.float64)
        text = torch.randn(2, 5, 16, generator=g, dtype=torch.float64)
        saved = []
        for net in (plain, ckpt):
            count = [0]

            def pack(tensor, count=count):
                count[0] += 1
                return tensor

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                loss = (net(x, t, text) ** 2).sum()
            saved.append(count[0])
            loss.backward()
        assert saved[1] < saved[0] / 2, saved  # the blocks' insides were not kept
        for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12, msg=name)
        tx = torch.randn(x.shape, generator=g, dtype=torch.float64)
        for a, b in zip(plain.jvp(x, t, text, tx, torch.ones(2, dtype=torch.float64)),
                        ckpt.jvp(x, t, text, tx, torch.ones(2, dtype=torch.float64))):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    finally:
        destroy_parallel()
