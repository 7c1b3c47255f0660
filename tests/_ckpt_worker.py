"""Subprocess of tests/test_checkpoint.py: score a tiny LLaVA into a checkpoint folder, slowly.

python -m tests._ckpt_worker CHECKPOINT_DIR   (env BYE_TEST_SLEEP: seconds to sleep after each batch)
"""

from __future__ import annotations

import os
import sys
import time

import torch

from ._models import llava

N_BATCHES = 12


def data(seed: int = 0):
    """The model and its 12 batches of 2 rows, with string ids; the same in every process."""
    model, batches = llava(seed=seed, n_batches=N_BATCHES, batch_size=2)
    return model, [{**b, "ids": [f"s{2 * i + j:02d}" for j in range(2)]} for i, b in enumerate(batches)]


def slowly(batches, seconds: float):
    for b in batches:
        yield b
        time.sleep(seconds)  # after batch i was scored (and checkpointed), before batch i+1


def main() -> None:
    torch.set_num_threads(1)
    import bye_fast

    model, batches = data()
    sleep = float(os.environ.get("BYE_TEST_SLEEP", "0"))
    bye_fast.score(
        model, slowly(batches, sleep), progress=False, checkpoint_dir=sys.argv[1], checkpoint_every=1
    )
    print("finished", flush=True)


if __name__ == "__main__":
    main()
