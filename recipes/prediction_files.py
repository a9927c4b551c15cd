"""The files of a segmentation ``predict``: the images it reads (`check_images`) and the outputs
it writes (`output_paths`), checked before anything is written.

Writes stay inside ``--out``: class names are checked (`check_class_names`), and every planned
output is checked before the first write (`check_outputs`): inside ``--out`` once symbolic links
are followed, outside training data folders, one output per path. `INCOMPLETE_FILE` in ``--out``
marks a folder whose predict has not finished; `remove_partial_files` removes what a killed
predict left.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from recipes.errors import UsageError
from trainer_datasets import DatasetError, read_image_rgb
from trainer_datasets.image_files import is_image_file, is_system_file, not_regular
from trainer_datasets.segmentation_layout import class_name_problem

__all__ = ["INCOMPLETE_FILE", "ImageFile", "check_class_names", "check_images", "check_outputs", "output_paths"]

#: Errors the image reader raises for a file it cannot use.
READ_ERRORS = (DatasetError, OSError, RuntimeError, ValueError)
#: The file in ``--out`` that marks a predict that has not finished: its outputs are partial.
INCOMPLETE_FILE = "PREDICT_INCOMPLETE.txt"
#: The temporary files of a predict's writes (`trainer.atomic.temporary_path` of an output or the mark).
_TEMPORARY = re.compile(rf"\..+\.png\.\d+\.tmp|\.{re.escape(INCOMPLETE_FILE)}\.\d+\.tmp")


@dataclass(frozen=True)
class ImageFile:
    """An image to predict: its file and its own size.

    Args:
        path: the image file.
        height, width: its size in pixels.
    """

    path: Path
    height: int
    width: int

    @property
    def id(self) -> str:
        """The file name without its extension: the outputs are named after it."""
        return self.path.stem


def check_images(folder: str) -> list[ImageFile]:
    """Decode every image file in `folder` (sorted by name) and return their sizes. Hidden and
    system files (``.DS_Store``, ``Thumbs.db``) are left out, as training leaves them out, and
    so are folders and files with other extensions.

    Nothing is kept in memory but the sizes. Every problem goes into one `UsageError`: a
    missing folder, entries with an image extension that are no regular files (FIFOs, dangling or
    looping links: named, never opened), no images, each file that cannot be decoded (named, with the reason) and
    ids (file names without extension) that two files share, since the outputs are named by id.

    Args:
        folder: the ``--images`` folder.
    """
    root = Path(folder)
    if not root.is_dir():
        raise UsageError(f"--images {folder!r}: no such folder")
    entries = sorted(p for p in root.iterdir() if is_image_file(p) and not is_system_file(p))
    kinds = {p: not_regular(p) for p in entries}
    irregular = [f"{p.name} is {kind}" for p, kind in kinds.items() if kind not in (None, "a folder")]
    if irregular:  # never opened: reading a FIFO would wait forever
        raise UsageError(
            f"--images {folder!r} holds entries that are not image files, nothing written: " + "; ".join(irregular)
        )
    paths = [p for p, kind in kinds.items() if kind is None]
    if not paths:
        raise UsageError(f"--images {folder!r} holds no .png, .jpg or .tif images")
    files: list[ImageFile] = []
    problems: list[str] = []
    seen: dict[str, Path] = {}
    for path in paths:
        if path.stem in seen:
            problems.append(f"{seen[path.stem].name} and {path.name} share the id {path.stem!r} that names the outputs")
            continue
        seen[path.stem] = path
        try:
            image = read_image_rgb(path)
        except READ_ERRORS as exc:
            problems.append(str(exc))
            continue
        files.append(ImageFile(path, image.shape[-2], image.shape[-1]))
    if problems:
        raise UsageError(
            f"{len(problems)} of the {len(paths)} images in {folder} cannot be predicted, nothing "
            f"written: " + "; ".join(problems)
        )
    return files


def check_class_names(classes: object, source: str | os.PathLike) -> list[str]:
    """`classes`, the class names a checkpoint records, when every one can name outputs: a list of
    distinct strings that `trainer_datasets.segmentation_layout.class_name_problem` accepts (no
    ``.``, ``..``, path separator or control character). Otherwise a one-line `UsageError`
    naming `source` and the first name at fault: a name like ``../x`` would send outputs out of
    ``--out``.

    Args:
        classes: the ``classes`` of the checkpoint's ``data`` (or ``config``).
        source: the checkpoint, for the message.
    """
    if not isinstance(classes, (list, tuple)):
        raise UsageError(
            f"{source} records its class names as a {type(classes).__name__}, not a list of names; nothing written"
        )
    for index, name in enumerate(classes):
        problem = class_name_problem(name)
        if problem is None and name in classes[:index]:
            problem = f"names class {classes.index(name)} as well"
        if problem is not None:
            raise UsageError(
                f"{source} records the class name {name!r} (class {index}), which {problem}; outputs are "
                "named after the classes, so it is refused: nothing written"
            )
    return list(classes)


def output_paths(
    out: Path, image_id: str, classes: list[str], labels: bool = False, probabilities: bool = False
) -> list[Path]:
    """The files `write_prediction` writes for one image, probability map then mask per class.

    One class: ``<out>/<id>_prob.png`` and ``<out>/<id>_mask.png``. Several: the training layout,
    ``<out>/<class>/<id>_prob.png`` and ``<out>/<class>/<id>.png``. With `labels`, the files of
    `write_label_prediction`: the label map ``<out>/<id>.png``, then with `probabilities`
    ``<out>/<class>/<id>_prob.png`` per class.

    Args:
        out: the output folder.
        image_id: the image's file name without extension.
        classes: the class names.
        labels: the outputs of a model trained on label maps.
        probabilities: with `labels`, the probability maps too.
    """
    return [path for path, _ in _outputs(out, image_id, classes, labels, probabilities)]


def _outputs(
    out: Path, image_id: str, classes: Sequence[str], labels: bool, probabilities: bool
) -> list[tuple[Path, str]]:
    """`output_paths` with what each file is, for messages."""
    if labels:
        maps = [(out / name / f"{image_id}_prob.png", f"probability map of class {name!r}") for name in classes]
        return [(out / f"{image_id}.png", "label map"), *(maps if probabilities else [])]
    if len(classes) == 1:
        return [(out / f"{image_id}_prob.png", "probability map"), (out / f"{image_id}_mask.png", "mask")]
    return [
        pair
        for name in classes
        for pair in (
            (out / name / f"{image_id}_prob.png", f"probability map of class {name!r}"),
            (out / name / f"{image_id}.png", f"mask of class {name!r}"),
        )
    ]


def check_outputs(
    out: Path,
    files: list[ImageFile],
    classes: list[str],
    overwrite: bool,
    labels: bool = False,
    probabilities: bool = False,
) -> None:
    """Refuse, before anything is written, outputs that would go astray, be lost or replace files;
    each case is a one-line `UsageError` (saying that nothing was written):

    - two outputs at one path, e.g. with several classes ``cell.png``'s probability map and
      ``cell_prob.png``'s mask (both ``<class>/cell_prob.png``), or an output file where the
      folder of a class goes: both images are named;
    - an output whose folder lies outside `out` once symbolic links are followed (a class folder
      that links elsewhere), or in a training data folder (one with ``images/`` and ``masks/``);
    - an output that is a folder;
    - unless `overwrite`: `INCOMPLETE_FILE` in `out` (a predict into it that did not finish),
      and any output that exists already (the first is named, and how many there are).

    Args:
        out: the output folder (it may not exist yet).
        files: the images, as `check_images` returns them.
        classes: the class names (checked by `check_class_names`).
        overwrite: existing outputs may be replaced.
        labels: the outputs of `write_label_prediction` instead of `write_prediction`.
        probabilities: with `labels`, the probability maps too.
    """
    planned = _planned_outputs(out, files, classes, labels, probabilities)
    _check_output_folders(out, planned)
    clashes = [path for path in planned if path.exists()]
    taken = [path for path in clashes if path.is_dir()]
    if taken:
        raise UsageError(f"--out {str(out)!r}: {taken[0]} is a folder where an output file goes; nothing written")
    if overwrite:
        return
    if (out / INCOMPLETE_FILE).exists():
        raise UsageError(
            f"--out {str(out)!r} holds {INCOMPLETE_FILE}: a predict into it stopped before the end, so its outputs "
            "are partial; nothing written: run predict again with --overwrite to complete them, or choose another "
            "--out"
        )
    if clashes:
        more = f" and {len(clashes) - 1} more of the outputs" if len(clashes) > 1 else ""
        raise UsageError(
            f"--out {str(out)!r} already holds {clashes[0]}{more}; nothing written: pass --overwrite to "
            "replace them, or choose another --out"
        )


def _planned_outputs(
    out: Path, files: list[ImageFile], classes: list[str], labels: bool, probabilities: bool
) -> dict[Path, tuple[ImageFile, str]]:
    """Every output of `files`, with its image and what it is; two at one path, or an output
    where a class's folder goes, is a `UsageError` naming both images."""
    planned: dict[Path, tuple[ImageFile, str]] = {}
    for file in files:
        for path, role in _outputs(out, file.id, classes, labels, probabilities):
            if path in planned:
                other, other_role = planned[path]
                both = (
                    f"{file.path.name} would write it twice (its {other_role} and its {role})"
                    if other is file
                    else f"{other.path.name} and {file.path.name} would both write it (the {other_role} of "
                    f"{other.path.name}, the {role} of {file.path.name})"
                )
                raise UsageError(
                    f"--out {str(out)!r}: {path} is planned twice: {both}; nothing written: rename one of the "
                    "images or predict them into separate folders"
                )
            planned[path] = (file, role)
    folders = {path.parent for path in planned}
    for path, (file, role) in planned.items():
        if path in folders:
            raise UsageError(
                f"--out {str(out)!r}: {path} would be both the {role} of {file.path.name} and the folder of class "
                f"{path.name!r}; nothing written: rename the image or predict it into another folder"
            )
    return planned


