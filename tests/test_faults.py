"""The faults of a careless or hostile user, as real `leaps` processes: each gives one line and a
non-zero exit, leaves nothing half-written (or a run that `--resume` finishes), and two writers
never share a run directory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from leaps import runs

STIMULI = Path(__file__).resolve().parents[1] / "leaps" / "zoo" / "stimuli"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# demo.resnet3d at 8x32x32, verified by itself: about a second of optimisation. The paper's
# pixel parameterisation: the small disks below are sized to its state (a clip and its Adam
# moments; the default spectrum's phases are about half that).
UNTARGETED = ["invert", "--model", "demo.resnet3d", "--verifier", "self", "--iterations", "4",
              "--log-every", "2", "--save-every", "2", "--quiet", "--preset", "paper"]
DEMO = [*UNTARGETED, "--target", "right"]

# The resumable state of a run of one batch (leaps.batches).
BATCH_STATE = Path("batches", "batch_0000.state.pt")
BATCH_DONE = Path("batches", "batch_0000.done.pt")


def leaps(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "leaps.cli", *map(str, args)],
                          capture_output=True, text=True, env=ENV, timeout=300, **kwargs)


def one_line_error(proc: subprocess.CompletedProcess, *needles: str, code: int = 2,
                   prefix: str = "error: ") -> str:
    """The process failed with ``code`` and one ``error:`` line (no traceback) naming
    ``needles``; returns the line."""
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if not line.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith(prefix), proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# -- options: every number checked before anything is built or written ---------------------
@pytest.mark.parametrize("option, value, message", [
    ("--lr", "nan", "--lr must be a finite number"),
    ("--lr", "inf", "--lr must be a finite number"),
    ("--lr", "-0.1", "--lr must be a number > 0"),
    ("--priming-fraction", "0", "--priming-fraction must be a number in (0, 1]"),
    ("--save-every", "0", "--save-every must be an integer >= 1"),
    ("--log-every", "0", "--log-every must be an integer >= 1"),
])
def test_bad_numbers_are_refused_before_anything_is_written(tmp_path, option, value, message):
    out = tmp_path / "run"
    proc = leaps(*DEMO, option, value, "--out", out)  # the last of a repeated option counts
    one_line_error(proc, message, value)
    assert not out.exists()


def test_every_numeric_option_has_a_range_and_refuses_non_finite_values():
    from dataclasses import fields

    from leaps.config import RANGES, InvertConfig
    from leaps.errors import LeapsError

    numeric = [f.name for f in fields(InvertConfig)
               if f.type.split(" |")[0] in ("int", "float")]
    assert set(numeric) == set(RANGES), "give each numeric InvertConfig field a range in RANGES"
    for name, expected in RANGES.items():
        option = "--" + name.replace("_", "-")
        below = (expected.low - 1) if expected.low is not None else None
        above = (expected.high + 1) if expected.high is not None else None
        for bad in (float("nan"), float("inf"), below, above):
            if bad is None:
                continue
            with pytest.raises(LeapsError, match=f"^{option} must be "):
                InvertConfig(**{name: bad}).validate()


def test_out_under_a_file_or_unwritable_is_refused_before_any_model(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    one_line_error(leaps(*DEMO, "--out", afile / "sub"), f"{afile}", "is a file")
    one_line_error(leaps(*DEMO, "--out", afile), "is a file, not a folder")
    assert afile.read_text() == "not a folder" and sorted(tmp_path.iterdir()) == [afile]


def test_out_on_a_read_only_file_system_is_refused_before_any_model(tmp_path):
    mount = tmp_path / "ro"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here ({proc.stderr.strip()})")
    try:
        one_line_error(leaps(*DEMO, "--out", mount / "run"), "read-only file system",
                       f"cannot write in {mount}")
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


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
    assert f"resuming with --iterations {step} (the run had 400)" in resumed.stderr
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
    # A new run into it is refused with the way to continue it; options that would make it
    # another run are refused on --resume.
    one_line_error(leaps(*DEMO, "--out", out), "already exists", f"--resume {out}")
    one_line_error(leaps("invert", "--resume", out, "--lr", "0.5"),
                   "--lr 0.5 conflicts with the run being resumed (--lr 0.1)")
    one_line_error(leaps("invert", "--resume", out, "--model", "demo.x3d"),
                   "--model demo.x3d conflicts", "demo.resnet3d")
    one_line_error(leaps("invert", "--resume", out, "--target", "left"), "--target left conflicts")
    one_line_error(leaps("invert", "--resume", out, "--iterations", "1"),
                   "--iterations 1 is fewer than the 2 steps")
    one_line_error(leaps("invert", "--resume", out, "--out", tmp_path / "x"), "--out cannot")
    resumed = leaps("invert", "--resume", out, "--target", "right", "--log-every", "2",
                    "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert torch.equal(torch.load(out / "video.pt", weights_only=True),
                       torch.load(tmp_path / "whole" / "video.pt", weights_only=True))
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["run.json", *json.loads((out / "run.json").read_text())["files"]])
    one_line_error(leaps("invert", "--resume", out), f"run {out} is finished: nothing to resume")


def test_disk_full_while_writing_outputs_keeps_the_finished_run(small_disk):
    """Issue 22: the optimisation is saved before any output; --resume only writes them."""
    disk = small_disk(250)  # run.json and the finished batch fit, not every output beside them
    out = disk / "run"
    proc = leaps(*DEMO, "--save-every", "100", "--out", out)
    one_line_error(proc, "no space left on device", "the finished optimisation is kept",
                   f"`leaps invert --resume {out}` writes the outputs")
    assert json.loads((out / "run.json").read_text())["status"] == "running"
    final = torch.load(out / BATCH_DONE, weights_only=True)
    assert final["steps"] == 4 and len(final["history"]["total"]) == 4
    assert not list(out.rglob(".*.tmp*")), "no half-written file"
    small_disk(4096)
    resumed = leaps("invert", "--resume", out, "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert "finished (4 steps); writing its outputs" in resumed.stderr
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "done" and record["steps"] == 4
    assert len(record["history"]["total"]) == 4  # not optimised again
    assert torch.equal(torch.load(out / "video.pt", weights_only=True), final["video"])
    assert sorted(p.name for p in out.iterdir()) == sorted(["run.json", *record["files"]])


# -- random weights: the same seed gives the same network, also on --resume ------------------
RANDOM = ["invert", "--model", "torchvision.r3d_18", "--reduced", "--verifier", "self",
          "--target", "abseiling", "--stimulus", STIMULI / "left_0.mp4", "--iterations", "4",
          "--log-every", "2", "--save-every", "2", "--quiet", "--preset", "paper"]


def test_random_weights_are_seeded_and_rebuilt_identically_on_resume(small_disk, tmp_path):
    first, second = (leaps(*RANDOM, "--out", tmp_path / name) for name in ("a", "b"))
    assert first.returncode == second.returncode == 0, (first.stderr, second.stderr)
    video = torch.load(tmp_path / "a" / "video.pt", weights_only=True)
    assert torch.equal(video, torch.load(tmp_path / "b" / "video.pt", weights_only=True))
    record = json.loads((tmp_path / "a" / "run.json").read_text())
    assert record["checkpoint"] is None and record["model_seed"] == 0
    # As for a trained entry (the demo zoo's weights): the same command, the same clips.
    trained = [leaps(*DEMO, "--out", tmp_path / name) for name in ("c", "d")]
    assert [p.returncode for p in trained] == [0, 0], [p.stderr for p in trained]
    assert torch.equal(torch.load(tmp_path / "c" / "video.pt", weights_only=True),
                       torch.load(tmp_path / "d" / "video.pt", weights_only=True))
    # Cut by a full disk after step 2, resumed in a new process: the network is rebuilt from
    # the seed, so the result is the uninterrupted one.
    disk = small_disk(250)  # one state (4x32x32 clip + Adam moments) fits, not two
    cut = leaps(*RANDOM, "--out", disk / "run")
    one_line_error(cut, "no space left on device", "--resume")
    assert runs.read_state(disk / "run" / BATCH_STATE).step == 2
    small_disk(4096)
    resumed = leaps("invert", "--resume", disk / "run", "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert torch.equal(torch.load(disk / "run" / "video.pt", weights_only=True), video)


# -- inputs that were accepted without a word, hints that sent users the wrong way -------------
def test_a_truncated_video_says_how_many_frames_decoded(tmp_path):
    import av
    import numpy as np

    whole = tmp_path / "whole.mp4"
    with av.open(str(whole), "w", format="mp4", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width = stream.height = 64
        stream.pix_fmt = "yuv420p"
        noise = np.random.default_rng(0).integers(0, 255, (48, 64, 64, 3), dtype=np.uint8)
        for frame in noise:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))
    data = whole.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[:len(data) // 3])
    proc = leaps(*DEMO, "--iterations", "2", "--stimulus", cut, "--out", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr
    assert f"warning: video {cut} ends early: " in proc.stderr
    assert "of the 48 it declares decode" in proc.stderr


def test_existing_directories_suggest_resume_only_where_it_can_resume(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    line = one_line_error(leaps(*DEMO, "--out", other), "already exists")
    assert "--resume" not in line and (other / "notes.txt").read_text() == "mine"
    one_line_error(leaps("invert", "--resume", other), "not a leaps run directory")
    finished = tmp_path / "finished"
    assert leaps(*DEMO, "--iterations", "2", "--out", finished).returncode == 0
    line = one_line_error(leaps(*DEMO, "--out", finished), "already exists", "finished run")
    assert "--resume" not in line


def test_only_a_head_size_mismatch_suggests_labels(tmp_path):
    zoo = STIMULI.parent
    line = one_line_error(leaps(*DEMO, "--checkpoint", zoo / "demo.x3d.safetensors",
                                "--out", tmp_path / "a"), "does not fit the model")
    assert "--labels" not in line and "family and variant" in line
    labels = tmp_path / "four.txt"
    labels.write_text("left\nright\nup\ndown\n")
    line = one_line_error(leaps(*DEMO, "--labels", labels, "--out", tmp_path / "b"),
                          "does not fit the model")
    assert "pass --labels FILE with the model's classes" in line
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_report_out_is_checked_before_any_evaluation(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    run = tmp_path / "run"
    done = leaps(*DEMO, "--out", run)
    assert done.returncode == 0, done.stderr
    started = time.monotonic()
    proc = leaps("report", run, "--out", afile / "r.html")
    one_line_error(proc, f"{afile}", "is a file")
    assert time.monotonic() - started < 30
    one_line_error(leaps("report", run, "--out", tmp_path), "is a folder")


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


# -- stopped runs: SIGTERM as Ctrl-C, SIGKILL loses no logged step, damaged states -----------
def start(*args: object, sigint: bool = False) -> subprocess.Popen:
    """A `leaps` process with progress lines on stdout (no terminal: plain lines)."""
    # A shell's background job ignores SIGINT; give the child the default handler back.
    restore = (lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)) if sigint else None
    return subprocess.Popen([sys.executable, "-m", "leaps.cli", *map(str, args)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=restore)


def wait_for_step(proc: subprocess.Popen, step: int) -> None:
    """Read ``proc``'s progress lines (``leaps N/TOTAL ...``) until one reaches ``step``."""
    for line in proc.stdout:
        if line.startswith("leaps ") and int(line.split()[1].split("/")[0]) >= step:
            return
    raise AssertionError(f"the run ended before step {step}: {proc.stderr.read()}")


