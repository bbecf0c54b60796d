"""Videos and live sources -> one description per scene, with start and end times (WebVTT, SRT, JSON).

    from captioner import Captioner
    from captioner.apps.video import describe_video, to_vtt
    cues = describe_video(Captioner.load(), "clip.mp4")   # [Cue(start, end, text, ...)], one per scene
    open("clip.vtt", "w").write(to_vtt(cues))             # for <track kind="descriptions">

How: PyAV decodes the video; `fps` frames a second are sampled; a scene changes when a sampled frame's small
grayscale thumbnail differs from the scene's first one by more than `threshold` (mean absolute difference,
0-1: cheap next to the encoder, and comparing with the scene's start rather than the previous frame also
catches slow pans); each scene is described once, from the frame `settle_s` after its cut (or its last, if
shorter: frames right at a cut are often blends or blurred), and scene frames go through
`Captioner.caption_batch` together. A damaged or truncated file raises VideoError naming the file and the time
of the damage; the scenes before it were described and are on the error (`.cues`).

`live_scenes` does the same for a camera, a stream URL or a file read as a stream: each scene is described as
soon as it has settled (`captioner live`).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

VIDEO_SUFFIXES = {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".ogv", ".y4m",
                  ".wmv", ".flv", ".3gp"}
THUMB = 32         # scene detection compares THUMB x THUMB grayscale thumbnails
KEY_SIDE = 512     # kept frames are reduced to this long side (the encoder takes 260 x 260)
TAG_AT = 0.5       # concepts at least this probable are a cue's tags (as on the page)


class VideoError(Exception):
    """A video that cannot be read (on), as one line naming the file; `cues`: the scenes described before."""

    def __init__(self, message: str, cues: list | None = None):
        super().__init__(message)
        self.cues = cues or []


@dataclass
class Frame:
    t: float            # seconds from the first frame
    thumb: np.ndarray   # (THUMB, THUMB) float32 grayscale in 0-1, for scene detection
    image: np.ndarray   # (H, W, 3) uint8 RGB, long side <= KEY_SIDE, for the captioner


@dataclass
class Scene:
    start: float
    end: float | None   # None: still going (live)
    key: Frame          # the frame described


@dataclass
class Cue:
    start: float
    end: float | None
    text: str                     # what to say (CaptionResult.text: hedged when unsure)
    caption: str = ""             # the model's own sentence
    confidence: float | None = None
    tags: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def is_video(path) -> bool:
    return Path(str(path)).suffix.lower() in VIDEO_SUFFIXES


# ---- decoding and sampling ------------------------------------------------------------------

def source_name(source) -> str:
    """How messages name a source: its path or URL, or a file object's `name` (an upload's file name)."""
    return str(getattr(source, "name", "video") if hasattr(source, "read") else source)


def _open(source, fmt: str | None):
    import av
    name = source_name(source)
    if fmt is None and name.startswith("/dev/video"):
        fmt = "v4l2"  # a Linux camera
    try:
        container = av.open(source if hasattr(source, "read") else name, format=fmt, timeout=10)
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise VideoError(f"{name}: cannot open as a video ({_reason(e)})") from None
    if not container.streams.video:
        container.close()
        raise VideoError(f"{name}: has no video stream")
    return container


def _reason(e: Exception) -> str:
    text = getattr(e, "strerror", None) or str(e)
    return " ".join(text.split())[:200] or type(e).__name__


def sample_frames(source, fps: float = 4.0, fmt: str | None = None, progress: bool = False) -> Iterator[Frame]:
    """Decode `source` (a file, device or URL PyAV opens, or a binary file object; `fmt` forces a demuxer such as
    v4l2) and yield about `fps` frames a second. Damage raises VideoError after every good frame before it was
    yielded; so does a file whose frames stop well before the duration its header declares (a truncated copy)."""
    import av
    from tqdm import tqdm
    container = _open(source, fmt)
    name = source_name(source)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # frame and slice threads: decoding is most of the cost for long videos
        duration = container.duration / 1e6 if container.duration else None  # microseconds (AV_TIME_BASE)
        bar = tqdm(total=round(duration or 0, 1), unit="s", desc=Path(name).name, leave=False,
                   disable=not progress or not duration or duration < 30,
                   bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s [{elapsed}<{remaining}]")
        t0, next_t, last = None, 0.0, 0.0
        try:
            for frame in container.decode(stream):
                if frame.time is None:
                    continue
                t0 = frame.time if t0 is None else t0
                t = frame.time - t0
                if t + 1e-6 < next_t:
                    continue
                next_t = (math.floor(t * fps + 1e-6) + 1) / fps
                scale = KEY_SIDE / max(frame.width, frame.height, KEY_SIDE)
                w, h = max(2, round(frame.width * scale) // 2 * 2), max(2, round(frame.height * scale) // 2 * 2)
                thumb = frame.reformat(width=THUMB, height=THUMB, format="gray").to_ndarray()
                image = frame.reformat(width=w, height=h, format="rgb24").to_ndarray()
                bar.update(round(t - last, 1))
                last = t
                yield Frame(t, thumb.astype(np.float32) / 255, image)
        except (av.error.FFmpegError, OSError, ValueError) as e:
            raise VideoError(f"{name}: damaged at {last:.1f} s ({_reason(e)})") from None
        finally:
            bar.close()
        if t0 is None:
            raise VideoError(f"{name}: no video frame could be decoded")
        # where the header says the video ends, on the frames' clock (MPEG-TS and streams may not start at 0)
        end = (container.start_time / 1e6 if container.start_time is not None else t0) + (duration or 0)
        if duration and t0 + last + max(1.0, 2 / fps) < end:
            raise VideoError(f"{name}: truncated or damaged: frames stop at {last:.1f} s of {duration:.1f} s")
    finally:
        container.close()


# ---- scene detection ------------------------------------------------------------------------

class SceneCuts:
    """Says whether a frame starts a new scene: its thumbnail differs from the current scene's first frame by
    more than `threshold`, and the current scene is at least `min_scene_s` long (a flash is not two scenes)."""

    def __init__(self, threshold: float = 0.12, min_scene_s: float = 0.5):
        self.threshold, self.min_scene_s = threshold, min_scene_s
        self.anchor: Frame | None = None

    def __call__(self, frame: Frame) -> bool:
        if self.anchor is None or (frame.t - self.anchor.t >= self.min_scene_s
                                   and difference(self.anchor.thumb, frame.thumb) > self.threshold):
            self.anchor = frame
            return True
        return False


def difference(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference of two thumbnails, 0 (same) to 1; the overall brightness change is taken
    out first, so a camera adjusting its exposure does not start a new scene."""
    return float(np.abs((a - a.mean()) - (b - b.mean())).mean())


