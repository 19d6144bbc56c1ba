"""What `leukax.predict` computes for an image file through a saved bundle (with a feature transform and views)
equals what training computed for the same image: backbone features of every view → the training part's
standardisation + PCA → each member's head → softmax averaged over the views (compiled.make_predict)."""
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from leukax import bundle as bundle_lib
from leukax import predict
from leukax.pretrained import pretrained
from leukax.train import compiled, recipe
from leukax.train.views import view_features

SIZE, K = 64, 3


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A random-weight MobileNetV2 at 64 px (2×2 maps), 8 dihedral views, standardisation + PCA to 8 channels
    fitted on the training images, a 2-member GRU ensemble trained 2 epochs; saved as a bundle."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (24, SIZE, SIZE, 3), dtype=np.uint8)
    images[:, 16:48, 16:48] = (np.arange(24) % K * 100)[:, None, None, None].astype(np.uint8)  # a class "cell"
    labels = np.arange(24) % K
    backbone, variables, spec = pretrained("mobilenet_v2", weights=None)
    # Frames of 4 images, as predict_files(batch_size=4) runs them: the same compiled backbone program, so the
    # features are the same bits and the comparison below is about transform, views and heads only.
    views = view_features(backbone, variables, images, spec.normalization, "dihedral", batch_size=4)  # V×N×T×C
    train, val = np.arange(16), np.arange(16, 24)
    tf = recipe.fit_transform(views[:, train], dim=8)
    assert tf.proj_cd is not None and not np.allclose(tf.std_c, 1.0, atol=0.1)  # the transform does something
    head = recipe.make_model("gru", K, units=8, hidden=8)
    rcp = compiled.Recipe(num_members=2, num_epochs=2, batch_size=8, patience=5)
    res = compiled.fit(rcp, head, K, tf.apply(views[:, train]), labels[train], tf.apply(views[:, val]), labels[val],
                       compiled.default_hparams(learning_rate=1e-2))
    probs_mnk = np.asarray(compiled.make_predict(head)(res.params, jnp.asarray(tf.apply(views))))  # training's path
    out = tmp_path_factory.mktemp("parity")
    cfg = bundle_lib.BundleConfig(
        backbone="mobilenet_v2", weights="none", image_size=SIZE, normalization=spec.normalization, head="gru",
        head_kwargs=dict(units=8, hidden=8, dropout=0.0, order="center_last"), class_names=["a", "b", "c"],
        mode="head", num_members=2, views="dihedral")
    transform = {"mean_c": tf.mean_c, "std_c": tf.std_c, "proj_cd": tf.proj_cd}
    bundle_lib.save(out / "model", cfg, {"params": res.params, "transform": transform})
    files = []
    for i, im in enumerate(images[:6]):
        files.append(out / f"cell{i}.png")
        Image.fromarray(im).save(files[-1])
    return out / "model", files, probs_mnk[:, :6]


def test_predict_through_the_bundle_equals_training_for_the_same_images(trained):
    model_dir, files, probs_mnk = trained
    cfg, rows = predict.predict_files(model_dir, files, batch_size=4)
    got_nk = np.asarray([[r[f"p_{c}"] for c in cfg.class_names] for r in rows])
    want_nk = probs_mnk.mean(0)
    assert not np.allclose(want_nk, want_nk[:1], atol=1e-3)  # the images get different probabilities
    np.testing.assert_allclose(got_nk, want_nk, atol=1e-4)
    _, probs_fn = predict.load_model(model_dir)  # per member too, not only their mean
    images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    np.testing.assert_allclose(probs_fn(images)[0], probs_mnk, atol=1e-4)
