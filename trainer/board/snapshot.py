"""A still picture of a run for a saved notebook: its loss curves and its latest figure, as a PNG.

Read with TensorBoard's own reader (`EventAccumulator`, which drops the points a resumed run
replaced), drawn with `matplotlib.figure.Figure` (Agg, no pyplot state) for a notebook's width
(930 pixels, text at its size on screen): the loss curves on top, one colour per run and one line
style per tag (training solid, validation dashed), with a legend beside the plot holding one entry
per run and one per tag; below them the newest run's latest figure at the full width (a small
image at most twice its size). Names come from the files and are drawn as plain text (a ``$`` in a
folder or tag name starts no formula); an image that does not decode is left out of the picture.

The picture is drawn once per state of the event files: `snapshot` keeps the last one of each
folder, keyed by the names, sizes and modification times of its event files, so a re-run of a
cell on an unchanged run returns at once.
"""

from __future__ import annotations

import io
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from trainer.event_files import EVENT_FILE_PATTERN, find_event_files

#: The most runs of a folder the picture draws (the newest ones).
MAX_RUNS = 8
#: The images shown below the curves, by preference (else the latest image of any tag).
FIGURE_TAGS = ("predictions vs. actuals",)
#: The picture's width in pixels: JupyterLab's output width, so that text shows at its own size.
WIDTH = 930
#: The tallest the latest figure is drawn, in pixels.
MAX_FIGURE_HEIGHT = 1200
_DPI = 100
_cache: dict[str, tuple[tuple, Snapshot]] = {}


@dataclass(frozen=True)
class Snapshot:
    """A picture of a folder's runs.

    Attributes:
        png: the PNG, or None when the runs hold neither loss curves nor images.
        points: the number of points of the longest loss curve.
    """

    png: bytes | None
    points: int


@dataclass
class _Runs:
    curves: list[tuple[str, str, list[int], list[float]]]  # run, tag, steps, values
    latest: tuple[str, int, Any] | None  # tag, step, image


def _plain(text: str) -> str:
    """`text` as matplotlib draws it literally: ``$`` would otherwise start a formula."""
    return text.replace("$", r"\$")


