"""The head-mode recipe on one split: frozen features of V views → standardise (+ PCA) fitted on the training
part only → a deep ensemble of heads trained by the compiled trainer → test-time-augmented probabilities,
with the linear probe and other heads trained on the very same features and split.

    x̃ = (x − μ_train) / σ_train              per channel, statistics over training images, views and positions
    z = x̃ · V_d                               optional PCA to d dims (top eigenvectors of the training x̃)

PCA keeps the d directions of largest training variance (not whitened: in an exploratory one-split run on
PBC whitening cost the GRU about 25 points, since it blows up low-variance noise directions). It is a linear
map, so
a GRU on z is a GRU on x̃ with a rank-d input projection: fewer FLOPs (the input projection dominates the GRU
head on 1280-channel maps) and fewer parameters to over-fit a few hundred images.
"""
from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from leukax.models.heads import make_head
from leukax.train import compiled, probe

HEAD_KINDS = ("gru", "dense", "linear", "probe", "gru_pool")

# Akter et al. 2024, Table 2 (Bayesian-optimised hyper-parameters per backbone), all of it. EfficientNetB3's row
# also serves its offline substitute (EfficientNet-Lite2), which is recorded in the results.
PAPER_TABLE2 = {
    "inception_v3": dict(units=512, optimizer="sgd", learning_rate=0.01, momentum=0.3, dropout=0.4),
    "mobilenet_v2": dict(units=512, optimizer="sgd", learning_rate=0.01, momentum=0.9, dropout=0.1),
    "efficientnet_b3": dict(units=256, optimizer="rmsprop", learning_rate=1e-4, momentum=0.5, dropout=0.1),
}


@dataclasses.dataclass(frozen=True)
class FeatureTransform:
    """Standardisation (+ PCA) fitted on training features: `apply(x_...c) -> x_...d`."""
    mean_c: np.ndarray
    std_c: np.ndarray
    proj_cd: np.ndarray | None

    def standardize(self, x):
        """Returns (x − μ) / σ with the training statistics (before any PCA)."""
        z = np.array(x, np.float32)  # one float32 copy, then in place (a chunk's temporaries are its peak)
        z -= self.mean_c
        z /= self.std_c
        return z

    def apply(self, x):
        z = self.standardize(x)
        return z if self.proj_cd is None else z @ self.proj_cd


DEAD_CHANNEL = 1e-4  # a channel whose training σ is below this fraction of the median channel's is constant there
FLOAT16_MAX = float(np.finfo(np.float16).max)
CHUNK_BYTES = 128 << 20  # float32 bytes of one chunk of images (transform, pooled_standardized)


