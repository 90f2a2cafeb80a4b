"""The third-party plugin path: fault-tolerant loading of installed distributions, errors that
name what is wrong, and a conformance suite that fails adapters which break the contract."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from leaps.adapter import Adapter, InputSpec, NormLayer, Tap
from leaps.errors import LeapsError
from leaps.hookspecs import hookimpl
from leaps.plugins import get_host, reset_host
from leaps.registry import build_model, load_registry
from leaps.testing import (
    InProcessPlugin,
    check_checkpoint_round_trip,
    check_input_spec,
    check_norm_layers,
    check_registry_entry,
    check_tap_gradients,
    check_tap_locality,
    check_taps,
    check_taps_cover_blocks,
    registered_plugin,
)

DOCS = Path(__file__).resolve().parents[1] / "docs" / "writing_adapters.md"


# -- installed distributions, loaded in a fresh interpreter ------------------------------------
BROKEN_PLUGINS = {
    # distribution: (entry-point name, module source, what the warning must say)
    "leaps-broken": ("broken", "import leaps_missing_dependency  # not installed\n",
                     r"failed to import: ModuleNotFoundError: .*leaps_missing_dependency"),
    "leaps-misspelled": ("misspelled", textwrap.dedent("""\
        from leaps.hookspecs import hookimpl


        @hookimpl
        def leaps_register_adapter(register):
            raise AssertionError("a misspelled hook must never be called")
        """), r"implements unknown hook\(s\) leaps_register_adapter\b"),
}

LOAD_SCRIPT = textwrap.dedent("""\
    import json, sys
    from leaps.errors import LeapsError
    from leaps.plugins import get_host
    from leaps.registry import load_registry
    try:
        host = get_host()
        models = sorted(load_registry().models)
    except LeapsError as exc:
        print(json.dumps({"error": str(exc)}))
        sys.exit(3)
    print(json.dumps({"plugins": sorted(host.plugins), "adapters": sorted(host.adapters),
                      "models": models}))
    """)


def install_distribution(site: Path, dist: str, entry_point: str, source: str) -> None:
    """Lay out an installed distribution as pip leaves it: ``<name>-<version>.dist-info`` with
    METADATA and entry_points.txt, next to the module the entry point names."""
    module = dist.replace("-", "_")
    info = site / f"{module}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[leaps]\n{entry_point} = {module}\n")
    (site / f"{module}.py").write_text(source)


def load_in_subprocess(site: Path, strict: bool) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "LEAPS_STRICT_PLUGINS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    if strict:
        env["LEAPS_STRICT_PLUGINS"] = "1"
    return subprocess.run([sys.executable, "-c", LOAD_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=120, check=False)


@pytest.mark.parametrize("dist", sorted(BROKEN_PLUGINS))
def test_broken_plugin_warns_once_and_the_rest_load(tmp_path: Path, dist: str) -> None:
    entry_point, source, error = BROKEN_PLUGINS[dist]
    install_distribution(tmp_path, dist, entry_point, source)
    result = load_in_subprocess(tmp_path, strict=False)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, result.stderr
    assert f"plugin {entry_point!r} from {dist} 0.1" in warnings[0]
    assert re.search(error, warnings[0]), warnings[0]
    loaded = json.loads(result.stdout)
    assert entry_point not in loaded["plugins"]
    assert {"torchvision", "timm"} <= set(loaded["plugins"])
    assert {"torchvision.r3d", "timm.frames"} <= set(loaded["adapters"])
    assert "torchvision.r3d_18" in loaded["models"]


@pytest.mark.parametrize("dist", sorted(BROKEN_PLUGINS))
def test_broken_plugin_is_an_error_when_strict(tmp_path: Path, dist: str) -> None:
    entry_point, source, error = BROKEN_PLUGINS[dist]
    install_distribution(tmp_path, dist, entry_point, source)
    result = load_in_subprocess(tmp_path, strict=True)
    assert result.returncode == 3, result.stderr
    message = json.loads(result.stdout)["error"]
    assert dist in message and "LEAPS_STRICT_PLUGINS" in message
    assert re.search(error, message), message


# -- in-process plugins: a tiny adapter and broken variants of it ---------------------------
class TinyNet(nn.Module):
    def __init__(self, num_classes: int, width: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Sequential(nn.Conv3d(3, width, 3, padding=1), nn.BatchNorm3d(width), nn.ReLU()),
            nn.Sequential(nn.Conv3d(width, 2 * width, 3, stride=2, padding=1),
                          nn.BatchNorm3d(2 * width), nn.ReLU()))
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3, 4)))


class GoodAdapter(Adapter):
    name = "faulty.good"

    def create(self, arch: dict[str, Any], num_classes: int, spec: InputSpec) -> nn.Module:
        return TinyNet(num_classes, **arch)

    def taps(self, net: nn.Module, arch: dict[str, Any], spec: InputSpec) -> list[Tap]:
        return [Tap(f"features.{i}", block) for i, block in enumerate(net.features)]


class TapsOutOfOrder(GoodAdapter):
    name = "faulty.order"

    def taps(self, net: nn.Module, arch: dict[str, Any], spec: InputSpec) -> list[Tap]:
        return super().taps(net, arch, spec)[::-1]


class HeightWidthSwapped(GoodAdapter):
    """Its taps read [B, C, T, W, H]: every shape check passes on square frames."""

    name = "faulty.swapped"

    def taps(self, net: nn.Module, arch: dict[str, Any], spec: InputSpec) -> list[Tap]:
        return [Tap(t.name, t.module, lambda out: out.transpose(3, 4))
                for t in super().taps(net, arch, spec)]


class LastBlockOnly(GoodAdapter):
    """The official code's defect: only the last block is tapped."""

    name = "faulty.last"

    def taps(self, net: nn.Module, arch: dict[str, Any], spec: InputSpec) -> list[Tap]:
        return super().taps(net, arch, spec)[-1:]


