"""The segmentation folder layout: its files listed and paired, its kind of masks, its class names.

Layout (the pytorch-nested-unet layout, or its one-class shorthand)::

    <root>/images/<id>.<png|jpg|jpeg|tif|tiff>
    <root>/masks/<class>/<id>.png      one folder per class, classes sorted by folder name
    <root>/masks/<id>.png              or: a single class, masks directly in masks/
    <root>/masks/<id>.png + <root>/classes.txt   or: label maps, one class index per pixel

Which kind of masks a folder holds (`MASK_MODES`, the ``mask_mode`` argument):

- ``"binary"``: binary masks, 0 background and any non-zero value foreground, one per class
  folder (several classes are independent: multi-label, a sigmoid per class) or directly in
  ``masks/`` (one class, named ``mask``).
- ``"labels"``: label maps, ``masks/<id>.png`` holding one class index per pixel (8- or 16-bit
  grey, or palette PNG whose palette index is the class, as in Pascal VOC); exactly one class
  per pixel (softmax), and `ignore_index` (255 by default) for pixels of no class, which count
  for neither loss nor metrics. Class names come from ``<root>/classes.txt``, one per line, line
  i naming class i; without it the classes are ``"0"`` ... up to the largest value found.
- ``"auto"`` (the default): ``"labels"`` when the folder has a ``classes.txt`` (for train/ and
  val/ sub-folders: in the sub-folder or in the root above them), else ``"binary"``.
"""

from __future__ import annotations

import os
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from trainer_datasets.errors import DataNotFoundError, DatasetError
from trainer_datasets.image_files import IMAGE_EXTENSIONS, is_image_file, is_system_file, not_regular, read_label_map

LAYOUT = (
    "expected <root>/images/<id>.png (or .jpg/.jpeg/.tif/.tiff) and masks in "
    "<root>/masks/<class>/<id>.png (one folder per class) or <root>/masks/<id>.png"
)
#: What a folder's masks may be: see the module docstring.
MASK_MODES = ("auto", "binary", "labels")
#: The file naming a label-map folder's classes, one per line.
CLASSES_FILE = "classes.txt"
#: The label-map value of pixels that belong to no class, by default (as in Pascal VOC).
IGNORE_INDEX = 255


@dataclass
class FolderLayout:
    """The files found in a segmentation folder, paired by id (file name without extension)."""

    root: Path
    images: dict[str, Path]
    masks: dict[str, dict[str, Path]]  # class name -> id -> mask file; label maps: "labels" -> id -> file
    #: ``"binary"`` or ``"labels"`` (see the module docstring).
    mask_mode: str = "binary"
    #: Label maps: the class names, index i naming class i.
    label_classes: list[str] | None = None
    #: Label maps: the value of pixels of no class.
    ignore_index: int = IGNORE_INDEX

    @property
    def classes(self) -> list[str]:
        """Class names: the mask sub-folder names, sorted; ``["mask"]`` for the flat layout;
        for label maps, `label_classes` in index order."""
        if self.mask_mode == "labels":
            return list(self.label_classes or [])
        return list(self.masks)

    @property
    def ids(self) -> list[str]:
        """All sample ids, sorted."""
        return sorted(self.images)

    def files(self) -> list[Path]:
        """Every image and mask file of the folder, sorted."""
        return sorted([*self.images.values(), *(path for masks in self.masks.values() for path in masks.values())])


