"""`leaps evaluate` on real runs of two small models trained here (a 3D CNN and a (2+1)D CNN of
another adapter family): its numbers agree with a recomputation from the saved tensors, the
CLI writes what the API returns, and bad run directories give one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from leaps import metrics
from leaps.adapter import Adapter, Tap
from leaps.cli import cli
from leaps.datasets import MOTION_CLASSES, make_dataset
from leaps.demo import fit
from leaps.errors import LeapsError
from leaps.evaluate import REFERENCE_CLIPS, REFERENCE_SEED, evaluate_runs, to_markdown
from leaps.hookspecs import hookimpl
from leaps.invert import InvertConfig, invert
from leaps.registry import build_model
from leaps.testing import registered_plugin
from leaps.video import write_mp4

CLASSES = ("left", "right", "up", "down")


def _block(cin: int, cout: int, stride, kernel=(3, 3, 3)) -> nn.Module:
    return nn.Sequential(nn.Conv3d(cin, cout, kernel, stride=stride,
                                   padding=tuple(k // 2 for k in kernel), bias=False),
                         nn.BatchNorm3d(cout), nn.ReLU())


class Conv3D(Adapter):
    name = "testeval.c3d"

    def create(self, arch, num_classes, spec):
        return nn.Sequential(_block(3, 8, (1, 2, 2)), _block(8, 16, (1, 2, 2)),
                             _block(16, 32, (2, 2, 2)), nn.AdaptiveAvgPool3d(1), nn.Flatten(),
                             nn.Linear(32, num_classes))

    def taps(self, net, arch, spec):
        return [Tap(f"block{i}", net[i]) for i in range(3)]


class R2Plus1D(Adapter):
    """Factorised convolutions: spatial 1x3x3, then temporal 3x1x1."""

    name = "testeval.r2plus1d"

    def create(self, arch, num_classes, spec):
        return nn.Sequential(
            nn.Sequential(_block(3, 8, (1, 2, 2), (1, 3, 3)), _block(8, 8, 1, (3, 1, 1))),
            nn.Sequential(_block(8, 16, (1, 2, 2), (1, 3, 3)),
                          _block(16, 16, (2, 1, 1), (3, 1, 1))),
            _block(16, 32, (1, 2, 2), (1, 3, 3)),
            nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(32, num_classes))

    def taps(self, net, arch, spec):
        return [Tap(f"stage{i}", net[i]) for i in range(3)]


class EvalPlugin:
    """Two entries of two families, each the other's verifier; the (2+1)D ships its weights."""

    def __init__(self, r2plus1d_weights: Path | None = None) -> None:
        self.weights = r2plus1d_weights

    @hookimpl
    def leaps_register_adapters(self, register):
        register(Conv3D)
        register(R2Plus1D)

    @hookimpl
    def leaps_register_models(self, register):
        common = {"input": {"frames": 8, "size": 32, "mean": [0.5] * 3, "std": [0.25] * 3},
                  "labels": list(CLASSES), "leaps": {"lambda_1": 1.0, "lambda_L": 0.2, "r": 1e-3},
                  "mirrors": [["left", "right"]],
                  "opposites": [["left", "right"], ["up", "down"]]}
        r2plus1d = {**common, "adapter": "testeval.r2plus1d", "verifier": "testeval.c3d"}
        if self.weights is not None:
            r2plus1d["checkpoint"] = {"path": str(self.weights)}
        register({"models": {
            "testeval.c3d": {**common, "adapter": "testeval.c3d", "verifier": "testeval.r2plus1d"},
            "testeval.r2plus1d": r2plus1d}})


