"""Test setup: Keras on the JAX backend, the programs' XLA:CPU flags (`leukax.runtime`), a persistent JAX
compilation cache, the shared/ folder, and the skip policy.

Skip policy: the only skips a test run may contain are those whose reason is on ALLOWED_SKIPS. With CI=true
(CI sets it) or LEUKAX_STRICT_SKIPS=1, any other skip (a package CI should have, a file that should ship)
is turned into a failure. Every run prints the number of skips and their reasons. The shared/ folder (real
weights and access-controlled datasets) is not in a public clone, so skipping for it is allowed unless
LEUKAX_REQUIRE_SHARED=1. `LEUKAX_SHARED_DIR=/nonexistent` simulates a clone without shared/.
"""
import collections
import os
import pathlib

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import pytest  # noqa: E402

from leukax import runtime  # noqa: E402

# The test run is a program: it applies the programs' XLA:CPU flags before the first computation, as
# experiments/common.main does (the compiled head-mode trainer can deadlock without the scheduler flag).
runtime.apply_xla_cpu_flags()

REPO = pathlib.Path(__file__).resolve().parents[1]
_cache = os.environ.get("JAX_COMPILATION_CACHE_DIR", str(REPO / ".jax_cache"))
jax.config.update("jax_compilation_cache_dir", _cache)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

SHARED_SKIP_REASON = "shared/ folder with real data and weights not found"
# Skip reasons that may appear in a green run (prefix match), each with why it is acceptable.
ALLOWED_SKIPS = {
    SHARED_SKIP_REASON: "official weight files and access-controlled datasets are not redistributable",
}


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def strict_skips() -> bool:
    """True when unexpected skips must fail the run (CI=true or LEUKAX_STRICT_SKIPS=1)."""
    return _env_true("CI") or _env_true("LEUKAX_STRICT_SKIPS")


def allowed_skip(reason: str) -> bool:
    """True if a skip with this reason is acceptable under the current environment."""
    if reason.startswith(SHARED_SKIP_REASON) and _env_true("LEUKAX_REQUIRE_SHARED"):
        return False
    return any(reason.startswith(r) for r in ALLOWED_SKIPS)


def _shared_dir() -> pathlib.Path | None:
    """The shared/ folder: $LEUKAX_SHARED_DIR if set (even if it does not exist), else ../shared or ./shared."""
    env = os.environ.get("LEUKAX_SHARED_DIR")
    cands = (env,) if env else (REPO.parent / "shared", REPO / "shared")
    for cand in cands:
        if pathlib.Path(cand, "data").is_dir():
            return pathlib.Path(cand)
    return None


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
    """The shared/ folder beside the checkout; only tests of the shared weight files and real shared datasets
    use it, and they skip (an allowed skip) without it."""
    d = _shared_dir()
    if d is None:
        pytest.skip(SHARED_SKIP_REASON)
    return d


@pytest.fixture(scope="session")
def cnmc_sample_dir() -> pathlib.Path:
    """The embedded 60-image C-NMC 2019 sample shipped in the package (images/ + labels.csv)."""
    from leukax.data.builders import sample_dir
    d = sample_dir()
    assert (d / "labels.csv").is_file(), f"{d}: the embedded sample is missing from the package"
    return d


def _skip_reason(report) -> str:
    if isinstance(report.longrepr, tuple) and len(report.longrepr) == 3:
        return str(report.longrepr[2]).removeprefix("Skipped: ")
    return str(report.longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under strict skips, turns a skip whose reason is not on ALLOWED_SKIPS into a failure."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail") and strict_skips():
        reason = _skip_reason(report)
        if not allowed_skip(reason):
            report.outcome = "failed"
            report.longrepr = (f"unexpected skip (not on tests/conftest.py ALLOWED_SKIPS; CI=true or "
                               f"LEUKAX_STRICT_SKIPS=1 forbids it): {reason}")


def pytest_terminal_summary(terminalreporter):
    """Prints the number of skips and each reason with its count."""
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if not hasattr(r, "wasxfail")]
    reasons = collections.Counter(_skip_reason(r) for r in skipped)
    terminalreporter.write_sep("-", f"skips: {len(skipped)} (strict={strict_skips()})")
    for reason, n in reasons.most_common():
        why = next((w for r, w in ALLOWED_SKIPS.items() if reason.startswith(r)), "NOT ALLOWED")
        terminalreporter.write_line(f"{n:4d}  {reason}  [{why}]")
