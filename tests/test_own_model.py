"""Your own model in one command: an mmaction2 user's config file, the checkpoint its training
wrote and a class list, inverted, explained and listed through ``--config`` with no registry
entry; stimulus folders; ``--registry`` files.

The user's project is made here the way mmaction2 leaves one: a self-contained config (as
``tools/train.py`` dumps it into its work dir) of two backbone types, recognizers trained a few
steps through mmaction2's own ``train_step`` and written by mmengine's ``save_checkpoint`` with
the runner's bookkeeping (message hub, optimizer, schedulers), and a clips folder in the
Kinetics layout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from click.testing import CliRunner

pytest.importorskip("mmaction")
pytest.importorskip("mmengine")

from leaps_adapters.mmaction_models import import_mmaction_models

from leaps.cli import cli
from leaps.errors import LeapsError
from leaps.model_files import register_config_model
from leaps.registry import (
    build_model,
    clear_registry_files,
    load_registry,
    missing_requirements,
    reset_registry,
)
from leaps.video import class_clips, write_mp4

CLASSES = ["falling", "rising", "spinning", "waving", "pouring tea", "push_up"]
MEAN, STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]

PIPELINE = """
test_pipeline = [
    dict(type='DecordInit', io_backend='disk'),
    dict(type='SampleFrames', clip_len={clip_len}, frame_interval=2, num_clips={num_clips},
         test_mode=True),
    dict(type='DecordDecode'),
    dict(type='Resize', scale=(-1, 40)),
    dict(type='CenterCrop', crop_size=32),
    dict(type='FormatShape', input_format='{layout}'),
    dict(type='PackActionInputs'),
]
test_dataloader = dict(
    batch_size=1, num_workers=0,
    dataset=dict(type='VideoDataset', ann_file='data/test.txt',
                 data_prefix=dict(video='data/videos'), pipeline=test_pipeline,
                 test_mode=True))
default_scope = 'mmaction'
work_dir = './work_dirs/{name}'
"""

# Self-contained configs as mmaction2's tools/train.py dumps them (no _base_), small enough
# for the test suite: a 3D ResNet-18 of base width 8, and a 2D TSM ResNet-18 on 4 segments.
CONFIGS = {
    "i3d_r18_mine": """
model = dict(
    type='Recognizer3D',
    backbone=dict(type='ResNet3d', depth=18, base_channels=8, pretrained=None,
                  pretrained2d=False, conv1_kernel=(1, 7, 7), inflate=(1, 1, 1, 1),
                  zero_init_residual=False),
    cls_head=dict(type='I3DHead', num_classes=6, in_channels=64, spatial_type='avg',
                  dropout_ratio=0.5, average_clips='prob'),
    data_preprocessor=dict(type='ActionDataPreprocessor', mean={mean}, std={std},
                           format_shape='NCTHW'))
""" + PIPELINE.replace("{clip_len}", "4").replace("{num_clips}", "1").replace(
        "{layout}", "NCTHW"),
    "tsm_r18_mine": """
model = dict(
    type='Recognizer2D',
    backbone=dict(type='ResNetTSM', depth=18, num_segments=4, shift_div=8, pretrained=None,
                  pretrained2d=False,
                  norm_eval=False),
    cls_head=dict(type='TSMHead', num_classes=6, in_channels=512, num_segments=4,
                  spatial_type='avg', consensus=dict(type='AvgConsensus', dim=1),
                  dropout_ratio=0.5, average_clips='prob'),
    data_preprocessor=dict(type='ActionDataPreprocessor', mean={mean}, std={std},
                           format_shape='NCHW'))
