"""leaps.video on real files: clips encoded here with PyAV (and PIL for GIF/PNG), read back
through every supported container; writers checked by decoding what they wrote."""

from __future__ import annotations

import os
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

import leaps.video as video_module
from leaps.errors import LeapsError
from leaps.video import (
    MIN_MP4_SIDE,
    atomic_path,
    overlay_heatmap,
    read_clip,
    read_clips,
    sample_indices,
    save_tensor,
    write_gif,
    write_grid_png,
    write_mp4,
)

HEIGHT, WIDTH, LENGTH = 48, 64, 24
CODE_STEP = 10  # grey level of the bottom bar per frame index: the index survives compression


def pattern(index: int, step: int = CODE_STEP) -> np.ndarray:
    """Frame ``index``: black, a white 8x8 square at rows 16-23, columns 16+index..23+index,
    and a bottom bar (rows 40-47) whose grey level encodes the index."""
    frame = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    frame[40:] = step * index
    frame[16:24, 16 + index:24 + index] = 255
    return frame


def has_encoder(name: str) -> bool:
    try:
        av.codec.Codec(name, "w")
    except (av.FFmpegError, ValueError):
        return False
    return True


def encode(path: Path, frames: list[np.ndarray], codec: str) -> Path:
    with av.open(str(path), "w") as container:
        options = {"crf": "12"} if codec == "libx264" else {}
        stream = container.add_stream(codec, rate=8, options=options)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        if codec != "libx264":
            stream.bit_rate = 4_000_000
        for array in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        container.mux(stream.encode(None))
    return path


def make_source(kind: str, directory: Path, frames: list[np.ndarray]) -> Path:
    if kind == "mp4":
        return encode(directory / "clip.mp4", frames, "libx264")
    if kind == "avi":
        return encode(directory / "clip.avi", frames, "mpeg4")
    if kind == "mkv":
        return encode(directory / "clip.mkv", frames, "libx264")
    if kind == "webm":
        if not has_encoder("libvpx"):
            pytest.skip("this PyAV/FFmpeg build has no libvpx encoder for webm")
        return encode(directory / "clip.webm", frames, "libvpx")
    if kind == "gif":
        images = [Image.fromarray(f) for f in frames]
        path = directory / "clip.gif"
        images[0].save(path, save_all=True, append_images=images[1:], duration=125, loop=0)
        return path
    if kind == "png":
        folder = directory / "frames"
        folder.mkdir()
        # Unpadded numbers: only natural order puts frame_2 before frame_10.
        for i, frame in enumerate(frames):
            Image.fromarray(frame).save(folder / f"frame_{i}.png")
        (folder / "notes.txt").write_text("not a frame")
        return folder
    raise AssertionError(kind)


def decoded_indices(clip: torch.Tensor, size: int, step: int = CODE_STEP) -> list[int]:
    """Read the frame index back from the bottom bar's grey level."""
    bar_rows = slice(int(size * 5 / 6) + 1, size)  # the bar's bottom 1/6, minus its blurred edge
    level = clip[:, :, bar_rows, :].mean(dim=(0, 2, 3)) * 255
    return [round(v / step) for v in level.tolist()]


def square_centroid(frame: torch.Tensor, size: int) -> tuple[float, float]:
    """(row, column) intensity centroid of the square, above the bar."""
    band = frame.mean(dim=0)[: int(size * 0.75)]
    weight = (band - 0.2).clamp(min=0)
    rows = torch.arange(band.shape[0], dtype=torch.float32)
    cols = torch.arange(band.shape[1], dtype=torch.float32)
    total = weight.sum()
    return float((weight.sum(1) * rows).sum() / total), float((weight.sum(0) * cols).sum() / total)


def expected_centroid(index: int, size: int) -> tuple[float, float]:
    """Where the square's centre lands after short-side resize to ``size`` and centre crop."""
    scale = size / HEIGHT
    crop_left = (round(WIDTH * scale) - size) // 2
    # Continuous pixel coordinates: the square spans [16, 24) x [16+i, 24+i); centres at +0.5.
    return 20 * scale - 0.5, (20 + index) * scale - 0.5 - crop_left


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    frames = [pattern(i) for i in range(LENGTH)]
    made = {}
    for kind in ("mp4", "avi", "mkv", "gif", "png"):
        made[kind] = make_source(kind, tmp_path_factory.mktemp(kind), frames)
    return made


