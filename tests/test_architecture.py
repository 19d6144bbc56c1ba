"""Layering: leukax.models builds networks, leukax.weights reads files; only leukax.pretrained joins them."""
import ast
import pathlib
import subprocess
import sys

import pytest

PKG = pathlib.Path(__file__).resolve().parents[1] / "leukax"


def _leukax_imports(path: pathlib.Path) -> list[tuple[str, bool]]:
    """Returns (imported leukax module, at module level?) for every import of leukax in `path`."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("leukax"):
            out += [(f"{node.module}.{a.name}", id(node) in top) for a in node.names]
        elif isinstance(node, ast.Import):
            out += [(a.name, id(node) in top) for a in node.names if a.name.startswith("leukax")]
    return out


@pytest.mark.parametrize("package, other", [("models", "weights"), ("weights", "models")])
def test_models_and_weights_do_not_import_each_other(package, other):
    files = sorted((PKG / package).rglob("*.py"))
    assert files
    for path in files:
        for module, at_top in _leukax_imports(path):
            assert not module.startswith(f"leukax.{other}"), f"{path.relative_to(PKG)} imports {module}"
            assert not module.startswith("leukax.pretrained"), f"{path.relative_to(PKG)} imports {module}"
            # The one exception: the opt-in native kernels are imported only when a model asks for them.
            assert at_top or module.startswith("leukax.native."), f"{path.relative_to(PKG)}: function-local import of {module}"


def test_importing_a_layer_loads_not_the_other():
    code = ("import sys, leukax.weights.registry, leukax.weights.keras_h5, leukax.weights.torch_state, "
            "leukax.weights.embedded; assert not [m for m in sys.modules if m.startswith('leukax.models')]; "
            "import leukax.models.registry, leukax.models.efficientnet, leukax.models.xception; "
            "assert not [m for m in sys.modules if m.startswith('leukax.pretrained')]")
    subprocess.run([sys.executable, "-c", code], check=True)
