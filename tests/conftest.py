"""Test setup: Keras on the JAX backend, a persistent JAX compilation cache, and the shared/ folder."""
import os
import pathlib

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
_cache = os.environ.get("JAX_COMPILATION_CACHE_DIR", str(REPO / ".jax_cache"))
jax.config.update("jax_compilation_cache_dir", _cache)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _shared_dir() -> pathlib.Path | None:
    for cand in (os.environ.get("LEUKAX_SHARED_DIR"), REPO.parent / "shared", REPO / "shared"):
        if cand and pathlib.Path(cand, "data").is_dir():
            return pathlib.Path(cand)
    return None


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
    """The shared/ folder beside the checkout (CI has it); tests that need it skip without it."""
    d = _shared_dir()
    if d is None:
        pytest.skip("shared/ folder with real data and weights not found")
    return d
