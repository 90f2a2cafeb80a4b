"""A careless plugin author's faults, as installed distributions and real `leaps` processes: a
broken plugin costs its own models and adapters only, with one warning naming it; `leaps
plugins` always runs and shows what is wrong; LEAPS_STRICT_PLUGINS turns each into an error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# distribution: (entry-point name, {file: source}, the problem `leaps plugins` must name)
PLUGINS = {
    "leaps-badyaml": ("badyaml", {
        "leaps_badyaml/__init__.py": """\
            from pathlib import Path

            from leaps.hookspecs import hookimpl


            @hookimpl
            def leaps_register_models(register):
                register(Path(__file__).with_name("registry.yaml"))
            """,
        "leaps_badyaml/registry.yaml": "models:\n  badyaml.model: [unclosed\n",
    }, "leaps_badyaml/registry.yaml: while parsing a flow sequence; fix its YAML"),
    "leaps-modelsraise": ("modelsraise", {
        "leaps_modelsraise.py": """\
            from leaps.hookspecs import hookimpl


            @hookimpl
            def leaps_register_models(register):
                raise RuntimeError("no registry today")
            """,
    }, "contributes no models: raised RuntimeError: no registry today"),
    "leaps-adaptersraise": ("adaptersraise", {
        "leaps_adaptersraise.py": """\
            from leaps.hookspecs import hookimpl


            @hookimpl
            def leaps_register_adapters(register):
                raise ValueError("no adapters today")
            """,
    }, "failed while registering adapters: ValueError: no adapters today"),
    "leaps-clash": ("clash", {
        "leaps_clash.py": """\
            from leaps.adapter import Adapter
            from leaps.hookspecs import hookimpl


            class Impostor(Adapter):
                name = "torchvision.r3d"


            class Own(Adapter):
                name = "clash.own"


            @hookimpl
            def leaps_register_adapters(register):
                register(Impostor)
                register(Own)
            """,
    }, "adapter 'torchvision.r3d' is provided twice: by plugin 'clash' (leaps-clash) and by "
       "plugin 'torchvision' (leaps)"),
}
DEMO = ["invert", "--model", "demo.resnet3d", "--verifier", "self", "--target", "right",
        "--iterations", "2", "--log-every", "2", "--quiet"]


def install(site: Path, dist: str) -> None:
    """Lay the distribution out as pip leaves it: dist-info with its entry point, and its code."""
    entry_point, files, _ = PLUGINS[dist]
    module = dist.replace("-", "_")
    info = site / f"{module}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[leaps]\n{entry_point} = {module}\n")
    for name, text in files.items():
        (site / name).parent.mkdir(parents=True, exist_ok=True)
        (site / name).write_text(textwrap.dedent(text))


def leaps(site: Path, *args: object, strict: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "LEAPS_STRICT_PLUGINS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    env["COLUMNS"] = "250"  # a table wide enough to hold each problem on one line
    if strict:
        env["LEAPS_STRICT_PLUGINS"] = "1"
    return subprocess.run([sys.executable, "-m", "leaps.cli", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=300, check=False)


def warnings_of(proc: subprocess.CompletedProcess) -> list[str]:
    assert "Traceback" not in proc.stderr, proc.stderr
    return [line for line in proc.stderr.splitlines() if line.startswith("warning: ")]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every broken plugin of PLUGINS installed at once."""
    site = tmp_path_factory.mktemp("site")
    for dist in PLUGINS:
        install(site, dist)
    return site


