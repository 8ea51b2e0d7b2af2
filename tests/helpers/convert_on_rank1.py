"""Both ranks ask for the built-in model on a first launch, rank 1 first: rank 1 converts
while the process group is up (transformers' save_pretrained would write nothing there: it
writes on global rank 0 only), and rank 0 must wait for it rather than convert again."""

import time

from distprune import dist
from distprune.models import builtin_dir

comm = dist.init()
if comm.rank == 0:
    time.sleep(3)  # rank 1 is converting by now (it takes seconds)
print(f"rank {comm.rank}: {builtin_dir('smollm2-135m')}")
comm.barrier()
dist.shutdown()
