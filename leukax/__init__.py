"""leukax: JAX/Flax deep ensembles for acute-leukemia detection in blood-smear images."""
import os as _os

__version__ = "0.1.0"

# XLA:CPU's concurrency-optimised scheduler deadlocks (every thread idle, the result never ready) on the
# compiled head-mode trainer once the ensemble's while-loop body is large enough (5 members × GRU(256), jaxlib
# 0.10.2; 4 members ran). Turned off here, before any backend starts; an explicit setting in XLA_FLAGS wins.
#
# XLA:CPU hands k×k convolutions to YNNPACK by default, whose backward convolutions ran 2× slower than Eigen's
# (one 3×3 conv, 96 channels, 73², batch 8, one core: forward + backward 552 ms with YNNPACK, 275 ms without,
# PyTorch 302 ms). Without it, one core, batch 8: InceptionV3 training 1.14 → 1.98 img/s, inference 4.52 →
# 6.85; EfficientNet-B0 training 8.85 → 13.56; MobileNetV2 (whose only k×k convolution is its stem) 19.9 →
# 19.0 (benchmarks/finetune_vs_torch.py). Dots stay on YNNPACK.
for _flag, _value in (("--xla_cpu_enable_concurrency_optimized_scheduler", "false"),
                      ("--xla_cpu_experimental_ynn_fusion_type", "-individual_convolution")):
    if _flag not in _os.environ.get("XLA_FLAGS", ""):
        _os.environ["XLA_FLAGS"] = (_os.environ.get("XLA_FLAGS", "") + f" {_flag}={_value}").strip()

# XLA:CPU's per-step temporaries otherwise come from fresh mmaps that fault in every step (leukax/cpu_memory.py).
from leukax import cpu_memory as _cpu_memory  # noqa: E402

_cpu_memory.configure_from_env()
