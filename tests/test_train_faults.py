"""Training that survives faults (issue 11 §3), each on a tiny model and synthetic data:
a SIGKILL inside an epoch, a SIGKILL while a checkpoint is committed, a truncated checkpoint, a nan/inf
loss, and a Bayesian-optimisation search killed between trials. Kills happen at exact points: the child
process (tests/train_faults_child.py) blocks there and says so on stdout, then the parent sends SIGKILL."""
import os
import pathlib
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

import train_faults_child as child
from leukax.train import bayes, finetune
from leukax.train import checkpoint as ckpt_lib

CHILD = pathlib.Path(child.__file__)


def tree_equal(a, b):
    return all(jax.tree.leaves(jax.tree.map(lambda u, v: bool(np.array_equal(u, v, equal_nan=True)), a, b)))


def kill_child_when_blocked(kind: str, path, at: int) -> str:
    """Runs the child until it prints BLOCKED, SIGKILLs it there, and returns what it printed."""
    root = str(CHILD.parents[1])  # the child imports the leukax under test, not an installed copy
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    proc = subprocess.Popen([sys.executable, str(CHILD), kind, str(path), str(at)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=CHILD.parents[1])
    lines = []
    for line in proc.stdout:  # ends at EOF if the child dies on its own
        lines.append(line)
        if line.startswith("BLOCKED"):
            break
    if not lines or not lines[-1].startswith("BLOCKED"):
        proc.kill()
        raise AssertionError(f"child never blocked: {''.join(lines)}\n{proc.stderr.read()[-3000:]}")
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    proc.stdin.close(), proc.stdout.close(), proc.stderr.close()
    return "".join(lines)


def saved_steps(ckpt) -> list[int]:
    mngr = ckpt_lib.manager(ckpt)
    try:
        return list(mngr.all_steps())
    finally:
        mngr.close()


def restore_latest(ckpt, like):
    mngr = ckpt_lib.manager(ckpt)
    try:
        return ckpt_lib.restore_latest(mngr, like)
    finally:
        mngr.close()


def count_steps(monkeypatch) -> list:
    """Counts ensemble step calls of this process from now on."""
    calls, step = [0], finetune.STEP[child.CONFIG.ensemble_axis]

    def counting(*args):
        calls[0] += 1
        return step(*args)

    monkeypatch.setitem(finetune.STEP, child.CONFIG.ensemble_axis, counting)
    return calls


@pytest.fixture(scope="module")
def straight():
    """The 4-epoch run never interrupted."""
    return child.make_train().fit()


def test_sigkill_inside_an_epoch_resumes_bit_for_bit(tmp_path, straight, monkeypatch):
    ckpt = tmp_path / "ckpt"
    at = child.STEPS_PER_EPOCH + 3  # epoch 2, before its third step: checkpoint 1 exists, 2 does not
    kill_child_when_blocked("fit", ckpt, at)
    assert saved_steps(ckpt) == [1]
    calls = count_steps(monkeypatch)
    resumed = child.make_train().fit(checkpoint_dir=ckpt)
    assert calls[0] == 3 * child.STEPS_PER_EPOCH  # epochs 2-4 only: it resumed, it did not start over
    assert int(resumed.epoch) == 4 and tree_equal(straight, resumed)  # every leaf, bit for bit


def test_sigkill_while_committing_a_checkpoint_keeps_the_previous(tmp_path, straight):
    ckpt = tmp_path / "ckpt"
    out = kill_child_when_blocked("save", ckpt, 2)  # step 2 fully written to a tmp folder, not renamed
    assert "orbax-checkpoint-tmp" in out
    assert any(".orbax-checkpoint-tmp" in p.name for p in ckpt.iterdir())
    tr = child.make_train()
    restored, step = restore_latest(ckpt, tr.init_state())
    assert step == 1 and int(restored.epoch) == 1
    resumed = tr.fit(checkpoint_dir=ckpt)
    assert tree_equal(straight, resumed)
    assert saved_steps(ckpt) == [3, 4]


def test_truncated_newest_checkpoint_falls_back_to_the_previous(tmp_path, straight, caplog):
    """A step folder whose files were cut half-way (a crash on a filesystem without atomic rename, a disk
    error) is moved aside, the previous step is restored, and training goes on to the straight result."""
    ckpt = tmp_path / "ckpt"
    tr = child.make_train()
    after3 = tr.fit(checkpoint_dir=ckpt, until_epoch=3)
    cut = 0
    for f in (ckpt / "3").rglob("*"):
        if f.is_file() and f.parent.name == "d":  # the array data files of step 3
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
            cut += 1
    assert cut > 0
    mngr = ckpt_lib.manager(ckpt)
    with pytest.raises(ValueError):  # step 3 itself is unreadable now
        mngr.restore(3, args=ckpt_lib.ocp.args.StandardRestore(
            jax.tree.map(ckpt_lib.ocp.utils.to_shape_dtype_struct, after3)))
    mngr.close()
    restored, step = restore_latest(ckpt, tr.init_state())
    assert step == 2 and int(restored.epoch) == 2
    assert (ckpt / "3.unreadable").is_dir() and "unreadable" in caplog.text
    resumed = tr.fit(checkpoint_dir=ckpt)
    assert tree_equal(straight, resumed)
    assert saved_steps(ckpt) == [3, 4]


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, bad):
    ckpt = tmp_path / "ckpt"
    good = child.make_train().fit(checkpoint_dir=ckpt, until_epoch=2)
    (x, y), _ = child.data()
    x = x.copy()
    x[5, 3] = bad  # every member meets example 5 in epoch 3
    with pytest.raises(finetune.NonFiniteError, match=r"epoch 3: .*member 0 .*member 1 .*checkpoint \(epoch 2\)"):
        child.make_train((x, y)).fit(checkpoint_dir=ckpt)
    assert saved_steps(ckpt) == [1, 2]  # nothing of epoch 3 was written
    restored, step = restore_latest(ckpt, good)
    assert step == 2 and tree_equal(restored, good)
    assert all(np.isfinite(v).all() for v in jax.tree.leaves(restored.members.params))