def scenes(frames: Iterator[Frame], *, threshold: float = 0.12, settle_s: float = 1.0,
           fps: float = 4.0) -> Iterator[Scene]:
    """Each scene once it has ended (end = the next cut, or a sample period after the last frame). On damage
    the scene in progress is yielded, ended at its last good frame, and the VideoError is raised after it."""
    cut = SceneCuts(threshold)
    start = key = last = None
    try:
        for frame in frames:
            if cut(frame):
                if key is not None:
                    yield Scene(start, frame.t, key)
                start, key = frame.t, frame
            elif frame.t - start <= settle_s + 1e-6:
                key = frame  # the latest frame within settle_s of the cut
            last = frame
    except VideoError:
        if key is not None:
            yield Scene(start, last.t + 1 / fps, key)
        raise
    if key is not None:
        yield Scene(start, last.t + 1 / fps, key)


def live_scenes(frames: Iterator[Frame], *, threshold: float = 0.12, settle_s: float = 0.5) -> Iterator[Scene]:
    """Each scene as soon as it has settled (its frame `settle_s` after the cut), end unknown."""
    cut = SceneCuts(threshold)
    pending = None
    for frame in frames:
        if cut(frame):
            pending = frame
        if pending is not None and frame.t - pending.t >= settle_s - 1e-6:
            yield Scene(pending.t, None, frame)
            pending = None


