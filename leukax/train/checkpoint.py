"""Orbax checkpoints of the whole member-stacked ensemble state (one step per finished epoch)."""
from __future__ import annotations

import pathlib

import jax
import orbax.checkpoint as ocp


def manager(directory: str | pathlib.Path, max_to_keep: int = 2) -> ocp.CheckpointManager:
    """Returns a CheckpointManager writing to `directory` (created if needed)."""
    directory = pathlib.Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    return ocp.CheckpointManager(directory, options=options)


def save(mngr: ocp.CheckpointManager, step: int, state) -> None:
    """Saves `state` (any pytree of arrays) as `step` and waits until it is on disk."""
    mngr.save(step, args=ocp.args.StandardSave(state))
    mngr.wait_until_finished()


def restore_latest(mngr: ocp.CheckpointManager, like_state):
    """Returns (state, step) of the newest checkpoint, structured like `like_state`; (None, None) if none."""
    step = mngr.latest_step()
    if step is None:
        return None, None
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like_state)
    try:
        state = mngr.restore(step, args=ocp.args.StandardRestore(abstract))
    except (ValueError, KeyError) as e:  # structure mismatch: a different config wrote this directory
        raise ValueError(f"leukax/train/checkpoint.py: checkpoint {mngr.directory}/{step} does not match "
                         f"this trainer's state (different config or model?): {e}") from e
    return state, step
