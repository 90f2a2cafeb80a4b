"""The mmaction2 adapter: every registry entry passes the conformance suite; each family's logits
equal mmaction2's own inference path; registry entries agree with the configs and model zoo of
the installed wheel; native checkpoints load (safely) and save; users' own configs build."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

pytest.importorskip("mmaction")
pytest.importorskip("mmengine")

from leaps_adapters.mmaction_models import (
    ADAPTERS,
    configs_dir,
    import_mmaction_models,
)

from leaps.errors import LeapsError
from leaps.hookspecs import hookimpl
from leaps.registry import ModelSpec, build_model, load_registry
from leaps.testing import AdapterConformance, check_taps, registered_plugin

MMACTION = {name: spec for name, spec in load_registry().models.items()
            if spec.adapter.startswith("mmaction.")}
USABLE = [name for name, spec in MMACTION.items() if spec.unavailable is None]

# One entry per family for the comparison with mmaction2's own inference.
FAMILY_ENTRIES = ["mmaction.swin_t", "mmaction.mvitv2_s", "mmaction.uniformerv2_b",
                  "mmaction.timesformer", "mmaction.x3d_m", "mmaction.ircsn_r50",
                  "mmaction.r2plus1d_r34", "mmaction.slowonly_r50", "mmaction.i3d_r50",
                  "mmaction.tsm_r50"]

# The config fields that fix a family's input size, written out here (not taken from the
# adapter) so that mmaction2's side of the comparison is configured independently.
INPUT_SIZE_FIELDS = {
    "mmaction.mvit": {"model.backbone.temporal_size": "frames",
                      "model.backbone.spatial_size": "size"},
    "mmaction.uniformerv2": {"model.backbone.t_size": "frames",
                             "model.backbone.input_resolution": "size"},
    "mmaction.timesformer": {"model.backbone.num_frames": "frames",
                             "model.backbone.img_size": "size"},
    "mmaction.tsm": {"model.backbone.num_segments": "frames",
                     "model.cls_head.num_segments": "frames"},
}


@pytest.fixture(autouse=True, scope="module")
def _mmaction_importable() -> None:
    """mmaction2's own modules (mmaction.apis ...) import mmaction.models, which fails on the
    wheel's missing DRN package until the adapter has put its stand-in in place; do that first
    so that every test here also runs on its own."""
    import_mmaction_models()


class TestMmactionConformance(AdapterConformance):
    models = USABLE


# -- helpers ----------------------------------------------------------------------------------
def mmaction_config(spec: ModelSpec, num_classes: int | None = None) -> Any:
    """mmaction2's config for ``spec`` (at its size), as a user of mmaction2 would write it:
    the wheel's config plus the entry's cfg-options, input size and class count (the entry's
    label set unless ``num_classes`` is given); the head averages raw scores, which for one
    view are the logits."""
    from mmengine.config import Config

    cfg = Config.fromfile(str(configs_dir() / spec.arch["config"]))
    options = copy.deepcopy(spec.arch.get("cfg_options", {}))
    for key, field in INPUT_SIZE_FIELDS.get(spec.adapter, {}).items():
        options[key] = getattr(spec, field)
    options["model.cls_head.num_classes"] = num_classes or len(spec.label_names())
    options["model.cls_head.average_clips"] = "score"
    cfg.merge_from_dict(options)
    return cfg


def mmaction_scores(recognizer: Any, frames: torch.Tensor) -> torch.Tensor:
    """Class scores from mmaction2's test path (its data_preprocessor included) for uint8
    clips ``[B, 3, T, H, W]``, one sample per call as mmaction's inference does."""
    from mmaction.structures import ActionDataSample

    two_d = type(recognizer).__name__ == "Recognizer2D"
    scores = []
    with torch.no_grad():
        for clip in frames:
            # The test pipeline's FormatShape gives NCHW (frames as segments) or NCTHW (clips).
            sample = clip.transpose(0, 1).contiguous() if two_d else clip.unsqueeze(0)
            result = recognizer.test_step({"inputs": [sample],
                                           "data_samples": [ActionDataSample()]})
            scores.append(result[0].pred_score.reshape(-1))
    return torch.stack(scores)


