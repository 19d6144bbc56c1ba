"""Head-mode deep ensembles as ONE compiled program (purejaxrl style): `make_train(recipe, head)` returns a pure
``train(key_t, hparams_t, data) -> EnsembleResult`` whose whole early-stopped run of all M members (and of T
hyper-parameter trials at once) is a single `jax.jit`:

    jit(vmap_trials(train_ensemble))      train_ensemble = while_loop over epochs { vmap_members(epoch) }
    epoch = scan over batches { gather view·index → loss → grad → optax update } → validation (TTA) → early stop

Inputs live on the device: cached frozen features of V views per image (`leukax.train.views`), labels, and a
validation part. Every member m has its own init, dropout keys, data order and *view* per image and epoch
(augmentation that reaches head mode); validation and prediction average the softmax over views (TTA).

Recipe for a few hundred images (each part measured in results/heads/): AdamW (decoupled weight decay),
label smoothing α: targets (1 − α)·onehot + α/K, linear warm-up then cosine decay of the learning rate,
input / recurrent / hidden dropout, and early stopping on the validation NLL that keeps each member's best
weights. The paper's optimizers (Akter et al. 2024, Table 2: SGD or RMSprop with momentum) are
`optimizer="sgd" | "rmsprop"` with a constant schedule and no smoothing.

Hyper-parameters that do not change shapes are *traced* (``hparams`` arrays with a leading trial axis T):
learning_rate, weight_decay, momentum, dropout, input_dropout, recurrent_dropout, and with
``Recipe(optimizer="traced")`` the optimizer itself (AdamW / SGD / RMSprop by "optimizer_index"). Changing them
never recompiles, and T trials of a Bayesian-optimisation batch can train together. Shapes (units, batch size,
epochs, M) are static: one compilation per distinct value.

Features on the device or fed from the host: `fit` keeps the features device-resident when they fit in the
device's free memory (``residency="auto"``; always on the CPU backend, where host and device memory are one) and
otherwise leaves them in host memory (`HostFeatures`): the same compiled program then fetches each step's batch
and each validation chunk through `jax.pure_callback`, so only one batch of every member is on the device at a
time. Same keys, same order, same arithmetic: the results equal the device-resident run's
(`tests/test_compiled.py::test_host_fed_training_equals_device_resident`).

Device mesh: with ``mesh`` (a `jax.sharding.Mesh` with axis "members") the member axis of every state leaf
is sharded over devices (`with_sharding_constraint`); data is replicated. The same code runs on 1 device. The
mesh may span several processes (`jax.distributed`, `experiments.common.init_distributed`): `fit` then gathers the
trained members to every process (`tests/test_distributed.py`: two processes equal one).
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import time
import weakref
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from leukax import metrics, runtime
from leukax.train import optim

HPARAMS = ("learning_rate", "weight_decay", "momentum", "dropout", "input_dropout", "recurrent_dropout")
OPTIMIZERS = optim.OPTIMIZERS + ("traced",)
# Recipe(optimizer="traced"): each trial's optimizer is TRACED_OPTIMIZERS[hparams["optimizer_index"]], so trials
# with different optimizers share one compiled program (a BO batch compiles once per GRU width, not per pair).
TRACED_OPTIMIZERS = ("adamw", "sgd", "rmsprop")


_PROGRESS_T0 = [0.0]  # when `fit` called the trainer: the epoch lines' clock


def _print_epoch(epoch, train_loss_m, val_loss_m, active_m, num_epochs: int) -> None:
    """Recipe(progress=True): prints `epoch e/E: train loss, validation NLL (means over the members still
    training), active members, [seconds since `fit` called the trainer, compilation included]` on stderr while
    the compiled loop runs (one line per trial and epoch)."""
    import sys
    print(f"  epoch {int(epoch) + 1}/{num_epochs}: train loss {np.nanmean(train_loss_m):.4f}  "
          f"val NLL {np.nanmean(val_loss_m):.4f}  active members {int(np.sum(active_m))}/{np.size(active_m)}  "
          f"[{time.perf_counter() - _PROGRESS_T0[0]:.0f} s]", file=sys.stderr, flush=True)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Static settings of a compiled head-mode run (hashable: one compilation per distinct Recipe + shapes)."""
    num_members: int = 5
    num_epochs: int = 60
    batch_size: int = 32
    patience: int = 12
    optimizer: str = "adamw"
    schedule: str = "warmup_cosine"     # warmup_cosine | constant
    warmup_epochs: int = 3
    label_smoothing: float = 0.1
    monitor: str = "val_nll"            # val_nll (lower is better) | val_acc
    member_axis: str = "vmap"           # vmap | map (lax.map: members one after another inside the program)
    val_views: int = 2                  # views averaged at validation each epoch (0 = all; test TTA uses all)
    eval_chunk: int = 256               # examples·views per forward pass at validation/prediction
    progress: bool = False              # one line on stderr per epoch (jax.debug.callback from inside the loop)

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"leukax/train/compiled.py: optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.schedule not in ("warmup_cosine", "constant"):
            raise ValueError(f"leukax/train/compiled.py: schedule must be warmup_cosine|constant, got {self.schedule!r}")
        if self.member_axis not in ("vmap", "map"):
            raise ValueError(f"leukax/train/compiled.py: member_axis must be vmap|map, got {self.member_axis!r}")
        if self.monitor not in ("val_nll", "val_acc"):
            raise ValueError(f"leukax/train/compiled.py: monitor must be val_nll|val_acc, got {self.monitor!r}")


