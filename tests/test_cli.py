"""The `leaps` commands as a user runs them, and the registry's promises."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from leaps.adapter import Adapter
from leaps.errors import LeapsError
from leaps.registry import build_model, load_registry, missing_requirements
from leaps.testing import InProcessPlugin, registered_plugin

TABLE_S1 = {  # the paper's Table S1: lambda_1, lambda_L, r
    "3D R50": (1.0, 0.3, 7.5e-3), "(2+1)D R50": (0.75, 0.1, 5e-3), "CSN R50": (1.0, 0.2, 5e-3),
    "X3D XS": (1.0, 0.2, 1e-3), "X3D S": (1.0, 0.1, 1e-3), "X3D M": (0.75, 0.1, 1e-3),
    "X3D L": (0.75, 0.1, 1e-3), "TimeSformer": (1.0, 0.2, 2.5e-3),
    "Swin-T": (0.75, 0.2, 1e-3), "Swin-S": (0.75, 0.1, 1e-3), "Swin-B": (0.625, 0.1, 1e-3),
    "MViTv2-S": (0.75, 0.1, 2.5e-3),
    "MViTv2-B": (0.75, 0.1, 1e-3), "rev-MViT-B": (0.625, 0.1, 5e-3),
    "UniFormerV2-B": (1.0, 0.2, 2.5e-3), "UniFormerV2-L": (1.0, 0.1, 1e-3),
}


def leaps(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "leaps.cli", *args], capture_output=True,
                          text=True, timeout=300)


def _normal(name: str) -> str:
    return name.lower().replace(" ", "").replace("-", "").replace("_", "")


def test_paper_models_carry_table_s1_hyperparameters():
    specs = [s for s in load_registry().models.values() if s.paper]
    table = {_normal(name): values for name, values in TABLE_S1.items()}
    assert {_normal(s.paper) for s in specs} == set(table), "every Table S1 model, no other"
    for spec in specs:
        assert (spec.leaps.lambda_1, spec.leaps.lambda_L, spec.leaps.r) == table[
            _normal(spec.paper)], spec.name
    usable = [s for s in specs if missing_requirements(s) is None]
    # X3D-M from two libraries, TimeSformer from mmaction2 and transformers; rev-MViT absent
    assert len(specs) == 18 and len(usable) == 17
    assert "reversible" in missing_requirements(load_registry().get("mmaction.rev_mvit_b"))


def test_models_lists_usable_entries_with_input_specs():
    proc = leaps("models", "torchvision.*", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    names = {row["name"] for row in rows}
    assert {"torchvision.r3d_18", "torchvision.swin3d_b", "torchvision.mvit_v2_s"} <= names
    r3d = next(row for row in rows if row["name"] == "torchvision.r3d_18")
    assert r3d["usable"] and (r3d["frames"], r3d["size"]) == (16, 112)
    assert leaps("models", "no-such-model*").returncode == 2


def test_layers_prints_taps_with_shapes():
    proc = leaps("layers", "--adapter", "torchvision.r3d")
    assert proc.returncode == 0, proc.stderr
    assert "layer4.1" in proc.stdout and "[1, 512, 1, 2, 2]" in proc.stdout
    assert "Grad-CAM target: layer4.1" in proc.stdout
    proc = leaps("layers", "--adapter", "torchvision.r3x")
    assert proc.returncode == 2 and "did you mean torchvision.r3d" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_plugins_lists_builtin_and_installed_third_party_plugins():
    proc = leaps("plugins", "--json")
    assert proc.returncode == 0, proc.stderr
    plugins = {row["name"]: row for row in json.loads(proc.stdout)}
    assert {"torchvision", "pytorchvideo", "mmaction", "timm"} <= set(plugins)
    assert "torchvision.swin3d" in plugins["torchvision"]["adapters"]
    assert "leaps_register_adapters" in plugins["torchvision"]["hooks"]
    assert plugins["example"]["distribution"] == "leaps-example"


class NeedsMissingLibrary(Adapter):
    name = "needy.net"
    requires = {"leaps_no_such_module": "leaps-no-such-package>=1.0"}


NEEDY = InProcessPlugin([NeedsMissingLibrary], {"needy.net": {
    "adapter": "needy.net", "input": {"frames": 2, "size": 8, "mean": [0, 0, 0], "std": [1, 1, 1]},
    "labels": ["a", "b"], "verifier": "none",
    "leaps": {"lambda_1": 1.0, "lambda_L": 0.1, "r": 0.001}}})


def test_entry_needing_a_missing_library_names_the_pip_requirement():
    # a plugin's requirement is printed as it is, never as an extra of leaps
    with registered_plugin(NEEDY, "needy"):
        spec = load_registry().get("needy.net")
        assert "pip install 'leaps-no-such-package>=1.0'" in missing_requirements(spec)
        with pytest.raises(LeapsError, match=r"not usable here: needs leaps_no_such_module: "
                                             r"pip install 'leaps-no-such-package>=1\.0'"):
            build_model("needy.net")


class NeedsAnExtraOfLeaps(Adapter):
    name = "needy.extra"
    requires = {"leaps_no_such_module": "leaps[nosuchextra]"}


def test_models_table_keeps_the_brackets_of_an_install_hint():
    """rich reads "[nosuchextra]" as markup unless it is escaped: the hint would lose it."""
    from click.testing import CliRunner

    from leaps.cli import cli

    entry = dict(NEEDY.models["needy.net"], adapter="needy.extra")
    with registered_plugin(InProcessPlugin([NeedsAnExtraOfLeaps], {"needy.extra": entry}),
                           "needy"):
        result = CliRunner(env={"COLUMNS": "300"}).invoke(cli, ["models", "needy.*"])
    assert result.exit_code == 0, result.output
    assert "pip install 'leaps[nosuchextra]'" in result.output