def randomise_bn_stats(net: torch.nn.Module) -> None:
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)


def uint8_clips(spec: ModelSpec, batch: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (batch, 3, spec.frames, spec.size, spec.size),
                         generator=generator, dtype=torch.uint8)


def runner_checkpoint(net: torch.nn.Module, **extra: Any) -> dict[str, Any]:
    """A checkpoint as mmengine's runner makes it (weights, meta and any ``extra`` parts)."""
    from mmengine.runner.checkpoint import get_state_dict, weights_to_cpu

    return {"meta": {"epoch": 3, "iter": 120, "mmengine_version": "0.10.7"},
            "state_dict": weights_to_cpu(get_state_dict(net)), **extra}


def write_mmengine_checkpoint(net: torch.nn.Module, path: Path, **extra: Any) -> None:
    from mmengine.runner.checkpoint import save_checkpoint

    save_checkpoint(runner_checkpoint(net, **extra), str(path))


class RegistryMapping:
    """An in-process plugin that contributes registry entries."""

    def __init__(self, item: str | dict[str, Any]) -> None:
        self.item = item

    @hookimpl
    def leaps_register_models(self, register: Any) -> None:
        register(self.item)


# -- mmaction2's own inference is the reference -------------------------------------------------
@pytest.mark.parametrize("name", FAMILY_ENTRIES)
def test_logits_equal_mmaction_inference(name: str, tmp_path: Path) -> None:
    """A checkpoint made by mmaction2 gives the same logits through leaps (pixels in [0, 1],
    normalised by the core) as through mmaction2's init_recognizer and test path (uint8 frames,
    normalised by the config's data_preprocessor)."""
    from mmaction.apis import init_recognizer

    spec = load_registry().get(name).at_reduced_size()
    torch.manual_seed(0)
    made = init_recognizer(mmaction_config(spec), None, device="cpu")
    randomise_bn_stats(made)
    path = tmp_path / "mmaction.pth"
    write_mmengine_checkpoint(made, path)

    peer = init_recognizer(mmaction_config(spec), str(path), device="cpu")
    ours = build_model(name, reduced=True, checkpoint=path)
    frames = uint8_clips(spec)
    expected = mmaction_scores(peer, frames)
    with torch.no_grad():
        logits = ours(frames.float() / 255)
    assert logits.shape == expected.shape == (2, len(spec.label_names()))
    assert expected.std() > 1e-3, "degenerate reference logits; the comparison would be vacuous"
    diff = (logits - expected).abs().max().item()
    assert diff <= 1e-4, f"{name}: logits differ from mmaction2's by {diff:.3g}"


# -- tap layouts ------------------------------------------------------------------------------
def _channel_layer_norm(video: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    channels_last = video.permute(0, 2, 3, 4, 1)
    return torch.nn.functional.layer_norm(channels_last, norm.normalized_shape, norm.weight,
                                          norm.bias, norm.eps).permute(0, 4, 1, 2, 3)


def _patches_as_video(name: str, net: Any, x: torch.Tensor) -> torch.Tensor:
    """What the first tap's input holds, computed as video straight from the family's patch
    embedding (positional embeddings zeroed), i.e. without any token bookkeeping."""
    backbone = net.backbone
    if name == "mmaction.swin_t":
        return backbone.patch_embed(x)
    if name == "mmaction.mvitv2_s":
        assert backbone.patch_embed.norm is None
        return backbone.patch_embed.projection(x)
    if name == "mmaction.uniformerv2_b":
        return _channel_layer_norm(backbone.conv1(x), backbone.ln_pre)
    if name == "mmaction.timesformer":
        batch, _, frames = x.shape[:3]
        flat = x.transpose(1, 2).flatten(0, 1)
        patches = backbone.patch_embed.projection(flat)
        return patches.reshape(batch, frames, *patches.shape[1:]).transpose(1, 2)
    raise KeyError(name)


@pytest.mark.parametrize("name", ["mmaction.swin_t", "mmaction.mvitv2_s",
                                  "mmaction.uniformerv2_b", "mmaction.timesformer"])
def test_token_taps_keep_the_patch_layout(name: str) -> None:
    """The tap conversion puts every token back at its own (t, h, w): applied to the first
    block's input it reproduces the patch embedding computed as video."""
    model = build_model(name, reduced=True)
    with torch.no_grad():
        for key in ("positional_embedding", "pos_embed", "time_embed"):
            if hasattr(model.net.backbone, key):
                getattr(model.net.backbone, key).zero_()
    first = model.taps[0]
    seen: list[Any] = []
    handle = first.module.register_forward_pre_hook(lambda _module, args: seen.append(args))
    x = model.normalize(torch.rand(2, *model.spec.shape))
    try:
        with torch.no_grad():
            model.net(x.unsqueeze(1), mode="tensor", stage="head")
            expected = _patches_as_video(name, model.net, x)
    finally:
        handle.remove()
    # An MViT block passes (tokens, grid) on, as its output; the others take tokens first.
    got = first.to_video(seen[0] if name == "mmaction.mvitv2_s" else seen[0][0])
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-5), f"{name}: tokens land in the wrong places"


