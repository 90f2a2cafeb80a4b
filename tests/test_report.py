"""`leaps report`: the page is self-contained and every image renders in a real headless
browser (Debian's chromium); stimuli come from the run directory or the files run.json names."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image, ImageSequence

from leaps.cli import cli
from leaps.datasets import make_dataset
from leaps.evaluate import evaluate_runs, table
from leaps.invert import InvertConfig, invert
from leaps.registry import build_model
from leaps.report import write_report
from leaps.testing import Conv3DStack, InProcessPlugin, motion_entry, registered_plugin
from leaps.video import write_mp4

CLASSES = ("left", "right", "up", "down")
BROWSERS = ("chromium", "chromium-browser", "google-chrome")


MODEL = "testreport.c3d"
PLUGIN = InProcessPlugin([Conv3DStack], {MODEL: motion_entry(
    CLASSES, [[8, [1, 2, 2]], [16, [2, 2, 2]]], opposites=[["left", "right"], ["up", "down"]])})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two runs of a small model (its weights a fixed random draw, saved as its checkpoint):
    one sample per class, and two samples per class with another seed."""
    root = tmp_path_factory.mktemp("report")
    stimuli, labels, _ = make_dataset(1, classes=CLASSES, seed=7)
    paths = [str(write_mp4(clip, root / f"{CLASSES[y]}.mp4")) for clip, y in zip(stimuli, labels)]
    with registered_plugin(PLUGIN, "testreport"):
        torch.manual_seed(0)
        Conv3DStack().save_checkpoint(build_model(MODEL).net, root / "c3d.pth")
        common = {"targets": list(CLASSES), "stimuli": paths, "checkpoint": root / "c3d.pth",
                  "progress": False, "on_warning": lambda _: None}
        a = invert(MODEL, config=InvertConfig(iterations=10, log_every=5),
                   out=root / "a", **common).run_dir
        b = invert(MODEL, config=InvertConfig(iterations=10, log_every=5, samples=2,
                                                         seed=1), out=root / "b", **common).run_dir
        yield {"root": root, "a": a, "b": b, "stimuli": paths}


class _Images(HTMLParser):
    """Every <img>'s attributes, and the attributes of the element with id image-check."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[dict[str, str | None]] = []
        self.check: dict[str, str | None] = {}
        self.body: dict[str, str | None] = {}

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs)
        elif attrs.get("id") == "image-check":
            self.check = attrs
        elif tag == "body":
            self.body = attrs


def parse(markup: str) -> _Images:
    parser = _Images()
    parser.feed(markup)
    return parser


def browser_dom(page: Path, profile: Path) -> str:
    """The page's DOM after its load handler ran, as a real headless browser built it."""
    browser = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if browser is None:
        pytest.skip("no headless browser: install Debian's chromium (apt-get install -y "
                    "chromium) to check that the report's images render")
    # --no-sandbox: the suite may run as root (CI containers), where chromium's sandbox refuses
    proc = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                           f"--user-data-dir={profile}", "--virtual-time-budget=10000",
                           "--dump-dom", page.resolve().as_uri()],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_every_image_renders_in_a_headless_browser(runs, tmp_path):
    page = tmp_path / "out" / "report.html"
    result = CliRunner().invoke(cli, ["report", str(runs["a"]), str(runs["b"]),
                                      "--out", str(page)])
    assert result.exit_code == 0, result.output
    markup = page.read_text(encoding="utf-8")
    source = parse(markup)
    # self-contained: every image is embedded, nothing refers to another file
    assert source.images and all(img["src"].startswith("data:image/") for img in source.images)
    assert "href=" not in markup and list(page.parent.iterdir()) == [page]
    # per run: 4 stimuli + 4 (a) or 8 (b) samples + loss curves + frame grid
    assert len(source.images) == (4 + 4 + 2) + (4 + 8 + 2)

    dom = parse(browser_dom(page, tmp_path / "profile"))
    assert dom.body.get("data-images-checked") == str(len(source.images))
    assert [img.get("data-rendered") for img in dom.images] == ["yes"] * len(source.images)
    assert dom.check.get("data-broken") == "0" and "hidden" in dom.check

    # each class row shows its stimulus and its synthesized clips side by side
    for label in CLASSES:
        row = re.search(rf"<tr><th>{label}</th>(.*?)</tr>", markup).group(1)
        assert f'alt="stimulus {label}"' in row and f'alt="leaps {label} sample 0"' in row
    # the evaluation table is the one `leaps evaluate` computes
    header, rows = table(evaluate_runs([runs["a"], runs["b"]]))
    assert "".join(f"<th>{c}</th>" for c in header) in markup
    for cells in rows:
        assert "".join(f"<td>{c}</td>" for c in cells) in markup


