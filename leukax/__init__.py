"""leukax: JAX/Flax deep ensembles for acute-leukemia detection in blood-smear images."""
import os as _os

__version__ = "0.1.0"

# XLA:CPU's concurrency-optimised scheduler deadlocks (every thread idle, the result never ready) on the
# compiled head-mode trainer once the ensemble's while-loop body is large enough (5 members × GRU(256), jaxlib
# 0.10.2; 4 members ran). Turned off here, before any backend starts; an explicit setting in XLA_FLAGS wins.
_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler"
if _FLAG not in _os.environ.get("XLA_FLAGS", ""):
    _os.environ["XLA_FLAGS"] = (_os.environ.get("XLA_FLAGS", "") + f" {_FLAG}=false").strip()

# XLA:CPU's per-step temporaries otherwise come from fresh mmaps that fault in every step (leukax/cpu_memory.py).
from leukax import cpu_memory as _cpu_memory  # noqa: E402

_cpu_memory.configure_from_env()
