"""Batches as units of work and torchrun sharding: real torchrun processes on CPU (gloo)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from leaps.batches import BatchFiles, plan_batches
from leaps.invert import _progress, warn

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
LEAPS = str(Path(sys.executable).with_name("leaps"))
# 8 classes x 2 samples = 16 clips in 4 batches of 4: rank 0 runs 0 and 2, rank 1 runs 1 and 3.
RUN = ["invert", "--model", "demo.resnet3d", "--target", "all", "--samples", "2",
       "--batch-size", "4", "--iterations", "24", "--save-every", "2", "--log-every", "2",
       "--verifier", "self"]


def torchrun(*args: str, module: bool = False, **kwargs) -> subprocess.Popen:
    """``torchrun --nproc-per-node 2 --no-python leaps ARGS`` (``module``: ``-m leaps ARGS``)."""
    program = ["-m", "leaps"] if module else ["--no-python", LEAPS]
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc-per-node", "2", *program, *map(str, args)],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **kwargs)


def leaps(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([LEAPS, *map(str, args)], env=ENV, capture_output=True, text=True,
                          timeout=300)


def video(run_dir: Path) -> torch.Tensor:
    return torch.load(run_dir / "video.pt", weights_only=True)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "run"
    proc = leaps(*RUN, "--out", out)
    assert proc.returncode == 0, proc.stderr
    return out


def test_progress_and_warning_lines_are_one_write_each(monkeypatch):
    """torchrun's processes share the terminal: ``print`` there writes a line's text and its
    newline separately, and two ranks' lines ran together mid-line."""

    class Stream:
        def __init__(self) -> None:
            self.writes: list[str] = []

        def write(self, text: str) -> int:
            self.writes.append(text)
            return len(text)

        def flush(self) -> None:
            self.writes.append("<flush>")

    out, err = Stream(), Stream()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    with _progress(True, 2, 0, "leaps rank 1/2", plain=True) as update:
        update(2, {"total": 1.0, "target_prob": 0.5})
    warn("stimulus x is classified as 'y'")
    assert len(out.writes) == 2 and out.writes[1] == "<flush>", out.writes
    assert out.writes[0].startswith("leaps rank 1/2 2/2 (100%") and out.writes[0].endswith(
        "total=1 p(target)=0.50\n")
    assert err.writes == ["warning: stimulus x is classified as 'y'\n", "<flush>"]


def test_batches_cut_targets_x_samples_in_order():
    batches = plan_batches(targets=3, samples=2, batch_size=4)
    assert [b.clips for b in batches] == [((0, 0), (0, 1), (1, 0), (1, 1)), ((2, 0), (2, 1))]
    assert [b.name for b in batches] == ["batch_0000", "batch_0001"]


def test_torchrun_writes_the_run_one_process_writes(one_process, tmp_path):
    out = tmp_path / "run"
    proc = torchrun(*RUN, "--out", out)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert (video(out) - video(one_process)).abs().max() <= 1e-5
    assert stdout.count(f"{out}: 16 clip(s)") == 1  # rank 0 reports the run
    # Progress: whole lines, each naming its rank and batch, nothing run together.
    progress = stdout.splitlines()[:-1]
    assert len(progress) == 4 * 12 and all(
        re.fullmatch(r"leaps rank [01]/2 demo\.resnet3d batch [1-4]/4 \d+/24 \(\d+%, \d+ s left\)"
                     r"( \S+=\S+)+", line) for line in progress), stdout
    record = json.loads((out / "run.json").read_text())
    single = json.loads((one_process / "run.json").read_text())
    assert record["status"] == "done" and record["world_size"] == 2
    assert [(b["index"], b["rank"]) for b in record["batches"]] == [(0, 0), (1, 1), (2, 0), (3, 1)]
    assert record["metrics"]["model_top1"] == single["metrics"]["model_top1"]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in one_process.iterdir())
    evaluated = leaps("evaluate", out, "--json", tmp_path / "eval.json")
    assert evaluated.returncode == 0, evaluated.stderr
    reported = leaps("report", out, "--evaluation", tmp_path / "eval.json",
                     "--out", tmp_path / "report.html")
    assert reported.returncode == 0, reported.stderr