def test_the_browser_check_catches_a_broken_image(runs, tmp_path):
    page = write_report([runs["a"]], tmp_path / "report.html")
    markup = page.read_text(encoding="utf-8")
    first = re.search(r'src="data:image/gif;base64,([^"]+)"', markup).group(1)
    broken = tmp_path / "broken.html"
    broken.write_text(markup.replace(first, base64.b64encode(b"GIF89a broken").decode(), 1),
                      encoding="utf-8")
    dom = parse(browser_dom(broken, tmp_path / "profile"))
    assert [img.get("data-rendered") for img in dom.images].count("no") == 1
    assert dom.check.get("data-broken") == "1" and "hidden" not in dom.check


def _gif_frames(data_uri: str) -> list[torch.Tensor]:
    data = base64.b64decode(data_uri.split(",", 1)[1])
    with Image.open(io.BytesIO(data)) as gif:
        assert gif.format == "GIF"
        return [torch.from_numpy(np.array(frame.convert("RGB"))).float() / 255
                for frame in ImageSequence.Iterator(gif)]


def test_the_synthesized_gifs_are_the_runs_clips(runs, tmp_path):
    page = write_report([runs["a"]], tmp_path / "report.html")
    images = parse(page.read_text(encoding="utf-8")).images
    video = torch.load(runs["a"] / "video.pt", weights_only=True)
    for i, label in enumerate(CLASSES):
        img = next(im for im in images if im["alt"] == f"leaps {label} sample 0")
        frames = _gif_frames(img["src"])
        assert len(frames) == 8
        assert int(img["width"]) == 128  # 32 px shown 4x, pixelated
        # GIF palettes quantise colours: the first frame is close to its clip's, far from the
        # next clip's
        own = (frames[0] - video[i, :, 0].permute(1, 2, 0)).abs().mean()
        other = (frames[0] - video[(i + 1) % 4, :, 0].permute(1, 2, 0)).abs().mean()
        assert own < 0.06 and own < other / 3, (own, other)


def test_stimuli_are_read_from_run_json_when_the_run_directory_lacks_them(runs, tmp_path):
    copy = shutil.copytree(runs["a"], tmp_path / "copy")
    for gif in copy.glob("stimulus_*.gif"):
        gif.unlink()
    moved = []
    for path in runs["stimuli"]:
        moved.append(str(shutil.copy(path, tmp_path / Path(path).name)))
    Path(moved[1]).unlink()  # the stimulus of "right" is gone
    record = json.loads((copy / "run.json").read_text())
    record["stimuli"] = [[p] for p in moved]
    (copy / "run.json").write_text(json.dumps(record))
    markup = write_report([copy], tmp_path / "report.html").read_text(encoding="utf-8")
    alts = [img["alt"] for img in parse(markup).images]
    assert [a for a in alts if a.startswith("stimulus")] == \
        ["stimulus left", "stimulus up", "stimulus down"]
    assert f"stimulus {moved[1]}: not found" in markup


def test_report_reuses_a_saved_evaluation_of_the_same_runs(runs, tmp_path):
    saved = tmp_path / "eval.json"
    evaluation = evaluate_runs([runs["a"]])
    evaluation["runs"][0]["metrics"]["target_prob"] = 0.123  # proves the file was used
    evaluation["runs"][0]["random_weights"] = [MODEL]
    evaluation["runs"][0].update(param="warp", views=3)  # shown as recorded
    saved.write_text(json.dumps(evaluation))
    result = CliRunner().invoke(cli, ["report", str(runs["a"]), "--evaluation", str(saved),
                                      "--out", str(tmp_path / "r.html")])
    assert result.exit_code == 0, result.output
    markup = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert "<td>0.12</td>" in markup
    assert "x* warp with 3 view(s) per step" in markup and "<td>warp (3)</td>" in markup
    assert "testreport.c3d had no weights (random initialisation)" in markup
    result = CliRunner().invoke(cli, ["report", str(runs["b"]), "--evaluation", str(saved),
                                      "--out", str(tmp_path / "r2.html")])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: evaluation ") and "covers other runs" in result.stderr
    assert not (tmp_path / "r2.html").exists()


def test_a_directory_that_is_not_a_run_is_a_one_line_error(tmp_path):
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(cli, ["report", str(tmp_path / "empty"),
                                      "--out", str(tmp_path / "r.html")])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "not a leaps run directory" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "r.html").exists()