def test_frame_taps_regroup_segments() -> None:
    """TSM runs frames as a batch; its taps put frame t of sample b at [b, :, t]."""
    model = build_model("mmaction.tsm_r50", reduced=True)
    stem = model.taps[0]
    x = model.normalize(torch.rand(2, *model.spec.shape))
    with torch.no_grad():
        flat = stem.module(x.transpose(1, 2).flatten(0, 1))
        video = stem.to_video(flat)
        for t in range(model.spec.frames):
            assert torch.allclose(video[:, :, t], stem.module(x[:, :, t]), atol=1e-6)


# -- the registry agrees with the installed wheel -------------------------------------------
def _test_pipeline_input(cfg: Any) -> tuple[int, int]:
    frames = size = None
    for step in cfg.test_pipeline:
        if step["type"] in ("SampleFrames", "UniformSample"):
            # TSN-style sampling takes clip_len=1 from each of num_clips segments.
            frames = step["clip_len"] if step["clip_len"] > 1 else step["num_clips"]
        if step["type"] in ("CenterCrop", "ThreeCrop", "TenCrop"):
            size = step["crop_size"]
    assert frames is not None and size is not None, "test pipeline has no sampling or crop step"
    return frames, size


@pytest.mark.parametrize("name", USABLE)
def test_entry_matches_config_and_model_zoo(name: str) -> None:
    """Frames and crop come from the config's test pipeline, mean/std from its
    data_preprocessor, the checkpoint from the model zoo's metafile for that config, and its
    sha256 prefix from the file name (OpenMMLab's publish tool appends it)."""
    from mmengine.config import Config

    spec = MMACTION[name]
    config = spec.arch["config"]
    cfg = Config.fromfile(str(configs_dir() / config))
    assert (spec.frames, spec.size) == _test_pipeline_input(cfg)
    preprocessor = cfg.model.data_preprocessor
    assert spec.value_range == 255
    assert list(spec.mean) == pytest.approx(preprocessor.mean)
    assert list(spec.std) == pytest.approx(preprocessor.std)

    metafile = yaml.safe_load((configs_dir() / Path(config).parent / "metafile.yml").read_text())
    weights = [m["Weights"] for m in metafile["Models"]
               if m["Config"].replace(".py.py", ".py") == f"configs/{config}"]
    assert spec.checkpoint is not None and spec.checkpoint.url in weights, (
        f"{name}: {spec.checkpoint} is not a model-zoo checkpoint of {config}: {weights}")
    assert re.search(rf"-{spec.checkpoint.sha256}\.pth$", spec.checkpoint.url)


def test_every_family_has_a_default_entry() -> None:
    """``--adapter mmaction.<family>`` alone selects a usable entry of that family."""
    registry = load_registry()
    for adapter in ADAPTERS:
        spec = registry.resolve(adapter=adapter.name)
        assert spec.adapter == adapter.name and spec.unavailable is None
    assert registry.resolve(adapter="mmaction.swin").name == "mmaction.swin_t"


