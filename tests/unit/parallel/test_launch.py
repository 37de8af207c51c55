"""parallel/launch.py: `run_on_ranks` starts a gloo world of fresh processes with torchrun's variables, hides the GPUs
unless asked, and re-raises the first failure with its rank and traceback."""

import os

import pytest
import torch
import torch.distributed as dist

from megatron_rcm.parallel.launch import run_on_ranks

pytestmark = pytest.mark.distributed


def _sum_ranks(out_dir):
    dist.init_process_group("gloo")
    value = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(value)
    env = {k: os.environ[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "CUDA_VISIBLE_DEVICES")}
    with open(os.path.join(out_dir, f"rank{dist.get_rank()}"), "w") as f:
        f.write(f"{value.item()} {sorted(env.items())}")


def _fail_on_rank_1():
    if os.environ["RANK"] == "1":
        raise ValueError("rank one refuses")


def test_every_rank_joins_one_world(tmp_path):
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    run_on_ranks(_sum_ranks, 3, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["rank0", "rank1", "rank2"]
    for r in range(3):
        env = [("CUDA_VISIBLE_DEVICES", ""), ("LOCAL_RANK", str(r)), ("LOCAL_WORLD_SIZE", "3"), ("RANK", str(r)),
               ("WORLD_SIZE", "3")]
        assert (tmp_path / f"rank{r}").read_text() == f"6.0 {env}"  # 1 + 2 + 3 on every rank
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == visible  # the caller's setting is restored


def test_a_failure_names_its_rank():
    with pytest.raises(RuntimeError, match=r"(?s)^rank 1 failed:\n.*ValueError: rank one refuses"):
        run_on_ranks(_fail_on_rank_1, 2)
