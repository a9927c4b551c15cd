"""A still picture of a run for a saved notebook: its loss curves and its latest figure, as a PNG.

Read with TensorBoard's own reader (`EventAccumulator`, which drops the points a resumed run
replaced), drawn with `matplotlib.figure.Figure` (Agg, no pyplot state). Names come from the files
and are drawn as plain text (a ``$`` in a folder or tag name starts no formula); an image that does
not decode is left out of the picture.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from trainer.board import EVENT_FILE_PATTERN

#: The most runs of a folder the picture draws (the newest ones).
MAX_RUNS = 8
#: The images shown in the picture's right panel, by preference (else the latest image of any tag).
FIGURE_TAGS = ("predictions vs. actuals",)


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


def _runs(root: Path) -> list[Path]:
    """The run directories at or below `root`, newest (by last event file) last."""
    runs = {p.parent for p in root.rglob(EVENT_FILE_PATTERN) if p.is_file()}
    return sorted(runs, key=lambda run: max(p.stat().st_mtime for p in run.glob(EVENT_FILE_PATTERN)))


def snapshot_png(path: str | os.PathLike) -> bytes | None:
    """A PNG of the runs at or below `path`: their loss curves (the ``Loss/`` tags, and the
    tutorial's ``training loss``) on the left, the newest run's latest figure on the right; None when the
    runs hold neither."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root = Path(path)
    curves: list[tuple[str, list[int], list[float]]] = []
    latest = None
    runs = _runs(root)[-MAX_RUNS:]
    for run in runs:
        events = EventAccumulator(os.fspath(run), size_guidance={"scalars": 2000, "images": 1})
        events.Reload()
        name = os.fspath(run.relative_to(root)) if run != root else run.name
        tags = events.Tags()
        for tag in sorted(filter(_is_loss, tags["scalars"])):
            points = events.Scalars(tag)
            label = _plain(f"{name}: {tag}" if len(runs) > 1 else tag)
            curves.append((label, [p.step for p in points], [p.value for p in points]))
        images = [t for t in FIGURE_TAGS if t in tags["images"]] or sorted(tags["images"])
        if images:
            event = events.Images(images[0])[-1]
            picture = _decoded(event.encoded_image_string)
            latest = (images[0], event.step, picture) if picture is not None else latest
    if not curves and latest is None:
        return None
    figure = Figure(figsize=(11, 3.6) if latest and curves else (6, 3.6), dpi=100, layout="constrained")
    axes = figure.subplots(1, 2 if latest and curves else 1, squeeze=False)[0]
    if curves:
        for label, steps, values in curves:
            axes[0].plot(steps, values, marker="o" if len(steps) < 3 else None, label=label)
        axes[0].set(xlabel="step", ylabel="loss", title="losses")
        axes[0].legend(fontsize="small")
        axes[0].grid(alpha=0.3)
    if latest is not None:
        tag, step, picture = latest
        panel = axes[-1]
        panel.imshow(picture)
        panel.set_title(_plain(f"{tag} (step {step})"))
        panel.axis("off")
    buffer = io.BytesIO()
    FigureCanvasAgg(figure).print_png(buffer)
    return buffer.getvalue()