@pytest.mark.parametrize("kind", ["mp4", "avi", "webm", "mkv", "gif", "png"])
def test_read_clip_samples_uniformly_and_crops_centre(kind: str, clips: dict[str, Path],
                                                      tmp_path: Path) -> None:
    source = clips[kind] if kind in clips else make_source(
        kind, tmp_path, [pattern(i) for i in range(LENGTH)])
    size = 32
    clip = read_clip(source, frames=8, size=size)

    assert clip.shape == (3, 8, size, size) and clip.dtype == torch.float32
    assert clip.min() >= 0 and clip.max() <= 1
    wanted = sample_indices(LENGTH, 8)
    assert wanted == [0, 3, 7, 10, 13, 16, 20, 23]
    assert decoded_indices(clip, size) == wanted
    for t, index in enumerate(wanted):
        row, col = square_centroid(clip[:, t], size)
        want_row, want_col = expected_centroid(index, size)
        assert abs(row - want_row) < 0.6 and abs(col - want_col) < 0.6, (t, row, col)


def test_crop_without_resize_and_with_portrait_frames(clips: dict[str, Path],
                                                      tmp_path: Path) -> None:
    clip = read_clip(clips["mp4"], frames=LENGTH, size=HEIGHT)
    assert decoded_indices(clip, HEIGHT) == list(range(LENGTH))
    for index in (0, 11, 23):
        row, col = square_centroid(clip[:, index], HEIGHT)
        assert abs(row - 19.5) < 0.5 and abs(col - (11.5 + index)) < 0.5

    # Portrait 80x40 at size 20: halved to 40x20, then rows 10-29 kept; the marker at rows
    # 59-60 (centre 60) lands at 30 - 10 = 20 (pixel index 19.5).
    tall = np.zeros((80, 40, 3), np.uint8)
    tall[59:61] = 255
    path = encode(tmp_path / "tall.mp4", [tall] * 3, "libx264")
    frame = read_clip(path, frames=1, size=20)[:, 0].mean(dim=(0, 2))
    assert int(frame.argmax()) in (19, 20)


def test_mkv_frame_count_comes_from_a_counting_pass(clips: dict[str, Path]) -> None:
    with av.open(str(clips["mkv"])) as container:
        assert container.streams.video[0].frames == 0  # mkv does not declare its length
    clip = read_clip(clips["mkv"], frames=5, size=16)
    assert decoded_indices(clip, 16) == sample_indices(LENGTH, 5) == [0, 6, 12, 17, 23]


