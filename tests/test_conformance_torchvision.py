"""Every torchvision registry entry passes the conformance suite at its reduced size; the
reduced size is derived from the entry the way the suite expects; a torchvision model
fine-tuned on other classes loads with its label file."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from leaps.errors import LeapsError
from leaps.registry import build_model, load_registry
from leaps.testing import AdapterConformance, reduced_input

TORCHVISION = [name for name, spec in load_registry().models.items()
               if spec.adapter.startswith("torchvision.")]


class TestTorchvisionConformance(AdapterConformance):
    models = TORCHVISION


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


def test_fine_tuned_checkpoint_takes_its_labels(tmp_path: Path) -> None:
    """An r3d_18 fine-tuned on six classes, built and saved the torchvision way (its builder,
    torch.save of the state dict), loads with --labels and gives torchvision's own logits;
    without --labels the classifier mismatch is named."""
    from torchvision.models.video import r3d_18

    classes = [f"gesture {i}" for i in range(6)]
    labels = tmp_path / "gestures.txt"
    labels.write_text("\n".join(classes) + "\n", encoding="utf-8")
    torch.manual_seed(9)
    tuned = r3d_18(weights=None, num_classes=len(classes)).eval()
    path = tmp_path / "r3d_gestures.pth"
    torch.save(tuned.state_dict(), path)

    model = build_model("torchvision.r3d_18", reduced=True, checkpoint=path, labels=labels)
    assert model.labels == tuple(classes)
    clip = reduced_input(model)
    with torch.no_grad():
        assert (model(clip) - tuned(model.normalize(clip))).abs().max() <= 1e-5
    with pytest.raises(LeapsError, match=r"fc\.weight \(6, 512\) vs \(400, 512\).*--labels"):
        build_model("torchvision.r3d_18", reduced=True, checkpoint=path)
