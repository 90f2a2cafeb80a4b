"""``leaps explain`` end to end: real encoded videos in, overlays / grids / tensors / JSON out,
on a model trained here; bad input gives one line, exit 2 and no output directory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import av
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from leaps.attribution import METHODS
from leaps.cli import cli
from leaps.datasets import make_clip, make_dataset
from leaps.demo import fit
from leaps.errors import LeapsError
from leaps.explain import explain_videos, parse_params
from leaps.registry import build_model
from leaps.testing import Conv3DStack, InProcessPlugin, motion_entry, registered_plugin
from leaps.video import read_clip, write_mp4

pytest.importorskip("captum")

CLASSES = ("left", "right", "up", "down")
MODEL = "testexplain.tiny3d"


PLUGIN = InProcessPlugin([Conv3DStack], {MODEL: motion_entry(
    CLASSES, [[16, [1, 2, 2]], [32, [1, 2, 2]], [32, [2, 1, 1]]])})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The plugin registered, a model trained for a few seconds, motion clips written as mp4
    (12 frames of 48x48: reading samples and resizes them to the model's 8x32x32)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("explain")
    with registered_plugin(PLUGIN, "testexplain"):
        torch.manual_seed(0)
        model = build_model(MODEL)
        videos, labels, _ = make_dataset(24, classes=CLASSES)
        fit(model, videos, labels, epochs=5, batch_size=16)
        checkpoint = root / "tiny.pth"
        Conv3DStack().save_checkpoint(model.net, checkpoint)
        paths = {name: write_mp4(make_clip(name, frames=12, size=48, seed=9).video,
                                 root / f"{name}.mp4") for name in CLASSES}
        yield {"root": root, "checkpoint": str(checkpoint), "videos": paths}


def test_api_writes_every_output_per_video(setup, tmp_path):
    videos = [setup["videos"]["up"], setup["videos"]["left"]]
    out = tmp_path / "explained"
    results = explain_videos(videos, MODEL, checkpoint=setup["checkpoint"], out=out)
    model = build_model(MODEL, checkpoint=setup["checkpoint"])
    assert sorted(p.name for p in out.iterdir()) == ["left", "up"]
    for video, item in zip(videos, results):
        folder = out / Path(video).stem
        assert item.directory == folder
        record = json.loads((folder / "explanation.json").read_text())
        with torch.no_grad():
            probs = model(read_clip(video, 8, 32)[None]).softmax(1)[0]
        predicted = int(probs.argmax())
        assert record["prediction"]["name"] == CLASSES[predicted]
        assert record["prediction"]["probability"] == pytest.approx(float(probs.max()), abs=1e-5)
        assert record["target"] == {"index": predicted, "name": CLASSES[predicted],
                                    "source": "predicted"}
        assert record["top5"][0]["name"] == CLASSES[predicted]
        assert len(record["top5"]) == 4
        assert record["method"] == "gradcam"
        assert record["parameters"] == {"temporal": "frame", "relu": True, "weights": "gradcam",
                                        "layer": "block2"}
        assert record["checkpoint_sha256"] and record["versions"]["torch"]
        assert len(record["temporal_profile"]) == 8
        raw = torch.load(folder / "map.pt", weights_only=True)
        assert raw.shape == (1, 8, 32, 32) and torch.equal(raw, item.attribution)
        with av.open(str(folder / "overlay.mp4")) as container:
            frames = list(container.decode(video=0))
        assert len(frames) == 8 and min(frames[0].width, frames[0].height) >= 64
        with Image.open(folder / "overlay.gif") as gif:
            assert gif.size == (96, 96) and gif.n_frames >= 2
        with Image.open(folder / "grid.png") as grid:
            assert grid.height > 3 * 96 and grid.width > 8 * 96  # rows video, map, overlay
    assert not list(tmp_path.glob(".*tmp*"))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_explains_through_the_api(setup, method):
    params = {"n_steps": 4} if method == "integrated_gradients" else \
        {"samples": 2} if method == "smoothgrad" else \
        {"iterations": 10} if method == "perturbation" else {}
    (item,) = explain_videos([setup["videos"]["right"]], MODEL, method=method, target="right",
                             params=params, checkpoint=setup["checkpoint"])
    assert item.heatmap.shape == (8, 32, 32)
    assert 0 <= item.heatmap.min() and item.heatmap.max() <= 1 and item.heatmap.max() > 0
    assert item.target_name == "right" and item.record["target"]["source"] == "given"
    assert item.record["parameters"].items() >= params.items()
    assert item.directory is None  # no out: nothing written


def test_cli_explains_with_method_parameters(setup, tmp_path):
    out = tmp_path / "ig"
    result = CliRunner().invoke(cli, [
        "explain", "--model", MODEL, "--checkpoint", setup["checkpoint"], "--method", "ig",
        "-p", "n_steps=8", "-p", "baseline=blur", "--target", "down", "--out", str(out),
        str(setup["videos"]["down"]), str(setup["videos"]["up"])])
    assert result.exit_code == 0, result.output
    assert result.stdout.count("integrated_gradients map of 'down'") == 2
    record = json.loads((out / "up" / "explanation.json").read_text())
    assert record["parameters"]["n_steps"] == 8 and record["parameters"]["baseline"] == "blur"
    assert record["target"]["name"] == "down"
    assert torch.load(out / "up" / "map.pt", weights_only=True).shape == (3, 8, 32, 32)


@pytest.mark.parametrize("args, message", [
    (["--method", "gradcm"], "unknown attribution method 'gradcm'; did you mean 'gradcam'"),
    (["--target", "dwn"], "unknown target class 'dwn'; did you mean 'down'"),
    (["--layer", "block7"], "has no layer 'block7'"),
    (["-p", "steps=3"], "gradcam has no parameter 'steps'"),
    (["--method", "perturbation", "-p", "area=2"], "area must lie in"),
    (["--method", "ig", "-p", "n_steps=many"], "parameter n_steps must be int, got 'many'"),
    (["--method", "saliency", "--layer", "block1"], "--layer applies to gradcam only"),
    (["VIDEO:missing.mp4"], "not found"),
    (["VIDEO:corrupt.mp4"], "corrupt"),
])
def test_cli_bad_input_is_one_line_exit_2_and_writes_nothing(setup, tmp_path, args, message):
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x01 not a video" * 64)
    videos = [str(setup["videos"]["up"])]
    if args[0].startswith("VIDEO:"):
        videos, args = [str(tmp_path / args[0][6:])], []
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["explain", "--model", MODEL, "--checkpoint",
                                      setup["checkpoint"], "--out", str(out), *args, *videos])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.output
    assert not out.exists()
    assert not list(tmp_path.glob(".out*"))


def test_occupied_output_directory_is_kept(setup, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(LeapsError, match="already exists"):
        explain_videos([setup["videos"]["up"]], MODEL, checkpoint=setup["checkpoint"], out=out)
    assert (out / "keep.txt").read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()  # an empty directory is fine to fill
    explain_videos([setup["videos"]["up"]], MODEL, checkpoint=setup["checkpoint"], out=empty)
    assert (empty / "up" / "explanation.json").is_file()


def test_a_failure_while_writing_leaves_no_directory(setup, tmp_path, monkeypatch):
    import leaps.video

    def broken(*_args, **_kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(leaps.video, "write_mp4", broken)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="disk full"):
        explain_videos([setup["videos"]["up"], setup["videos"]["left"]], MODEL,
                       checkpoint=setup["checkpoint"], out=out)
    assert list(tmp_path.iterdir()) == []


def test_parse_params():
    assert parse_params(["n_steps=64", "baseline=blur", "abs=false", "noise=0.2"]) == {
        "n_steps": 64, "baseline": "blur", "abs": False, "noise": 0.2}
    with pytest.raises(LeapsError, match="KEY=VALUE"):
        parse_params(["n_steps"])


def test_installed_cli_on_a_builtin_model(tmp_path):
    """The real ``leaps`` entry point in a fresh process, on a registry model at reduced size
    (bad input through the same command group is covered in-process above: a fresh process
    costs seconds of imports on this CPU)."""
    video = write_mp4(make_clip("grow", frames=10, size=40).video, tmp_path / "grow.mp4")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "leaps.cli", "explain", "--model",
                           "torchvision.r3d_18", "--reduced", "--method", "saliency", "--out",
                           str(out), str(video)], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    assert "saliency map of" in proc.stdout
    record = json.loads((out / "grow" / "explanation.json").read_text())
    assert record["model"] == "torchvision.r3d_18"
    assert record["input"] == {"frames": 4, "size": 32}
    assert torch.load(out / "grow" / "map.pt", weights_only=True).shape == (3, 4, 32, 32)