# ---- describing -----------------------------------------------------------------------------

def _cue(scene: Scene, result) -> Cue:
    tags = [c["word"] for c in result.concepts if c["p"] >= TAG_AT]
    return Cue(round(scene.start, 3), None if scene.end is None else round(scene.end, 3), result.text,
               result.caption, result.confidence, tags)


def describe_video(captioner, path, *, fps: float = 4.0, threshold: float = 0.12, settle_s: float = 1.0,
                   batch_size: int = 8, progress: bool = False) -> list[Cue]:
    """One cue per scene of the video at `path`, in order. Scene frames are captioned `batch_size` at a time.
    Raises VideoError (one line, naming the file) for a video that cannot be read; for one damaged part way,
    after describing the scenes before the damage, which the error carries as `.cues`."""
    cues: list[Cue] = []
    batch: list[Scene] = []

    def flush():
        results = captioner.caption_batch([s.key.image for s in batch])
        for scene, r in zip(batch, results):
            if isinstance(r, Exception):  # cannot happen for decoded frames; said rather than dropped
                raise VideoError(f"{source_name(path)}: frame at {scene.key.t:.1f} s: {r}", cues)
            cues.append(_cue(scene, r))
        batch.clear()

    try:
        for scene in scenes(sample_frames(path, fps, progress=progress), threshold=threshold, settle_s=settle_s,
                            fps=fps):
            batch.append(scene)
            if len(batch) >= batch_size:
                flush()
    except VideoError as e:
        if batch:
            flush()
        raise VideoError(str(e), cues) from None
    if batch:
        flush()
    return cues


def describe_live(captioner, source, *, fps: float = 4.0, threshold: float = 0.12, settle_s: float = 0.5,
                  fmt: str | None = None) -> Iterator[Cue]:
    """A cue (end None) for each scene of a camera, stream or file, as soon as the scene has settled."""
    for scene in live_scenes(sample_frames(source, fps, fmt=fmt), threshold=threshold, settle_s=settle_s):
        yield _cue(scene, captioner.caption(scene.key.image))


# ---- writing --------------------------------------------------------------------------------

def _timestamp(seconds: float, sep: str) -> str:
    ms = round(max(0.0, seconds) * 1000)
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def clock(seconds: float) -> str:
    """A time as people read it: 0:12, 1:02:03, and tenths only when there are some (0:02.5)."""
    whole, tenths = divmod(round(max(0.0, seconds) * 10), 10)
    h, m, s = whole // 3600, whole // 60 % 60, whole % 60
    return (f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}") + (f".{tenths}" if tenths else "")


def _one_line(text: str) -> str:
    return " ".join(text.split()).replace("-->", "->")  # a blank line or "-->" would end or break the cue


def to_vtt(cues: list[Cue]) -> str:
    """WebVTT (W3C), as browsers read for <track kind="descriptions">: one numbered cue per scene."""
    out = ["WEBVTT", ""]
    for i, c in enumerate(cues, 1):
        text = _one_line(c.text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        out += [str(i), f"{_timestamp(c.start, '.')} --> {_timestamp(c.end, '.')}", text, ""]
    return "\n".join(out)


def to_srt(cues: list[Cue]) -> str:
    out = []
    for i, c in enumerate(cues, 1):
        out += [str(i), f"{_timestamp(c.start, ',')} --> {_timestamp(c.end, ',')}", _one_line(c.text), ""]
    return "\n".join(out)


def to_json(cues: list[Cue], source=None, error: str | None = None) -> str:
    return json.dumps({"source": None if source is None else str(source), "error": error,
                       "cues": [c.to_dict() for c in cues]}, indent=2, ensure_ascii=False)