def default_hparams(**overrides) -> dict[str, float]:
    """Returns the recipe's traced hyper-parameters (chosen on validation data, results/heads/README.md)."""
    hp = dict(learning_rate=1e-3, weight_decay=1e-2, momentum=0.9, dropout=0.3, input_dropout=0.2,
              recurrent_dropout=0.0)
    unknown = set(overrides) - set(HPARAMS) - {"optimizer_index"}
    if unknown:
        raise ValueError(f"leukax/train/compiled.py: unknown hyper-parameters {sorted(unknown)}; known {HPARAMS}")
    hp.update({k: (int(v) if k == "optimizer_index" else float(v)) for k, v in overrides.items()})
    return hp


def stack_trials(hparams: list[dict[str, float]]) -> dict[str, jax.Array]:
    """Returns {name: float32 T} from T hyper-parameter dicts (the trial axis of `train`); "optimizer_index"
    (used by Recipe(optimizer="traced") only) defaults to 0."""
    out = {k: jnp.asarray([float(h[k]) for h in hparams], jnp.float32) for k in HPARAMS}
    out["optimizer_index"] = jnp.asarray([int(h.get("optimizer_index", 0)) for h in hparams], jnp.int32)
    return out


@flax.struct.dataclass
class MemberState:
    """One member's training state (every leaf gets leading member, then trial, axes under vmap)."""
    params: Any
    opt_state: Any
    best_params: Any
    best_score: jax.Array      # higher is better (−NLL or accuracy)
    best_epoch: jax.Array
    bad_epochs: jax.Array
    active: jax.Array
    key: jax.Array
    history: dict              # {"train_loss", "train_acc", "val_loss" (NLL), "val_acc"}: E float32 (nan: not run)


@flax.struct.dataclass
class EnsembleResult:
    """What `train` returns (leading axes T×M on every leaf): each member's best params, best epoch, history."""
    params: Any
    best_epoch: jax.Array
    epochs_run: jax.Array
    history: dict


def _optimizer(recipe: Recipe, hp: dict, steps_per_epoch: int) -> optax.GradientTransformation:
    """Returns `optim.make` of the recipe's optimizer with the trial's traced hyper-parameters and the recipe's
    schedule (linear warm-up then cosine decay of the peak rate, or constant); "traced": `optim.select`."""
    total = recipe.num_epochs * steps_per_epoch
    if recipe.schedule == "warmup_cosine":
        shape = optax.warmup_cosine_decay_schedule(0.0, 1.0, recipe.warmup_epochs * steps_per_epoch,
                                                   max(total, recipe.warmup_epochs * steps_per_epoch + 1))
        lr = lambda count: hp["learning_rate"] * shape(count)  # noqa: E731  (peak lr traced)
    else:
        lr = lambda count: hp["learning_rate"]  # noqa: E731
    if recipe.optimizer == "traced":
        return optim.select([_optimizer(dataclasses.replace(recipe, optimizer=name), hp, steps_per_epoch)
                             for name in TRACED_OPTIMIZERS], hp["optimizer_index"])
    return optim.make(recipe.optimizer, lr, weight_decay=hp["weight_decay"], momentum=hp["momentum"])


