"""Scale-out on JAX's own distributed runtime: two processes on localhost (gloo collectives on CPU) give the same
trained ensemble, and the same study, as one process."""
import json
import os
import pathlib
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

FIT_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np, jax
    from experiments import common
    num, pid, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    common.init_distributed(f"127.0.0.1:{port}" if num > 1 else None, num, pid)
    from leukax.models.heads import GRUHead
    from leukax.train import compiled
    gathered = []  # fit gathers only what a mesh spread over processes
    allgather = compiled.multihost_utils.process_allgather
    compiled.multihost_utils.process_allgather = lambda t, tiled: gathered.append(1) or allgather(t, tiled=tiled)
    rng = np.random.default_rng(0)
    y = np.arange(32) % 3; x = rng.normal(size=(2, 32, 4, 6)).astype(np.float32)
    rcp = compiled.Recipe(num_members=4, num_epochs=2, batch_size=16, patience=5)
    res = compiled.fit(rcp, GRUHead(3, units=8, hidden=8, dropout=0.0), 3, x, y, x, y,
                       compiled.default_hparams(learning_rate=1e-2), mesh=common.member_mesh(4))
    print("processes", jax.process_count(), "devices", jax.device_count(), "gathered", len(gathered))
    np.savez(out, *[np.asarray(a) for a in jax.tree.leaves(res.params)], best_epoch=np.asarray(res.best_epoch))
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices_per_process: int) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices_per_process}"
    return env


def _launch(argv_of, num: int, devices_per_process: int, timeout: int = 600) -> list[str]:
    """Starts `num` processes (argv_of(process_id)) together and returns their stdouts; fails on any error."""
    procs = [subprocess.Popen(argv_of(pid), env=_env(devices_per_process), cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for pid in range(num)]
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            assert p.returncode == 0, err[-3000:]
            outs.append(out)
    finally:
        for p in procs:
            p.kill()
    return outs


def test_two_processes_train_the_same_members_as_one(tmp_path):
    port = _free_port()
    outs = _launch(lambda pid: [sys.executable, "-c", FIT_SCRIPT, "2", str(pid), str(port), str(tmp_path / f"two{pid}.npz")],
                   num=2, devices_per_process=2)
    assert all("processes 2 devices 4 gathered 1" in o for o in outs)  # 4 members over 2 processes × 2 devices
    _launch(lambda pid: [sys.executable, "-c", FIT_SCRIPT, "1", "0", "0", str(tmp_path / "one.npz")],
            num=1, devices_per_process=1)
    one = np.load(tmp_path / "one.npz")
    for pid in range(2):
        two = np.load(tmp_path / f"two{pid}.npz")
        assert sorted(two.files) == sorted(one.files)
        np.testing.assert_array_equal(two["best_epoch"], one["best_epoch"])
        for k in one.files:
            np.testing.assert_allclose(two[k], one[k], atol=1e-5, err_msg=k)
    assert not np.allclose(one["arr_0"][0], one["arr_0"][1])  # members differ: each process held different ones


@pytest.mark.slow
def test_hybrid_gru_over_two_processes_equals_one_process(tmp_path):
    """The whole study from the command line, launched as two processes sharing a feature cache: each extracts
    half of the images into the same file, which equals a one-process run's byte for byte; each trains half of
    every Bayesian-optimisation batch; and process 0's results equal the one-process run's (the BO logs, and
    the GRU ensemble's members trained on different processes)."""
    args = ["--weights=none", "--image_size=32", "--members=2", "--folds=2", "--batch_size=8", "--epochs=2",
            "--backbones=mobilenet_v2", "--heads=probe,gru", "--hidden=8", "--feature_dim=16", "--hparams=bo",
            "--bo_trials=2", "--bo_batch=2", "--nosave_model"]
    port = _free_port()
    cmd = [sys.executable, "-m", "experiments.hybrid_gru", *args]
    outs = _launch(lambda pid: [*cmd, f"--out_dir={tmp_path / 'two'}", f"--feature_cache={tmp_path / 'cache2'}",
                                f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                                f"--process_id={pid}"], num=2, devices_per_process=1)
    assert "mobilenet_v2: features: images 0–30 of 60 (process 0 of 2)" in outs[0]
    assert "mobilenet_v2: features: images 30–60 of 60 (process 1 of 2)" in outs[1]
    for pid in (0, 1):  # each BO batch of two trials: one trial per process, the scores shared
        assert outs[pid].count(f"mobilenet_v2: BO trials [{pid}] of 2 on process {pid} of 2") == 2  # two folds
    _launch(lambda pid: [*cmd, f"--out_dir={tmp_path / 'one'}", f"--feature_cache={tmp_path / 'cache1'}"],
            num=1, devices_per_process=1)
    (f2,), (f1,) = (list((tmp_path / c).glob("*.npy")) for c in ("cache2", "cache1"))
    assert f2.name == f1.name and f2.read_bytes() == f1.read_bytes()
    assert not (tmp_path / "two" / "figures").exists() or (tmp_path / "two" / "metrics.json").exists()
    m1, m2 = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    z1, z2 = (np.load(tmp_path / d / "predictions_first_repeat.npz") for d in ("one", "two"))
    np.testing.assert_allclose(z2["probs_fused_gru"], z1["probs_fused_gru"], atol=1e-5)
    for head in ("probe", "gru"):
        assert (m2["fused"][head]["test_mean_std"]["accuracy"]["per_split"]
                == m1["fused"][head]["test_mean_std"]["accuracy"]["per_split"])
    assert m2["environment"]["process_count"] == 2 and m1["environment"]["process_count"] == 1
    logs = [json.loads((tmp_path / d / "bo" / "mobilenet_v2_r0_f1.json").read_text())["trials"] for d in ("one", "two")]
    assert [t["target"] for t in logs[1]] == [t["target"] for t in logs[0]] and len(logs[0]) == 2