def test_truncated_video_is_sampled_over_the_frames_that_decode(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    frames = [pattern(i) for i in range(LENGTH)]
    for frame in frames:  # incompressible noise above the square spreads data over all frames
        frame[:12] = rng.integers(0, 256, (12, WIDTH, 3), dtype=np.uint8)
    data = encode(tmp_path / "full.avi", frames, "mpeg4").read_bytes()
    truncated = tmp_path / "truncated.avi"
    truncated.write_bytes(data[: int(len(data) * 0.6)])
    with av.open(str(truncated)) as container:
        assert container.streams.video[0].frames == LENGTH  # the header still says 24
        decodable = sum(1 for _ in container.decode(video=0))
    assert 2 < decodable < LENGTH
    notes: list[str] = []
    clip = read_clip(truncated, frames=8, size=32, on_warning=notes.append)
    assert notes == [f"video {truncated} ends early: {decodable} frame(s) of the {LENGTH} it "
                     "declares decode (a truncated or damaged file?); using those"]
    # The last decodable frame may be damaged by the cut; the others carry their index.
    assert decoded_indices(clip, 32)[:-1] == sample_indices(decodable, 8)[:-1]


def test_short_clip_repeats_frames_in_order(tmp_path: Path) -> None:
    path = encode(tmp_path / "short.mp4", [pattern(i, step=80) for i in range(3)], "libx264")
    clip = read_clip(path, frames=8, size=24)
    assert clip.shape == (3, 8, 24, 24)
    assert decoded_indices(clip, 24, step=80) == [0, 0, 1, 1, 1, 1, 2, 2]


def test_read_clips_stacks(clips: dict[str, Path]) -> None:
    batch = read_clips([clips["mp4"], clips["png"]], frames=4, size=16)
    assert batch.shape == (2, 3, 4, 16, 16)
    assert decoded_indices(batch[0], 16) == decoded_indices(batch[1], 16) == [0, 8, 15, 23]


def zero_packet_video(path: Path, codec: str) -> Path:
    """A container with a valid video stream whose packets are all zero bytes."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=8)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        packets = [p for i in range(4) for p in stream.encode(
            av.VideoFrame.from_ndarray(pattern(i), format="rgb24"))]
        packets += stream.encode(None)
        for packet in packets:
            blank = av.Packet(bytes(packet.size))
            blank.stream, blank.pts, blank.dts = stream, packet.pts, packet.dts
            blank.time_base = packet.time_base
            container.mux(blank)
    return path


def bad_sources(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    (tmp_path / "random.mp4").write_bytes(np.random.default_rng(0).bytes(4096))
    (tmp_path / "clip.txt").write_text("hello")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no frames here")
    (tmp_path / "broken_frames").mkdir()
    (tmp_path / "broken_frames" / "0001.png").write_bytes(b"\x89PNG not really")
    return {
        "missing": (tmp_path / "nope.mp4", "not found"),
        "corrupt": (tmp_path / "random.mp4", "corrupt"),
        "extension": (tmp_path / "clip.txt", ".mp4 .avi .webm .mkv"),
        "no images": (tmp_path / "empty", "no frame images"),
        "broken image": (tmp_path / "broken_frames", "cannot read frame image"),
        "zero frames h264": (zero_packet_video(tmp_path / "blank_h264.mkv", "libx264"),
                             "no decodable frames"),
        "zero frames mpeg4": (zero_packet_video(tmp_path / "blank_mpeg4.mkv", "mpeg4"),
                              "no decodable frames"),
    }


def test_bad_inputs_raise_one_line_errors_naming_the_file(tmp_path: Path) -> None:
    for case, (path, problem) in bad_sources(tmp_path).items():
        with pytest.raises(LeapsError) as caught:
            read_clip(path, frames=4, size=16)
        message = str(caught.value)
        assert "\n" not in message, case
        assert problem in message, (case, message)
        assert path.name in message, (case, message)
        assert ";" in message, (case, message)  # problem; fix
    with pytest.raises(LeapsError, match="at least one"):
        read_clips([], frames=4, size=16)


def gradient_video(frames: int, height: int, width: int) -> torch.Tensor:
    t = torch.linspace(0, 1, frames)[:, None, None]
    y = torch.linspace(0, 1, height)[None, :, None]
    x = torch.linspace(0, 1, width)[None, None, :]
    shape = (frames, height, width)
    channels = [(x + t) / 2, y, (1 - x) * (1 - y)]
    return torch.stack([c.expand(shape) for c in channels])


def decode_all(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


@pytest.mark.parametrize("codec", ["libx264", "mpeg4"])
def test_write_gif_and_mp4_decode_back(codec: str, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    if codec == "libx264" and not has_encoder("libx264"):
        pytest.skip("this PyAV/FFmpeg build has no libx264; write_mp4 falls back to mpeg4")
    # Force the fallback codec a build without libx264 would use.
    monkeypatch.setattr(video_module, "_mp4_codec", lambda: codec)
    video = gradient_video(6, 40, 56)
    gif = write_gif(video, tmp_path / "out" / "clip.gif", fps=8)
    with Image.open(gif) as image:
        assert image.n_frames == 6 and image.size == (56, 40)
        assert image.info.get("loop") == 0
    assert len(decode_all(gif)) == 6

    mp4 = write_mp4(video, tmp_path / "clip.mp4", fps=8)
    frames = decode_all(mp4)
    assert len(frames) == 6
    # 40 < MIN_MP4_SIDE: scaled by 2 (nearest), then content compared at the original size.
    assert frames[0].shape == (80, 112, 3)
    back = torch.from_numpy(np.stack(frames)[:, ::2, ::2]).permute(3, 0, 1, 2).float() / 255
    assert (back - video).abs().mean() < 0.03
    with av.open(str(mp4)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.pix_fmt == "yuv420p"
        assert stream.codec_context.name == {"libx264": "h264", "mpeg4": "mpeg4"}[codec]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4", "out"]


def test_write_mp4_makes_small_odd_clips_playable(tmp_path: Path) -> None:
    frames = decode_all(write_mp4(gradient_video(5, 25, 31), tmp_path / "odd.mp4", fps=12.5))
    # Short side 25 -> factor 3 (>= MIN_MP4_SIDE) -> 75 x 93 -> padded to even 76 x 94.
    assert 25 * 3 >= MIN_MP4_SIDE
    assert len(frames) == 5 and frames[0].shape == (76, 94, 3)


def test_write_grid_png_layout_and_labels(tmp_path: Path) -> None:
    red = torch.zeros(3, 4, 16, 16)
    red[0] = 1
    blue = torch.zeros(3, 3, 16, 16)
    blue[2] = 1
    plain = write_grid_png([red, blue], tmp_path / "grid.png")
    with Image.open(plain) as image:
        assert image.size == (2 + 4 * 18, 2 + 2 * 18)
        pixels = np.asarray(image.convert("RGB"))
    assert tuple(pixels[2 + 18 + 8, 2 + 2 * 18 + 8]) == (0, 0, 255)  # row 1, frame 2
    assert tuple(pixels[2 + 8, 2 + 3 * 18 + 8]) == (255, 0, 0)  # row 0, frame 3
    assert tuple(pixels[2 + 18 + 8, 2 + 3 * 18 + 8]) == (255, 255, 255)  # row 1 has 3 frames

    labelled = write_grid_png([red, blue], tmp_path / "labelled.png", row_labels=["stimulus", "x*"])
    with Image.open(labelled) as image:
        width = image.size[0]
        left = np.asarray(image.convert("L"))[:, : width - (2 + 4 * 18)]
    assert width > 2 + 4 * 18 and (left < 128).any()  # the label column holds dark text
    with pytest.raises(ValueError):
        write_grid_png([red], tmp_path / "bad.png", row_labels=["a", "b"])


def test_save_tensor_roundtrip(tmp_path: Path) -> None:
    tensor = torch.rand(2, 3, 4, requires_grad=True)
    path = save_tensor(tensor, tmp_path / "x.pt")
    assert torch.equal(torch.load(path, weights_only=True), tensor.detach())


def test_failed_writes_leave_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "result.bin"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as temporary:
            temporary.write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert os.listdir(tmp_path) == []

    target.write_bytes(b"previous")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as temporary:
            temporary.write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert target.read_bytes() == b"previous" and os.listdir(tmp_path) == ["result.bin"]

    # The GIF encoder dies after writing part of its output (a full disk).
    def partial_save(self: Image.Image, fp: object, *args: object, **kwargs: object) -> None:
        Path(str(fp)).write_bytes(b"GIF89a")
        raise OSError("No space left on device")

    monkeypatch.setattr(Image.Image, "save", partial_save)
    with pytest.raises(OSError):
        write_gif(gradient_video(3, 8, 8), tmp_path / "anim.gif")
    assert os.listdir(tmp_path) == ["result.bin"]


def test_overlay_heatmap_shape_range_and_colours() -> None:
    video = torch.rand(3, 4, 12, 16)
    heat = torch.rand(4, 12, 16)
    out = overlay_heatmap(video, heat, alpha=0.4)
    assert out.shape == video.shape and out.min() >= 0 and out.max() <= 1
    assert torch.allclose(overlay_heatmap(video, heat, alpha=0.0), video)

    cold = overlay_heatmap(video, torch.zeros(4, 12, 16), alpha=1.0)
    hot = overlay_heatmap(video, torch.ones(4, 12, 16), alpha=1.0)
    assert torch.allclose(cold[:, 0, 0, 0], torch.tensor([0.0, 0.0, 0.5]))
    assert torch.allclose(hot[:, 0, 0, 0], torch.tensor([0.5, 0.0, 0.0]))

    # A coarse map (e.g. Grad-CAM's feature grid) is upsampled to the clip.
    coarse = overlay_heatmap(video, torch.rand(2, 3, 4), alpha=0.5)
    assert coarse.shape == video.shape and coarse.min() >= 0 and coarse.max() <= 1