def stopped(proc: subprocess.Popen, code: int, *needles: str) -> str:
    _, err = proc.communicate(timeout=120)
    return one_line_error(subprocess.CompletedProcess(proc.args, proc.returncode, "", err),
                          *needles, code=code, prefix="")


PLAIN = [a for a in DEMO if a != "--quiet"]


def test_sigterm_saves_like_ctrl_c_and_resume_loses_no_logged_step(tmp_path):
    """Issue 21: SIGTERM mid-run saves the last logged step, marks the run interrupted and
    exits 143; --resume (run.json says running meanwhile) ends where an unstopped run ends."""
    whole = leaps(*DEMO, "--iterations", "60", "--log-every", "3", "--out", tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr
    out = tmp_path / "run"
    proc = start(*PLAIN, "--iterations", "60", "--log-every", "3", "--save-every", "1000",
                 "--out", out)
    wait_for_step(proc, 12)
    proc.send_signal(signal.SIGTERM)
    line = stopped(proc, 143, f"terminated (SIGTERM); the state is saved: continue with "
                              f"`leaps invert --resume {out}`")
    assert line.startswith("terminated")
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
    state = runs.read_state(out / BATCH_STATE)
    assert state.step >= 12 and state.step % 3 == 0 and len(state.history["total"]) == state.step
    resumed = start("invert", "--resume", out)
    wait_for_step(resumed, state.step + 3)
    assert json.loads((out / "run.json").read_text())["status"] == "running"  # issue 21.6
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "done" and record["steps"] == 60
    assert len(record["history"]["total"]) == 60
    assert torch.equal(torch.load(out / "video.pt", weights_only=True),
                       torch.load(tmp_path / "whole" / "video.pt", weights_only=True))


def test_sigkill_then_resume_keeps_a_history_entry_per_step(tmp_path):
    """Issue 23.1: a periodic save between log steps holds the history up to its step."""
    out = tmp_path / "run"
    proc = start(*PLAIN, "--iterations", "60", "--log-every", "5", "--save-every", "7",
                 "--out", out)
    wait_for_step(proc, 15)
    proc.kill()
    proc.communicate()
    state = runs.read_state(out / BATCH_STATE)
    assert state.step % 7 == 0 and state.step >= 14, state.step
    assert len(state.history["total"]) == state.step
    resumed = leaps("invert", "--resume", out, "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    record = json.loads((out / "run.json").read_text())
    assert record["steps"] == 60 and len(record["history"]["total"]) == 60


def test_ctrl_c_before_the_run_directory_exists_says_nothing_was_written(tmp_path):
    out = tmp_path / "run"
    proc = start(*DEMO, "--out", out, sigint=True)
    time.sleep(0.3)  # still importing / building the model
    proc.send_signal(signal.SIGINT)
    line = stopped(proc, 130, "interrupted; ", "nothing was written")
    assert "--resume" not in line and "saved" not in line
    assert not out.exists()


def test_what_a_stopped_run_says_is_what_is_on_disk(tmp_path):
    run = tmp_path / "run"
    assert runs.stopped_state(run) == "the run had not started: nothing was written"
    run.mkdir()
    (run / "run.json").write_text("{}")
    assert "no step was saved yet" in runs.stopped_state(run)
    assert "starts the run from its first step" in runs.stopped_state(run)
    (run / BATCH_STATE).parent.mkdir()
    (run / BATCH_STATE).write_bytes(b"")
    assert runs.stopped_state(run) == (f"the state is saved: continue with `leaps invert "
                                       f"--resume {run}`")


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory) -> Path:
    """A run killed (SIGKILL) once it saved a state: what --resume continues."""
    out = tmp_path_factory.mktemp("killed") / "run"
    proc = start(*PLAIN, "--iterations", "400", "--out", out)
    wait_for_step(proc, 4)
    while not (out / BATCH_STATE).exists():
        time.sleep(0.02)
    proc.kill()
    proc.communicate()
    return out


def _drop_key(key):
    def damage(path: Path) -> None:
        data = torch.load(path, weights_only=True)
        del data[key]
        torch.save(data, path)
    return damage


DAMAGED_STATES = {
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:3000]),
                  "is truncated or damaged, not a complete torch file"),
    "empty": (lambda p: p.write_bytes(b""), "is empty (0 bytes)"),
    "text": (lambda p: p.write_text("not a state\n"), "is damaged or not a torch file"),
    "no rng": (_drop_key("rng"), "lacks 'rng' (damaged or edited)"),
    "no format": (_drop_key("format"), "records no state format"),
    "a pickled command": (lambda p: p.write_bytes(_pickled_command()),
                          "pickles posix.system, which leaps does not unpickle"),
}


