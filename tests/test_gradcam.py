"""leukax.gradcam: localisation on a toy model, the formula by hand, and a real Classifier ensemble member."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from leukax import gradcam as gc
from leukax.models.classifier import Classifier
from leukax.models.heads import DenseHead

I0, J0 = 2, 5  # the feature-map cell the toy logit reads (8×8 map of a 32×32 image)


class SpotModel(nn.Module):
    """features: 4×4 average pool then relu(1×1 conv); classify: Dense over the channels of cell (I0, J0) only."""

    def setup(self):
        self.conv = nn.Conv(4, (1, 1))
        self.dense = nn.Dense(2)

    def features(self, x_bhwc, train=False):
        fm = nn.relu(self.conv(nn.avg_pool(x_bhwc, (4, 4), (4, 4))))
        return fm, {"pre_logits": fm.mean((1, 2))}

    def classify(self, fm_bhwc, train=False, dropout_rate=None):
        return self.dense(fm_bhwc[:, I0, J0, :]), {"pre_logits": fm_bhwc[:, I0, J0, :]}

    def __call__(self, x_bhwc, train=False):
        return self.classify(self.features(x_bhwc)[0])


def test_heatmap_peaks_where_the_logit_looks():
    rng = np.random.default_rng(0)
    images = rng.uniform(0.0, 0.1, (2, 32, 32, 3)).astype(np.float32)
    images[:, 4 * I0:4 * I0 + 4, 4 * J0:4 * J0 + 4] += 1.0  # a "cell" in the region the logit reads
    model = SpotModel()
    variables = model.init(jax.random.key(0), jnp.asarray(images))
    # positive 1×1 conv and positive class-1 weights, so the spot raises the class-1 logit
    variables = jax.tree_util.tree_map(lambda v: jnp.abs(v) + 0.1, variables)
    heat = gc.gradcam_classifier(model, variables, jnp.asarray(images), class_index=1)
    assert heat.shape == (2, 32, 32)
    assert float(heat.min()) >= 0.0 and float(heat.max()) == pytest.approx(1.0)
    for b in range(2):
        r, c = np.unravel_index(int(jnp.argmax(heat[b])), (32, 32))
        assert 4 * I0 - 2 <= r <= 4 * I0 + 5 and 4 * J0 - 2 <= c <= 4 * J0 + 5, (r, c)
        # far from the spot the heatmap is low
        assert float(heat[b, 28:, :4].max()) < 0.3


def test_formula_by_hand_and_predicted_class_default():
    model = SpotModel()
    x = jax.random.uniform(jax.random.key(1), (3, 32, 32, 3))
    variables = model.init(jax.random.key(2), x)
    heat, logits = gc.gradcam_classifier(model, variables, x, return_logits=True)
    fm, _ = model.apply(variables, x, method="features")
    pred = np.asarray(logits.argmax(-1))
    kernel = np.asarray(variables["params"]["dense"]["kernel"])  # C×2
    fm = np.asarray(fm)
    for b in range(3):
        grads = np.zeros_like(fm[b])
        grads[I0, J0] = kernel[:, pred[b]]
        alpha = grads.mean((0, 1))
        cam = np.maximum((fm[b] * alpha).sum(-1), 0)
        up = np.asarray(jax.image.resize(jnp.asarray(cam), (32, 32), "linear"))
        ref = up / up.max() if up.max() > 0 else up
        np.testing.assert_allclose(heat[b], ref, atol=1e-5)


class TinyBackbone(nn.Module):
    """A contract backbone (conv-BN-relu ×2, stride 4): returns (B×H/4×W/4×8 map, {"pre_logits": B×8})."""

    @nn.compact
    def __call__(self, x_bhwc, train: bool = False):
        for i in range(2):
            x_bhwc = nn.Conv(8, (3, 3), strides=(2, 2), use_bias=False, name=f"conv{i}")(x_bhwc)
            x_bhwc = nn.relu(nn.BatchNorm(use_running_average=not train, name=f"bn{i}")(x_bhwc))
        return x_bhwc, {"pre_logits": x_bhwc.mean((1, 2))}


@pytest.fixture(scope="module")
def members():
    model = Classifier(backbone=TinyBackbone(), head=DenseHead(num_classes=2, features=16))
    x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3), minval=-1.0, maxval=1.0)
    init = jax.jit(model.init)
    per_member = [init(k, x[:1]) for k in jax.random.split(jax.random.key(3), 2)]
    variables_m = jax.tree_util.tree_map(lambda *v: jnp.stack(v), *per_member)
    return model, variables_m, per_member, x


def gradcam_by_hand(model, variables, x, class_index):
    """Grad-CAM written out with jax.grad on the Classifier's own features/classify (no leukax.gradcam)."""
    fm = model.apply(variables, x, train=False, method="features")[0]
    grads = jax.grad(lambda f: model.apply(variables, f, train=False, method="classify")[0][:, class_index].sum())(fm)
    cam = np.maximum(np.einsum("bhwc,bc->bhw", np.asarray(fm), np.asarray(grads).mean((1, 2))), 0)
    up = np.asarray(jax.image.resize(jnp.asarray(cam), (x.shape[0],) + x.shape[1:3], "linear"))
    peak = up.max((1, 2), keepdims=True)
    return np.where(peak > 0, up / np.where(peak > 0, peak, 1), 0)


def test_gradcam_member_on_classifier(members):
    """gradcam_member(m) = Grad-CAM of the m-th member's own (unstacked) variables, computed by hand."""
    model, variables_m, per_member, x = members
    for m in (0, 1):
        heat, logits = gc.gradcam_member(variables_m, m, model, x, class_index=0, return_logits=True)
        assert heat.shape == (2, 32, 32)
        np.testing.assert_allclose(logits, model.apply(per_member[m], x)[0], atol=1e-5)
        ref = gradcam_by_hand(model, per_member[m], x, 0)
        assert ref.max() == pytest.approx(1.0)  # the by-hand map is not all zeros, so the check has teeth
        np.testing.assert_allclose(heat, ref, atol=1e-5)
    # the two members were initialised differently, so their maps differ
    heat_0 = gc.gradcam_member(variables_m, 0, model, x, class_index=0)
    heat_1 = gc.gradcam_member(variables_m, 1, model, x, class_index=0)
    assert not np.allclose(heat_0, heat_1, atol=1e-3)
