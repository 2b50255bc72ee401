"""Bad-step arithmetic: which data positions a rewind skips. Pure (no torch)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

# What the run does after ``resilience.max_bad_steps`` non-finite steps in a row.
BadStepAction = Literal["stop", "rewind"]
BAD_STEP_ACTIONS: tuple[str, ...] = get_args(BadStepAction)


def past_skipped(position: int, windows: Sequence[Sequence[int]]) -> int:
    """The data position to train from: ``position`` moved past every skipped window [start, end) it
    falls in (windows may chain: one ending where the next starts). Windows are recorded at the batch
    boundaries of the run that met the bad steps; a batch that straddles a window's start (after a
    batch-size change) is trained as it is."""
    moved = True
    while moved:
        moved = False
        for start, end in windows:
            if start <= position < end:
                position, moved = end, True
    return position


def skipped_samples(windows: Sequence[Sequence[int]]) -> int:
    """Samples the run has skipped so far (windows never overlap: each starts past the last)."""
    return sum(end - start for start, end in windows)


def is_bad_batch(nan_steps: Sequence[int], position: int, global_batch: int) -> bool:
    """Fault injection follows the data, as a bad batch does: the batch at ``position`` is the one an
    uninterrupted run trains at step ``position // global_batch + 1``; a rewind that skips it never
    meets it again."""
    return position % global_batch == 0 and position // global_batch + 1 in nan_steps
