"""A tiny deep-ensemble run and a tiny BO search, shared by tests/test_train_faults.py and by the child
processes those tests kill with SIGKILL.

As a script, it runs one of them and stops itself at a chosen point by blocking on stdin after printing
`BLOCKED ...` (so the parent kills it at an exact point, not after a delay):
  python tests/train_faults_child.py fit   <checkpoint_dir> <block_at_step_call>
  python tests/train_faults_child.py save  <checkpoint_dir> <block_at_committing_step>
  python tests/train_faults_child.py bayes <log_path> <block_at_objective_batch_call>
"""
from __future__ import annotations

import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from leukax.train import bayes, finetune

CONFIG = finetune.TrainConfig(num_members=2, optimizer="adam", learning_rate=1e-2, dropout_rate=0.2, batch_size=8,
                              eval_batch_size=16, num_epochs=4, seed=0, ensemble_axis="vmap", normalization=None)
STEPS_PER_EPOCH = 32 // 8
BO_SPACE = {"units": (4, 16, int), "optimizer": ("sgd", "rmsprop"), "log10_lr": (-4.0, -1.0),
            "momentum": (0.0, 0.99)}
BO_TRIALS = 7
BO_BATCH = 2  # trials suggested and evaluated together (bayes.run_batched)


class TinyMLP(nn.Module):
    """Dense(16, relu) → dropout (rate may be traced) → Dense(2); returns (logits_bk, {})."""
    hidden: int = 16

    @nn.compact
    def __call__(self, x_bd, train: bool = False, dropout_rate=None):
        h = nn.relu(nn.Dense(self.hidden)(x_bd.reshape(x_bd.shape[0], -1)))
        if train and dropout_rate is not None:
            keep = 1.0 - dropout_rate
            h = jnp.where(jax.random.uniform(self.make_rng("dropout"), h.shape) < keep, h / keep, 0.0)
        return nn.Dense(2)(h), {}


def data():
    """Synthetic, learnable: ((x_train 32×8, y_train), (x_val 16×8, y_val)), y = [x0 + x1/2 > 0]."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(48, 8)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int32)
    return (x[:32], y[:32]), (x[32:], y[32:])


def make_train(train_data=None, config=CONFIG) -> finetune.Train:
    tr_data, val_data = data()
    return finetune.make_train(config, TinyMLP(), tr_data if train_data is None else train_data, val_data)


def bo_objective(params) -> tuple[float, dict]:
    """A cheap deterministic objective with its optimum at lr 1e-2, momentum 0.8, 10 units, sgd."""
    target = (-(params["log10_lr"] + 2.0) ** 2 - (params["momentum"] - 0.8) ** 2
              - 0.01 * (params["units"] - 10) ** 2 + (0.1 if params["optimizer"] == "sgd" else 0.0))
    return float(target), {}


def bo_batch_objective(params_list) -> list[tuple[float, dict]]:
    return [bo_objective(p) for p in params_list]


def _block(what: str) -> None:
    print(f"BLOCKED {what}", flush=True)
    sys.stdin.readline()  # the parent never writes: it kills this process here
    raise SystemExit("train_faults_child.py: the parent closed stdin instead of killing")


def main(argv: list[str]) -> None:
    kind, path, at = argv[1], argv[2], int(argv[3])
    if kind == "fit":  # stop inside an epoch, just before step call `at` (1-based)
        step, calls = finetune.STEP[CONFIG.ensemble_axis], [0]

        def blocking_step(*args):
            calls[0] += 1
            if calls[0] == at:
                _block(f"step {at}")
            return step(*args)

        finetune.STEP[CONFIG.ensemble_axis] = blocking_step
        make_train().fit(checkpoint_dir=path)
    elif kind == "save":  # stop while Orbax commits step `at`: written to a tmp folder, not yet renamed
        from orbax.checkpoint._src.path import async_path
        rename = async_path.rename

        async def blocking_rename(src, dst):
            if dst.name == str(at):
                _block(f"commit {src.name} -> {dst.name}")
            return await rename(src, dst)

        async_path.rename = blocking_rename
        make_train().fit(checkpoint_dir=path)
    elif kind == "bayes":  # stop inside batch call `at` (1-based), its trials suggested, none logged
        calls = [0]

        def objective_batch(params_list):
            calls[0] += 1
            if calls[0] == at:
                _block(f"objective_batch call {at}")
            return bo_batch_objective(params_list)

        bayes.run_batched(objective_batch, BO_SPACE, BO_TRIALS, path, batch=BO_BATCH, init_points=2, seed=0)
    else:
        raise SystemExit(f"train_faults_child.py: unknown kind {kind!r}")
    print("FINISHED", flush=True)


if __name__ == "__main__":
    main(sys.argv)
