"""Read stimulus clips and write result videos and images.

Reading turns a video file (decoded with PyAV) or a folder of frame images into a float32
``[3, T, H, W]`` clip in [0, 1]: ``T`` frames sampled uniformly over the whole clip, each
resized (short side, antialiased bilinear) and centre-cropped to ``H = W = size``.

Writing is atomic: every writer goes through :func:`leaps.files.atomic_path`, so an interrupted
or failed write leaves the previous file (or no file) at the target, never a half-written one,
and a refusal of the operating system (a full disk) is one line naming the file.
"""

from __future__ import annotations

import io
import math
import re
import warnings
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from leaps.errors import LeapsError
from leaps.files import atomic_path, write_bytes

VIDEO_EXTENSIONS = (".mp4", ".avi", ".webm", ".mkv", ".mov", ".gif")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")

# Players (and some browsers) refuse H.264 this small; tiny synthesized clips are scaled up by
# an integer factor (nearest neighbour, so pixels stay sharp) until the short side reaches it.
MIN_MP4_SIDE = 64

# Jet-like colour map sampled at 9 evenly spaced points, interpolated linearly in between:
# dark blue (cold) -> cyan -> yellow -> dark red (hot).
_COLORMAP = torch.tensor(
    [
        [0.0, 0.0, 0.5],
        [0.0, 0.0, 1.0],
        [0.0, 0.5, 1.0],
        [0.0, 1.0, 1.0],
        [0.5, 1.0, 0.5],
        [1.0, 1.0, 0.0],
        [1.0, 0.5, 0.0],
        [1.0, 0.0, 0.0],
        [0.5, 0.0, 0.0],
    ]
)


# --------------------------------------------------------------------------------- reading


def sample_indices(total: int, frames: int) -> list[int]:
    """Uniform temporal sampling: ``round(linspace(0, total - 1, frames))``.

    A clip shorter than ``frames`` is stretched, not looped: indices repeat in order
    (3 frames asked for 8 give ``0 0 1 1 1 1 2 2``), so motion keeps its direction and no
    jump from the last frame back to the first is introduced.
    """
    if total < 1 or frames < 1:
        raise ValueError(f"need total >= 1 and frames >= 1, got total={total}, frames={frames}")
    positions = torch.linspace(0, total - 1, frames, dtype=torch.float64)
    return [int(i) for i in positions.round().long().tolist()]


def read_clip(source: str | Path, frames: int, size: int,
              on_short: Callable[[int], None] | None = None,
              on_warning: Callable[[str], None] | None = None) -> Tensor:
    """Read ``frames`` uniformly sampled frames of a clip as float32 ``[3, frames, size, size]``.

    ``source`` is a video file (``.mp4 .avi .webm .mkv .mov .gif``) or a folder of frame images
    (``.png .jpg .jpeg .bmp .webp``, in natural order: ``frame2`` before ``frame10``). Sampling
    follows :func:`sample_indices` (short clips repeat frames rather than fail). Each frame is
    resized so its short side is ``size`` (antialiased bilinear) and centre-cropped to
    ``size x size``. Videos are decoded once and only the sampled frames are kept and
    converted, so long videos cost decode time but not memory.

    ``on_short(n)`` is called when the source has only ``n < frames`` frames (they are then
    stretched, see :func:`sample_indices`), so callers can say so. ``on_warning(message)``
    (default: :func:`warnings.warn`) hears of a video that ends early: fewer frames decode than
    it declares (a truncated file) or a damaged packet stops decoding; the frames that did
    decode are used.

    Raises :class:`LeapsError` for a missing, unreadable or unsupported source, a folder without
    images, or a video without decodable frames.
    """
    if frames < 1 or size < 1:
        raise LeapsError(f"frames and size must be positive (got frames={frames}, size={size}); "
                         "pass e.g. frames=16 size=112")
    path = Path(source).expanduser()
    if not path.exists():
        raise LeapsError(f"stimulus not found: {path}; check the path (relative paths are "
                         f"resolved from {Path.cwd()})")
    if path.is_dir():
        kept, total = _read_image_folder(path, frames, on_warning or _warn)
    else:
        if path.suffix.lower() not in VIDEO_EXTENSIONS:
            raise LeapsError(
                f"unsupported stimulus file {path}: extension '{path.suffix}' is not one of "
                f"{' '.join(VIDEO_EXTENSIONS)}; convert it (e.g. ffmpeg -i {path.name} clip.mp4) "
                f"or pass a folder of {'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} frames"
            )
        kept, total = _read_video_file(path, frames, on_warning or _warn)
    if total < frames and on_short is not None:
        on_short(total)
    return torch.stack([_resize_crop(frame, size) for frame in kept], dim=1).contiguous()