def _chunks(features_vntc, indices, chunk: int | None):
    """Yields (start, features[:, indices[start: start + chunk]]) of an array or a `views.FeatureFile` (which
    reads only those images); chunk=None: as many images as fit CHUNK_BYTES in float32 (the chunk and its one
    float32 copy are the transient peak: 256 images of MobileNetV2's 8 × 49 × 1280 maps were 0.8 GB)."""
    idx = np.asarray(indices, np.int64)
    if chunk is None:
        v, _, t, c = np.shape(features_vntc)
        chunk = max(1, CHUNK_BYTES // (v * t * c * 4))
    for s in range(0, len(idx), chunk):
        yield s, np.asarray(features_vntc[:, idx[s: s + chunk]])


def fit_transform(features_vntc, dim: int = 0, max_rows: int = 50_000, seed: int = 0, indices=None
                  ) -> FeatureTransform:
    """Returns the standardisation (and, with dim > 0, PCA to `dim`) of the training features
    `features_vntc[:, indices]` (V×N×T×C; all N when indices is None; an array or a `views.FeatureFile`).

    Beyond `max_rows` (view, image, position) rows, the statistics come from `max_rows` rows drawn at random,
    and only those rows are read."""
    v, n_all, t, c = np.shape(features_vntc)
    idx = np.arange(n_all) if indices is None else np.asarray(indices, np.int64)
    total = v * len(idx) * t
    if total > max_rows:  # a random subset of positions is plenty for C×C statistics
        r = np.random.default_rng(seed).choice(total, max_rows, replace=False)
        v_r, i_r, t_r = np.unravel_index(r, (v, len(idx), t))
        rows = np.asarray(features_vntc[v_r, idx[i_r], t_r], np.float32)
    else:
        rows = np.asarray(features_vntc[:, idx], np.float32).reshape(-1, c)
    mean, std = rows.mean(0), rows.std(0)
    # A channel constant on the training rows (a ReLU channel never active there: 60 of MobileNetV2's 1,280 on
    # the C-NMC sample) carries nothing to learn from, and (x − μ)/(0 + ε) turned its first activation on a test
    # cell into ~1e10, past float16's range (inf → NaN in the GRU). Its σ is ∞: the channel reads 0 everywhere.
    dead = std <= DEAD_CHANNEL * max(float(np.median(std)), np.finfo(np.float32).tiny)
    std = np.where(dead, np.inf, std + 1e-6).astype(np.float32)
    if not dim or dim >= rows.shape[1]:
        return FeatureTransform(mean, std, None)
    z = rows - mean
    z /= std
    evals, evecs = np.linalg.eigh(z.T @ z / len(z))
    order = np.argsort(evals)[::-1][:dim]
    return FeatureTransform(mean, std, evecs[:, order].astype(np.float32))


def transform(tf: FeatureTransform, features_vntc, indices, dtype=np.float16, chunk: int | None = None,
              residency: str = "device"):
    """Returns `tf.apply(features_vntc[:, indices])`, V×k×T×d in `dtype` (16-bit: the reduced features that head
    mode keeps), computed `chunk` images at a time and written into the output in place (memory: the output plus
    one chunk). residency "device": a device array, built there because moving a finished host array there copies
    it (`jax.device_put` on the CPU), which would hold the reduced features twice; "host": a numpy array, for
    features larger than the device's memory (`compiled.feature_residency`, fed batch by batch while training)."""
    v, _, t, c = np.shape(features_vntc)
    d = c if tf.proj_cd is None else tf.proj_cd.shape[1]
    if residency == "host":
        out = np.empty((v, len(indices), t, d), dtype)
        for s, x in _chunks(features_vntc, indices, chunk):
            out[:, s: s + x.shape[1]] = _cast(tf.apply(x), dtype)
        return out
    out = jnp.zeros((v, len(indices), t, d), dtype)
    for s, x in _chunks(features_vntc, indices, chunk):
        out = _write_images(out, jnp.asarray(_cast(tf.apply(x), dtype)), s)
    return out


def _cast(z, dtype) -> np.ndarray:
    """z in `dtype`, clipped to float16's range when that is the dtype (no inf from an outlier)."""
    if np.dtype(dtype) == np.float16:
        z = np.clip(z, -FLOAT16_MAX, FLOAT16_MAX, out=z)
    return z.astype(dtype)


def transformed_bytes(tf_dim: int, features_vntc, num_images: int, dtype=np.float16) -> int:
    """Returns the bytes of `transform`'s output for `num_images` images (what `compiled.feature_residency`
    weighs against the device's free memory)."""
    v, _, t, c = np.shape(features_vntc)
    d = tf_dim if 0 < tf_dim < c else c
    return v * num_images * t * d * np.dtype(dtype).itemsize


@functools.partial(jax.jit, donate_argnums=0)
def _write_images(out_vntd, x_vktd, start):
    """out[:, start: start + k] = x, in place (the output's buffer is donated)."""
    return jax.lax.dynamic_update_slice_in_dim(out_vntd, x_vktd, start, axis=1)


def pooled_standardized(tf: FeatureTransform, features_vntc, indices, chunk: int | None = None) -> np.ndarray:
    """Returns N×C float32: the standardised features averaged over views and positions (what `leukax.predict`
    pools for the Mahalanobis OOD score), `chunk` images at a time."""
    pooled = [tf.standardize(x).mean((0, 2)) for _, x in _chunks(features_vntc, indices, chunk)]
    return np.concatenate(pooled) if pooled else np.zeros((0, len(tf.mean_c)), np.float32)


def make_model(kind: str, num_classes: int, units: int = 128, hidden: int = 128, dense_features: int = 256,
               order: str = "center_last"):
    """Returns the head module of `kind` ("gru" | "gru_pool" | "dense" | "linear"); `order`: the GRU's reading
    order."""
    if kind in ("gru", "gru_pool"):
        return make_head(kind, num_classes, units=units, hidden=hidden, dropout=0.0, order=order)
    if kind == "dense":
        return make_head("dense", num_classes, features=dense_features, dropout=0.0)
    return make_head("linear", num_classes)


def train_and_predict(kind: str, recipe: compiled.Recipe, hparams: dict, num_classes: int, train_x, train_y,
                      val_x, test_x, val_y, *, units: int = 128, hidden: int = 128, order: str = "center_last",
                      seed: int = 0, mesh=None, residency: str = "auto"):
    """Trains one head kind on transformed V×N×T×D features; returns (probs_val_mnk, probs_test_mnk, info).

    "probe" is the logistic-regression linear probe (one model: M = 1); the others are M-member deep
    ensembles from the compiled trainer. Validation and test probabilities average all views (TTA).
    residency: where the features live while training and predicting (`compiled.feature_residency`).
    """
    if kind == "probe":  # pooled chunk by chunk (`probe.pool`): host arrays never go to the device whole
        p = probe.fit(train_x, train_y, num_classes)
        return (np.asarray(probe.predict(p, probe.pool(val_x)))[None],
                np.asarray(probe.predict(p, probe.pool(test_x)))[None], {"members": 1})
    head = make_model(kind, num_classes, units, hidden, order=order)
    res = compiled.fit(recipe, head, num_classes, train_x, train_y, val_x, val_y, hparams, seed=seed, mesh=mesh,
                       residency=residency)
    p_va, p_te, info = predict_both(head, res, val_x, test_x, residency)
    info["members"] = recipe.num_members
    return p_va, p_te, info


def predict_both(head, res, val_x, test_x, residency: str = "auto"):
    """Returns (probs_val_mnk, probs_test_mnk, info with best epochs and history) of a trained ensemble."""
    p_va = compiled.predict_probs(head, res.params, val_x, residency)  # float32 or 16-bit: cast per chunk
    p_te = compiled.predict_probs(head, res.params, test_x, residency)
    info = dict(best_epoch=np.asarray(res.best_epoch).tolist(),
                epochs_run=int(np.asarray(res.epochs_run)[0]),
                history={k: np.asarray(v) for k, v in res.history.items()})
    return p_va, p_te, info


class TransformedHead(nn.Module):
    """A head reading raw backbone feature maps through a fitted `FeatureTransform` (its arrays are this
    module's params "mean_c", "std_c", "proj_cd"), e.g. for Grad-CAM of backbone + transform + head."""
    head: nn.Module
    channels: int
    dim: int = 0

    @nn.compact
    def __call__(self, feature_map_bhwc, train: bool = False, **kw):
        mean = self.param("mean_c", nn.initializers.zeros_init(), (self.channels,))
        std = self.param("std_c", nn.initializers.ones_init(), (self.channels,))
        x = (feature_map_bhwc - mean) / std
        if self.dim:
            x = x @ self.param("proj_cd", nn.initializers.zeros_init(), (self.channels, self.dim))
        return self.head(x, train=train, **kw)

    @staticmethod
    def variables(tf: FeatureTransform, head_params) -> dict:
        """Returns this module's params for transform `tf` and one member's head params."""
        out = {"head": head_params, "mean_c": jnp.asarray(tf.mean_c), "std_c": jnp.asarray(tf.std_c)}
        if tf.proj_cd is not None:
            out["proj_cd"] = jnp.asarray(tf.proj_cd)
        return out