def _rates(hp: dict) -> dict:
    return dict(dropout_rate=hp["dropout"], input_dropout_rate=hp["input_dropout"],
                recurrent_dropout_rate=hp["recurrent_dropout"])


_HOST_ARRAYS: dict[int, np.ndarray] = {}  # token → host features of a live `HostFeatures`
_TOKENS = itertools.count()


class HostFeatures:
    """V×N×T×C features left in host memory, for arrays larger than the device's free memory: inside a compiled
    program `take` and `rows` fetch what one step or one validation chunk needs through `jax.pure_callback`.

    A pytree whose only leaf is an int32 token naming the array in a process-wide table (shape and dtype are
    static), so a new array of the same shape reuses the compiled program. The table holds the array while this
    handle lives; callers keep the handle until the program's results are ready (`fit` and `predict_probs` do)."""

    def __init__(self, x, *, _token=None):
        if _token is not None:  # unflattened inside a trace: shares the original's table entry
            self.token, (self.shape, self.dtype) = _token, x
            return
        x = np.asarray(x)
        if x.ndim != 4:
            raise ValueError(f"leukax/train/compiled.py: HostFeatures wants V×N×T×C features, got shape {x.shape}")
        token = next(_TOKENS)
        _HOST_ARRAYS[token] = x
        weakref.finalize(self, _HOST_ARRAYS.pop, token, None)
        self.token, self.shape, self.dtype = np.int32(token), x.shape, x.dtype

    def take(self, view, idx) -> jax.Array:
        """Returns x[view, idx] (idx.shape + (T, C), in the stored dtype) from host memory; batched index arrays
        (the member and trial axes under vmap) arrive as one call."""
        def host(token, v, i):
            return np.asarray(_host_array(token)[v, i])
        out = jax.ShapeDtypeStruct(tuple(np.shape(idx)) + self.shape[2:], self.dtype)
        return jax.pure_callback(host, out, self.token, view, idx, vmap_method="expand_dims")

    def rows(self, start, size: int) -> jax.Array:
        """Returns rows [start, start + size) of the V·N sequences (view-major), zeros past the end."""
        v, n = self.shape[:2]

        def host(token, s):
            x, s = _host_array(token), int(np.ravel(s)[0])
            f = np.arange(s, s + size)
            got = np.zeros((size,) + self.shape[2:], self.dtype)
            ok = f < v * n
            got[ok] = x[f[ok] // n, f[ok] % n]
            return got
        out = jax.ShapeDtypeStruct((size,) + self.shape[2:], self.dtype)
        return jax.pure_callback(host, out, self.token, start, vmap_method="expand_dims")


def _host_array(token) -> np.ndarray:
    """The array a callback's token names (a scalar, or broadcast to size-1 batch axes under vmap)."""
    return _HOST_ARRAYS[int(np.ravel(token)[0])]


jax.tree_util.register_pytree_node(
    HostFeatures, lambda h: ((h.token,), (h.shape, h.dtype)),
    lambda aux, leaves: HostFeatures(aux, _token=leaves[0]))


def _first_views(x, k: int):
    """x[:k] along the view axis, of device features or `HostFeatures` (the same host array, fewer views read)."""
    if isinstance(x, HostFeatures):
        return HostFeatures(((min(k, x.shape[0]),) + x.shape[1:], x.dtype), _token=x.token)
    return x[:k]


def _take(x, view, idx):
    """x[view, idx] of device features or `HostFeatures`."""
    return x.take(view, idx) if isinstance(x, HostFeatures) else x[view, idx]


def view_mean_probs(head, params, x_vntc, chunk: int):
    """Returns N×K: softmax averaged over the V views (TTA), computed in chunks of ≤ `chunk` sequences
    (of device features, or fetched chunk by chunk from `HostFeatures`)."""
    v, n = x_vntc.shape[:2]
    total = v * n
    size = min(chunk, total)
    num = -(-total // size)
    apply = lambda xb: head.apply({"params": params}, xb.astype(jnp.float32))[0]  # noqa: E731  (16-bit cast here)
    if isinstance(x_vntc, HostFeatures):
        logits = jax.lax.map(lambda i: apply(x_vntc.rows(i * size, size)), jnp.arange(num, dtype=jnp.int32))
    else:
        flat = x_vntc.reshape((total,) + x_vntc.shape[2:])
        flat = jnp.concatenate([flat, jnp.zeros((num * size - total,) + flat.shape[1:], flat.dtype)])
        logits = jax.lax.map(apply, flat.reshape((num, size) + flat.shape[1:]))
    return jnp.mean(jax.nn.softmax(logits.reshape(num * size, -1)[:total].reshape(v, n, -1), -1), 0)


@functools.lru_cache(maxsize=32)
def make_train(recipe: Recipe, head, num_classes: int, mesh=None) -> Callable:
    """Returns the pure, jit-compiled ``train(key_t, hparams_t, data) -> EnsembleResult`` (leaves T×M×...).

    data: {"train_x": V×N×T×C float (float32, or 16-bit: cast per batch), "train_y": N int, "val_x": V'×N'×T×C,
    "val_y": N'} (device arrays; train_x and val_x may be `HostFeatures`).
    key_t: T PRNG keys (one per trial); hparams_t: `stack_trials(...)` (every value a length-T vector).
    On the CPU backend with XLA:CPU's concurrency-optimised scheduler on, warns once per process: it can
    deadlock this program (`leukax.runtime`).
    """
    runtime.warn_if_deadlock_prone()
    r = recipe
    smooth = r.label_smoothing

    def loss_fn(params, x, y, key, hp):
        logits, _ = head.apply({"params": params}, x, train=True, rngs={"dropout": key}, **_rates(hp))
        target = optax.smooth_labels(jax.nn.one_hot(y, num_classes), smooth) if smooth else jax.nn.one_hot(y, num_classes)
        return optax.softmax_cross_entropy(logits, target).mean(), jnp.mean(jnp.argmax(logits, -1) == y)

    def init_member(key, hp, data, steps):
        k_init, k_run = jax.random.split(key)
        x0 = jnp.zeros((1,) + data["train_x"].shape[2:], jnp.float32)  # shapes only: init reads no data
        params = head.init({"params": k_init, "dropout": k_init}, x0)["params"]
        nan_e = jnp.full((r.num_epochs,), jnp.nan, jnp.float32)
        return MemberState(
            params=params, opt_state=_optimizer(r, hp, steps).init(params), best_params=params,
            best_score=jnp.float32(-jnp.inf), best_epoch=jnp.int32(-1), bad_epochs=jnp.int32(0),
            active=jnp.bool_(True), key=k_run,
            history={k: nan_e for k in ("train_loss", "train_acc", "val_loss", "val_acc")})

    def epoch_member(s: MemberState, epoch, hp, data, steps):
        tx = _optimizer(r, hp, steps)
        v, n = data["train_x"].shape[:2]
        key, k_perm, k_view, k_steps = jax.random.split(s.key, 4)
        idx_sb = jax.random.permutation(k_perm, n)[: steps * r.batch_size].reshape(steps, r.batch_size)
        view_sb = jax.random.randint(k_view, (steps, r.batch_size), 0, v)

        def step(carry, inp):
            params, opt_state = carry
            idx_b, view_b, k = inp
            x, y = _take(data["train_x"], view_b, idx_b).astype(jnp.float32), data["train_y"][idx_b]
            (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x, y, k, hp)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), (loss, acc)

        (params, opt_state), (loss_s, acc_s) = jax.lax.scan(
            step, (s.params, s.opt_state), (idx_sb, view_sb, jax.random.split(k_steps, steps)))
        val_x = data["val_x"] if r.val_views == 0 else _first_views(data["val_x"], r.val_views)
        probs_nk = view_mean_probs(head, params, val_x, r.eval_chunk)
        y_val = data["val_y"]
        val_nll = metrics.nll(y_val, probs_nk)
        val_acc = jnp.mean(jnp.argmax(probs_nk, -1) == y_val)
        score = -val_nll if r.monitor == "val_nll" else val_acc
        improved, best_score, bad, active = optim.early_stopping(score, s.best_score, s.bad_epochs, s.active,
                                                                 r.patience)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(s.active, a, b), new, old)  # noqa: E731
        record = lambda h, val: h.at[epoch].set(jnp.where(s.active, val, jnp.nan))  # noqa: E731
        return MemberState(
            params=keep(params, s.params), opt_state=keep(opt_state, s.opt_state),
            best_params=jax.tree.map(lambda a, b: jnp.where(improved, a, b), params, s.best_params),
            best_score=best_score, best_epoch=jnp.where(improved, epoch, s.best_epoch),
            bad_epochs=bad, active=active, key=key,
            history=dict(train_loss=record(s.history["train_loss"], loss_s.mean()),
                         train_acc=record(s.history["train_acc"], acc_s.mean()),
                         val_loss=record(s.history["val_loss"], val_nll), val_acc=record(s.history["val_acc"], val_acc)))

    def constrain(state):
        if mesh is None:
            return state
        return jax.tree.map(lambda a: jax.lax.with_sharding_constraint(
            a, NamedSharding(mesh, P("members", *([None] * (a.ndim - 1))))), state)

    def train_ensemble(key, hp, data):
        n = data["train_y"].shape[0]
        if n < r.batch_size:
            raise ValueError(f"leukax/train/compiled.py: {n} training examples < batch size {r.batch_size}")
        steps = n // r.batch_size  # the remainder of each epoch's permutation is left out (fixed shapes)
        keys_m = jax.random.split(key, r.num_members)
        state = constrain(jax.vmap(init_member, (0, None, None, None))(keys_m, hp, data, steps))

        def cond(c):
            epoch, st = c
            return (epoch < r.num_epochs) & jnp.any(st.active)

        def body(c):
            epoch, st = c
            if r.member_axis == "vmap":
                st = jax.vmap(epoch_member, (0, None, None, None, None))(st, epoch, hp, data, steps)
            else:
                st = jax.lax.map(lambda sm: epoch_member(sm, epoch, hp, data, steps), st)
            if r.progress:
                jax.debug.callback(functools.partial(_print_epoch, num_epochs=r.num_epochs), epoch,
                                   st.history["train_loss"][..., epoch], st.history["val_loss"][..., epoch], st.active)
            return epoch + 1, constrain(st)

        epochs_run, state = jax.lax.while_loop(cond, body, (jnp.int32(0), state))
        return EnsembleResult(params=state.best_params, best_epoch=state.best_epoch,
                              epochs_run=jnp.broadcast_to(epochs_run, (r.num_members,)), history=state.history)

    return jax.jit(jax.vmap(train_ensemble, (0, 0, None)))


