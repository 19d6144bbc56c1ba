"""The skip policy of tests/conftest.py: under CI=true a skip whose reason is not on ALLOWED_SKIPS fails the
run, the shared/ skip stays allowed (unless LEUKAX_REQUIRE_SHARED=1), and every run prints its skips."""
import os
import pathlib
import subprocess
import sys
import textwrap

CONFTEST = pathlib.Path(__file__).with_name("conftest.py")
TESTS = textwrap.dedent('''
    import pytest

    def test_needs_a_package():
        pytest.importorskip("leukax_no_such_package")

    def test_needs_shared(shared_dir):
        pass

    def test_plain():
        pass
''')


def run_pytest(tmp_path, **env_overrides):
    """Runs the probe in <tmp>/repo/tests with a real-looking <tmp>/shared/data beside the checkout, which
    LEUKAX_SHARED_DIR=<missing folder> must hide (how a clone without shared/ is simulated)."""
    tests = tmp_path / "repo" / "tests"
    tests.mkdir(parents=True, exist_ok=True)
    (tmp_path / "shared" / "data").mkdir(parents=True, exist_ok=True)
    (tests / "conftest.py").write_text(CONFTEST.read_text())
    (tests / "test_policy_probe.py").write_text(TESTS)
    env = {k: v for k, v in os.environ.items()
           if k not in ("CI", "LEUKAX_STRICT_SKIPS", "LEUKAX_REQUIRE_SHARED", "PYTEST_ADDOPTS")}
    env.update(JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
               LEUKAX_SHARED_DIR=str(tmp_path / "no_shared_here"), **env_overrides)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:xdist", "-p", "no:cacheprovider",
                        "test_policy_probe.py"], cwd=tests, env=env, capture_output=True, text=True, timeout=300)
    return r.returncode, r.stdout + r.stderr


def test_strict_under_ci(tmp_path):
    code, out = run_pytest(tmp_path, CI="true")
    assert code == 1, out
    assert "unexpected skip" in out and "leukax_no_such_package" in out
    assert "1 failed, 1 passed, 1 skipped" in out  # the shared/ skip is allowed
    assert "skips: 1 (strict=True)" in out and "shared/ folder with real data and weights not found" in out
    code, out = run_pytest(tmp_path, CI="true", LEUKAX_REQUIRE_SHARED="1")
    assert code == 1 and "1 failed, 1 passed, 1 error" in out, out


def test_lenient_locally_but_counted(tmp_path):
    code, out = run_pytest(tmp_path)
    assert code == 0, out
    assert "1 passed, 2 skipped" in out and "skips: 2 (strict=False)" in out
    assert "NOT ALLOWED" in out  # the package skip is flagged in the summary even when not enforced