def _config(**overrides) -> InvertConfig:
    return InvertConfig(**{"iterations": 20, "lr": 0.1, "log_every": 10, **overrides})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Both models trained; run A: the 3D CNN verified by the (2+1)D, every class; run B: the
    3D CNN verifying itself, two samples per class, another seed."""
    root = tmp_path_factory.mktemp("evaluate")
    videos, labels, _ = make_dataset(48, classes=CLASSES)
    with registered_plugin(EvalPlugin(), "testeval"):
        torch.manual_seed(0)
        c3d = build_model("testeval.c3d")
        fit(c3d, videos, labels, epochs=8, lr=3e-3)
        Conv3D().save_checkpoint(c3d.net, root / "c3d.pth")
        torch.manual_seed(0)
        r2plus1d = build_model("testeval.r2plus1d")
        fit(r2plus1d, videos, labels, epochs=8, lr=1e-2)
        R2Plus1D().save_checkpoint(r2plus1d.net, root / "r2plus1d.pth")
    stimuli, stimulus_labels, _ = make_dataset(1, classes=CLASSES, seed=7)
    paths = [str(write_mp4(clip, root / f"{CLASSES[y]}.mp4"))
             for clip, y in zip(stimuli, stimulus_labels)]
    with registered_plugin(EvalPlugin(root / "r2plus1d.pth"), "testeval"):
        common = {"targets": list(CLASSES), "stimuli": paths, "checkpoint": root / "c3d.pth",
                  "progress": False}
        a = invert("testeval.c3d", config=_config(), out=root / "a", **common)
        b = invert("testeval.c3d", verifier="self", config=_config(samples=2, seed=1),
                   out=root / "b", **common)
        yield {"root": root, "a": a, "b": b, "checkpoint": root / "c3d.pth"}


def test_evaluate_agrees_with_a_recomputation_from_the_saved_tensors(runs):
    a = runs["a"].run_dir
    result = evaluate_runs([a], also=["testeval.r2plus1d"])
    run = result["runs"][0]
    m = run["metrics"]
    assert json.loads(json.dumps(result)) == result  # a plain JSON-serialisable dict

    video = torch.load(a / "video.pt", weights_only=True)
    targets = torch.tensor([CLASSES.index(t) for t in CLASSES])
    model = build_model("testeval.c3d", checkpoint=runs["checkpoint"])
    verifier = build_model("testeval.r2plus1d")
    with torch.no_grad():
        logits, v_logits = model(video), verifier(video)
        reversed_logits = model(video.flip(2))
    assert m["clips"] == 4 and run["targets"] == list(CLASSES)
    assert m["top1_model"] == pytest.approx(float((logits.argmax(1) == targets).float().mean()))
    assert m["top1_model"] == runs["a"].metrics["model_accuracy"]  # what invert measured
    assert m["top1_verifier"] == pytest.approx(
        float((v_logits.argmax(1) == targets).float().mean()))
    assert m["top1_also"]["testeval.r2plus1d"] == m["top1_verifier"]
    assert run["unseen"] == {"testeval.r2plus1d": False}  # it was the verifier: not unseen
    assert m["target_prob"] == pytest.approx(
        float(logits.softmax(1)[range(4), targets].mean()), abs=1e-6)
    assert m["target_prob"] == pytest.approx(sum(runs["a"].metrics["target_prob"]) / 4, abs=1e-6)
    opposite = torch.tensor([1, 0, 3, 2])
    assert m["motion_test_model"] == {
        "accuracy": pytest.approx(float((reversed_logits.argmax(1) == opposite).float().mean())),
        "clips": 4}
    p = logits.double().softmax(1)
    expected_is = torch.exp((p * (p.log() - p.mean(0).log())).sum(1).mean())
    assert m["inception_score_model"] == {"mean": pytest.approx(float(expected_is)),
                                          "std": 0.0, "splits": 1}

    diff = (video[:, :, 1:] - video[:, :, :-1]).abs().mean(dim=(1, 2, 3, 4))
    tv = ((video[..., 1:] - video[..., :-1]).abs().mean(dim=(1, 2, 3, 4))
          + (video[..., 1:, :] - video[..., :-1, :]).abs().mean(dim=(1, 2, 3, 4)))
    real, real_labels, _ = make_dataset(REFERENCE_CLIPS, 8, 32, REFERENCE_SEED)
    real_diff = (real[:, :, 1:] - real[:, :, :-1]).abs().mean(dim=(1, 2, 3, 4))
    per_class = {c: float(real_diff[real_labels == MOTION_CLASSES.index(c)].mean())
                 for c in CLASSES}
    assert m["frame_diff"] == pytest.approx(float(diff.mean()))
    assert m["tv"] == pytest.approx(float(tv.mean()))
    assert m["frame_diff_rel"] == pytest.approx(
        sum(float(d) / per_class[c] for d, c in zip(diff, CLASSES)) / 4)
    assert m["reference"] == "motion dataset"
    verdicts = [metrics.motion_oracle(clip, classes=CLASSES) for clip in video]
    assert [c["oracle"] for c in run["clips"]] == [v.label for v in verdicts]
    confirmed = sum(v.label == t for v, t in zip(verdicts, CLASSES))
    assert m["oracle"]["accuracy"] == confirmed / 4
    assert m["oracle"]["abstention"] == sum(v.label is None for v in verdicts) / 4
    assert sum(m["oracle"]["abstained"].values()) == sum(v.label is None for v in verdicts)
    assert m["diversity"] is None and m["diversity_groups"] == 0  # one sample per class
    assert run["iterations"] == 20 and run["verifier"] == "testeval.r2plus1d"
    assert run["random_weights"] == []  # the run's checkpoint and the shipped (2+1)D weights


def test_unseen_family_samples_and_pooling_over_runs(runs):
    a, b = runs["a"].run_dir, runs["b"].run_dir
    result = evaluate_runs([a, b], also=["testeval.r2plus1d"])
    run_a, run_b = result["runs"]
    # B was optimised with the 3D CNN alone: the (2+1)D took no part.
    assert run_b["verifier"] == "self" and run_b["unseen"] == {"testeval.r2plus1d": True}
    assert run_b["also_adapters"] == {"testeval.r2plus1d": "testeval.r2plus1d"}
    assert run_b["samples"] == 2 and run_b["metrics"]["clips"] == 8
    assert run_b["targets"] == [c for c in CLASSES for _ in range(2)]
    assert run_b["metrics"]["top1_verifier"] == run_b["metrics"]["top1_model"]

    video = torch.load(b / "video.pt", weights_only=True)
    unseen = build_model("testeval.r2plus1d")
    with torch.no_grad():
        hits = unseen(video).argmax(1) == torch.arange(4).repeat_interleave(2)
    assert run_b["metrics"]["top1_also"]["testeval.r2plus1d"] == pytest.approx(
        float(hits.float().mean()))
    pairs = [metrics.pairwise_correlation(video[2 * k:2 * k + 2]) for k in range(4)]
    assert run_b["metrics"]["diversity"] == pytest.approx(sum(pairs) / 4)
    assert run_b["metrics"]["diversity_groups"] == 4

    overall = result["overall"]
    assert overall["clips"] == 12
    flags = [c["model_top1"] == c["target"] for r in (run_a, run_b) for c in r["clips"]]
    assert overall["top1_model"] == pytest.approx(sum(flags) / 12)
    assert overall["inception_score_model"]["splits"] == 3  # 12 clips, >= 4 per split
    assert overall["inception_score_verifier"] is None      # the runs have different verifiers
    # diversity across runs: per class the 3 clips of both seeds
    video_a = torch.load(a / "video.pt", weights_only=True)
    pooled = [metrics.pairwise_correlation(torch.stack([video_a[k], video[2 * k],
                                                         video[2 * k + 1]])) for k in range(4)]
    assert overall["diversity"] == pytest.approx(sum(pooled) / 4)


def test_seconds_per_iteration_from_the_recorded_time(runs, tmp_path):
    copy = shutil.copytree(runs["a"].run_dir, tmp_path / "timed")
    record = json.loads((copy / "run.json").read_text())
    assert "steps" in record
    record["elapsed_s"] = 6.0
    (copy / "run.json").write_text(json.dumps(record))
    result = evaluate_runs([copy])
    assert result["runs"][0]["seconds_per_iteration"] == pytest.approx(6.0 / 20)


def test_a_run_of_the_registry_weights(runs, tmp_path):
    """`--checkpoint registry` (the entry's shipped weights) is what evaluation rebuilds."""
    run = invert("testeval.r2plus1d", targets=["up"], stimuli=[runs["root"] / "up.mp4"],
                 checkpoint="registry", config=_config(iterations=5), out=tmp_path / "r",
                 progress=False, on_warning=lambda _: None)
    result = evaluate_runs([run.run_dir])["runs"][0]
    assert result["verifier"] == "testeval.c3d" and result["metrics"]["clips"] == 1
    # the c3d entry ships no weights: as a verifier it is a random draw, and says so
    assert result["random_weights"] == ["testeval.c3d"]
    assert result["metrics"]["target_prob"] == pytest.approx(run.metrics["target_prob"][0],
                                                             abs=1e-6)


def test_cli_prints_the_table_and_writes_json_and_markdown(runs, tmp_path):
    a, b = runs["a"].run_dir, runs["b"].run_dir
    out_json, out_md = tmp_path / "eval.json", tmp_path / "eval.md"
    result = CliRunner().invoke(cli, ["evaluate", str(a), str(b), "--also",
                                      "testeval.r2plus1d", "--json", str(out_json),
                                      "--markdown", str(out_md)])
    assert result.exit_code == 0, result.output
    assert "leaps evaluate" in result.stdout and "all runs" in result.stdout
    written = json.loads(out_json.read_text())
    assert written == json.loads(json.dumps(evaluate_runs([a, b], also=["testeval.r2plus1d"])))
    markdown = out_md.read_text()
    assert markdown == to_markdown(written)
    rows = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert len(rows) == 4  # header, run a, run b, all runs
    first = written["runs"][0]
    top1 = f"{100 * first['metrics']['top1_model']:.0f}%"
    x = f"{first['param']} ({first['views']})"
    assert first["param"] in ("pixels", "spectrum", "warp") and first["views"] >= 1
    assert rows[1].startswith(f"| a | testeval.c3d | {x} | 4 | {top1} |")
    assert "| top-1 testeval.r2plus1d |" in rows[0]
    assert " (seen) |" in rows[1] and " (unseen) |" in rows[2]


def _damage(source: Path, target: Path, how: str) -> Path:
    run = shutil.copytree(source, target)
    record = json.loads((run / "run.json").read_text())
    if how == "no video":
        (run / "video.pt").unlink()
    elif how == "interrupted":
        record["status"] = "interrupted"
    elif how == "running":
        record["status"] = "running"
    elif how == "other version":  # written before run.json had a format, by another leaps
        record.pop("format", None)
        record["versions"]["leaps"] = "0.0.1"
    elif how == "other format":
        record["format"] = 99
    elif how == "bad field":
        record["input"] = {"frames": "eight", "size": 32}
    elif how == "missing key":
        del record["target_indices"]
    elif how == "corrupt video":
        (run / "video.pt").write_bytes(b"not a tensor file" * 10)
    elif how == "wrong shape":
        torch.save(torch.rand(1, 3, 4, 16, 16), run / "video.pt")
    elif how == "corrupt json":
        (run / "run.json").write_text("{not json")
        return run
    (run / "run.json").write_text(json.dumps(record))
    return run


@pytest.mark.parametrize("how, message", [
    ("no video", "incomplete run: video.pt is missing"),
    ("interrupted", "--resume"),
    ("running", "still running"),
    ("other version", "written by leaps 0.0.1"),
    ("other format", "run format 1"),
    ("missing key", "lacks 'target_indices'"),
    ("bad field", "input must be an object with positive integers"),
    ("corrupt video", "video.pt cannot be read"),
    ("wrong shape", "(1, 3, 4, 16, 16)"),
    ("corrupt json", "not valid JSON"),
])
def test_bad_run_directory_is_one_line_error_with_exit_2(runs, tmp_path, how, message):
    bad = _damage(runs["a"].run_dir, tmp_path / "bad", how)
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(cli, ["evaluate", str(runs["a"].run_dir), str(bad),
                                      "--json", str(out)])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert message in result.stderr and "Traceback" not in result.output
    assert not out.exists()


@pytest.mark.parametrize("make, message", [
    (lambda root: root / "nowhere", "does not exist"),
    # (a folder of runs is a sweep directory: its runs; a folder without any is not a run)
    (lambda root: (root / "plain").mkdir(exist_ok=True) or root / "plain",
     "not a leaps run directory (no run.json)"),
])
def test_not_a_run_directory(runs, make, message):
    with pytest.raises(LeapsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        evaluate_runs([make(runs["root"])])


def test_unknown_also_model_names_close_matches(runs):
    with pytest.raises(LeapsError, match="testeval.r2plus1d"):
        evaluate_runs([runs["a"].run_dir], also=["testeval.r2plus1"])
