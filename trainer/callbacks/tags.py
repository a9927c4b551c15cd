"""The TensorBoard tag scheme every callback and recipe follows (docs/tensorboard.md, "TensorBoard tags").

- ``Loss/training loss``: the mean training loss over the last `every_n_steps` optimizer steps (the
  running loss of the PyTorch TensorBoard tutorial, whose name it keeps, in the ``Loss`` group).
- ``Loss/training (epoch mean)`` and ``Loss/validation``: the epoch's training and validation loss.
- ``Validation/<metric>``: each validation metric at each epoch's end, under the name it was
  passed with (``metrics={"iou": ...}``: ``Validation/iou``). A metric named ``<metric>_<class>``
  beside a metric ``<metric>`` holds one class's value and goes under the parent's tag:
  ``Validation/iou/<class>`` (or ``Validation/IoU/<class>`` where ``tags=`` renames the parent).
- ``throughput (samples per second)``: training samples per second of wall time, at the running
  loss's points.
- ``learning rate``: the optimizer's learning rate after the scheduler's step, per epoch.
- images: ``images`` and ``masks`` (grids), ``predictions vs. actuals`` (figure); PR curves:
  ``pr/<index> <class>``.

TensorBoard's Time Series sorts cards by tag (capitals before lower case) and groups them by the
part before the first ``/``; it opens the first two groups. The two capitalised groups, ``Loss``
(all three losses, the running training loss among them) and ``Validation``, therefore open
first, whatever the other (lower-case) tags are called. A ``/`` is in a tag only where it starts
a group: ``per second``, not ``/s``, or TensorBoard would make a group ``throughput (samples``.
The summary of a finished run (its options and the last value of each curve) is in the HParams
tab only, never as a one-point scalar chart.
"""

from __future__ import annotations

from collections.abc import Iterable

#: The running training loss, every `every_n_steps` steps.
RUNNING_LOSS = "Loss/training loss"
#: Training samples per second of wall time, at the running loss's points.
THROUGHPUT = "throughput (samples per second)"
#: The epoch-end values of the trainer's logs that are not validation metrics.
EPOCH = {"loss": "Loss/training (epoch mean)", "val_loss": "Loss/validation", "lr": "learning rate"}
#: The group of the validation metrics: ``val_<name>`` is logged as ``Validation/<name>``.
VALIDATION = "Validation/"


def epoch_tag(key: str) -> str:
    """The tag of an epoch log key: ``loss``, ``val_loss`` and ``lr`` as in `EPOCH`,
    ``val_<metric>`` as ``Validation/<metric>``, anything else as ``epoch/<key>``."""
    if key in EPOCH:
        return EPOCH[key]
    if key.startswith("val_"):
        return VALIDATION + key[len("val_") :]
    return f"epoch/{key}"


def parent_metric(key: str, keys: Iterable[str]) -> str | None:
    """The validation metric among `keys` that `key` is one class's (or part's) value of:
    ``val_iou`` for ``val_iou_nucleus`` when ``val_iou`` is also among `keys` (the shortest such
    name, so class names may hold ``_``); None for any other key.

    Args:
        key: an epoch log key.
        keys: the keys logged with it.
    """
    if not key.startswith("val_") or key == "val_loss":
        return None
    keys = set(keys)
    start = len("val_")
    while (cut := key.find("_", start + 1)) != -1:
        if key[:cut] in keys and key[:cut] != "val_loss":
            return key[:cut]
        start = cut
    return None


def pr_curve_tags(classes: list[str], prefix: str = "pr/") -> list[str]:
    """One PR-curve tag per class, numbered so that TensorBoard lists them in class order:
    ``pr/0 T-shirt/top`` ... (zero-padded from 10 classes on)."""
    width = len(str(len(classes) - 1)) if classes else 1
    return [f"{prefix}{index:0{width}d} {name}" for index, name in enumerate(classes)]