""" + PIPELINE.replace("{clip_len}", "1").replace("{num_clips}", "4").replace(
        "{layout}", "NCHW"),
}


def write_config(folder: Path, name: str, text: str | None = None) -> Path:
    path = folder / f"{name}.py"
    body = (text or CONFIGS[name]).replace("{mean}", repr(MEAN)).replace("{std}", repr(STD))
    path.write_text(body.replace("{name}", name), encoding="utf-8")
    return path


def train_and_save(config: Path, checkpoint: Path, steps: int = 2) -> Any:
    """Build the recognizer as mmaction2 does, train it ``steps`` steps through its own
    ``train_step`` (data preprocessor, loss, optimizer wrapper), and write the checkpoint the
    way mmengine's runner does (meta with the config, state_dict, message_hub, optimizer,
    param_schedulers). Returns the trained recognizer."""
    import numpy as np
    from mmaction.registry import MODELS
    from mmaction.structures import ActionDataSample
    from mmengine.config import Config
    from mmengine.logging import MessageHub
    from mmengine.optim import OptimWrapper
    from mmengine.registry import init_default_scope
    from mmengine.runner.checkpoint import get_state_dict, save_checkpoint, weights_to_cpu

    import_mmaction_models()
    cfg = Config.fromfile(str(config))
    init_default_scope("mmaction")
    torch.manual_seed(0)
    net = MODELS.build(cfg.model)
    net.init_weights()
    net.train()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    wrapper = OptimWrapper(optimizer)
    two_d = cfg.model.type == "Recognizer2D"
    generator = torch.Generator().manual_seed(1)
    hub = MessageHub.get_instance(f"leaps-test-{config.stem}")
    for step in range(steps):
        inputs, samples = [], []
        for k in range(2):
            clip = torch.randint(0, 256, (3, 4, 32, 32), generator=generator, dtype=torch.uint8)
            inputs.append(clip.transpose(0, 1).contiguous() if two_d else clip.unsqueeze(0))
            samples.append(ActionDataSample().set_gt_label(torch.tensor([(step + k) % 6])))
        losses = net.train_step({"inputs": inputs, "data_samples": samples}, wrapper)
        hub.update_scalar("train/loss", losses["loss"].item())
    hub.update_info("iter", np.int64(steps))
    net.eval()
    save_checkpoint({
        "meta": {"epoch": 1, "iter": steps, "cfg": cfg.pretty_text, "seed": 0,
                 "experiment_name": config.stem, "mmengine_version": "0.10.7"},
        "state_dict": weights_to_cpu(get_state_dict(net)),
        "message_hub": hub.state_dict(),
        "optimizer": wrapper.state_dict(),
        "param_schedulers": [{"last_step": steps, "base_values": [np.float64(0.01)]}],
    }, str(checkpoint))
    return net


def write_clip(path: Path, seed: int, frames: int = 6) -> Path:
    generator = torch.Generator().manual_seed(seed)
    video = torch.rand(3, frames, 8, 8, generator=generator)
    video = torch.nn.functional.interpolate(video[None], size=(frames, 40, 40))[0]
    return write_mp4(video, path)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """An mmaction2 user's project: two configs, their trained checkpoints, classes.txt,
    and clips/ with both layouts (clips/<class>/*.mp4 and clips/<class>_*.mp4)."""
    root = tmp_path_factory.mktemp("project")
    made: dict[str, Any] = {"root": root, "models": {}}
    for name in CONFIGS:
        config = write_config(root, name)
        checkpoint = root / f"{name}_epoch_1.pth"
        made["models"][name] = {"config": config, "checkpoint": checkpoint,
                                "net": train_and_save(config, checkpoint)}
    labels = root / "classes.txt"
    labels.write_text("\n".join(CLASSES) + "\n", encoding="utf-8")
    made["labels"] = labels
    clips = root / "clips"
    (clips / "falling").mkdir(parents=True)
    write_clip(clips / "falling" / "a.mp4", 1)
    write_clip(clips / "falling" / "b.mp4", 2)
    (clips / "pouring_tea").mkdir()
    write_clip(clips / "pouring_tea" / "x.mp4", 3)
    write_clip(clips / "rising_01.mp4", 4)
    write_clip(clips / "push_up_01.mp4", 5)
    made["clips"] = clips
    return made


@pytest.fixture(autouse=True)
def _fresh_registry() -> Any:
    yield
    clear_registry_files()


def mmaction_logits(net: Any, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """mmaction2's own answer for uint8 clips ``[B, 3, T, H, W]``: the logits of its data
    preprocessor + recognizer (``mode='tensor'`` up to the head), and the class scores of its
    test step (the config's ``average_clips='prob'``)."""
    from mmaction.structures import ActionDataSample

    two_d = type(net).__name__ == "Recognizer2D"
    logits, scores = [], []
    with torch.no_grad():
        for clip in frames:
            sample = clip.transpose(0, 1).contiguous() if two_d else clip.unsqueeze(0)
            data = {"inputs": [sample], "data_samples": [ActionDataSample()]}
            prepared = net.data_preprocessor(data, False)
            logits.append(net(prepared["inputs"], mode="tensor", stage="head").reshape(-1))
            scores.append(net.test_step(data)[0].pred_score.reshape(-1))
    return torch.stack(logits), torch.stack(scores)


# -- the model the config describes -------------------------------------------------------
@pytest.mark.parametrize(("name", "adapter", "frames"), [("i3d_r18_mine", "mmaction.i3d", 4),
                                                        ("tsm_r18_mine", "mmaction.tsm", 4)])
def test_config_model_equals_mmaction_init_recognizer(project: dict[str, Any], name: str,
                                                      adapter: str, frames: int) -> None:
    """The adapter comes from the backbone type, the input from the test pipeline and the
    data_preprocessor; the logits equal mmaction2's init_recognizer + data preprocessor."""
    from mmaction.apis import init_recognizer

    files = project["models"][name]
    spec = register_config_model(files["config"], labels=project["labels"])
    assert spec.adapter == adapter and spec.verifier == "self"
    assert (spec.frames, spec.size, spec.value_range) == (frames, 32, 255.0)
    assert list(spec.mean) == MEAN and list(spec.std) == STD
    model = build_model(spec.name, checkpoint=files["checkpoint"], labels=project["labels"])
    assert model.labels == tuple(CLASSES)

    # init_recognizer(config, checkpoint) as mmaction2's demo runs it; its torch.load refuses
    # the runner's bookkeeping under torch >= 2.6 (weights_only), so the test, which made the
    # file, loads it in full and hands mmaction2 the weights the way mmengine's loader does.
    peer = init_recognizer(str(files["config"]), None, device="cpu")
    saved = torch.load(files["checkpoint"], map_location="cpu", weights_only=False)
    peer.load_state_dict(saved["state_dict"], strict=True)
    peer.eval()
    frames_u8 = torch.randint(0, 256, (2, 3, frames, 32, 32),
                              generator=torch.Generator().manual_seed(7), dtype=torch.uint8)
    expected, scores = mmaction_logits(peer, frames_u8)
    with torch.no_grad():
        logits = model(frames_u8.float() / 255)
    assert logits.shape == expected.shape == (2, len(CLASSES))
    assert expected.std() > 1e-3, "degenerate reference logits; the comparison would be vacuous"
    assert (logits - expected).abs().max() <= 1e-4
    assert (logits.softmax(dim=1) - scores).abs().max() <= 1e-5
    # the checkpoint is the trained one, not the initial weights
    _, trained = mmaction_logits(files["net"], frames_u8)
    assert torch.allclose(trained, scores, atol=1e-6)


def test_classes_from_the_head_with_a_warning(project: dict[str, Any]) -> None:
    warnings: list[str] = []
    spec = register_config_model(project["models"]["i3d_r18_mine"]["config"],
                                 on_warning=warnings.append)
    assert spec.label_names() == tuple(f"class_{i}" for i in range(6))
    assert len(warnings) == 1 and "class_0 .. class_5" in warnings[0] and "--labels" in warnings[0]


def test_frames_and_size_override_and_conflict(project: dict[str, Any], tmp_path: Path) -> None:
    i3d = project["models"]["i3d_r18_mine"]["config"]
    spec = register_config_model(i3d, frames=6, size=48, labels=project["labels"])
    assert (spec.frames, spec.size) == (6, 48)
    tsm = project["models"]["tsm_r18_mine"]["config"]
    with pytest.raises(LeapsError, match=r"^--frames 6 conflicts with model\.backbone\."
                                         r"num_segments=4 in tsm_r18_mine\.py.*drop --frames$"):
        register_config_model(tsm, frames=6, labels=project["labels"])
    broken = write_config(tmp_path, "inconsistent",
                          CONFIGS["tsm_r18_mine"].replace("num_clips=4", "num_clips=8"))
    with pytest.raises(LeapsError, match=r"inconsistent: its test pipeline gives frames 8 but "
                                         r"model\.backbone\.num_segments=4"):
        register_config_model(broken, labels=project["labels"])


@pytest.mark.parametrize(("edit", "expected"), [
    (("ResNet3d'", "ResNet2Plus1dX'"), r"builds a ResNet2Plus1dX backbone, which no adapter "
                                       r"taps \(the mmaction adapters tap: .*ResNet3d "
                                       r"\(mmaction\.i3d\).*\); pass --adapter NAME"),
    (("model = dict(", "model = dict(oops"), r"cannot read the config .*; fix it"),
    (("dict(type='CenterCrop', crop_size=32),", ""), None),
    (("dict(type='SampleFrames'", "dict(type='Decord'"),
     r"has no test pipeline SampleFrames step with clip_len .*; pass --frames N$"),
])
def test_config_mistakes_are_one_line(project: dict[str, Any], tmp_path: Path,
                                      edit: tuple[str, str], expected: str | None) -> None:
    text = CONFIGS["i3d_r18_mine"].replace(*edit)
    config = write_config(tmp_path, "edited", text)
    if expected is None:  # without a crop, the Resize scale gives the size
        assert register_config_model(config, labels=project["labels"]).size == 40
        return
    with pytest.raises(LeapsError, match=expected) as error:
        register_config_model(config, labels=project["labels"])
    assert "\n" not in str(error.value)


def test_labels_must_match_the_head(project: dict[str, Any], tmp_path: Path) -> None:
    labels = tmp_path / "five.txt"
    labels.write_text("\n".join(CLASSES[:5]), encoding="utf-8")
    with pytest.raises(LeapsError, match=r"names 5 classes but i3d_r18_mine\.py gives the "
                                         r"classifier 6 outputs"):
        register_config_model(project["models"]["i3d_r18_mine"]["config"], labels=labels)


def test_not_a_config_names_the_adapters(tmp_path: Path) -> None:
    other = tmp_path / "notes.py"
    other.write_text("x = 1\n")
    with pytest.raises(LeapsError, match=r"no installed adapter reads .*notes\.py.*adapters "
                                         r"that read config files: mmaction\.csn"):
        register_config_model(other)


def test_adapter_forces_one(project: dict[str, Any]) -> None:
    """--adapter forces an adapter on a config whose backbone it does not name: a 3D ResNet
    has the layers the SlowOnly adapter taps."""
    config = project["models"]["i3d_r18_mine"]["config"]
    spec = register_config_model(config, adapter="mmaction.slowonly", labels=project["labels"])
    assert spec.adapter == "mmaction.slowonly" and spec.arch["any_backbone"] is True
    model = build_model(spec.name, checkpoint=project["models"]["i3d_r18_mine"]["checkpoint"],
                        labels=project["labels"])
    assert model.taps[0].name == "backbone.conv1"
    with pytest.raises(LeapsError, match="adapter torchvision.r3d does not read"):
        register_config_model(config, adapter="torchvision.r3d")


# -- stimulus folders --------------------------------------------------------------------------
def test_class_clips_reads_both_layouts(project: dict[str, Any]) -> None:
    warnings: list[str] = []
    found = class_clips(project["clips"], CLASSES, warnings.append)
    clips = project["clips"]
    assert found == {"falling": [clips / "falling" / "a.mp4", clips / "falling" / "b.mp4"],
                     "pouring tea": [clips / "pouring_tea" / "x.mp4"],
                     "rising": [clips / "rising_01.mp4"],
                     "push_up": [clips / "push_up_01.mp4"]}
    assert not warnings
    with pytest.raises(LeapsError, match="holds no clips of the model's classes"):
        class_clips(project["clips"], ["jumping"])


# -- the commands ---------------------------------------------------------------------------
def invoke(args: list[str]) -> Any:
    result = CliRunner().invoke(cli, args)
    clear_registry_files()  # --registry holds for one command (one process)
    return result


def test_invert_all_targets_from_the_stimulus_folder(project: dict[str, Any],
                                                     tmp_path: Path) -> None:
    """The acceptance command, as a separate process: --config, --checkpoint, --labels,
    --target all, --stimuli; run.json records the config (path, sha256) and the verifier;
    --resume and `leaps evaluate` rebuild the model from it."""
    files = project["models"]["i3d_r18_mine"]
    out = tmp_path / "runs" / "x"
    command = [sys.executable, "-m", "leaps.cli", "invert", "--config", str(files["config"]),
               "--checkpoint", str(files["checkpoint"]), "--labels", str(project["labels"]),
               "--target", "all", "--stimuli", str(project["clips"]), "--out", str(out),
               "--iterations", "2", "--quiet"]
    env = {**os.environ, "LEAPS_STRICT_PLUGINS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "verifier self (the model itself" in done.stdout
    assert "4 clip(s) of falling, rising, pouring tea, push_up" in done.stdout
    record = json.loads((out / "run.json").read_text())
    assert record["model"] == "config:i3d_r18_mine" and record["adapter"] == "mmaction.i3d"
    assert record["verifier"] == "self" and record["stimuli_dir"] == str(project["clips"])
    saved = record["model_config"]
    assert saved["path"] == str(files["config"].resolve()) and len(saved["sha256"]) == 64
    assert record["target_names"] == ["falling", "rising", "pouring tea", "push_up"]
    assert [len(g) for g in record["stimuli"]] == [2, 1, 1, 1]
    assert record["input"] == {"frames": 4, "size": 32}

    from leaps.evaluate import evaluate_runs

    reset_registry()
    evaluated = evaluate_runs([out])
    assert [run["model"] for run in evaluated["runs"]] == ["config:i3d_r18_mine"]


def test_resume_rebuilds_the_config_model(project: dict[str, Any], tmp_path: Path) -> None:
    files = project["models"]["tsm_r18_mine"]
    out = tmp_path / "run"
    args = ["invert", "--config", str(files["config"]), "--checkpoint", str(files["checkpoint"]),
            "--labels", str(project["labels"]), "--target", "falling", "--stimulus",
            str(project["clips"] / "falling" / "a.mp4"), "--out", str(out), "--quiet",
            "--iterations", "2"]
    result = invoke(args)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "run.json").read_text())
    record["status"] = "interrupted"
    (out / "run.json").write_text(json.dumps(record))
    result = invoke(["invert", "--resume", str(out), "--iterations", "3", "--quiet"])
    assert result.exit_code == 0, result.output
    # a changed config file is refused, naming it
    record["status"] = "interrupted"
    (out / "run.json").write_text(json.dumps(record))
    copy = tmp_path / "tsm_r18_mine.py"
    copy.write_text(files["config"].read_text() + "\n# edited\n")
    record["model_config"]["path"] = str(copy)
    (out / "run.json").write_text(json.dumps(record))
    copy.write_text(copy.read_text() + "# again\n")
    result = invoke(["invert", "--resume", str(out), "--quiet"])
    assert result.exit_code == 2
    assert "changed since the run" in result.stderr and str(copy) in result.stderr


def test_target_all_with_named_stimuli(project: dict[str, Any], tmp_path: Path) -> None:
    """`--target all --stimulus CLASS=PATH ...` expands `all` before grouping the stimuli."""
    files = project["models"]["i3d_r18_mine"]
    labels = tmp_path / "two.txt"
    two = tmp_path / "two_classes.py"
    two.write_text(files["config"].read_text().replace("num_classes=6", "num_classes=2"))
    labels.write_text("fall\nrise\n")
    clips = project["clips"]
    result = invoke(["invert", "--config", str(two), "--labels", str(labels), "--target", "all",
                     "--stimulus", f"fall={clips / 'falling' / 'a.mp4'}",
                     "--stimulus", f"rise={clips / 'rising_01.mp4'}",
                     "--out", str(tmp_path / "run"), "--iterations", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["target_names"] == ["fall", "rise"]
    assert record["stimuli"] == [[str(clips / "falling" / "a.mp4")],
                                 [str(clips / "rising_01.mp4")]]
    # with more classes than stimuli, `all` is every class that has some (as with --stimuli)
    result = invoke(["invert", "--config", str(files["config"]), "--labels",
                     str(project["labels"]), "--target", "all",
                     "--stimulus", f"waving={clips / 'falling' / 'a.mp4'}",
                     "--stimulus", f"rising={clips / 'rising_01.mp4'}",
                     "--out", str(tmp_path / "run2"), "--iterations", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "run2" / "run.json").read_text())
    assert record["target_names"] == ["rising", "waving"]
    result = invoke(["invert", "--config", str(files["config"]), "--labels",
                     str(project["labels"]), "--target", "all",
                     "--stimulus", f"wavin={clips / 'falling' / 'a.mp4'}",
                     "--out", str(tmp_path / "run3"), "--iterations", "1", "--quiet"])
    assert result.exit_code == 2 and "unknown target class 'wavin'" in result.stderr
    assert "did you mean 'waving'" in result.stderr


def test_missing_class_in_the_folder(project: dict[str, Any], tmp_path: Path) -> None:
    files = project["models"]["i3d_r18_mine"]
    common = ["invert", "--config", str(files["config"]), "--labels", str(project["labels"]),
              "--checkpoint", str(files["checkpoint"]), "--target", "falling", "--target",
              "waving", "--stimuli", str(project["clips"]), "--iterations", "1", "--quiet"]
    result = invoke([*common, "--out", str(tmp_path / "a")])
    assert result.exit_code == 2 and not (tmp_path / "a").exists()
    assert "holds none for waving" in result.stderr
    assert "--priming-weight 0" in result.stderr and "Traceback" not in result.output
    # Without stimuli there is no spectrum to keep: x* in pixels (the paper's).
    result = invoke([*common, "--out", str(tmp_path / "b"), "--priming-weight", "0",
                     "--param", "pixels"])
    assert result.exit_code == 0, result.output
    assert "inverting without stimuli" in result.stderr


def test_explain_and_layers_take_the_config(project: dict[str, Any], tmp_path: Path) -> None:
    files = project["models"]["tsm_r18_mine"]
    own = ["--config", str(files["config"]), "--checkpoint", str(files["checkpoint"]),
           "--labels", str(project["labels"])]
    clip = str(project["clips"] / "falling" / "a.mp4")
    result = invoke(["explain", *own, clip, "--out", str(tmp_path / "explained")])
    assert result.exit_code == 0, result.output
    record = json.loads(next((tmp_path / "explained").glob("*/explanation.json")).read_text())
    assert record["model"] == "config:tsm_r18_mine" and record["adapter"] == "mmaction.tsm"
    assert record["model_config"]["sha256"] and record["input"] == {"frames": 4, "size": 32}
    result = invoke(["layers", *own])
    assert result.exit_code == 0, result.output
    assert "config:tsm_r18_mine (adapter mmaction.tsm) at full size: input 1x3x4x32x32 -> " \
        in " ".join(result.output.split())
    result = invoke(["layers", "--config", str(files["config"]), "--model", "x"])
    assert result.exit_code == 2 and "--config gives the model; drop --model" in result.stderr


def test_python_api_takes_the_config(project: dict[str, Any]) -> None:
    from leaps.invert import invert

    files = project["models"]["i3d_r18_mine"]
    result = invert(model_config=files["config"], checkpoint=files["checkpoint"],
                    labels=project["labels"], targets=["rising"],
                    stimuli_dir=project["clips"], config=_config(iterations=1),
                    progress=False)
    assert result.labels == ["rising"] and result.verifier == "self"
    model = build_model(model_config=files["config"], checkpoint=files["checkpoint"],
                        labels=project["labels"])
    assert model.model_name == "config:i3d_r18_mine" and model.labels == tuple(CLASSES)


def _config(**values: Any) -> Any:
    from leaps.config import InvertConfig

    return InvertConfig(**values)


# -- registry files ---------------------------------------------------------------------------
def test_registry_file_and_environment(project: dict[str, Any], tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    files = project["models"]["i3d_r18_mine"]
    entry = {"adapter": "mmaction.i3d", "arch": {"config": files["config"].name},
             "input": {"frames": 4, "size": 32, "mean": MEAN, "std": STD, "value_range": 255},
             "labels": str(project["labels"]), "verifier": "self",
             "checkpoint": {"path": files["checkpoint"].name},
             "leaps": {"lambda_1": 0.75, "lambda_L": 0.1, "r": 1e-3}}
    registry_file = project["root"] / "my_models.yaml"
    registry_file.write_text(yaml.safe_dump({"models": {"mine.i3d": entry}}))
    result = invoke(["models", "mine.*", "--registry", str(registry_file), "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [r["name"] for r in rows] == ["mine.i3d"]
    assert rows[0]["source"] == str(registry_file.resolve()) and rows[0]["usable"]

    monkeypatch.setenv("LEAPS_REGISTRY", str(registry_file))
    reset_registry()
    model = build_model("mine.i3d")
    spec = register_config_model(files["config"], labels=project["labels"])
    reference = build_model(spec.name, checkpoint=files["checkpoint"], labels=project["labels"])
    video = torch.rand(1, 3, 4, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(video), reference(video))
    out = tmp_path / "run"
    result = invoke(["invert", "--model", "mine.i3d", "--target", "waving",
                     "--priming-weight", "0", "--param", "pixels", "--iterations", "1",
                     "--quiet", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "run.json").read_text())["registry_file"] == \
        str(registry_file.resolve())

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"models": {"mine.bad": {**entry, "adapter": "mmaction.i3dd"}}}))
    monkeypatch.setenv("LEAPS_REGISTRY", str(bad))
    result = invoke(["models"])
    assert result.exit_code == 2
    assert result.stderr.strip().startswith(f"error: registry entry 'mine.bad' ({bad})")
    assert "did you mean mmaction.i3d" in result.stderr
    monkeypatch.setenv("LEAPS_REGISTRY", str(tmp_path / "missing.yaml"))
    result = invoke(["models"])
    assert result.exit_code == 2 and "LEAPS_REGISTRY names" in result.stderr
    monkeypatch.delenv("LEAPS_REGISTRY")
    result = invoke(["models", "--registry", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2 and "registry file" in result.stderr and \
        "does not exist" in result.stderr
    assert load_registry().models.get("mine.i3d") is None


# -- the README's "Your own model" commands ----------------------------------------------------
def readme_commands() -> list[str]:
    text = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    section = text.split("## Your own model", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.startswith("leaps ")]


def test_readme_lists_each_library() -> None:
    commands = readme_commands()
    for needle in ("--config my_config.py", "--model torchvision.", "--model pytorchvideo.",
                   "--model timm.", "--model transformers."):
        assert any(needle in c and c.startswith("leaps invert") for c in commands), needle
    assert any(c.startswith("leaps explain --config") for c in commands)
    assert any(c.startswith("leaps layers --config") for c in commands)


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_runs(command: str, project: dict[str, Any], tmp_path: Path,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Each README command, run as written in a folder holding the files it names (each
    family's checkpoint in its native format, trained classes.txt, clips/), at the reduced
    test size and one iteration."""
    import shlex
    import shutil

    from leaps.plugins import get_host

    monkeypatch.chdir(tmp_path)
    shutil.copytree(project["clips"], "clips")
    shutil.copy(project["labels"], "classes.txt")
    shutil.copy(project["models"]["i3d_r18_mine"]["config"], "my_config.py")
    Path("work_dirs/my_config").mkdir(parents=True)
    shutil.copy(project["models"]["i3d_r18_mine"]["checkpoint"],
                "work_dirs/my_config/epoch_50.pth")
    args = shlex.split(command)[1:]
    if "--model" in args:
        name = args[args.index("--model") + 1]
        reason = missing_requirements(load_registry().get(name))
        if reason:
            pytest.skip(f"{name}: {reason}")
        model = build_model(name, labels="classes.txt", reduced=True)
        adapter = get_host().adapter(model.adapter_name)()
        checkpoint = args[args.index("--checkpoint") + 1]
        if checkpoint.endswith("/"):  # a folder: the library's own save (save_pretrained)
            shutil.move(adapter.save_native(model.net, Path("native")), checkpoint.rstrip("/"))
        else:
            adapter.save_checkpoint(model.net, Path(checkpoint))
    if args[0] in ("invert", "explain"):
        args.append("--reduced")
    if args[0] == "invert":
        args += ["--iterations", "1", "--quiet"]
    result = invoke(args)
    assert result.exit_code == 0, (command, result.output, result.stderr)
    if args[0] == "invert":
        out = Path(args[args.index("--out") + 1])
        record = json.loads((out / "run.json").read_text())
        assert record["status"] == "done" and record["verifier"] == "self"
        assert record["target_names"] == ["falling", "rising", "pouring tea", "push_up"]


def test_own_backbone_class_gets_the_adapter_of_its_base(project: dict[str, Any], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A backbone of the user's own code (registered through the config's custom_imports, as
    mmaction2 projects do) deriving from a tapped one is tapped by that one's adapter."""
    module = tmp_path / "my_backbones_leaps_test.py"
    module.write_text(
        "from mmaction.models.backbones.resnet3d import ResNet3d\n"
        "from mmaction.registry import MODELS\n\n\n"
        "@MODELS.register_module()\n"
        "class MyWiderResNet3dLeapsTest(ResNet3d):\n"
        "    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    text = "custom_imports = dict(imports=['my_backbones_leaps_test'], " \
           "allow_failed_imports=False)\n" + CONFIGS["i3d_r18_mine"].replace(
               "type='ResNet3d'", "type='MyWiderResNet3dLeapsTest'")
    config = write_config(tmp_path, "custom_backbone", text)
    spec = register_config_model(config, labels=project["labels"])
    assert spec.adapter == "mmaction.i3d" and "any_backbone" not in spec.arch
    model = build_model(spec.name, labels=project["labels"])
    assert type(model.net.backbone).__name__ == "MyWiderResNet3dLeapsTest"
    assert model.taps[0].name == "backbone.conv1" and len(model.taps) == 9