def _check_output_folders(out: Path, planned: dict[Path, tuple[ImageFile, str]]) -> None:
    """Refuse an output folder that leads outside `out` (a symbolic link), one that two classes
    share, or one in a training data folder."""
    root = out.resolve()
    leads_to: dict[Path, Path] = {}
    for folder in sorted({path.parent for path in planned}):
        try:
            resolved = folder.resolve()
        except (OSError, RuntimeError) as exc:  # a symbolic link loop
            raise UsageError(f"--out {str(out)!r}: cannot follow {folder}: {exc}; nothing written") from None
        if not resolved.is_relative_to(root):
            raise UsageError(
                f"--out {str(out)!r}: the output folder {folder} leads to {resolved}, outside --out (a symbolic "
                "link); predict writes only inside --out: nothing written"
            )
        if resolved in leads_to:  # the outputs of two classes would land in one folder
            raise UsageError(
                f"--out {str(out)!r}: the output folders {leads_to[resolved]} and {folder} are one folder, "
                f"{resolved} (a symbolic link), where their outputs would replace each other; nothing written"
            )
        leads_to[resolved] = folder
        data = data_folder_above(resolved)
        if data is not None:
            raise UsageError(
                f"--out {str(out)!r}: the output folder {folder} lies in the training data folder {str(data)!r} "
                "(it holds images/ and masks/); nothing written: choose a folder outside it"
            )


def remove_partial_files(out: Path, classes: Iterable[str]) -> list[Path]:
    """Delete the temporary files (``.NAME.png.PID.tmp``, and that of `INCOMPLETE_FILE`) that a
    predict killed while writing left in `out` and in its class folders, and return them. Call it
    only while holding `out`'s lock (no other predict writes there).

    Args:
        out: the output folder.
        classes: the class names (their folders in `out` are looked into too).
    """
    removed = []
    for folder in (out, *(out / name for name in classes)):
        if folder.is_dir() and not folder.is_symlink():
            for path in folder.iterdir():
                if _TEMPORARY.fullmatch(path.name) and path.is_file() and not path.is_symlink():
                    path.unlink(missing_ok=True)
                    removed.append(path)
    return removed


def data_folder_above(path: Path) -> Path | None:
    """The training data folder (one holding both ``images/`` and ``masks/``) that `path` is, or
    lies in, else None."""
    for folder in (path, *path.parents):
        if (folder / "images").is_dir() and (folder / "masks").is_dir():
            return folder
    return None