def test_rev_mvit_is_listed_but_unavailable() -> None:
    spec = MMACTION["mmaction.rev_mvit_b"]
    assert spec.paper == "rev-MViT-B" and spec.unavailable
    assert (spec.leaps.lambda_1, spec.leaps.lambda_L, spec.leaps.r) == (0.625, 0.1, 5e-3)
    with pytest.raises(LeapsError, match="reversible MViT"):
        build_model("mmaction.rev_mvit_b", reduced=True)


def test_missing_drn_stand_in_explains_itself() -> None:
    import_mmaction_models()
    from mmaction.registry import MODELS

    with pytest.raises(LeapsError, match="2714"):
        MODELS.build({"type": "DRN"})


# -- native checkpoints ---------------------------------------------------------------------
def test_runner_checkpoint_with_bookkeeping_loads(tmp_path: Path) -> None:
    """A checkpoint as mmaction2 trains and publishes it (message hub history, numpy scalars,
    scheduler state beside the weights; zip or legacy format) loads with identical logits."""
    import numpy as np
    from mmengine.logging import MessageHub

    model = build_model("mmaction.x3d_m", reduced=True)
    randomise_bn_stats(model.net)
    hub = MessageHub.get_instance("leaps-test")
    hub.update_scalar("train/loss", 0.25)
    hub.update_info("iter", np.int64(120))
    bookkeeping = {"message_hub": hub.state_dict(),
                   "param_schedulers": [{"last_step": 120, "base_values": [np.float64(0.1)]}]}
    path = tmp_path / "runner.pth"
    write_mmengine_checkpoint(model.net, path, **bookkeeping)
    # OpenMMLab's publish tool re-saves in torch's legacy (non-zip) format.
    legacy = tmp_path / "published.pth"
    torch.save(runner_checkpoint(model.net, **bookkeeping), legacy,
               _use_new_zipfile_serialization=False)

    video = torch.rand(1, *model.spec.shape)
    for checkpoint in (path, legacy):
        loaded = build_model("mmaction.x3d_m", reduced=True, checkpoint=checkpoint)
        with torch.no_grad():
            assert torch.equal(model(video), loaded(video))


def test_checkpoint_that_runs_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "was-run"

    class Payload:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.mkdir, (str(marker),))

    model = build_model("mmaction.x3d_m", reduced=True)
    path = tmp_path / "payload.pth"
    write_mmengine_checkpoint(model.net, path, extra=Payload())
    with pytest.raises(LeapsError, match=r"cannot read checkpoint .*it pickles \w+\.mkdir"):
        build_model("mmaction.x3d_m", reduced=True, checkpoint=path)
    assert not marker.exists()


def test_bookkeeping_allowance_is_the_mmaction_adapters_own(tmp_path: Path) -> None:
    """mmaction's checkpoint_safe_globals apply to its own checkpoints only: another family's
    loader still refuses the numpy scalars that mmengine's runner pickles, naming them."""
    import numpy as np

    model = build_model("torchvision.r3d_18", reduced=True)
    path = tmp_path / "r3d.pth"
    torch.save({"meta": {"iter": np.int64(120)}, "state_dict": model.net.state_dict()}, path)
    build_model("mmaction.x3d_m", reduced=True)  # the mmaction adapters are in use
    with pytest.raises(LeapsError, match=r"it pickles numpy\.\S*scalar, which leaps does not "):
        build_model("torchvision.r3d_18", reduced=True, checkpoint=path)


def test_checkpoint_of_another_model_names_the_keys(tmp_path: Path) -> None:
    model = build_model("mmaction.x3d_m", reduced=True)
    state = dict(model.net.state_dict())
    del state["cls_head.fc2.weight"]
    state["backbone.extra.weight"] = torch.zeros(3)
    path = tmp_path / "other.pth"
    torch.save({"meta": {"epoch": 1}, "state_dict": state}, path)
    with pytest.raises(LeapsError) as error:
        build_model("mmaction.x3d_m", reduced=True, checkpoint=path)
    message = str(error.value)
    assert "missing: cls_head.fc2.weight" in message
    assert "unexpected: backbone.extra.weight" in message


