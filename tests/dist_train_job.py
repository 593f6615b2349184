"""One training run for tests/test_distributed.py, alone or under torchrun.

    python dist_train_job.py OUT.pt                       # one process, global batch
    torchrun --nproc_per_node 2 dist_train_job.py OUT.pt  # 2 ranks (gloo), half each

Every rank reads its own share of each global batch (rank r of W takes rows
[r*B/W, (r+1)*B/W) of it), as a DistributedSampler-style loader would; the global
batches are the same in both runs, so the results must agree up to rounding.
Rank 0 saves the trained state and the history to OUT.pt.
"""

import os
import sys

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fastmdl  # noqa: E402
from models import TinyResNet  # noqa: E402

NUM_CLASSES = (4, 2, 3)
GLOBAL_BATCH = 8
STEPS = 6


def shard_loaders(rank, world, n=GLOBAL_BATCH * STEPS, seed=0):
    g = torch.Generator().manual_seed(seed)
    share = GLOBAL_BATCH // world
    batches = [list(range(i * GLOBAL_BATCH + rank * share, i * GLOBAL_BATCH + (rank + 1) * share))
               for i in range(n // GLOBAL_BATCH)]
    out = []
    for k in NUM_CLASSES:
        x = torch.randn(n, 3, 8, 8, generator=g)
        y = torch.randint(0, k, (n,), generator=g)
        x += y[:, None, None, None] * 0.5
        out.append(DataLoader(TensorDataset(x, y), batch_sampler=batches))
    return out


def main(out):
    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    torch.manual_seed(0)
    model = fastmdl.convert(TinyResNet(), len(NUM_CLASSES), list(NUM_CLASSES), input_size=(3, 8, 8))
    history = fastmdl.train(model, shard_loaders(rank, world), shard_loaders(rank, world, seed=1),
                            budget=0.5, epochs=2, sharing="jaccard", mask_lr=0.2,
                            train_weights=True, recalibrate=3, progress=False, log=None)
    if rank == 0:
        torch.save({"state": model.state_dict(), "history": history, "world": world}, out)
    if dist.is_initialized():
        # Every rank done with every collective before any tears the group down: a
        # rank that destroyed it while the other still had gloo work in flight
        # aborted at exit ("terminate called without an active exception") once,
        # on a machine busy with other work.
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