def test_diverging_run_stops_at_its_first_epoch_without_a_checkpoint(tmp_path):
    cfg = finetune.TrainConfig(**{**child.CONFIG.__dict__, "optimizer": "sgd", "learning_rate": 1e30})
    with pytest.raises(finetune.NonFiniteError, match=r"epoch 1: .*member"):
        child.make_train(config=cfg).fit(checkpoint_dir=tmp_path / "ckpt")
    assert saved_steps(tmp_path / "ckpt") == []


def test_bayes_killed_mid_search_resumes_without_repeating_trials(tmp_path):
    ref_calls, calls = [], []
    reference = bayes.run_batched(lambda ps: (ref_calls.append(ps), child.bo_batch_objective(ps))[1], child.BO_SPACE,
                                  child.BO_TRIALS, tmp_path / "ref.json", batch=child.BO_BATCH, init_points=2, seed=0)
    assert [len(ps) for ps in ref_calls] == [2, 2, 2, 1]  # batches of BO_BATCH, the last one cut at BO_TRIALS
    log = tmp_path / "bo.json"
    kill_child_when_blocked("bayes", log, 3)  # batches 0-1 (trials 0-3) logged, batch 2 running when killed
    killed = bayes.load_log(log)
    assert [t["trial"] for t in killed] == [0, 1, 2, 3]
    resumed = bayes.run_batched(lambda ps: (calls.append(ps), child.bo_batch_objective(ps))[1], child.BO_SPACE,
                                child.BO_TRIALS, log, batch=child.BO_BATCH, init_points=2, seed=0)
    assert [len(ps) for ps in calls] == [2, 1]  # only the unfinished trials ran
    assert resumed["trials"][:4] == killed
    # ... and they are the trials an uninterrupted search runs (GP suggestions, constant liars included).
    assert [t["params"] for t in resumed["trials"]] == [t["params"] for t in reference["trials"]]
    assert [t["target"] for t in resumed["trials"]] == [t["target"] for t in reference["trials"]]
    assert resumed["best"]["target"] == max(t["target"] for t in reference["trials"])
