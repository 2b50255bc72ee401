"""``launcher.pretrain`` whose rank 0 first holds the GIL for ``RAMP_TEST_HOLD_GIL_S`` seconds in one C call
(libc ``sleep`` through ``ctypes.PyDLL``, which keeps the GIL), as megatron's index builds do at scale.
Started by torchrun from the heartbeat test; not a test module itself."""

import ctypes
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from launcher import data, pretrain

build_datasets = data.build_datasets


def build_holding_the_gil(*args, **kwargs):
    if os.environ["RANK"] == "0":
        hold = int(os.environ["RAMP_TEST_HOLD_GIL_S"])
        ctypes.PyDLL(None).sleep(hold)
        print(f"gil_holding_rank: rank 0 held the GIL for {hold} s", flush=True)
    return build_datasets(*args, **kwargs)


data.build_datasets = build_holding_the_gil
sys.exit(pretrain.main())