def test_distributed_checkpoint_prefix_is_removed(tmp_path: Path) -> None:
    model = build_model("mmaction.slowonly_r50", reduced=True)
    randomise_bn_stats(model.net)
    state = {f"module.{key}": value for key, value in model.net.state_dict().items()}
    path = tmp_path / "ddp.pth"
    torch.save({"meta": {}, "state_dict": state}, path)
    loaded = build_model("mmaction.slowonly_r50", reduced=True, checkpoint=path)
    video = torch.rand(1, *model.spec.shape)
    with torch.no_grad():
        assert torch.equal(model(video), loaded(video))


def test_saved_checkpoint_is_mmengine_native(tmp_path: Path) -> None:
    """What leaps saves is an mmengine checkpoint whose recorded config rebuilds the
    recognizer in mmaction2 with the same logits."""
    from mmaction.apis import init_recognizer
    from mmengine.config import Config

    from leaps.plugins import get_host

    model = build_model("mmaction.tsm_r50", reduced=True)
    randomise_bn_stats(model.net)
    path = tmp_path / "saved.pth"
    get_host().adapter("mmaction.tsm")().save_checkpoint(model.net, path)
    saved = torch.load(path, weights_only=True)
    assert set(saved) == {"meta", "state_dict"}
    assert saved["meta"]["mmaction_version"]
    assert {key.split(".")[0] for key in saved["state_dict"]} == {"backbone", "cls_head"}

    cfg = Config.fromstring(saved["meta"]["cfg"], ".py")
    cfg.model.cls_head.average_clips = "score"
    peer = init_recognizer(cfg, str(path), device="cpu")
    spec = load_registry().get("mmaction.tsm_r50").at_reduced_size()
    frames = uint8_clips(spec, batch=1)
    with torch.no_grad():
        logits = model(frames.float() / 255)
    assert (logits - mmaction_scores(peer, frames)).abs().max() <= 1e-4


# -- a model fine-tuned on the user's own classes -------------------------------------------
FINE_TUNED_CLASSES = ["pouring tea", "slicing bread", "stirring", "whisking", "washing dishes"]