def _decoded(encoded: bytes) -> Any:
    """The image in `encoded` (PNG, JPEG...), decoded; None where it does not decode (damaged, not
    an image, or larger than Pillow's decompression-bomb limit)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(encoded)) as image:
            image.load()
            return image.copy()
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def _is_loss(tag: str) -> bool:
    return tag.startswith("Loss/") or tag == "training loss"  # the tutorial's own tag, written by hand


def _style(tag: str) -> Literal["-", "--", ":"]:
    """The line style of a loss tag: validation dashed, an epoch mean dotted, the rest solid."""
    lowered = tag.lower()
    return "--" if "val" in lowered else ":" if "epoch" in lowered else "-"


def _run_folders(files: list[Path]) -> list[Path]:
    """The run directories of event files `files`, newest (by last event file) last."""
    runs = {p.parent for p in files}
    return sorted(runs, key=lambda run: max(p.stat().st_mtime for p in run.glob(EVENT_FILE_PATTERN)))


class _Records:
    """The events of a run's event files in TensorBoard's order (by file name), for
    `EventAccumulator` in place of its own loader: the same records, read without checking each
    one's checksum, which TensorBoard's pure-Python reader computes at about 0.1 s per MB (most of
    a run's bytes are its images). A record cut short (being written) ends its file."""

    def __init__(self, run: Path) -> None:
        self.run = run

    def Load(self) -> Iterator[Any]:  # noqa: N802 (the name EventAccumulator calls)
        from google.protobuf.message import DecodeError
        from tensorboard.compat.proto.event_pb2 import Event

        for file in sorted(self.run.glob(EVENT_FILE_PATTERN)):
            data, position = file.read_bytes(), 0
            while position + 12 <= len(data):  # a record: length (8 bytes), its checksum (4), data, checksum (4)
                (length,) = struct.unpack_from("<Q", data, position)
                end = position + 12 + length
                if end + 4 > len(data):
                    break
                try:
                    yield Event.FromString(data[position + 12 : end])
                except DecodeError:
                    break
                position = end + 4


def _read(root: Path, runs: list[Path]) -> _Runs:
    """The loss curves of `runs` (folders at or below `root`) and the newest one's latest figure."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found = _Runs([], None)
    guidance = {"scalars": 2000, "images": 1, "histograms": 1, "tensors": 1, "audio": 1, "compressedHistograms": 1}
    for run in runs:
        events = EventAccumulator(os.fspath(run), size_guidance=guidance)
        if hasattr(events, "_generator"):  # TensorBoard's reader otherwise (slower, same events)
            events._generator = _Records(run)
        events.Reload()
        name = os.fspath(run.relative_to(root)) if run != root else run.name
        tags = events.Tags()
        for tag in sorted(filter(_is_loss, tags["scalars"])):
            points = events.Scalars(tag)
            found.curves.append((name, tag, [p.step for p in points], [p.value for p in points]))
        images = [t for t in FIGURE_TAGS if t in tags["images"]] or sorted(tags["images"])
        if images:
            event = events.Images(images[0])[-1]
            picture = _decoded(event.encoded_image_string)
            found.latest = (images[0], event.step, picture) if picture is not None else found.latest
    return found


def _draw_curves(axes: Any, curves: list[tuple[str, str, list[int], list[float]]]) -> None:
    from matplotlib.lines import Line2D

    runs = list(dict.fromkeys(run for run, *_ in curves))
    tags = sorted(dict.fromkeys(tag for _, tag, *_ in curves), key=lambda tag: (_style(tag) != "-", tag))
    colours = {run: f"C{index}" for index, run in enumerate(runs)}
    for run, tag, steps, values in curves:
        marker = "o" if len(steps) < 12 else None
        axes.plot(steps, values, color=colours[run], linestyle=_style(tag), marker=marker, markersize=4)
    handles = [Line2D([], [], color="0.3", linestyle=_style(tag), label=_plain(tag)) for tag in tags]
    if len(runs) > 1:
        handles += [Line2D([], [], color=colours[run], linewidth=3, label=_plain(run)) for run in runs]
    axes.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    axes.set(xlabel="step", ylabel="loss", title="losses" if len(runs) > 1 else _plain(f"losses of {runs[0]}"))
    axes.grid(alpha=0.3)


def _rendered(figure: Any) -> Any:
    """The matplotlib `figure`, drawn, as a Pillow image."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from PIL import Image

    buffer = io.BytesIO()
    FigureCanvasAgg(figure).print_png(buffer)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def _draw(found: _Runs) -> bytes:
    """The PNG of `found`: the curves on top, the latest figure below them, centred, as wide as the
    picture (a small one at most twice its size, a tall one at most `MAX_FIGURE_HEIGHT` pixels)."""
    import matplotlib
    from matplotlib.figure import Figure
    from PIL import Image

    parts = []
    with matplotlib.rc_context({"font.size": 12}):
        if found.curves:
            curves = Figure(figsize=(WIDTH / _DPI, 3.4), dpi=_DPI, layout="constrained")
            _draw_curves(curves.subplots(), found.curves)
            parts.append(_rendered(curves))
        if found.latest is not None:
            tag, step, image = found.latest
            title = Figure(figsize=(WIDTH / _DPI, 0.4), dpi=_DPI)
            title.text(0.5, 0.5, _plain(f"{tag} (step {step})"), ha="center", va="center")
            scale = min(WIDTH / image.width, 2.0, MAX_FIGURE_HEIGHT / image.height)
            shown = image.convert("RGB").resize((round(image.width * scale), round(image.height * scale)))
            panel = Image.new("RGB", (WIDTH, shown.height), "white")
            panel.paste(shown, ((WIDTH - shown.width) // 2, 0))
            parts += [_rendered(title), panel]
    picture = Image.new("RGB", (WIDTH, sum(part.height for part in parts)), "white")
    for index, part in enumerate(parts):
        picture.paste(part, (0, sum(previous.height for previous in parts[:index])))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def snapshot(path: str | os.PathLike) -> Snapshot:
    """The picture of the runs at or below `path` (the ``Loss/`` tags, and the tutorial's
    ``training loss``, and the newest run's latest figure), drawn again only when their event
    files changed since the last call on `path`."""
    root = Path(path).resolve()
    files = find_event_files(root)
    key = tuple((os.fspath(p), info.st_size, info.st_mtime_ns) for p, info in ((p, p.stat()) for p in files))
    cached = _cache.get(os.fspath(root))
    if cached is not None and cached[0] == key:
        return cached[1]
    found = _read(root, _run_folders(files)[-MAX_RUNS:])
    points = max((len(steps) for *_, steps, _ in found.curves), default=0)
    made = Snapshot(_draw(found) if found.curves or found.latest is not None else None, points)
    _cache[os.fspath(root)] = (key, made)
    return made


def snapshot_png(path: str | os.PathLike) -> bytes | None:
    """The PNG of `snapshot`; None when the runs hold neither loss curves nor images."""
    return snapshot(path).png
