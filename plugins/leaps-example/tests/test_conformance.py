"""The example plugin, installed from its folder, passes leaps' conformance suite."""

from __future__ import annotations

from typing import ClassVar

import torch
from leaps_example import REGISTRY, Tiny3DAdapter

from leaps.plugins import get_host
from leaps.registry import build_model, load_registry
from leaps.testing import AdapterConformance, reduced_input


class TestTiny3DConformance(AdapterConformance):
    models: ClassVar[list[str]] = ["example.tiny3d"]


def test_found_through_its_entry_point() -> None:
    info = get_host().plugins["example"]
    assert info.distribution == "leaps-example"
    assert info.adapters == ["example.tiny3d"]
    assert set(info.hooks) == {"leaps_register_adapters", "leaps_register_models"}
    assert get_host().adapter("example.tiny3d") is Tiny3DAdapter


def test_registry_entry_comes_from_the_plugins_file() -> None:
    spec = load_registry().get("example.tiny3d")
    assert spec.source == str(REGISTRY)
    assert spec.label_names() == ("clapping", "waving hand", "jumping jacks", "sitting down",
                                  "standing up")


def test_full_size_model_classifies_its_own_classes() -> None:
    torch.manual_seed(0)
    model = build_model("example.tiny3d")
    assert model.spec.shape == (3, 8, 64, 64)
    with torch.no_grad():
        logits = model(reduced_input(model, batch=1))
    assert logits.shape == (1, 5)
    assert [tap.name for tap in model.taps] == ["stem", "blocks.0", "blocks.1", "blocks.2"]
    assert len(model.norm_layers) == 1 + 2 * 3 + 2  # stem, two per block, two projections


def test_ships_stimuli_so_invert_needs_no_stimulus_option() -> None:
    from leaps.config import InvertConfig
    from leaps.invert import invert

    spec = load_registry().get("example.tiny3d")
    assert all(spec.stimulus_files(label) for label in spec.label_names())
    result = invert("example.tiny3d", targets=["waving hand"], reduced=True, verifier="self",
                    config=InvertConfig(iterations=1, samples=1), progress=False)
    assert result.labels == ["waving hand"]
