"""End-to-end inversion on a small real model trained here, resume equivalence, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from leaps import runs
from leaps.datasets import make_dataset
from leaps.demo import fit
from leaps.errors import LeapsError
from leaps.invert import InvertConfig, Inverter, invert
from leaps.registry import build_model, load_registry
from leaps.testing import Conv3DStack, InProcessPlugin, motion_entry, registered_plugin
from leaps.video import write_mp4

CLASSES = ("left", "right", "up", "down")

# The resumable state of a run of one batch (leaps.batches).
BATCH_STATE = Path("batches", "batch_0000.state.pt")


MODEL = "testmotion.tiny3d"
PLUGIN = InProcessPlugin([Conv3DStack], {MODEL: motion_entry(
    CLASSES, [[16, [1, 2, 2]], [32, [1, 2, 2]], [32, [2, 2, 2]], [64, [1, 1, 1]]],
    mirrors=[["left", "right"]], opposites=[["left", "right"], ["up", "down"]])})


@pytest.fixture(scope="module")
def motion(tmp_path_factory):
    """The plugin registered, a model trained on the motion data, stimuli written as mp4."""
    root = tmp_path_factory.mktemp("motion")
    with registered_plugin(PLUGIN, "testmotion"):
        torch.manual_seed(0)
        model = build_model(MODEL)
        videos, labels, _ = make_dataset(64, classes=CLASSES)
        fit(model, videos, labels, epochs=10)
        checkpoint = root / "tiny3d.pth"
        Conv3DStack().save_checkpoint(model.net, checkpoint)
        stimuli, stimulus_labels, _ = make_dataset(1, classes=CLASSES, seed=7)
        paths = {}
        for clip, label in zip(stimuli, stimulus_labels):
            paths[CLASSES[label]] = write_mp4(clip, root / f"{CLASSES[label]}.mp4")
        yield {"root": root, "checkpoint": checkpoint, "stimuli": paths}


def short(**overrides) -> InvertConfig:
    return InvertConfig(**{"iterations": 40, "lr": 0.1, "log_every": 10, **overrides})


def test_inversion_reaches_the_target_and_writes_the_run(motion, tmp_path):
    out = tmp_path / "run"
    result = invert(MODEL, targets=["right", "up"],
                    stimuli=[motion["stimuli"]["right"], motion["stimuli"]["up"]],
                    checkpoint=motion["checkpoint"], config=short(), out=out, progress=False)
    assert result.labels == ["right", "up"]
    assert result.metrics["model_accuracy"] == 1.0, result.metrics
    assert min(result.metrics["target_prob"]) > 0.5
    assert result.video.shape == (2, 3, 8, 32, 32)
    assert 0 <= result.video.min() and result.video.max() <= 1
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "done" and record["steps"] == 40
    assert record["flip_mode"] == "swap"  # the label set declares left/right mirrors
    assert record["checkpoint_sha256"] and record["versions"]["torch"]
    assert len(record["history"]["priming"]) == 40
    assert set(record["config"]) >= {"lambda_1", "lambda_L", "r", "seed", "lr"}
    for name in ("video.pt", "grid.png", "loss.png", "sample_0_right.gif", "sample_1_up.mp4"):
        assert (out / name).is_file(), name
    assert not (out / "batches").exists()
    assert torch.equal(torch.load(out / "video.pt", weights_only=True), result.video)


def test_priming_pulls_tap_embeddings_toward_the_stimulus(motion):
    """With priming on, the synthesized clip's tap embeddings end up closer to the stimulus, at
    every tap. (Weight 5, not 1: after 60 steps weight 1 moves the similarities by about 0.02,
    which float rounding order can reverse; weight 5 by 0.04-0.27.)"""
    from leaps.losses import jvs
    from leaps.testing import capture_taps
    from leaps.video import read_clip

    stimulus = read_clip(motion["stimuli"]["down"], 8, 32)[None]
    similarity = {}
    for weight in (0.0, 5.0):
        result = invert(MODEL, targets=["down"], stimuli=[motion["stimuli"]["down"]],
                        checkpoint=motion["checkpoint"],
                        config=short(priming_weight=weight, iterations=60), progress=False)
        model = build_model(MODEL, checkpoint=motion["checkpoint"])
        with torch.no_grad():
            _, synth, _ = capture_taps(model, result.video)
            _, real, _ = capture_taps(model, stimulus)
        similarity[weight] = [float(jvs(s.mean(dim=(2, 3, 4)), r.mean(dim=(2, 3, 4))))
                              for s, r in zip(synth, real)]
    assert all(p > q for p, q in zip(similarity[5.0], similarity[0.0])), similarity


def test_resume_gives_the_same_result_as_an_uninterrupted_run(motion, tmp_path):
    model = build_model(MODEL, checkpoint=motion["checkpoint"])
    from leaps.video import read_clips

    clips = [read_clips([motion["stimuli"]["left"]], 8, 32)]
    config = short(iterations=30, log_every=5, save_every=5, lambda_1=1.0, lambda_L=0.2, r=1e-3,
                   jitter=0.25, jitter_end=0.0)
    whole = Inverter(model, [0], clips, config, "self").run()

    def interrupt(step, _terms):
        if step == 15:
            raise KeyboardInterrupt

    first = Inverter(model, [0], clips, config, "self")
    with pytest.raises(KeyboardInterrupt):
        first.run(on_log=interrupt, on_save=lambda s: runs.write_state(tmp_path / "state.pt", s))
    first.close()
    state = runs.read_state(tmp_path / "state.pt")
    assert state.step == 15 and len(state.history["total"]) == 15
    resumed = Inverter(model, [0], clips, config, "self").run(state)
    assert torch.equal(resumed.param, whole.param)
    assert resumed.history == whole.history


def test_nan_loss_stops_naming_the_term_and_keeps_the_last_good_state(motion, tmp_path):
    saved = []
    model = build_model(MODEL, checkpoint=motion["checkpoint"])
    config = short(lambda_1=1.0, lambda_L=0.2, r=1e-3)
    from leaps.video import read_clips

    inverter = Inverter(model, [1], [read_clips([motion["stimuli"]["right"]], 8, 32)], config,
                        "self")
    # A NaN option is refused up front (InvertConfig.validate), so poison the margin itself.
    inverter.priming.margin = torch.tensor(float("nan"))
    with pytest.raises(LeapsError, match="coherence"):
        inverter.run(on_save=saved.append)
    assert saved and saved[-1].step == 0 and torch.isfinite(saved[-1].param).all()


def test_jitter_is_constant_or_linear_to_its_end_value():
    constant = InvertConfig(iterations=5, jitter=0.125)
    assert [constant.jitter_pixels(step, 32) for step in range(5)] == [4] * 5
    annealed = InvertConfig(iterations=5, jitter=0.25, jitter_end=0.0)
    assert [annealed.jitter_pixels(step, 32) for step in range(5)] == [8, 6, 4, 2, 0]
    assert InvertConfig(iterations=1, jitter=0.25, jitter_end=0.0).jitter_pixels(0, 32) == 8
    for bad in ({"jitter": -0.1}, {"jitter_end": 1.0}):
        with pytest.raises(LeapsError, match="jitter"):
            InvertConfig(**bad).validate()


@pytest.mark.parametrize("kwargs, message", [
    ({"targets": ["rigth"]}, "did you mean 'right'"),
    ({"targets": ["9"]}, "out of range"),
    ({"targets": []}, "at least one target"),
    ({"stimuli": ["missing.mp4"]}, "missing.mp4"),
])
def test_bad_input_is_one_line_and_writes_nothing(motion, tmp_path, kwargs, message):
    args = {"targets": ["right"], "stimuli": [motion["stimuli"]["right"]],
            "checkpoint": motion["checkpoint"], **kwargs}
    out = tmp_path / "run"
    with pytest.raises(LeapsError, match=message) as info:
        invert(MODEL, config=short(), out=out, progress=False, **args)
    assert "\n" not in str(info.value)
    assert not out.exists()


def test_corrupt_stimulus_and_wrong_checkpoint(motion, tmp_path):
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00not a video" * 100)
    with pytest.raises(LeapsError, match="corrupt.mp4"):
        invert(MODEL, targets=["left"], stimuli=[corrupt], config=short(),
               progress=False)
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\nc\n")
    with pytest.raises(LeapsError, match="--labels"):
        invert(MODEL, targets=["a"], stimuli=[motion["stimuli"]["left"]],
               checkpoint=motion["checkpoint"], labels=labels, config=short(), progress=False)


def test_existing_output_directory_is_never_overwritten(motion, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(LeapsError, match="already exists"):
        invert(MODEL, targets=["left"], stimuli=[motion["stimuli"]["left"]],
               checkpoint=motion["checkpoint"], config=short(), out=out, progress=False)
    assert (out / "keep.txt").read_text() == "mine"


def test_cli_reports_bad_input_on_one_line_with_exit_2(tmp_path):
    missing = tmp_path / "nope.mp4"
    proc = subprocess.run(
        [sys.executable, "-m", "leaps.cli", "invert", "--model", "torchvision.r3d_18",
         "--reduced", "--target", "abseiling", "--stimulus", str(missing),
         "--out", str(tmp_path / "run")], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ")
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()
    proc = subprocess.run([sys.executable, "-m", "leaps.cli", "invert", "--model",
                           "torchvision.r3d_18", "--reduced", "--target", "abseilin",
                           "--stimulus", str(missing)], capture_output=True, text=True)
    assert proc.returncode == 2 and "did you mean 'abseiling'" in proc.stderr


def test_registry_defaults_fill_the_config():
    spec = load_registry().get("torchvision.r2plus1d_18")
    config = InvertConfig(r=0.5).with_registry_defaults(**vars(spec.leaps))
    assert (config.lambda_1, config.lambda_L, config.r) == (0.75, 0.1, 0.5)


def test_a_short_stimulus_is_stretched_with_a_warning(motion, tmp_path):
    clip = make_dataset(1, classes=("left",), seed=3)[0][0]
    three = write_mp4(clip[:, :3], tmp_path / "three_frames.mp4")
    warnings: list[str] = []
    result = invert(MODEL, targets=["left"], stimuli=[three],
                    checkpoint=motion["checkpoint"], config=short(iterations=2),
                    progress=False, on_warning=warnings.append)
    assert result.video.shape[2] == 8
    assert any("3 frame(s), fewer than the model's 8" in w and "stretched" in w
               for w in warnings), warnings


def test_without_stimuli_only_when_priming_is_off(motion, tmp_path):
    with pytest.raises(LeapsError, match="ships none for left.*--priming-weight 0"):
        invert(MODEL, targets=["left"], checkpoint=motion["checkpoint"],
               config=short(), progress=False)
    out = tmp_path / "run"
    # The default parameterisation keeps the stimuli's spectrum: without them, natural 1/f.
    warnings: list[str] = []
    natural = invert(MODEL, targets=["all"], checkpoint=motion["checkpoint"],
                     config=short(priming_weight=0.0), out=tmp_path / "natural",
                     progress=False, on_warning=warnings.append)
    assert natural.video.shape[0] == len(CLASSES) and 0 <= float(natural.video.min())
    assert any("no stimuli: --param spectrum takes the amplitude spectrum of natural scenes"
               in w for w in warnings), warnings
    result = invert(MODEL, targets=["all"], checkpoint=motion["checkpoint"],
                    config=short(priming_weight=0.0, param="pixels"), out=out, progress=False)
    assert result.labels == list(CLASSES)  # --target all: every class of the label set
    record = json.loads((out / "run.json").read_text())
    assert record["stimuli"] == [] and record["format"] == runs.RUN_FORMAT
    assert record["elapsed_s"] > 0
    assert set(record["history"]["priming"]) == {0.0}
    assert not list(out.glob("stimulus_*.gif"))


def test_ctrl_c_saves_the_state_and_resume_finishes_it_like_an_uninterrupted_run(tmp_path):
    """The real thing: SIGINT to a `leaps invert` process, then `leaps invert --resume`."""
    import os
    import signal
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "leaps.cli", "invert", "--model", "demo.resnet3d",
               "--target", "right", "--iterations", "150", "--log-every", "5",
               "--save-every", "5", "--verifier", "self", "--quiet"]
    whole = subprocess.run([*command, "--out", str(tmp_path / "whole")], env=env,
                           capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr
    out = tmp_path / "cut"
    # A shell that starts the suite in the background leaves SIGINT ignored, and children
    # inherit that (Python then installs no KeyboardInterrupt handler): restore the default.
    process = subprocess.Popen([*command, "--out", str(out)], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not (out / BATCH_STATE).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert f"leaps invert --resume {out}" in stderr and "Traceback" not in stderr
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "interrupted" and (out / BATCH_STATE).is_file()
    assert runs.read_state(out / BATCH_STATE).step < 150
    resumed = subprocess.run([sys.executable, "-m", "leaps.cli", "invert", "--resume", str(out),
                              "--quiet"], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((out / "run.json").read_text())["status"] == "done"
    assert torch.equal(torch.load(out / "video.pt", weights_only=True),
                       torch.load(tmp_path / "whole" / "video.pt", weights_only=True))