@functools.lru_cache(maxsize=32)
def make_predict(head, chunk: int = 256) -> Callable:
    """Returns jit ``predict(params_m, x_vntc) -> probs_mnk``: every member's TTA-mean softmax."""
    return jax.jit(jax.vmap(lambda p, x: view_mean_probs(head, p, x, chunk), (0, None)))


def trial(result: EnsembleResult, t: int) -> EnsembleResult:
    """Returns trial t of a T×M result (leaves M×...)."""
    return jax.tree.map(lambda a: a[t], result)


FEATURE_DTYPES = frozenset(np.dtype(d) for d in (jnp.float32, jnp.float16, jnp.bfloat16))


def device_features(x) -> jax.Array:
    """Features on the device in their own precision when it is float32 or 16-bit (the reduced features of a
    large set stay 16-bit: half the memory; the trainer casts each batch), else as float32. `jax.device_put`,
    not `jnp.asarray`: a device array (what `recipe.transform` returns) passes through uncopied, and a numpy
    array is copied once (measured on the CPU: +1× its size, against +2× for `jnp.asarray`)."""
    dtype = np.dtype(getattr(x, "dtype", np.float32))
    return jax.device_put(x) if dtype in FEATURE_DTYPES else jnp.asarray(x, jnp.float32)


RESIDENCIES = ("auto", "device", "host")
DEVICE_FRACTION = 0.5  # "auto": features on the device while they take at most this share of its free memory


