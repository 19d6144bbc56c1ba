"""A/B of the MobileNetV2 + GRU training step: the implementation before issue 8's CPU work against now, and
the same network in PyTorch, interleaved in one process (see `interleave.py`).

Variants (each a set of swaps applied while the model is traced):
  before   shift-and-add depthwise by plain autodiff, jnp.clip ReLU6, flax BatchNorm, 4-D 1×1 dot_general
  dw       before + the custom-VJP depthwise (leukax.models.layers now)
  dw_relu  dw + relu6 with TF's gradient
  now      everything in leukax.models now (adds the fused-backward BatchNorm and the 2-D 1×1 matmul), with the
           default pure-XLA shift depthwise (cpu_kernels=xla)
  native   now with the opt-in native depthwise (leukax.native.depthwise; cpu_kernels=native)
  torch    the PyTorch network of cpu_mobilenetv2_gru.py

  python benchmarks/ab_mobilenetv2_gru.py --variants=before,dw,dw_relu,now,torch --repeats=5 --cores=1
  python benchmarks/ab_mobilenetv2_gru.py --variants=native,now,torch --repeats=7 --cores=1 [--mode=infer]
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import interleave  # noqa: E402

from experiments import common  # noqa: E402
from experiments.common import field  # noqa: E402


@dataclasses.dataclass
class Config:
    variants: tuple = field(("before", "now", "torch"), "Variants to time (first one is the reference).")
    repeats: int = field(5, "Timed rounds.")
    warmup: int = field(2, "Untimed steps first.")
    batch: int = field(16, "Batch size.")
    size: int = field(224, "Image size.")
    cores: int = field(1, "Pin to this many CPUs; torch threads = this (0: no pinning).")
    mode: str = field("train", "Step to time: train or infer.", choices=("train", "infer"))


def old_shift(x_bhwc, kernel_hw1c, strides=(1, 1), padding="SAME"):
    """The depthwise shift-and-add before issue 8 (plain autodiff keeps the kh*kw taps for the backward)."""
    import jax.numpy as jnp
    from jax import lax

    from leukax.models import layers
    kh, kw = kernel_hw1c.shape[:2]
    sh, sw = strides
    (plo_h, phi_h), (plo_w, phi_w) = layers._explicit_padding(x_bhwc, (kh, kw), strides, padding)
    x = jnp.pad(x_bhwc, ((0, 0), (plo_h, phi_h), (plo_w, phi_w), (0, 0)))
    b, hp, wp, c = x.shape
    ho, wo = (hp - kh) // sh + 1, (wp - kw) // sw + 1
    out = None
    for i in range(kh):
        for j in range(kw):
            tap = lax.slice(x, (0, i, j, 0), (b, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, c), (1, sh, sw, 1))
            out = tap * kernel_hw1c[i, j, 0] if out is None else out + tap * kernel_hw1c[i, j, 0]
    return out


def swaps(name: str) -> dict:
    import flax.linen as nn
    import jax.numpy as jnp
    from jax import lax

    from leukax.models import layers
    from leukax.models import mobilenet_v2 as mv2

    class Pointwise4D(layers.PointwiseConv2D):
        @nn.compact
        def __call__(self, x_bhwc):
            k = self.param("kernel", self.kernel_init, (1, 1, x_bhwc.shape[-1], self.features), jnp.float32)
            return lax.dot_general(x_bhwc, k[0, 0], (((3,), (0,)), ((), ())))

    clip6 = lambda x: jnp.clip(x, 0.0, 6.0)  # noqa: E731
    old = {(mv2, "relu6"): clip6, (mv2, "BatchNorm"): nn.BatchNorm, (mv2, "PointwiseConv2D"): Pointwise4D}
    table = {"before": {**old, (layers, "depthwise_conv_shift"): old_shift}, "dw": old,
             "dw_relu": {k: v for k, v in old.items() if k[1] != "relu6"}, "now": {}, "native": {}}
    return table[name]


@contextlib.contextmanager
def variant(name: str):
    table = swaps(name)
    saved = {k: getattr(*k) for k in table}
    for (mod, attr), v in table.items():
        setattr(mod, attr, v)
    try:
        yield
    finally:
        for (mod, attr), v in saved.items():
            setattr(mod, attr, v)


def run(cfg: Config) -> dict:
    interleave.pin(cfg.cores)
    import cpu_mobilenetv2_gru as gru
    args = gru.Config(batch=cfg.batch, size=cfg.size, threads=cfg.cores, cores=cfg.cores)
    steps = {}
    for name in cfg.variants:
        if name == "torch":
            steps[name] = gru.bench_torch(args, (cfg.mode,))[1][cfg.mode]
            continue
        with variant(name):
            kernels = "native" if name == "native" else "xla"
            fns = gru.bench_jax(dataclasses.replace(args, cpu_kernels=kernels), (cfg.mode,))[1]
            fns[cfg.mode]()  # trace + compile while the swaps are in place
        steps[name] = fns[cfg.mode]
    times = interleave.interleaved(steps, cfg.repeats, cfg.warmup)
    ref = cfg.variants[0]
    res = {n: interleave.summarize({ref: times[ref], n: times[n]}, cfg.batch, n, ref) for n in cfg.variants}
    for n in cfg.variants:
        s = res[n][n]
        print(f"{n:8s} {interleave.fmt(s)} img/s  speed vs {ref}: {res[n].get('ratio', 1.0):.3f}× (median per round)")
    print("machine", interleave.machine())
    return res


if __name__ == "__main__":
    common.main(Config, run)