def read_clips(sources: Sequence[str | Path], frames: int, size: int,
               on_short: Callable[[str | Path, int], None] | None = None,
               on_warning: Callable[[str], None] | None = None) -> Tensor:
    """Read several clips with :func:`read_clip` into one float32 ``[N, 3, frames, size, size]``;
    ``on_short(source, n)`` for each source with fewer than ``frames`` frames, ``on_warning``
    as :func:`read_clip`'s."""
    if len(sources) == 0:
        raise LeapsError("no stimulus given; pass at least one video file or frame folder")
    return torch.stack([read_clip(s, frames, size, None if on_short is None else
                                  (lambda n, s=s: on_short(s, n)), on_warning)
                        for s in sources])


def _warn(message: str) -> None:
    warnings.warn(message, stacklevel=4)


def _natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    # Digit runs compare as numbers, so frame_2.png sorts before frame_10.png.
    return tuple((0, int(part)) if part.isdigit() else (1, part.lower())
                 for part in re.split(r"(\d+)", name) if part)


def _read_image_folder(folder: Path, frames: int, on_warning: Callable[[str], None]
                       ) -> tuple[list[Tensor], int]:
    images = sorted((p for p in folder.iterdir()
                     if p.is_file() and not p.name.startswith(".")
                     and p.suffix.lower() in IMAGE_EXTENSIONS),
                    key=lambda p: _natural_key(p.name))
    if not images:
        raise LeapsError(f"no frame images in folder {folder}; put the frames there as "
                         f"{' '.join(IMAGE_EXTENSIONS)} files (sorted by name) or pass a video "
                         "file")
    loaded: dict[int, Tensor] = {}
    indices = sample_indices(len(images), frames)
    for index in sorted(set(indices)):
        image_path = images[index]
        try:
            with Image.open(image_path) as image:
                array = np.asarray(image.convert("RGB"))
        except (OSError, ValueError) as err:
            raise LeapsError(f"cannot read frame image {image_path}: {_first_line(err)}; "
                             "replace or remove the broken image") from None
        loaded[index] = _to_chw(array)
    sizes = sorted({(int(t.shape[2]), int(t.shape[1])) for t in loaded.values()})
    if len(sizes) > 1:
        listed = ", ".join(f"{w}x{h}" for w, h in sizes[:4]) + (" ..." if len(sizes) > 4 else "")
        on_warning(f"frame folder {folder} holds frames of different sizes ({listed}): each is "
                   "resized and centre-cropped on its own, so their content may not line up; "
                   "give frames of one size")
    return [loaded[i] for i in indices], len(images)


def _read_video_file(path: Path, frames: int, on_warning: Callable[[str], None]
                     ) -> tuple[list[Tensor], int]:
    declared = _stream_frame_count(path)
    if declared:
        total, failure = declared, None
    else:
        total, _, failure = _decode_pass(path, None)
    if total:
        count, kept, failure = _decode_pass(path, set(sample_indices(total, frames)))
        if count != total:
            # The declared frame count was wrong (edit lists, a broken tail): sample the frames
            # that really decode, which takes a second pass over the file.
            total = count
            if total:
                _, kept, _ = _decode_pass(path, set(sample_indices(total, frames)))
    if total and (failure or (declared and total < declared)):
        of = f" of the {declared} it declares" if declared and total < declared else ""
        why = f" ({failure})" if failure else " (a truncated or damaged file?)"
        on_warning(f"video {path} ends early: {total} frame(s){of} decode{why}; using those")
    if total == 0:
        raise LeapsError(f"video {path} has no decodable frames; check that it plays, or "
                         f"re-encode it (e.g. ffmpeg -i {path.name} -c:v libx264 clip.mp4)")
    return [kept[i] for i in sample_indices(total, frames)], total