class TapBreaksGradient(GoodAdapter):
    """Its first tap's conversion rounds the activations: the graph stays, the gradient is 0."""

    name = "faulty.rounded"

    def taps(self, net: nn.Module, arch: dict[str, Any], spec: InputSpec) -> list[Tap]:
        first, *rest = super().taps(net, arch, spec)
        return [Tap(first.name, first.module, lambda out: out.round()), *rest]


class TapDetached(GoodAdapter):
    name = "faulty.detached"

    def taps(self, net: nn.Module, arch: dict[str, Any], spec: InputSpec) -> list[Tap]:
        first, *rest = super().taps(net, arch, spec)
        return [Tap(first.name, first.module, lambda out: out.detach()), *rest]


class WrongNormStats(GoodAdapter):
    name = "faulty.stats"

    def norm_layers(self, net: nn.Module) -> list[NormLayer]:
        # The second BN's stats paired with the first BN: 8 channels for a 4-channel input.
        first, second = super().norm_layers(net)
        return [NormLayer(first.name, first.module, 1, second.running_mean, second.running_var),
                second]


class LossyCheckpoint(GoodAdapter):
    name = "faulty.lossy"

    def save_checkpoint(self, net: nn.Module, path: Path) -> None:
        torch.save({k: v.half() if v.is_floating_point() else v
                    for k, v in net.state_dict().items()}, path)


