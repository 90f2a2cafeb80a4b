"""The faults of a careless or hostile user, as real `leaps` processes: each gives one line and a
non-zero exit, leaves nothing half-written (or a run that `--resume` finishes), and two writers
never share a run directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from leaps import runs

STIMULI = Path(__file__).resolve().parents[1] / "leaps" / "zoo" / "stimuli"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# demo.resnet3d at 8x32x32, verified by itself: about a second of optimisation.
UNTARGETED = ["invert", "--model", "demo.resnet3d", "--verifier", "self", "--iterations", "4",
              "--log-every", "2", "--save-every", "2", "--quiet"]
DEMO = [*UNTARGETED, "--target", "right"]

# The resumable state of a run of one batch (leaps.batches).
BATCH_STATE = Path("batches", "batch_0000.state.pt")


def leaps(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "leaps.cli", *map(str, args)],
                          capture_output=True, text=True, env=ENV, timeout=300, **kwargs)


def one_line_error(proc: subprocess.CompletedProcess, *needles: str, code: int = 2) -> str:
    """The process failed with ``code`` and one ``error:`` line (no traceback) naming
    ``needles``; returns the line."""
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if not line.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# -- options: every number checked before anything is built or written ---------------------
@pytest.mark.parametrize("option, value, message", [
    ("--lr", "nan", "--lr must be a finite number"),
    ("--lr", "inf", "--lr must be a finite number"),
    ("--lr", "-0.1", "--lr must be a number > 0"),
    ("--r", "-1", "--r must be a number >= 0"),
    ("--priming-weight", "nan", "--priming-weight must be a finite number"),
    ("--warmup", "1.5", "--warmup must be a number in [0, 1)"),
    ("--priming-fraction", "0", "--priming-fraction must be a number in (0, 1]"),
    ("--iterations", "0", "--iterations must be an integer >= 1"),
    ("--samples", "-1", "--samples must be an integer >= 1"),
    ("--save-every", "0", "--save-every must be an integer >= 1"),
    ("--log-every", "0", "--log-every must be an integer >= 1"),
    ("--seed", "-3", "--seed must be an integer in [0, "),
])
def test_bad_numbers_are_refused_before_anything_is_written(tmp_path, option, value, message):
    out = tmp_path / "run"
    proc = leaps(*DEMO, option, value, "--out", out)  # the last of a repeated option counts
    one_line_error(proc, message, value)
    assert not out.exists()


def test_out_under_a_file_or_unwritable_is_refused_before_any_model(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    one_line_error(leaps(*DEMO, "--out", afile / "sub"), f"{afile}", "is a file")
    one_line_error(leaps(*DEMO, "--out", afile), "is a file, not a folder")
    assert afile.read_text() == "not a folder" and sorted(tmp_path.iterdir()) == [afile]


# -- label files: one reader, errors name the file and the line ------------------------------
def test_label_file_with_duplicates_or_not_utf8_names_the_lines(tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("left\nright\nup\ndown\nclockwise\ncounterclockwise\nleft\nshrink\n")
    out = tmp_path / "run"
    line = one_line_error(leaps(*DEMO, "--labels", labels, "--target", "all", "--out", out),
                          str(labels), "'left' on lines 1, 7")
    assert "repeats" in line and not out.exists()
    labels.write_bytes("left\ncafé\n".encode("latin-1"))
    one_line_error(leaps(*DEMO, "--labels", labels, "--out", out), str(labels), "line 2",
                   "not UTF-8", "0xe9")
    assert not out.exists()


# -- one writer per run directory --------------------------------------------------------------
def test_two_runs_into_one_out_at_once_exactly_one_runs(tmp_path):
    out = tmp_path / "same"
    procs = [subprocess.Popen([sys.executable, "-m", "leaps.cli", *UNTARGETED, "--target", target,
                               "--out", str(out)], env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for target in ("left", "up")]
    results = [(p, *p.communicate(timeout=300)) for p in procs]
    codes = sorted(p.returncode for p, _, _ in results)
    assert codes == [0, 2], [(p.returncode, err) for p, _, err in results]
    winner = next(p for p, _, _ in results if p.returncode == 0)
    loser = next(r for r in results if r[0].returncode == 2)
    line = one_line_error(subprocess.CompletedProcess(loser[0].args, 2, loser[1], loser[2]))
    assert (f"run directory {out} is in use by process {winner.pid}" in line
            or "already exists" in line), line
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "done"
    assert sorted(p.name for p in out.glob("sample_*.gif")) == [
        f"sample_0_{record['target_names'][0]}.gif"]
    assert not (out / runs.LOCK_FILE).exists() and not (out / "batches").exists()


def test_a_second_writer_is_refused_and_a_killed_runs_lock_is_taken_over(tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "leaps.cli", *DEMO, "--iterations", "400",
                              "--out", str(out)], env=ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / BATCH_STATE).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        second = leaps(*DEMO, "--out", out)
        one_line_error(second, f"run directory {out} is in use by process {first.pid}")
        resumed = leaps("invert", "--resume", out, "--quiet")
        one_line_error(resumed, f"in use by process {first.pid}")
    finally:
        first.kill()
        first.communicate()
    step = runs.read_state(out / BATCH_STATE).step
    # The lock of the killed process is stale: taken over with a word; the run finishes.
    resumed = leaps("invert", "--resume", out, "--iterations", step, "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert f"locked by process {first.pid}, which is no longer running" in resumed.stderr
    assert json.loads((out / "run.json").read_text())["status"] == "done"
    assert not (out / runs.LOCK_FILE).exists()


# -- a full disk ---------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of a given size at tmp_path/disk (root only); ``resize(kib)`` changes it."""
    mount = tmp_path / "disk"
    mount.mkdir()
    mounted: list[bool] = []

    def make(kib: int) -> Path:
        option = f"size={kib}k" if not mounted else f"remount,size={kib}k"
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", option, "tmpfs", str(mount)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here ({proc.stderr.strip()}); the "
                        "disk-full cases need root")
        mounted.append(True)
        return mount

    yield make
    if mounted:
        subprocess.run(["umount", str(mount)], capture_output=True)