def _open(path: Path) -> av.container.InputContainer:
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError) as err:
        raise LeapsError(f"cannot read video {path} (corrupt or not a video: {_first_line(err)}); "
                         f"check that it plays, or re-encode it (e.g. ffmpeg -i {path.name} "
                         "clip.mp4)") from None
    if not container.streams.video:
        container.close()
        raise LeapsError(f"video {path} has no video stream (truncated, or audio only); pass a "
                         "complete file that contains video")
    return container


def _stream_frame_count(path: Path) -> int | None:
    """The frame count the container declares, or None where it does not know (mkv, webm)."""
    with _open(path) as container:
        declared = container.streams.video[0].frames
    return declared if declared > 0 else None


def _decode_pass(path: Path, wanted: set[int] | None
                 ) -> tuple[int, dict[int, Tensor], str | None]:
    """Decode the first video stream once; return the number of decodable frames, the
    frames at ``wanted`` indices as uint8 ``[3, H, W]`` (only those are converted to RGB) and
    the decoder's error where one stopped it after some frames."""
    kept: dict[int, Tensor] = {}
    count, failure = 0, None
    with _open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            for frame in container.decode(stream):
                if wanted is not None and count in wanted:
                    kept[count] = _to_chw(frame.to_ndarray(format="rgb24"))
                count += 1
        except av.FFmpegError as err:
            # A broken packet ends the clip: keep what decoded before it rather than reject a
            # file that players show (up to its damaged tail).
            if count:
                failure = f"decoding stopped: {_first_line(err)}"
    return count, kept, failure


def _to_chw(array: np.ndarray) -> Tensor:
    return torch.from_numpy(np.array(array, dtype=np.uint8, copy=True)).permute(2, 0, 1)


def _resize_crop(frame: Tensor, size: int) -> Tensor:
    """uint8 ``[3, h, w]`` -> float32 ``[3, size, size]``: short side to ``size``, centre crop."""
    image = frame.float().div_(255.0)
    height, width = image.shape[-2:]
    scale = size / min(height, width)
    new_h = max(size, round(height * scale))
    new_w = max(size, round(width * scale))
    if (new_h, new_w) != (height, width):
        image = F.interpolate(image[None], size=(new_h, new_w), mode="bilinear",
                              align_corners=False, antialias=True)[0]
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return image[:, top:top + size, left:left + size].clamp_(0.0, 1.0)


def _first_line(err: BaseException) -> str:
    if isinstance(err, av.FFmpegError) and err.strerror:
        return err.strerror  # without PyAV's "[Errno -1094995529]" and the repeated path
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# --------------------------------------------------------------------------------- writing


def _frames_uint8(video: Tensor) -> np.ndarray:
    """``[3, T, H, W]`` in [0, 1] -> uint8 ``[T, H, W, 3]``."""
    if video.dim() != 4 or video.shape[0] != 3:
        raise ValueError(f"expected a video [3, T, H, W], got shape {tuple(video.shape)}")
    scaled = video.detach().float().clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8)
    return scaled.permute(1, 2, 3, 0).cpu().numpy()


def _check_fps(fps: float) -> None:
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")


def write_gif(video: Tensor, path: str | Path, fps: float = 8) -> Path:
    """Write ``[3, T, H, W]`` in [0, 1] as a looping GIF (adaptive palette per frame).

    The GIF encoder stores identical consecutive frames once with their durations summed, so
    playback timing is exact but a decoder may report fewer than ``T`` frames for such clips.
    """
    _check_fps(fps)
    images = [Image.fromarray(frame) for frame in _frames_uint8(video)]
    with atomic_path(path) as temporary:
        images[0].save(temporary, format="GIF", save_all=True, append_images=images[1:],
                       duration=round(1000 / fps), loop=0)
    return Path(path)


