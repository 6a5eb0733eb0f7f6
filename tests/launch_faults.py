"""Functions that Ray workers import by name in tests/test_launch_ray.py."""
import os


def fail_on_rank(bad: int) -> int:
    """Rank `bad` raises; the others wait in a gloo all-reduce that can never complete."""
    import torch
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if rank == bad:
        raise ValueError(f"rank {rank} of {world} failed on purpose")
    dist.init_process_group("gloo", rank=rank, world_size=world)  # blocks: rank `bad` is gone
    dist.all_reduce(torch.ones(1))
    return rank
