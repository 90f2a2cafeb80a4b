"""Every torchvision registry entry passes the conformance suite at its reduced size, and the
reduced size is derived from the entry the way the suite expects."""

from dataclasses import replace

from leaps.registry import load_registry
from leaps.testing import AdapterConformance


class TestTorchvisionConformance(AdapterConformance):
    models = [name for name, spec in load_registry().models.items()
              if spec.adapter.startswith("torchvision.")]


def test_reduced_arch_merges_into_arch_at_every_depth() -> None:
    """``reduced.arch`` overrides single keys of nested mappings and keeps the entry's others;
    other values (lists included) are replaced whole; the entry itself is left unchanged."""
    spec = replace(load_registry().get("torchvision.s3d"),
                   arch={"builder": "s3d", "kernel": [3, 3],
                         "options": {"a": 1, "nested": {"b": 2, "c": 3}}},
                   reduced={"size": 64, "arch": {"global_pool": True, "kernel": [1],
                                                 "options": {"nested": {"c": 4}}}})
    reduced = spec.at_reduced_size()
    assert reduced.arch == {"builder": "s3d", "kernel": [1], "global_pool": True,
                            "options": {"a": 1, "nested": {"b": 2, "c": 4}}}
    assert spec.arch["options"] == {"a": 1, "nested": {"b": 2, "c": 3}}
    assert (reduced.frames, reduced.size) == (spec.frames, 64)