def _device_free_bytes() -> int | None:
    """Free memory of the first local device, or None where the backend does not report it (the CPU)."""
    stats = jax.local_devices()[0].memory_stats()
    if not stats or "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))


def feature_residency(nbytes: int, residency: str = "auto") -> str:
    """Returns "device" or "host": where features of `nbytes` live for `fit` and `predict_probs`. "auto": on the
    device when they take at most DEVICE_FRACTION of its free memory (the rest is the program's), or when the
    backend reports no memory limit (the CPU: host memory is device memory), else in host memory."""
    if residency not in RESIDENCIES:
        raise ValueError(f"leukax/train/compiled.py: residency must be one of {RESIDENCIES}, got {residency!r}")
    if residency != "auto":
        return residency
    free = _device_free_bytes()
    return "device" if free is None or nbytes <= DEVICE_FRACTION * free else "host"


def _where(xs, residency: str) -> str:
    """Where features `xs` go: "auto" leaves device arrays on the device and `HostFeatures` on the host, and
    weighs host arrays by their bytes (`feature_residency`)."""
    if residency != "auto":
        return feature_residency(0, residency)
    if any(isinstance(x, HostFeatures) for x in xs):
        return "host"
    host_arrays = [x for x in xs if not isinstance(x, jax.Array)]
    return feature_residency(sum(_nbytes(x) for x in host_arrays)) if host_arrays else "device"