def scan_segmentation_folder(
    root: str | os.PathLike,
    mask_mode: str = "auto",
    ignore_index: int = IGNORE_INDEX,
    label_classes: Sequence[str] | None = None,
) -> FolderLayout:
    """List and pair the files of a segmentation folder and tell its kind of masks.

    Nothing is decoded, except label maps without a ``classes.txt``: their classes are ``"0"`` up
    to the largest value (but `ignore_index`) that any of them holds, so all are read once.

    Raises `DataNotFoundError` for a missing root, images/ or masks/ folder or an empty one, and
    `DatasetError` listing every unpaired file (images without masks, masks without images),
    unsupported file, entry that is not a regular file (a FIFO, a dangling or looping symbolic
    link: never opened) or duplicate id in one message. Hidden files and the files operating
    systems leave behind (``.DS_Store``, ``Thumbs.db``, ``desktop.ini``) are left out.
    Label maps in class folders, a class folder or a ``classes.txt`` whose names cannot name a
    class (blank or repeated, ``.`` or ``..``, with a path separator or a control character: see
    `read_classes` and `class_name_problem` in this module) and an `ignore_index` that is a class
    index raise `DatasetError`.

    Args:
        root: the folder.
        mask_mode: ``"auto"``, ``"binary"`` or ``"labels"`` (see the module docstring).
        ignore_index: label maps: the value of pixels of no class (0-65535).
        label_classes: label maps: the class names, in index order (default: those of
            ``<root>/classes.txt``, else indices); given, they make ``"auto"`` mean ``"labels"``.
    """
    if mask_mode not in MASK_MODES:
        raise DatasetError(f"mask_mode must be one of {', '.join(MASK_MODES)}, got {mask_mode!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int) or not 0 <= ignore_index <= 65535:
        raise DatasetError(f"ignore_index must be an integer in 0-65535 (a label-map value), got {ignore_index!r}")
    root = Path(root)
    _check_folders(root)
    problems: list[str] = []
    images = _index_files(root / "images", root, problems)
    if not images and not problems:
        raise DataNotFoundError(f"no images in {root / 'images'}; {LAYOUT}")
    class_dirs, masks = _index_masks(root, problems)
    _check_pairs(root, images, masks, problems)
    classes_file = root / CLASSES_FILE
    if mask_mode == "auto":
        mask_mode = "labels" if label_classes is not None or classes_file.is_file() else "binary"
    if mask_mode == "binary":
        return FolderLayout(root, images, masks)
    if class_dirs:
        raise DatasetError(
            f"{root / 'masks'} holds class folders ({', '.join(p.name for p in class_dirs)}), but label maps "
            f"(mask mode 'labels'{'' if not classes_file.is_file() else ', chosen by ' + str(classes_file)}) are "
            "one file per image, masks/<id>.png; use binary masks for class folders"
        )
    classes = _label_classes(root, masks["mask"], ignore_index, label_classes)
    return FolderLayout(root, images, {"labels": masks["mask"]}, "labels", classes, ignore_index)


def _check_folders(root: Path) -> None:
    """`DataNotFoundError` unless `root`, its images/ and its masks/ are folders."""
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise DataNotFoundError(f"segmentation folder {root} {what}; {LAYOUT}")
    for folder in (root / "images", root / "masks"):
        if not folder.is_dir():
            raise DataNotFoundError(f"missing folder {folder}; {LAYOUT}")


def _index_masks(root: Path, problems: list[str]) -> tuple[list[Path], dict[str, dict[str, Path]]]:
    """The class folders of masks/ (none for the flat layout) and class name -> id -> mask file
    (``"mask"`` for the flat layout); unsupported or duplicate names go to `problems`."""
    mask_dir = root / "masks"
    entries = _visible(mask_dir)
    class_dirs = sorted(p for p in entries if p.is_dir())
    loose = sorted(p for p in entries if not p.is_dir())
    if class_dirs and loose:
        raise DatasetError(
            f"{mask_dir} mixes class folders ({', '.join(p.name for p in class_dirs)}) with mask files "
            f"({', '.join(p.name for p in loose[:3])}{', ...' if len(loose) > 3 else ''}); use either "
            "masks/<class>/<id>.png or masks/<id>.png"
        )
    bad_names = [f"{d.name!r} {problem}" for d in class_dirs if (problem := class_name_problem(d.name)) is not None]
    if bad_names:
        raise DatasetError(
            f"{mask_dir} holds class folders whose names cannot name a class ({'; '.join(bad_names)}); "
            "class names become folder and file names of predict's outputs: rename them"
        )
    if class_dirs:
        masks = {d.name: _index_files(d, root, problems) for d in class_dirs}
    else:
        masks = {"mask": _index_files(mask_dir, root, problems)}
    if all(not m for m in masks.values()) and not problems:
        raise DataNotFoundError(f"no masks in {mask_dir}; {LAYOUT}")
    return class_dirs, masks


def _check_pairs(root: Path, images: dict[str, Path], masks: dict[str, dict[str, Path]], problems: list[str]) -> None:
    """One `DatasetError` listing `problems` and every unpaired file, if there is any."""
    unpaired_images = [images[i] for i in sorted(images) if any(i not in m for m in masks.values())]
    unpaired_masks = [m[i] for m in masks.values() for i in sorted(m) if i not in images]
    if unpaired_images:
        problems.append("images without a mask in every class: " + _names(unpaired_images, root))
    if unpaired_masks:
        problems.append("masks without an image: " + _names(unpaired_masks, root))
    if problems:
        raise DatasetError(
            f"segmentation folder {root} is not usable:\n  " + "\n  ".join(problems) + "\n"
            "Each image needs a mask with the same name (any supported extension) in every class folder."
        )


def _label_classes(
    root: Path, label_maps: dict[str, Path], ignore_index: int, label_classes: Sequence[str] | None
) -> list[str]:
    """The class names of the label maps of `root`: `label_classes`, else its ``classes.txt``,
    else ``"0"`` up to the largest value found; an `ignore_index` among them is a `DatasetError`."""
    classes_file = root / CLASSES_FILE
    if label_classes is not None:
        classes = list(label_classes)
    elif classes_file.is_file():
        classes = read_classes(classes_file)
    else:
        largest = max((_largest_label(path, ignore_index) for path in label_maps.values()), default=0)
        classes = [str(index) for index in range(max(largest + 1, 2))]
    if ignore_index < len(classes):
        raise DatasetError(
            f"the ignore index {ignore_index} is the index of class {classes[ignore_index]!r} of {root}; "
            f"choose an ignore index of {len(classes)} or more (255 by default)"
        )
    return classes


def class_name_problem(name: object) -> str | None:
    """Why `name` cannot name a class, or None when it can.

    Class names become folder and file names (``predict`` writes ``<out>/<class>/<id>.png``) and
    TensorBoard tags, so a name must name one entry inside a folder: a non-empty string, not
    ``.`` or ``..``, without a path separator (``/``, or ``\\`` as Windows reads it, which
    also rules out absolute paths), a control character (NUL, tab, newline, DEL, ...), a lone
    surrogate (no file system takes it) or a byte-order mark. `read_classes`, the class folders
    of a segmentation folder and the recipe's ``predict`` (for the names a checkpoint records)
    all apply this rule.

    Args:
        name: the class name to check.
    """
    if not isinstance(name, str):
        return f"is not a string but a {type(name).__name__}"
    if not name:
        return "is empty"
    if name in (".", ".."):
        return f"is {name!r}, which names a folder, not a class"
    for separator in ("/", "\\"):
        if separator in name:
            return f"holds a path separator {separator!r}"
    for char in name:
        kind = unicodedata.category(char)
        if kind in ("Cc", "Cs") or char == "\ufeff":
            what = {"Cc": "control character", "Cs": "lone surrogate"}.get(kind, "byte-order mark")
            return f"holds the {what} {char!r}"
    return None


def read_classes(path: str | os.PathLike) -> list[str]:
    """The class names of a ``classes.txt``: one per line, line i naming class i. The file is
    UTF-8, with or without a byte-order mark (``utf-8-sig``); spaces and tabs around a name and
    trailing blank lines are dropped.

    An empty file, a single class, a blank or repeated name, or a name that `class_name_problem`
    refuses (``.``, ``..``, a path separator, a control character: names become folders, file
    names and TensorBoard tags) is a one-line `DatasetError` naming the file and each line at
    fault.

    Args:
        path: the file.
    """
    path = Path(path)
    try:
        # Universal newlines: \n, \r\n and \r end a line; other control characters stay in the name.
        lines = [line.strip(" \t") for line in path.read_text(encoding="utf-8-sig").split("\n")]
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot read the class names of {path}: {' '.join(str(exc).split())}") from exc
    while lines and not lines[-1]:
        lines.pop()
    problems = []
    if len(lines) < 2:
        problems.append(f"it names {len(lines)} class(es); label maps need at least 2 (e.g. background and object)")
    for i, name in enumerate(lines):
        if not name:
            problems.append(f"line {i + 1} is blank")
        elif (problem := class_name_problem(name)) is not None:
            problems.append(f"line {i + 1} ({name!r}) {problem}")
    problems += [
        f"{name!r} is on lines {lines.index(name) + 1} and {i + 1}"
        for i, name in enumerate(lines)
        if name and lines.index(name) != i
    ]
    if problems:
        raise DatasetError(
            f"{path} is not a usable class list ({'; '.join(problems)}); write one class name per "
            "line, line i naming class index i"
        )
    return lines


def _largest_label(path: Path, ignore_index: int) -> int:
    labels = read_label_map(path)
    labels = labels[labels != ignore_index]
    return int(labels.max()) if labels.numel() else 0


def select_samples(
    root: Path, classes: Sequence[str], all_ids: Sequence[str], num_classes: int | None, ids: Sequence[str] | None
) -> list[str]:
    """The ids a dataset of folder `root` uses: `ids`, or `all_ids` when None. A `num_classes`
    other than the folder's count of `classes`, an unknown id or an empty selection is a
    `DatasetError`.

    Args:
        root: the folder, for the messages.
        classes: the folder's mask classes.
        all_ids: every sample id of the folder.
        num_classes: if given, the number of classes the folder must have.
        ids: the ids asked for, or None for all.
    """
    if num_classes is not None and num_classes != len(classes):
        raise DatasetError(
            f"num_classes={num_classes} but {root / 'masks'} has {len(classes)} class(es): {', '.join(classes)}"
        )
    if ids is None:
        return list(all_ids)
    ids, known = list(ids), set(all_ids)
    unknown = [i for i in ids if i not in known]
    if unknown:
        raise DatasetError(f"ids not found in {root / 'images'}: {', '.join(unknown)}")
    if not ids:
        raise DatasetError(f"ids is empty: select at least one sample of {root / 'images'}")
    return ids


def _visible(folder: Path) -> list[Path]:
    """The entries of `folder` but hidden and system files (`is_system_file`), which are left out."""
    return [p for p in folder.iterdir() if not is_system_file(p)]


def _index_files(folder: Path, root: Path, problems: list[str]) -> dict[str, Path]:
    """id -> file for the image files in `folder`; unsupported or duplicate names go to `problems`."""
    found: dict[str, Path] = {}
    unsupported: list[Path] = []
    irregular: list[str] = []
    for path in sorted(_visible(folder)):
        problem = not_regular(path)
        if problem is not None and problem != "a folder":  # never opened: a FIFO would block
            irregular.append(f"{path.relative_to(root)} ({problem})")
        elif path.is_dir():
            unsupported.append(path)
        elif not is_image_file(path):
            unsupported.append(path)
        elif path.stem in found:
            problems.append(f"two files for id {path.stem!r}: {_names([found[path.stem], path], root)}")
        else:
            found[path.stem] = path
    if unsupported:
        problems.append(f"unsupported entries (supported: {', '.join(IMAGE_EXTENSIONS)}): {_names(unsupported, root)}")
    if irregular:
        problems.append("entries that are not regular files: " + ", ".join(irregular))
    return found


def _names(paths: Sequence[Path], root: Path) -> str:
    return ", ".join(str(p.relative_to(root)) for p in paths)
