"""Orbax checkpoints of the whole member-stacked ensemble state (one step per finished epoch).

Fault model. Orbax writes a step into `<step>.orbax-checkpoint-tmp-*` and renames it when complete, so a
write killed half-way leaves a tmp folder that is never listed as a step. A step folder that exists but
cannot be read (a truncated file after a crash, a disk error) is moved aside to `<step>.unreadable[-k]` by
`restore_latest`, which then restores the newest older step: keeping 2 steps (the default) means one
readable step survives any single bad write.
"""
from __future__ import annotations

import logging
import pathlib

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


def manager(directory: str | pathlib.Path, max_to_keep: int = 2) -> ocp.CheckpointManager:
    """Returns a CheckpointManager writing to `directory` (created if needed)."""
    directory = pathlib.Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    return ocp.CheckpointManager(directory, options=options)


def save(mngr: ocp.CheckpointManager, step: int, state) -> None:
    """Saves `state` (any pytree of arrays, e.g. a flax.struct.dataclass) as `step`; waits until on disk."""
    mngr.save(step, args=ocp.args.StandardSave(state))
    mngr.wait_until_finished()


def _move_aside(mngr: ocp.CheckpointManager, step: int) -> pathlib.Path:
    src = pathlib.Path(mngr.directory) / str(step)
    dst, k = src.with_name(f"{step}.unreadable"), 0
    while dst.exists():
        k += 1
        dst = src.with_name(f"{step}.unreadable-{k}")
    src.rename(dst)
    return dst


def restore_latest(mngr: ocp.CheckpointManager, like_state):
    """Returns (state, step) of the newest readable checkpoint, structured like `like_state`; (None, None)
    if the directory has no step. Newer unreadable steps are moved aside (logged) so that later saves of
    those step numbers succeed. Raises ValueError if no step can be read (e.g. a different config wrote it).
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like_state)
    failed: list[tuple[int, Exception]] = []
    for step in sorted(mngr.all_steps(), reverse=True):
        try:
            state = mngr.restore(step, args=ocp.args.StandardRestore(abstract))
        except Exception as e:  # noqa: BLE001  (orbax/tensorstore raise ValueError, OSError, KeyError...)
            failed.append((step, e))
            continue
        for bad_step, err in failed:
            dst = _move_aside(mngr, bad_step)
            log.warning("checkpoint %s/%d is unreadable (%s: %s); moved to %s, restoring step %d",
                        mngr.directory, bad_step, type(err).__name__, str(err)[:200], dst.name, step)
        if failed:
            mngr.reload()
        return state, step
    if failed:
        step, err = failed[0]
        raise ValueError(f"leukax/train/checkpoint.py: no checkpoint in {mngr.directory} can be restored into "
                         f"this trainer's state (different config or model, or corrupt files); newest step "
                         f"{step}: {err}") from err
    return None, None