def test_a_killed_rank_and_resume_complete_the_run_with_no_batch_lost_or_redone(one_process,
                                                                                  tmp_path):
    out = tmp_path / "run"
    files = BatchFiles(out)
    batches = plan_batches(8, 2, 4)
    proc = torchrun(*RUN, "--out", out, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        # Rank 1 finished batch 1 and is in the middle of batch 3: kill it there.
        while not files.state_path(batches[3]).exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        victim = files.result(batches[1])["pid"]
        os.kill(victim, signal.SIGKILL)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode != 0
    before = {b.index: files.result(b)["pid"] for b in batches if files.done_path(b).exists()}
    assert 1 in before and 3 not in before, before  # killed mid-run, its first batch kept
    resumed = leaps("invert", "--resume", out, "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "done"
    assert [b["index"] for b in record["batches"]] == [0, 1, 2, 3]  # every batch, once
    for entry in record["batches"]:
        if entry["index"] in before:  # a batch done before the kill was not done again
            assert entry["pid"] == before[entry["index"]]
        else:
            assert entry["world_size"] == 1
    assert (video(out) - video(one_process)).abs().max() <= 1e-5
    assert not (out / "batches").exists()


PLAN = """\
targets: [left, right, up]
options: {iterations: 3, samples: 2, batch_size: 4, verifier: self}
models:
  demo.resnet3d: {}
  demo.x3d: {lr: 0.05}
"""


def test_sweep_shares_every_model_batch_and_skips_what_is_done(tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text(PLAN)
    out = tmp_path / "sweep"
    proc = torchrun("sweep", plan, "--out", out, "--quiet", module=True)  # python -m leaps
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    runs = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert runs == ["demo.resnet3d-seed0", "demo.x3d-seed0"]
    for name in runs:
        record = json.loads((out / name / "run.json").read_text())
        assert record["status"] == "done" and video(out / name).shape[0] == 6
        assert {b["rank"] for b in record["batches"]} == {0, 1}
    again = leaps("sweep", plan, "--out", out, "--quiet")
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("done before") == 2
    reported = leaps("report", out, "--out", tmp_path / "report.html")
    assert reported.returncode == 0, reported.stderr
    assert (tmp_path / "report.html").read_text().count("demo.x3d") >= 1


def test_a_plan_with_an_unknown_option_is_one_line(tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text("models:\n  demo.resnet3d: {iteration: 3}\n")
    proc = leaps("sweep", plan, "--out", tmp_path / "sweep")
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "'iteration'" in proc.stderr and "iterations" in proc.stderr
    assert not (tmp_path / "sweep").exists()


def test_the_example_plans_name_registry_models_and_valid_options():
    from leaps.registry import load_registry
    from leaps.sweep import read_plan

    examples = Path(__file__).resolve().parents[1] / "examples"
    demo = read_plan(examples / "sweep_demo.yaml")
    assert [r.name for r in demo] == [f"demo.{m}-seed{s}" for m in ("resnet3d", "x3d",
                                                                     "r2plus1d", "mvit")
                                      for s in (0, 1)]
    kinetics = read_plan(examples / "sweep_kinetics.yaml")
    assert len(kinetics) == 6 and {r.options["iterations"] for r in kinetics} == {2000}
    registry = load_registry()
    for run in demo + kinetics:
        registry.get(run.model)  # raises for a name the registry lacks


def test_a_plan_passes_a_stimuli_folder_and_a_verifier_checkpoint_key(tmp_path):
    """``stimuli_dir`` is `leaps invert --stimuli DIR` (here the Kinetics layout, DIR/<class>/*)."""
    import shutil

    from leaps.sweep import read_plan, run_sweep

    zoo = Path(__file__).resolve().parents[1] / "leaps" / "zoo" / "stimuli"
    for name in ("left", "right"):
        (tmp_path / "clips" / name).mkdir(parents=True)
        shutil.copy(zoo / f"{name}_1.mp4", tmp_path / "clips" / name / "a.mp4")
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"targets: [left, right]\noptions: {{iterations: 1, batch_size: 2, "
                    f"verifier: self, stimuli_dir: {tmp_path / 'clips'}}}\n"
                    "models:\n  demo.resnet3d: {}\n  demo.x3d: {verifier_checkpoint: v.pt}\n")
    assert read_plan(plan)[1].arguments["verifier_checkpoint"] == "v.pt"
    plan.write_text(plan.read_text().replace("  demo.x3d: {verifier_checkpoint: v.pt}\n", ""))
    rows = run_sweep(plan, tmp_path / "sweep", progress=False)
    assert [r["status"] for r in rows] == ["run"]
    record = json.loads((tmp_path / "sweep" / "demo.resnet3d-seed0" / "run.json").read_text())
    assert record["stimuli"] == [[str(tmp_path / "clips" / n / "a.mp4")] for n in ("left", "right")]