def test_leaps_plugins_lists_every_broken_and_clashing_plugin_with_why(site: Path) -> None:
    proc = leaps(site, "plugins", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = {row["name"]: row for row in json.loads(proc.stdout)}
    for dist, (name, _, problem) in PLUGINS.items():
        assert rows[name]["distribution"] == dist
        assert any(problem in p for p in rows[name]["problems"]), (name, rows[name])
    assert rows["adaptersraise"]["loaded"] is False
    assert rows["torchvision"]["problems"] == rows["clash"]["problems"]  # both named
    assert rows["clash"]["adapters"] == ["torchvision.r3d", "clash.own"]
    assert rows["timm"]["problems"] == [] and rows["example"]["problems"] == []
    # One warning per problem, each naming the plugin (or both clashing ones).
    warnings = warnings_of(proc)
    assert len(warnings) == 4, proc.stderr
    table = leaps(site, "plugins")
    assert table.returncode == 0, table.stderr
    assert "provided twice" in table.stdout and "contributes no models" in table.stdout


def test_built_in_models_work_beside_broken_plugins(site: Path, tmp_path: Path) -> None:
    models = leaps(site, "models", "--json")
    assert models.returncode == 0, models.stderr
    rows = {row["name"]: row for row in json.loads(models.stdout)}
    assert "demo.resnet3d" in rows and "badyaml.model" not in rows
    assert rows["demo.resnet3d"]["usable"] and rows["example.tiny3d"]["usable"]
    # Only entries of the clashing adapter name are unusable, and say why.
    assert "provided twice" in rows["torchvision.r3d_18"]["why_not"]
    warnings = warnings_of(models)
    assert any("plugin 'badyaml' from leaps-badyaml 0.1" in w and "registry.yaml" in w
               for w in warnings), warnings
    assert any("plugin 'modelsraise'" in w and "no registry today" in w for w in warnings)

    out = tmp_path / "run"
    run = leaps(site, *DEMO, "--out", out)
    assert run.returncode == 0, run.stderr
    assert json.loads((out / "run.json").read_text())["status"] == "done"

    # A command that touches the clashing name fails, with both providers named.
    clash = leaps(site, "invert", "--model", "torchvision.r3d_18", "--reduced", "--target",
                  "abseiling", "--out", tmp_path / "clash")
    assert clash.returncode == 2
    errors = [line for line in clash.stderr.splitlines() if not line.startswith("warning: ")]
    assert len(errors) == 1 and errors[0].startswith("error: model 'torchvision.r3d_18' is "
                                                     "not usable here: adapter "), clash.stderr
    assert PLUGINS["leaps-clash"][2] in errors[0]
    assert not (tmp_path / "clash").exists()
    layers = leaps(site, "layers", "--adapter", "torchvision.r3d")
    assert layers.returncode == 2 and "provided twice" in layers.stderr
    assert "Traceback" not in layers.stderr


@pytest.mark.parametrize("dist", sorted(PLUGINS))
def test_each_problem_is_an_error_under_strict_plugins(tmp_path: Path, dist: str) -> None:
    install(tmp_path, dist)
    proc = leaps(tmp_path, "models", strict=True)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert PLUGINS[dist][2] in lines[0] and "(LEAPS_STRICT_PLUGINS is set)" in lines[0]


def test_leaps_plugins_lists_under_strict_and_then_fails(site: Path) -> None:
    proc = leaps(site, "plugins", "--json", strict=True)
    assert proc.returncode == 2, proc.stderr
    assert {row["name"] for row in json.loads(proc.stdout)} >= {"badyaml", "clash", "timm"}
    assert proc.stderr.splitlines()[-1] == (
        "error: 4 plugin problem(s), listed above (LEAPS_STRICT_PLUGINS is set)")


BROKEN_BUILT_IN = """\
import sys


class _Broken:
    def find_spec(self, name, path=None, target=None):
        if name == "leaps_adapters.timm_models":
            raise ImportError("simulated broken install of timm")
        return None


sys.meta_path.insert(0, _Broken())
"""


def test_a_built_in_adapter_plugin_that_fails_to_import_costs_only_its_models(tmp_path):
    """A broken install of one family's library: its registry entries say why they are
    unusable, every other model works; under strict, an error."""
    (tmp_path / "sitecustomize.py").write_text(BROKEN_BUILT_IN)
    models = leaps(tmp_path, "models", "--json")
    assert models.returncode == 0, models.stderr
    assert warnings_of(models) == ["warning: plugin 'timm' from leaps 0.1.0 failed to import: "
                                   "ImportError: simulated broken install of timm"]
    rows = {row["name"]: row for row in json.loads(models.stdout)}
    timm = [row for row in rows.values() if row["adapter"].startswith("timm.")]
    assert timm and all(not row["usable"] and "adapter plugin 'timm' did not load" in
                        row["why_not"] for row in timm)
    assert rows["demo.resnet3d"]["usable"]
    one = leaps(tmp_path, "invert", "--model", timm[0]["name"], "--target", "0")
    assert one.returncode == 2 and "is not usable here: its adapter plugin 'timm'" in one.stderr
    strict = leaps(tmp_path, "models", strict=True)
    assert strict.returncode == 2 and "(LEAPS_STRICT_PLUGINS is set)" in strict.stderr
    assert "Traceback" not in one.stderr + strict.stderr