def entry(adapter: str, **fields: Any) -> dict[str, Any]:
    """A valid registry entry for ``adapter`` with ``fields`` replaced."""
    raw: dict[str, Any] = {
        "adapter": adapter, "arch": {},
        "input": {"frames": 4, "size": 16, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
        "labels": ["left", "right", "up"], "verifier": "torchvision.r3d_18",
        "leaps": {"lambda_1": 1.0, "lambda_L": 0.3, "r": 7.5e-3},
        "reduced": {"frames": 2, "size": 16}}
    raw.update(fields)
    return raw


@pytest.fixture
def fresh_host() -> Iterator[None]:
    """For tests that leave the host half-updated on purpose: reload plugins afterwards."""
    yield
    reset_host()


CHECKS: dict[str, Callable[[str, Path], None]] = {
    "input_spec": lambda name, _: check_input_spec(build_model(name, reduced=True)),
    "taps": lambda name, _: check_taps(build_model(name, reduced=True)),
    "tap_gradients": lambda name, _: check_tap_gradients(build_model(name, reduced=True)),
    "norm_layers": lambda name, _: check_norm_layers(build_model(name, reduced=True)),
    "registry_entry": lambda name, _: check_registry_entry(load_registry().get(name)),
    "checkpoint_round_trip": lambda name, tmp: check_checkpoint_round_trip(
        load_registry().get(name), tmp),
    "tap_locality": lambda name, _: check_tap_locality(build_model(name, reduced=True)),
    "taps_cover_blocks": lambda name, _: check_taps_cover_blocks(build_model(name,
                                                                             reduced=True)),
}

FAULTS = [
    (TapsOutOfOrder, "taps", "not in forward order"),
    (TapBreaksGradient, "tap_gradients", "no gradient reaches the input from tap features.0"),
    (WrongNormStats, "norm_layers", "running stats of shape"),
    (LossyCheckpoint, "checkpoint_round_trip", "logits differ after a checkpoint round trip"),
    (HeightWidthSwapped, "tap_locality", "is laid onto its [T, H, W] grid [2, 16, 16] wrongly"),
    (LastBlockOnly, "taps_cover_blocks", "taps cover only 1 of the 2 Sequential blocks of "
                                         "features; untapped: features.0"),
]


def test_the_sound_adapter_passes_every_check(tmp_path: Path) -> None:
    plugin = InProcessPlugin([GoodAdapter], {"faulty.good_tiny": entry("faulty.good")})
    with registered_plugin(plugin, "faulty"):
        for check in CHECKS.values():
            check("faulty.good_tiny", tmp_path)


@pytest.mark.parametrize(("adapter", "check", "message"), FAULTS,
                         ids=[fault[0].__name__ for fault in FAULTS])
def test_conformance_suite_fails_a_broken_adapter(tmp_path: Path, adapter: type[Adapter],
                                                   check: str, message: str) -> None:
    model = f"{adapter.name}_tiny"
    with registered_plugin(InProcessPlugin([adapter], {model: entry(adapter.name)}), "faulty"):
        with pytest.raises(AssertionError, match=re.escape(message)) as failure:
            CHECKS[check](model, tmp_path)
        assert model in str(failure.value)
        for other in sorted(set(CHECKS) - {check, "checkpoint_round_trip"}):
            # the fault is caught by its own check only; each check builds the model from the
            # same seed (a rounded tap of other weights can round a changed corner away, which
            # the locality check would then catch too)
            torch.manual_seed(0)
            CHECKS[other](model, tmp_path)


def test_a_detached_tap_fails_the_gradient_check(tmp_path: Path) -> None:
    plugin = InProcessPlugin([TapDetached], {"faulty.detached_tiny": entry("faulty.detached")})
    with (registered_plugin(plugin, "faulty"),
          pytest.raises(AssertionError, match="is detached from the input")):
        CHECKS["tap_gradients"]("faulty.detached_tiny", tmp_path)


def test_misspelled_hook_hint_names_the_real_hook(monkeypatch: pytest.MonkeyPatch,
                                                  fresh_host: None) -> None:
    class Misspelled:
        @hookimpl
        def leaps_register_adapter(self, register: Callable[[type], None]) -> None:
            raise AssertionError("a misspelled hook must never be called")

    monkeypatch.setenv("LEAPS_STRICT_PLUGINS", "1")
    with pytest.raises(LeapsError) as error, registered_plugin(Misspelled(), "misspelled"):
        pass
    assert "(did you mean leaps_register_adapters?)" in str(error.value)
    assert "known hooks: leaps_register_adapters, leaps_register_models " in str(error.value)


def test_duplicate_adapter_names_both_providers(fresh_host: None) -> None:
    class Impostor(GoodAdapter):
        name = "torchvision.r3d"

    impostor = InProcessPlugin([Impostor], {})
    with pytest.raises(LeapsError) as error, registered_plugin(impostor, "impostor"):
        pass
    message = str(error.value)
    assert "'torchvision.r3d' is provided twice" in message
    assert "plugin 'torchvision'" in message and "plugin 'impostor'" in message
    assert get_host().adapter("torchvision.r3d") is not Impostor


def test_a_rejected_plugin_is_not_left_registered(fresh_host: None) -> None:
    class Impostor(GoodAdapter):
        name = "torchvision.r3d"

    plugin = InProcessPlugin([Impostor], {})
    with pytest.raises(LeapsError, match="provided twice"), registered_plugin(plugin, "impostor"):
        pass
    assert "impostor" not in get_host().plugins
    assert not get_host().pm.is_registered(plugin)


def test_unknown_adapter_name_suggests_close_matches() -> None:
    with pytest.raises(LeapsError, match=r"unknown adapter 'torchvision\.r3'; did you mean "
                                         r"torchvision\.r3d\b") as error:
        get_host().adapter("torchvision.r3")
    assert "installed: " in str(error.value) and "timm.frames" in str(error.value)
    with pytest.raises(LeapsError, match=r"did you mean timm\.frames"):
        build_model(adapter="timm.frame")


INVALID_ENTRIES = {
    "missing field": ({k: v for k, v in entry("torchvision.r3d").items() if k != "verifier"},
                      "field 'verifier': is missing"),
    "wrong type": (entry("torchvision.r3d", input={"frames": "eight", "size": 16,
                                                   "mean": [0.5] * 3, "std": [0.25] * 3}),
                   "field 'frames': must be int, got 'eight'"),
    "unknown field": ({**entry("torchvision.r3d"), "lables": ["a"]},
                      "field 'lables': is not a registry field (did you mean 'labels'?)"),
    "unknown adapter": (entry("torchvision.r3dd"),
                        ("field 'adapter': unknown adapter 'torchvision.r3dd' (did you mean "
                         "torchvision.r3d")),
}


@pytest.mark.parametrize("case", sorted(INVALID_ENTRIES))
def test_invalid_registry_mapping_names_entry_and_field(case: str) -> None:
    raw, expected = INVALID_ENTRIES[case]
    with (registered_plugin(InProcessPlugin([], {"broken.entry": raw}), "entries"),
          pytest.raises(LeapsError) as error):
        load_registry()
    message = str(error.value)
    assert "registry entry 'broken.entry'" in message
    assert expected in message, message


# -- the documentation's plugin is real -----------------------------------------------------
def test_the_documented_minimal_plugin_passes_conformance(tmp_path: Path) -> None:
    text = DOCS.read_text(encoding="utf-8")
    match = re.search(r"<!-- leaps-doc-plugin: (\w+)\.py -->\n```python\n(.*?)```", text,
                      re.DOTALL)
    assert match, f"{DOCS} lost its minimal plugin code block"
    module = types.ModuleType(match.group(1))
    exec(compile(match.group(2), str(DOCS), "exec"), module.__dict__)  # noqa: S102 - our docs
    with registered_plugin(module, "mylab"):
        assert get_host().plugins["mylab"].adapters == ["mylab.c3d"]
        for check in CHECKS.values():
            check("mylab.c3d_tiny", tmp_path)