def _mp4_codec() -> str:
    # libx264 where the FFmpeg build has it; mpeg4 (always built in) otherwise.
    try:
        av.codec.Codec("libx264", "w")
    except (av.FFmpegError, ValueError):
        return "mpeg4"
    return "libx264"


def write_mp4(video: Tensor, path: str | Path, fps: float = 8) -> Path:
    """Write ``[3, T, H, W]`` in [0, 1] as an MP4 (H.264 via libx264, else MPEG-4 part 2; yuv420p).

    yuv420p needs even dimensions and players reject tiny videos: clips whose short side is
    below :data:`MIN_MP4_SIDE` are scaled up by an integer factor (nearest neighbour), then an
    odd width or height is padded by repeating the last column or row.
    """
    _check_fps(fps)
    frames = _frames_uint8(video)
    height, width = frames.shape[1:3]
    factor = math.ceil(MIN_MP4_SIDE / min(height, width))
    if factor > 1:
        frames = frames.repeat(factor, axis=1).repeat(factor, axis=2)
    frames = np.pad(frames, ((0, 0), (0, frames.shape[1] % 2), (0, frames.shape[2] % 2), (0, 0)),
                    mode="edge")
    codec = _mp4_codec()
    options = {"crf": "18"} if codec == "libx264" else {}
    with atomic_path(path) as temporary, av.open(str(temporary), "w", format="mp4") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001),
                                      options=options)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        if codec == "mpeg4":
            stream.bit_rate = 4_000_000
        for array in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        container.mux(stream.encode(None))
    return Path(path)