def test_disk_full_at_the_first_state_removes_the_new_run_directory(small_disk):
    disk = small_disk(200)  # run.json fits, the first state.pt (clip + Adam moments) does not
    out = disk / "run"
    proc = leaps(*DEMO, "--out", out)
    one_line_error(proc, "no space left on device", f"{out}", "is removed")
    assert list(disk.iterdir()) == []


def test_disk_full_mid_run_keeps_the_last_state_and_resume_continues(small_disk, tmp_path):
    whole = leaps(*DEMO, "--iterations", "6", "--out", tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr
    disk = small_disk(500)  # one state.pt fits, not a second one beside it while replacing it
    out = disk / "run"
    proc = leaps(*DEMO, "--iterations", "6", "--out", out)
    one_line_error(proc, "no space left on device", f"leaps invert --resume {out}")
    assert runs.read_state(out / BATCH_STATE).step == 2
    assert sorted(p.name for p in out.iterdir()) == ["batches", "run.json"]
    small_disk(4096)
    resumed = leaps("invert", "--resume", out, "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert torch.equal(torch.load(out / "video.pt", weights_only=True),
                       torch.load(tmp_path / "whole" / "video.pt", weights_only=True))


# -- what users see ---------------------------------------------------------------------------
def test_no_warnings_a_user_did_not_cause(tmp_path):
    for args in (["--help"], ["models"], [*DEMO, "--out", tmp_path / "run"]):
        proc = leaps(*args)
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr == "", (args, proc.stderr)


def test_progress_without_a_terminal_is_whole_plain_lines(tmp_path):
    args = [a for a in DEMO if a != "--quiet"]
    proc = leaps(*args, "--iterations", "8", "--out", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("leaps ")]
    assert lines and lines[-1].startswith("leaps 8/8 (100%"), proc.stdout
    assert all("total=" in line and "p(target)=" in line for line in lines), proc.stdout
    assert "…" not in proc.stdout
