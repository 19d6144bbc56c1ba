"""Grad-CAM (Selvaraju et al. 2017) heatmaps for any backbone + head split at the final feature map.

For class c with logit y_c and final feature map A (H'×W'×C):
    α_c,k = (1 / H'W') Σ_ij ∂y_c / ∂A_ijk           (spatial mean of the gradients)
    L_c   = ReLU(Σ_k α_c,k A_k)                      (H'×W')
then bilinearly upsampled to the image size and divided by its per-image maximum, so heatmaps lie in
[0, 1] (all zeros where the ReLU removes everything).
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp


def gradcam(apply_features: Callable, apply_classify: Callable, images_bhwc, class_index=None,
            return_logits: bool = False):
    """Returns heatmaps_bhw in [0, 1] at image resolution (and logits_bk too if return_logits).

    apply_features(images_bhwc) -> (feature_map_bhwc, out); apply_classify(feature_map_bhwc) -> (logits_bk,
    out), e.g. `Classifier.features` / `Classifier.classify` bound to variables (see `gradcam_classifier`).
    class_index: int, B ints, or None for each image's predicted class.
    """
    images_bhwc = jnp.asarray(images_bhwc)
    b, h, w = images_bhwc.shape[:3]
    fm_bhwc, _ = apply_features(images_bhwc)
    logits_bk, _ = apply_classify(fm_bhwc)
    if class_index is None:
        cls_b = jnp.argmax(logits_bk, -1)
    else:
        cls_b = jnp.broadcast_to(jnp.asarray(class_index, jnp.int32), (b,))

    def class_logit_sum(fm):
        logits, _ = apply_classify(fm)
        return jnp.sum(jnp.take_along_axis(logits, cls_b[:, None], -1))  # images are independent

    grads_bhwc = jax.grad(class_logit_sum)(fm_bhwc)
    alpha_bc = jnp.mean(grads_bhwc, axis=(1, 2))
    cam_bhw = jax.nn.relu(jnp.einsum("bhwc,bc->bhw", fm_bhwc.astype(jnp.float32), alpha_bc.astype(jnp.float32)))
    cam_bhw = jax.image.resize(cam_bhw, (b, h, w), method="linear")
    peak_b = jnp.max(cam_bhw, axis=(1, 2), keepdims=True)
    heat_bhw = jnp.where(peak_b > 0, cam_bhw / jnp.where(peak_b > 0, peak_b, 1.0), 0.0)
    heat_bhw = jnp.clip(heat_bhw, 0.0, 1.0)
    return (heat_bhw, logits_bk) if return_logits else heat_bhw


@functools.partial(jax.jit, static_argnames=("model", "return_logits"))
def gradcam_classifier(model, variables, images_bhwc, class_index=None, return_logits: bool = False):
    """Returns heatmaps_bhw (and logits_bk) for a `leukax.models.classifier.Classifier` (eval mode, jitted;
    `model` is static, class_index may be None, an int or B ints)."""
    def features(x):
        return model.apply(variables, x, train=False, method="features")

    def classify(fm):
        return model.apply(variables, fm, train=False, method="classify")

    return gradcam(features, classify, images_bhwc, class_index, return_logits)


def member_variables(variables_m, member: int):
    """Returns ensemble member `member`'s variables from variables stacked on a leading M axis."""
    return jax.tree_util.tree_map(lambda v: v[member], variables_m)


def gradcam_member(variables_m, member: int, model, images_bhwc, class_index=None, return_logits: bool = False):
    """Returns heatmaps_bhw (and logits_bk) of ensemble member `member` (variables stacked M×... per leaf)."""
    return gradcam_classifier(model, member_variables(variables_m, member), images_bhwc, class_index,
                              return_logits)