@pytest.fixture(scope="module")
def fine_tuned_swin(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A Video Swin fine-tuned on five classes, as mmaction2 leaves it: the recognizer built by
    init_recognizer from the wheel's config with a five-class head, written by mmengine's
    save_checkpoint (state_dict + meta); and the class file a user passes with --labels."""
    from mmaction.apis import init_recognizer

    root = tmp_path_factory.mktemp("fine-tuned")
    spec = load_registry().get("mmaction.swin_t").at_reduced_size()
    torch.manual_seed(8)
    recognizer = init_recognizer(mmaction_config(spec, num_classes=len(FINE_TUNED_CLASSES)),
                                 None, device="cpu")
    checkpoint = root / "swin_kitchen.pth"
    write_mmengine_checkpoint(recognizer, checkpoint)
    labels = root / "kitchen.txt"
    labels.write_text("\n".join(FINE_TUNED_CLASSES) + "\n", encoding="utf-8")
    return {"spec": spec, "recognizer": recognizer, "checkpoint": checkpoint, "labels": labels}


def test_fine_tuned_checkpoint_loads_with_its_labels(fine_tuned_swin: dict[str, Any]) -> None:
    """With --labels the classifier is sized to the file's classes, and the logits are
    mmaction2's own for the fine-tuned recognizer."""
    model = build_model("mmaction.swin_t", reduced=True, checkpoint=fine_tuned_swin["checkpoint"],
                        labels=fine_tuned_swin["labels"])
    assert model.labels == tuple(FINE_TUNED_CLASSES)
    frames = uint8_clips(fine_tuned_swin["spec"])
    expected = mmaction_scores(fine_tuned_swin["recognizer"], frames)
    with torch.no_grad():
        logits = model(frames.float() / 255)
    assert logits.shape == expected.shape == (2, len(FINE_TUNED_CLASSES))
    assert expected.std() > 1e-3, "degenerate reference logits; the comparison would be vacuous"
    assert (logits - expected).abs().max() <= 1e-4


def test_fine_tuned_checkpoint_without_labels_names_the_mismatch(
        fine_tuned_swin: dict[str, Any]) -> None:
    with pytest.raises(LeapsError) as error:
        build_model("mmaction.swin_t", reduced=True, checkpoint=fine_tuned_swin["checkpoint"])
    message = str(error.value)
    assert "\n" not in message
    assert ("shape mismatch (checkpoint vs model): cls_head.fc_cls.weight (5, 128) vs (400, 128),"
            " cls_head.fc_cls.bias (5,) vs (400,)") in message
    assert "missing" not in message and "unexpected" not in message
    assert message.endswith("pass --labels FILE with the model's classes")


def test_cli_inverts_the_fine_tuned_model(fine_tuned_swin: dict[str, Any],
                                          tmp_path: Path) -> None:
    """`leaps invert --adapter mmaction.swin --checkpoint PATH --labels FILE` targets the
    user's classes; without --labels it stops on one line (exit 2) and writes nothing."""
    from click.testing import CliRunner

    from leaps.adapter import sha256_file
    from leaps.cli import cli

    checkpoint, labels = str(fine_tuned_swin["checkpoint"]), str(fine_tuned_swin["labels"])
    out = tmp_path / "run"
    options = ["invert", "--adapter", "mmaction.swin", "--reduced", "--checkpoint", checkpoint,
               "--target", "whisking", "--priming-weight", "0", "--verifier", "none",
               "--param", "pixels", "--iterations", "2", "--quiet", "--out", str(out)]
    result = CliRunner().invoke(cli, [*options, "--labels", labels], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    record = json.loads((out / "run.json").read_text())
    assert (record["model"], record["status"]) == ("mmaction.swin_t", "done")
    assert (record["labels"], record["target_names"]) == (labels, ["whisking"])
    assert record["target_indices"] == [FINE_TUNED_CLASSES.index("whisking")]
    assert record["checkpoint_sha256"] == sha256_file(checkpoint)
    assert (out / "sample_0_whisking.gif").is_file()

    shutil.rmtree(out)
    result = CliRunner().invoke(cli, options)
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: checkpoint ")
    assert "cls_head.fc_cls.weight (5, 128) vs (400, 128)" in result.stderr
    assert "--labels" in result.stderr
    assert not out.exists()


# -- users' own configs ---------------------------------------------------------------------
# A user's config on top of a wheel config, named by its absolute path (mmengine's
# "mmaction::" shorthand needs pkg_resources, which setuptools >= 81 no longer ships).
TINY_X3D = f"""_base_ = ['{configs_dir()}/recognition/x3d/x3d_m_16x5x1_facebook-kinetics400-rgb.py']
model = dict(backbone=dict(gamma_d=0.4), cls_head=dict(fc1_bias=True))
"""


def _entry(config: str, **overrides: Any) -> dict[str, Any]:
    entry = {"adapter": "mmaction.x3d", "arch": {"config": config},
             "input": {"frames": 4, "size": 32, "mean": [114.75, 114.75, 114.75],
                       "std": [57.38, 57.38, 57.38], "value_range": 255},
             "labels": ["falling", "jumping", "waving"], "verifier": "mmaction.slowonly_r50",
             "leaps": {"lambda_1": 0.75, "lambda_L": 0.1, "r": 1e-3}}
    entry.update(overrides)
    return entry


def test_own_config_file_from_a_registry_mapping(tmp_path: Path) -> None:
    config = tmp_path / "tiny_x3d.py"
    config.write_text(TINY_X3D)
    mapping = {"models": {
        "mine.tiny_x3d": _entry(str(config)),
        "mine.tiny_x3d_shallower": _entry(str(config), arch={
            "config": str(config), "cfg_options": {"model.backbone.gamma_d": 0.2}}),
    }}
    with registered_plugin(RegistryMapping(mapping), "mine"):
        model = build_model("mine.tiny_x3d")
        assert model.net.backbone.gamma_d == 0.4 and model.net.cls_head.fc1.bias is not None
        assert model.labels == ("falling", "jumping", "waving")
        with torch.no_grad():
            assert model(torch.rand(1, *model.spec.shape)).shape == (1, 3)
        check_taps(model)
        shallower = build_model("mine.tiny_x3d_shallower")
        assert len(shallower.taps) < len(model.taps)


def test_own_config_relative_to_its_registry_file(tmp_path: Path, monkeypatch: Any) -> None:
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "tiny_x3d.py").write_text(TINY_X3D)
    registry_file = tmp_path / "models.yaml"
    registry_file.write_text(yaml.safe_dump({"models": {"mine.relative": _entry(
        "configs/tiny_x3d.py")}}))
    monkeypatch.chdir(Path(__file__).parent)
    with registered_plugin(RegistryMapping(str(registry_file)), "mine"):
        model = build_model("mine.relative")
        assert model.net.cfg.filename == str((tmp_path / "configs" / "tiny_x3d.py").resolve())


def test_reduced_cfg_options_merge_into_the_entrys() -> None:
    """At the reduced size an entry keeps its own cfg-options: the reduced ones are merged in
    key by key, so the suite builds the entry's variant, only smaller."""
    config = "recognition/x3d/x3d_m_16x5x1_facebook-kinetics400-rgb.py"
    entry = _entry(config, arch={"config": config,
                                 "cfg_options": {"model.cls_head.fc1_bias": True}},
                   reduced={"arch": {"cfg_options": {"model.backbone.gamma_d": 0.4}}})
    with registered_plugin(RegistryMapping({"models": {"mine.merged": entry}}), "mine"):
        full = build_model("mine.merged")
        reduced = build_model("mine.merged", reduced=True)
    assert full.net.cls_head.fc1.bias is not None and full.net.backbone.gamma_d == 2.2
    assert reduced.net.cls_head.fc1.bias is not None and reduced.net.backbone.gamma_d == 0.4


@pytest.mark.parametrize(("overrides", "expected"), [
    ({"arch": {"config": "recognition/x3d/x3d_m_16x5x1_facebook-kinetics400.py"}},
     "did you mean recognition/x3d/x3d_m_16x5x1_facebook-kinetics400-rgb.py"),
    ({"adapter": "mmaction.swin"}, "builds a X3D backbone.*use adapter mmaction.x3d"),
    ({"input": {"frames": 4, "size": 32, "mean": [0.485, 0.456, 0.406],
                "std": [0.229, 0.224, 0.225]}}, "differ from the data_preprocessor"),
    ({"arch": {"config": "recognition/x3d/x3d_m_16x5x1_facebook-kinetics400-rgb.py",
               "cfg_options": {"model.backbone.no_such_option": 1}}}, "cannot build"),
    ({"arch": {"config": "recognition/x3d/x3d_m_16x5x1_facebook-kinetics400-rgb.py",
               "depth": 2}}, "unknown arch field"),
])
def test_config_mistakes_are_explained(overrides: dict[str, Any], expected: str) -> None:
    entry = _entry("recognition/x3d/x3d_m_16x5x1_facebook-kinetics400-rgb.py", **overrides)
    with registered_plugin(RegistryMapping({"models": {"mine.broken": entry}}), "mine"), \
            pytest.raises(LeapsError, match=expected):
        build_model("mine.broken")


def test_size_options_follow_the_entry(tmp_path: Path) -> None:
    """Positional embeddings are built for the entry's input, and a conflicting cfg-option is
    reported rather than silently overridden."""
    spec = load_registry().get("mmaction.timesformer").at_reduced_size()
    model = build_model("mmaction.timesformer", reduced=True)
    assert model.net.backbone.num_frames == spec.frames
    assert tuple(model.net.backbone.patch_embed.img_size) == (spec.size, spec.size)
    entry = {**_entry(spec.arch["config"]), "adapter": "mmaction.timesformer",
             "arch": {**spec.arch, "cfg_options": {**spec.arch["cfg_options"],
                                                   "model.backbone.num_frames": 8}},
             "input": {"frames": 4, "size": 32, "mean": [127.5] * 3, "std": [127.5] * 3,
                       "value_range": 255}}
    with registered_plugin(RegistryMapping({"models": {"mine.conflict": entry}}), "mine"), \
            pytest.raises(LeapsError, match="model.backbone.num_frames=8"):
        build_model("mine.conflict")