def place_features(x, residency: str = "device"):
    """Returns features for `make_train` / `make_predict`: a device array (`device_features`) or, with
    residency "host", `HostFeatures` (a device array is copied back to the host once)."""
    if residency == "host":
        return x if isinstance(x, HostFeatures) else HostFeatures(x)
    return device_features(x)


def predict_probs(head, params_m, x, residency: str = "auto", chunk: int = 256) -> np.ndarray:
    """Returns M×N×K (numpy): every member's TTA-mean softmax over the V×N×T×C features `x`, on the device or
    fed from the host chunk by chunk (`_where`)."""
    xs = place_features(x, _where([x], residency))
    return np.asarray(make_predict(head, chunk)(params_m, xs))


def fit(recipe: Recipe, head, num_classes: int, train_x, train_y, val_x, val_y, hparams: dict | list[dict],
        seed: int = 0, mesh=None, views: bool | None = None, residency: str = "auto") -> EnsembleResult:
    """Trains one (dict) or T (list) hyper-parameter settings; returns the T×M (or M) `EnsembleResult`.

    train_x: V×N×... head inputs of V views (views=True) or N×... of one view (views=False); views=None takes
    rank 3 (N×T×C sequences) as one view and anything else as V×N×...; val_x likewise. Member keys derive
    from `seed` alone, the same for every trial (common random numbers): trials differ only by their
    hyper-parameters. residency: where train_x and val_x live while training ("host": fed batch by batch, same
    results); "auto" keeps device arrays on the device and weighs host arrays by their bytes (`_where`).
    """
    single = isinstance(hparams, dict)
    hps = [hparams] if single else list(hparams)
    one_view = (lambda x: np.ndim(x) == 3) if views is None else (lambda x: not views)  # noqa: E731
    as_views = lambda x: x if isinstance(x, HostFeatures) else (x[None] if one_view(x) else x)  # noqa: E731
    train_x, val_x = as_views(train_x), as_views(val_x)
    where = _where([train_x, val_x], residency)
    if where == "host" and mesh is not None:
        raise ValueError("leukax/train/compiled.py: host-fed features with a device mesh are not implemented; "
                         "use residency='device' or no mesh")
    data = dict(train_x=place_features(train_x, where), train_y=jnp.asarray(train_y, jnp.int32),
                val_x=place_features(val_x, where), val_y=jnp.asarray(val_y, jnp.int32))
    keys_t = jnp.broadcast_to(jax.random.PRNGKey(seed), (len(hps), 2))
    if mesh is not None and jax.process_count() > 1:
        runtime.await_all_processes()  # gloo gives processes only 30 s to meet at a first collective
    _PROGRESS_T0[0] = time.perf_counter()
    out = make_train(recipe, head, num_classes, mesh)(keys_t, stack_trials(hps), data)
    if where == "host":
        out = jax.block_until_ready(out)  # the host arrays stay referenced until the program is done
    if any(not a.is_fully_addressable for a in jax.tree.leaves(out)):  # a mesh over several processes
        out = multihost_utils.process_allgather(out, tiled=True)  # every process gets every member (numpy)
    return trial(out, 0) if single else out


def _nbytes(x) -> int:
    return int(np.prod(np.shape(x))) * np.dtype(getattr(x, "dtype", np.float32)).itemsize
