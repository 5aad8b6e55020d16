"""torchrun (`torch.distributed.run`), killed by the kernel when the train stage that started it
dies, whatever kills it (train.launch.die_with_parent); its training processes die with it.

    python -m train.torchrun --standalone --nproc-per-node 2 -m train.trainer spec.json
"""

from __future__ import annotations

import os

from torch.distributed.run import main

from train.launch import PARENT_ENV, die_with_parent

if __name__ == "__main__":
    die_with_parent()
    os.environ[PARENT_ENV] = str(os.getpid())  # each training process checks for us as parent
    main()
