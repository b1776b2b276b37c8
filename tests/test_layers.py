"""The package's layers point one way (pyproject.toml, [tool.importlinter]), and the check can actually fail.

The first test runs the real contract, as `make test` does. The others pin down the edges this layering was
built to remove, with grimp (import-linter's graph, function-level imports included), so a cycle hidden inside
a function cannot come back unnoticed; and one shows that a contract breaking a real edge is reported broken.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp
import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 (tomllib is in the standard library from 3.11)
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def lint(*args: str) -> subprocess.CompletedProcess:
    # From the repository root, so the package under test is this checkout's.
    return subprocess.run([str(LINT), "--no-cache", "--no-logo", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("tailorlm", cache_dir=None)


def test_the_layer_contract_holds():
    result = lint()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_tasks_import_nothing_from_eval(graph):
    # eval scores generated text with the task presets; the presets' own parsing and metrics live in tasks/.
    assert not graph.chain_exists("tailorlm.tasks", "tailorlm.eval", as_packages=True)


def test_kernels_import_nothing_from_train(graph):
    assert not graph.chain_exists("tailorlm.kernels", "tailorlm.train", as_packages=True)


def test_samples_is_a_leaf_and_all_the_kernels_take_from_data(graph):
    # Sample and IGNORE cross every layer from data up; the module that holds them depends on nothing of ours,
    # so the kernels reach into data for those two names only (not tokenization, templates or config).
    assert graph.find_modules_directly_imported_by("tailorlm.data.samples") == set()
    from_data = {imported for module in graph.find_descendants("tailorlm.kernels") | {"tailorlm.kernels"}
                 for imported in graph.find_modules_directly_imported_by(module) if imported.startswith("tailorlm.data")}
    assert from_data == {"tailorlm.data.samples"}


def test_a_contract_that_forbids_a_real_edge_is_broken(tmp_path):
    # The real layers with eval and train swapped: eval imports train (the training step, for validation loss
    # during training), so import-linter must report the contract broken and name that import.
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    layers = next(c for c in config["contracts"] if c["type"] == "layers")
    order = layers["layers"]
    i, j = order.index("eval"), order.index("train")
    order[i], order[j] = order[j], order[i]
    contract = tmp_path / "contract.toml"
    contract.write_text("\n".join([
        "[tool.importlinter]",
        'root_package = "tailorlm"',
        "[[tool.importlinter.contracts]]",
        'name = "swapped"',
        'type = "layers"',
        'containers = ["tailorlm"]',
        f"layers = {order!r}".replace("'", '"'),
    ]) + "\n")
    result = lint(str(contract))
    assert result.returncode != 0, result.stdout
    assert "swapped BROKEN" in result.stdout
    assert "tailorlm.eval" in result.stdout and "tailorlm.train" in result.stdout