def _pickled_command() -> bytes:
    import io

    class Command:
        def __reduce__(self):
            return (os.system, ("echo should never run",))

    buffer = io.BytesIO()
    torch.save({"step": Command()}, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("case", sorted(DAMAGED_STATES))
def test_resume_from_a_damaged_state_is_one_line_and_changes_nothing(killed_run, tmp_path,
                                                                    case):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(killed_run, run)
    damage, problem = DAMAGED_STATES[case]
    damage(run / BATCH_STATE)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    proc = leaps("invert", "--resume", run, "--quiet")
    line = one_line_error(proc, f"{run / BATCH_STATE} {problem}",
                          "the run cannot continue from it", f"`leaps invert --resume {run}` "
                          "starts batch 0 over")
    assert "weights_only" not in line and "should never run" not in proc.stdout
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before


def test_resume_verifies_the_model_and_the_run_format(killed_run, tmp_path):
    """Issue 23.4: a run.json edited to another model, or without its format, is refused."""
    import shutil

    edited = tmp_path / "edited"
    shutil.copytree(killed_run, edited)
    record = json.loads((edited / "run.json").read_text())
    record["model"] = "demo.x3d"
    (edited / "run.json").write_text(json.dumps(record))
    one_line_error(leaps("invert", "--resume", edited, "--quiet"),
                   f"{edited / BATCH_STATE} was made by another model or checkpoint than the "
                   "run's (", "model 'demo.resnet3d' there, 'demo.x3d' now",
                   "restore run.json or the checkpoint")
    old = tmp_path / "old"
    shutil.copytree(killed_run, old)
    record = json.loads((old / "run.json").read_text())
    del record["format"]
    (old / "run.json").write_text(json.dumps(record))
    one_line_error(leaps("invert", "--resume", old, "--quiet"),
                   f"{old / 'run.json'} records no run format", "cannot be resumed")
    state = torch.load(killed_run / BATCH_STATE, weights_only=True)
    assert state["format"] == runs.STATE_FORMAT
    assert state["identity"]["model"] == "demo.resnet3d"
    assert state["identity"]["adapter"] == "pytorchvideo.resnet"
    assert len(state["identity"]["weights_sha256"]) == 64


def test_resume_refuses_a_checkpoint_that_changed(tmp_path):
    checkpoint = tmp_path / "weights.safetensors"
    shutil_copy(STIMULI.parent / "demo.resnet3d.safetensors", checkpoint)
    out = tmp_path / "run"
    proc = start(*PLAIN, "--iterations", "400", "--checkpoint", checkpoint, "--out", out)
    wait_for_step(proc, 4)
    while not (out / BATCH_STATE).exists():
        time.sleep(0.02)
    proc.kill()
    proc.communicate()
    from safetensors.torch import load_file, save_file

    weights = load_file(checkpoint)
    save_file({k: v + 0.01 if v.is_floating_point() else v for k, v in weights.items()},
              checkpoint)
    one_line_error(leaps("invert", "--resume", out, "--quiet"),
                   f"checkpoint {checkpoint} is not the file the run started with")


def shutil_copy(src: Path, dst: Path) -> None:
    import shutil

    shutil.copyfile(src, dst)


# -- unsafe advice, wrong hints, inputs accepted without a word ------------------------------
@pytest.fixture(scope="module")
def done_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("done") / "run"
    proc = leaps(*DEMO, "--iterations", "2", "--out", out)
    assert proc.returncode == 0, proc.stderr
    return out


TORCH_FILE_DAMAGE = {
    "truncated": (lambda data: data[:500], "is truncated or damaged, not a complete torch file"),
    "text": (lambda data: b"hello\n", "is damaged or not a torch file"),
    "a pickled command": (lambda data: _pickled_command(),
                          "pickles posix.system, which leaps does not unpickle"),
}


@pytest.mark.parametrize("case", sorted(TORCH_FILE_DAMAGE))
def test_damaged_torch_files_are_named_and_never_loaded_unsafely(done_run, tmp_path, case):
    """Issue 23.2: evaluate's video.pt and --checkpoint, damaged or hostile: one line saying
    what the file is, no advice to load it with weights_only=False."""
    import shutil

    damage, problem = TORCH_FILE_DAMAGE[case]
    run = tmp_path / "run"
    shutil.copytree(done_run, run)
    (run / "video.pt").write_bytes(damage((done_run / "video.pt").read_bytes()))
    evaluated = leaps("evaluate", run)
    line = one_line_error(evaluated, f"{run / 'video.pt'} cannot be read: it {problem}")
    assert "weights_only" not in line and "should never run" not in evaluated.stdout
    checkpoint = leaps(*DEMO, "--checkpoint", run / "video.pt", "--out", tmp_path / "c")
    line = one_line_error(checkpoint, f"cannot read checkpoint {run / 'video.pt'}: it {problem}")
    assert "weights_only" not in line and not (tmp_path / "c").exists()


def test_no_message_advises_an_unsafe_load():
    """Every torch file leaps reads goes through leaps.files.load_torch_file (weights_only,
    its own words for a failure); no source line outside it calls torch.load, and no message
    text anywhere suggests weights_only=False or pickle."""
    import re

    root = Path(__file__).resolve().parents[1]
    sources = [p for folder in ("leaps", "adapters") for p in (root / folder).rglob("*.py")]
    assert len(sources) > 20
    calls = {p.relative_to(root).as_posix() for p in sources
             if re.search(r"torch\.load\(", re.sub(r"``[^`]*``|#.*", "", p.read_text()))}
    assert calls == {"leaps/files.py"}, calls
    unsafe = re.compile(r"weights_only\s*(=|set to|`\s*set to)\s*`?False|pickle\.loads?\(")
    for path in sources:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            assert not unsafe.search(line), f"{path}:{number}: {line.strip()}"
    from leaps.files import why_unreadable

    advice = RuntimeError("Weights only load failed. Re-running `torch.load` with "
                          "`weights_only` set to `False` will likely succeed")
    assert "weights_only" not in why_unreadable(Path(__file__), advice)


def test_a_nan_or_int8_checkpoint_is_named_not_the_learning_rate(tmp_path):
    """Issue 23.6: such weights are refused when loading, before any run directory."""
    from safetensors.torch import load_file, save_file

    weights = load_file(STIMULI.parent / "demo.resnet3d.safetensors")
    name = next(k for k, v in weights.items() if v.is_floating_point())
    nan = dict(weights)
    nan[name] = weights[name].clone()
    nan[name].view(-1)[0] = float("nan")
    save_file(nan, tmp_path / "nan.safetensors")
    save_file({k: (v * 100).to(torch.int8) if v.is_floating_point() else v
               for k, v in weights.items()}, tmp_path / "int8.safetensors")
    for case, needles in (("nan", ("holds NaN or infinite values in " + name,)),
                          ("int8", ("holds integer tensors for float parameters",
                                    f"{name} (int8)", "quantized"))):
        line = one_line_error(leaps(*DEMO, "--checkpoint", tmp_path / f"{case}.safetensors",
                                    "--out", tmp_path / case), f"{case}.safetensors", *needles)
        assert "--lr" not in line and not (tmp_path / case).exists()


def test_unknown_target_lists_the_classes(tmp_path):
    line = one_line_error(leaps(*UNTARGETED, "--target", "sideways", "--out", tmp_path / "r"),
                          "unknown target class 'sideways'")
    assert "(classes: left, right, up, down, clockwise, counterclockwise, grow, shrink)" in line
    assert not (tmp_path / "r").exists()


def test_video_errors_name_the_cause_without_errno_numbers(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_text("not a video\n")
    line = one_line_error(leaps(*DEMO, "--stimulus", bad, "--out", tmp_path / "r"),
                          f"cannot read video {bad}", "Invalid data found when processing input")
    assert "Errno" not in line and not (tmp_path / "r").exists()


def _frames(folder: Path, sizes: list[tuple[int, int]]) -> Path:
    from PIL import Image

    folder.mkdir()
    for i, size in enumerate(sizes):
        Image.new("RGB", size, (30 * i, 60, 90)).save(folder / f"frame{i}.png")
    return folder


def test_mixed_size_frames_short_clips_and_explain_options_are_named(done_run, tmp_path):
    """Issue 21.8 and 23.5: mixed frame sizes and a short clip get a warning in invert and
    explain alike; explain --fps and evaluate --json are checked before any work."""
    mixed = _frames(tmp_path / "mixed", [(64, 64), (80, 48)] * 4)
    proc = leaps(*DEMO, "--iterations", "2", "--stimulus", mixed, "--out", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr
    assert (f"warning: frame folder {mixed} holds frames of different sizes (64x64, 80x48)"
            in proc.stderr)
    short = _frames(tmp_path / "short", [(64, 64)] * 2)
    proc = leaps("explain", "--model", "demo.resnet3d", short, "--out", tmp_path / "maps")
    assert proc.returncode == 0, proc.stderr
    assert (f"warning: video {short} has 2 frame(s), fewer than the model's 8" in proc.stderr)
    for fps in ("0", "-5"):
        one_line_error(leaps("explain", "--model", "demo.resnet3d", short, "--fps", fps,
                             "--out", tmp_path / f"fps{fps}"), "--fps must be a number > 0",
                       f"got {fps}")
        assert not (tmp_path / f"fps{fps}").exists()
    afile = tmp_path / "afile"
    afile.write_text("x")
    for option in ("--json", "--markdown"):
        started = time.monotonic()
        one_line_error(leaps("evaluate", done_run, option, afile / "e.out"),
                       f"{option} {afile / 'e.out'} lies under {afile}, which is a file")
        assert time.monotonic() - started < 30


def test_run_json_is_strict_json(tmp_path):
    """Issue 21.7: no NaN or Infinity in run.json (nor evaluate's JSON), whatever the run."""
    path = tmp_path / "run.json"
    runs.write_json(path, {"history": {"total": [1.0, float("nan")]}, "is": float("inf"),
                           "nested": [{"x": float("-inf")}]})

    def refuse(constant):
        raise AssertionError(f"{constant} in strict JSON")

    data = json.loads(path.read_text(), parse_constant=refuse)
    assert data == {"history": {"total": [1.0, None]}, "is": None, "nested": [{"x": None}]}


@pytest.mark.parametrize("where", ["/proc/leaps-run", "/sys/leaps-run", "/proc/self/a/b"])
def test_out_under_proc_or_sys_is_one_line(where):
    """Issue 23.5: pseudo file systems refuse the run directory with one line, no traceback."""
    one_line_error(leaps(*DEMO, "--out", where), where)
    assert not Path(where).exists()