def write_grid_png(rows: Sequence[Tensor], path: str | Path,
                   row_labels: Sequence[str] | None = None, gap: int = 2) -> Path:
    """Write a PNG frame grid: one row per clip ``[3, T, H, W]``, its frames left to right.

    Clips of different sizes or lengths share one cell size (the largest; smaller frames are
    centred). ``row_labels`` (one per row) are drawn at the left of each row.
    """
    if len(rows) == 0:
        raise ValueError("write_grid_png needs at least one row")
    if row_labels is not None and len(row_labels) != len(rows):
        raise ValueError(f"{len(row_labels)} row labels for {len(rows)} rows")
    clips = [_frames_uint8(row) for row in rows]
    cell_h = max(c.shape[1] for c in clips)
    cell_w = max(c.shape[2] for c in clips)
    columns = max(c.shape[0] for c in clips)

    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = 0
    if row_labels is not None:
        widest = max(math.ceil(measure.textlength(str(t), font=font)) for t in row_labels)
        label_w = widest + 3 * gap

    canvas = Image.new("RGB", (label_w + columns * (cell_w + gap) + gap,
                               len(clips) * (cell_h + gap) + gap), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, clip in enumerate(clips):
        top = gap + r * (cell_h + gap)
        for t, frame in enumerate(clip):
            left = label_w + gap + t * (cell_w + gap)
            canvas.paste(Image.fromarray(frame), (left + (cell_w - frame.shape[1]) // 2,
                                                  top + (cell_h - frame.shape[0]) // 2))
        if row_labels is not None:
            draw.text((gap, top + cell_h / 2), str(row_labels[r]), fill=(0, 0, 0), font=font,
                      anchor="lm")
    with atomic_path(path) as temporary:
        canvas.save(temporary, format="PNG")
    return Path(path)


def save_tensor(tensor: Tensor, path: str | Path) -> Path:
    """``torch.save`` a detached CPU copy of ``tensor`` atomically.

    It is serialised in memory first, so a full disk is an OSError of the write (a
    :class:`~leaps.files.WriteError`), not torch's opaque error from inside its zip writer."""
    buffer = io.BytesIO()
    torch.save(tensor.detach().cpu(), buffer)
    return write_bytes(path, buffer.getvalue())


# --------------------------------------------------------------------------------- overlays


def colormap(values: Tensor) -> Tensor:
    """Map values in [0, 1] (any shape ``S``) to RGB ``[3, *S]`` with a jet-like colour map."""
    table = _COLORMAP.to(device=values.device)
    position = values.float().clamp(0.0, 1.0) * (len(table) - 1)
    low = position.floor().long().clamp(max=len(table) - 2)
    fraction = (position - low).unsqueeze(-1)
    rgb = table[low] * (1 - fraction) + table[low + 1] * fraction
    return rgb.movedim(-1, 0)


def overlay_heatmap(video: Tensor, heat: Tensor, alpha: float = 0.5) -> Tensor:
    """Blend a colour-mapped heat map onto a clip: ``(1 - alpha) * video + alpha * colormap(heat)``.

    ``video`` is ``[3, T, H, W]`` in [0, 1]; ``heat`` is ``[T, H, W]`` in [0, 1] (clamped). A
    heat map at a coarser resolution (e.g. Grad-CAM's feature grid) is upsampled trilinearly to
    the clip's ``T, H, W``. Returns ``[3, T, H, W]`` in [0, 1].
    """
    if video.dim() != 4 or video.shape[0] != 3:
        raise ValueError(f"expected a video [3, T, H, W], got shape {tuple(video.shape)}")
    if heat.dim() != 3:
        raise ValueError(f"expected a heat map [T, H, W], got shape {tuple(heat.shape)}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    heat = heat.detach().float()
    if heat.shape != video.shape[1:]:
        heat = F.interpolate(heat[None, None], size=tuple(video.shape[1:]), mode="trilinear",
                             align_corners=False)[0, 0]
    colours = colormap(heat).to(video.dtype)
    return ((1 - alpha) * video + alpha * colours).clamp(0.0, 1.0)


def class_clips(folder: str | Path, class_names: Sequence[str],
                on_warning: Callable[[str], None] | None = None) -> dict[str, list[Path]]:
    """The stimulus clips of each class in ``folder`` (``--stimuli DIR``), in natural order.

    Two layouts, also mixed: ``DIR/<class>/*`` (the Kinetics layout: video files, or folders
    of frame images, inside one folder per class) and ``DIR/<class>_*.*`` (video files named
    after their class). A class name with spaces also matches with underscores
    (``pouring tea`` -> ``pouring_tea``); a file name matching several classes goes to the
    longest (``push_up_1.mp4`` is ``push_up``'s, not ``push``'s). Classes without clips are
    left out; entries matching no class are named in one warning."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise LeapsError(f"--stimuli {root} is not a folder; pass a folder of stimulus videos "
                         "named <class>_<n>.mp4, or of <class>/ folders of clips")
    spellings = {}
    for name in class_names:
        for spelling in (name, name.replace(" ", "_")):
            spellings.setdefault(spelling, name)
    found: dict[str, list[Path]] = {}
    unmatched = []
    entries = sorted((p for p in root.iterdir() if not p.name.startswith(".")),
                     key=lambda p: _natural_key(p.name))
    for entry in entries:
        if entry.is_dir() and entry.name in spellings:
            clips = [p for p in sorted(entry.iterdir(), key=lambda p: _natural_key(p.name))
                     if not p.name.startswith(".") and (
                         p.is_dir() or p.suffix.lower() in VIDEO_EXTENSIONS)]
            found.setdefault(spellings[entry.name], []).extend(clips)
            continue
        if entry.is_file() and entry.suffix.lower() in VIDEO_EXTENSIONS:
            owners = [s for s in spellings if entry.stem.startswith(f"{s}_")]
            if owners:
                found.setdefault(spellings[max(owners, key=len)], []).append(entry)
                continue
        unmatched.append(entry.name)
    found = {name: clips for name, clips in found.items() if clips}
    if unmatched and on_warning is not None:
        shown = ", ".join(unmatched[:3]) + (f" (and {len(unmatched) - 3} more)"
                                            if len(unmatched) > 3 else "")
        on_warning(f"{root}: {shown} match no class of the model and are not used (expected "
                   "<class>/ folders or <class>_*.<video> files)")
    if not found:
        some = ", ".join(list(class_names)[:4]) + (" ..." if len(class_names) > 4 else "")
        raise LeapsError(f"stimulus folder {root} holds no clips of the model's classes "
                         f"({some}); lay it out as <class>/*.mp4 or <class>_<n>.mp4")
    return found
