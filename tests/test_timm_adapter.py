"""timm.frames: conformance of every timm entry, equivalence with timm applied per frame, and
timm's native checkpoint formats (state dicts as .pth / .safetensors, training checkpoints)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from leaps_adapters.timm_models import FramesAdapter, pretrained_input

from leaps.adapter import VideoClassifier
from leaps.errors import LeapsError
from leaps.registry import LeapsParams, ModelSpec, build_model, load_registry
from leaps.testing import AdapterConformance, reduced_input

timm = pytest.importorskip("timm")

TIMM_MODELS = [name for name, spec in load_registry().models.items()
               if spec.adapter.startswith("timm.")]


class TestTimmConformance(AdapterConformance):
    models = TIMM_MODELS


def test_registry_has_a_cnn_and_a_vit() -> None:
    assert {"timm.resnet18_frames", "timm.vit_small_frames"} <= set(TIMM_MODELS)


@pytest.mark.parametrize("name", TIMM_MODELS)
def test_input_spec_is_timms_pretrained_cfg(name: str) -> None:
    spec = load_registry().get(name)
    expected = pretrained_input(spec.arch["model"])
    assert spec.size == expected["size"]
    assert list(spec.mean) == pytest.approx(expected["mean"])
    assert list(spec.std) == pytest.approx(expected["std"])


def _timm_reference(model: VideoClassifier) -> torch.nn.Module:
    """The same network made by timm directly, carrying the adapter model's weights."""
    spec = load_registry().get(model.model_name).at_reduced_size()
    kwargs = {k: v for k, v in spec.arch.items() if k != "model"}
    if timm.models.get_pretrained_cfg(spec.arch["model"]).fixed_input_size:
        kwargs["img_size"] = spec.size
    reference = timm.create_model(spec.arch["model"], pretrained=False,
                                  num_classes=len(model.labels), **kwargs)
    reference.load_state_dict(model.net.state_dict())
    return reference.eval()


@pytest.mark.parametrize("name", TIMM_MODELS)
def test_logits_are_timm_per_frame_averaged(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, reduced=True)
    reference = _timm_reference(model)
    video = reduced_input(model)
    mean = torch.tensor(model.spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(model.spec.std).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = torch.stack([reference((video[:, :, t] - mean) / std)
                                for t in range(video.shape[2])]).mean(0)
        logits = model(video)
    assert logits.shape == expected.shape == (video.shape[0], 400)
    assert (logits - expected).abs().max().item() <= 1e-4


def test_vit_taps_are_the_patch_grid_without_the_class_token() -> None:
    torch.manual_seed(0)
    model = build_model("timm.vit_small_frames", reduced=True)
    video = reduced_input(model)
    seen = {}
    tap = model.taps[-1]
    handle = tap.module.register_forward_hook(lambda _m, _i, out: seen.update(tokens=out))
    with torch.no_grad():
        model(video)
    handle.remove()
    tokens = seen["tokens"]  # [B*T, 1 + h*w, C], frames of one clip consecutive
    grid = model.spec.size // 16
    as_video = tap.to_video(tokens)
    assert as_video.shape == (video.shape[0], tokens.shape[-1], model.spec.frames, grid, grid)
    # clip 1, frame 1, patch row 0 column 1 is token 1 + 1 of folded frame T + 1
    t = model.spec.frames
    assert torch.equal(as_video[1, :, 1, 0, 1], tokens[t + 1, 1 + 1])


def test_cnn_taps_follow_timm_feature_info_block_by_block() -> None:
    model = build_model("timm.resnet18_frames", reduced=True)
    assert [tap.name for tap in model.taps] == [
        "act1", "layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0", "layer3.1",
        "layer4.0", "layer4.1"]
    assert all(layer.channel_dim == 1 and layer.has_stats for layer in model.norm_layers)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_checkpoint_round_trip(tmp_path: Path, suffix: str) -> None:
    torch.manual_seed(3)
    first = build_model("timm.resnet18_frames", reduced=True)
    with torch.no_grad():
        for layer in first.norm_layers:
            layer.running_mean.uniform_(-0.1, 0.1)
    path = tmp_path / f"resnet18{suffix}"
    FramesAdapter().save_checkpoint(first.net, path)
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        assert set(load_file(str(path))) == set(first.net.state_dict())
    torch.manual_seed(4)
    second = build_model("timm.resnet18_frames", reduced=True, checkpoint=path)
    video = reduced_input(first)
    with torch.no_grad():
        assert torch.equal(first(video), second(video))


def test_timm_training_checkpoint_loads_its_ema_weights(tmp_path: Path) -> None:
    """timm's train.py nests the weights (DDP-prefixed) under state_dict / state_dict_ema."""
    torch.manual_seed(5)
    ema = build_model("timm.vit_small_frames", reduced=True)
    torch.manual_seed(6)
    raw = build_model("timm.vit_small_frames", reduced=True)
    path = tmp_path / "checkpoint-9.pth.tar"
    torch.save({"epoch": 9, "arch": "vit_small_patch16_224",
                "state_dict": {f"module.{k}": v for k, v in raw.net.state_dict().items()},
                "state_dict_ema": ema.net.state_dict()}, path)
    loaded = build_model("timm.vit_small_frames", reduced=True, checkpoint=path)
    video = reduced_input(loaded)
    with torch.no_grad():
        assert torch.equal(loaded(video), ema(video))


def test_fine_tuned_checkpoint_with_its_own_classes(tmp_path: Path) -> None:
    classes = ["archery", "bowling", "juggling balls", "surfing water", "yoga"]
    labels = tmp_path / "five.txt"
    labels.write_text("\n".join(classes) + "\n")
    torch.manual_seed(7)
    net = timm.create_model("resnet18", pretrained=False, num_classes=5)
    path = tmp_path / "finetuned.safetensors"
    from safetensors.torch import save_file

    save_file(net.state_dict(), str(path))
    model = build_model("timm.resnet18_frames", reduced=True, checkpoint=path, labels=labels)
    assert model.labels == tuple(classes)
    with torch.no_grad():
        assert model(reduced_input(model)).shape == (2, 5)
    with pytest.raises(LeapsError, match="--labels"):
        build_model("timm.resnet18_frames", reduced=True, checkpoint=path)


def test_unknown_timm_model_names_close_matches() -> None:
    spec = ModelSpec(name="typo", adapter="timm.frames", arch={"model": "resnet_18"}, frames=2,
                     size=32, mean=(0.5,) * 3, std=(0.5,) * 3, value_range=1.0,
                     labels=("a", "b"), verifier="none", leaps=LeapsParams(1.0, 0.3, 7.5e-3))
    with pytest.raises(LeapsError, match="did you mean.*resnet18"):
        FramesAdapter().build(spec)
