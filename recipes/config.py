"""`RunConfig`: the typed configuration of a recipe's run, saved with it and read back on resume."""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping
from typing import Any, ClassVar

__all__ = ["PATH", "PER_COMMAND", "RunConfig"]


#: Metadata of a field that this command line sets and the run does not save (``--max-time``,
#: ``--download``...): not in config.json, not compared on resume. Use it as
#: ``field(default=..., metadata=PER_COMMAND)``.
PER_COMMAND: Mapping[str, bool] = {"saved": False}


#: Metadata of a field that names a file or folder (``--data``): saved as an absolute path, so that
#: a resumed run finds it from any working folder. Use it as ``field(metadata=PATH)``.
PATH: Mapping[str, bool] = {"path": True}


def _saved(field: dataclasses.Field) -> bool:
    return field.metadata.get("saved", True)


@dataclasses.dataclass(kw_only=True, eq=False)
class RunConfig:
    """What defines a run: the options `Recipe.train` needs, and a recipe's own in a subclass.

    A recipe declares its options as fields of a subclass (a ``@dataclass(kw_only=True)``, each
    field named as the option's ``dest``). The saved fields go to ``config.json`` and every
    checkpoint and come back on resume; fields with `PER_COMMAND` metadata come from each
    command line. Read and set a field as an attribute (``config.epochs``), which the type
    checker follows; `saved` is what is saved.

    Attributes:
        epochs: epochs to train; a resumed run may raise it.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``; a resumed run may move.
        precision: ``auto``, ``32``, ``bf16`` or ``16-mixed``; ``auto`` is resolved once and saved.
        channels_last: True, False or ``auto`` (resolved with the precision).
        seed: seeds Python, NumPy and torch once, before `Recipe.build`.
        threads: CPU threads of each process (None: the CPUs this process may use).
        checkpoint_every: also save ``last.pt`` every N optimizer steps (None: at epoch ends).
        val_every: also validate every N optimizer steps (None: at epoch ends).
        histograms: log weight and gradient histograms every epoch.
        onednn: whether the CPU convolutions use oneDNN, resolved with the precision.
        precision_reason: why the precision was chosen; set once the choice is made.
        resume: the run directory this command resumes (per command).
        log_dir: the directory of a new run (per command; None: a new ``runs/<name>/<timestamp>``).
        max_time: seconds of training after which this command stops and saves (per command).
        fast_dev_run: one training and one validation batch in a temporary directory (per command).
        verbose: print in full why the precision, threads and OpenMP waiting were chosen (per command).
        other: saved values this class has no field for (a run written by another version of the
            recipe), kept so that they are saved again.
    """

    epochs: int
    device: str = "auto"
    precision: str = "auto"
    channels_last: bool | str = "auto"
    seed: int = 0
    threads: int | None = None
    checkpoint_every: int | None = None
    val_every: int | None = None
    histograms: bool = False
    onednn: bool | None = None
    precision_reason: str | None = None
    resume: str | None = dataclasses.field(default=None, metadata=PER_COMMAND)
    log_dir: str | None = dataclasses.field(default=None, metadata=PER_COMMAND)
    max_time: float | None = dataclasses.field(default=None, metadata=PER_COMMAND)
    fast_dev_run: bool = dataclasses.field(default=False, metadata=PER_COMMAND)
    verbose: bool = dataclasses.field(default=False, metadata=PER_COMMAND)
    other: dict[str, Any] = dataclasses.field(default_factory=dict, metadata=PER_COMMAND, repr=False)

    #: Options a resumed run may change on its command line (all others keep their saved value).
    RESUMABLE: ClassVar[tuple[str, ...]] = ("epochs", "device", "checkpoint_every", "threads")

    @classmethod
    def saved_fields(cls) -> tuple[str, ...]:
        """Names of the fields saved with the run, in declaration order."""
        return tuple(field.name for field in dataclasses.fields(cls) if _saved(field))

    @classmethod
    def required_fields(cls) -> tuple[str, ...]:
        """Names of the saved fields without a default: every saved run of the recipe holds them."""
        return tuple(
            field.name
            for field in dataclasses.fields(cls)
            if _saved(field) and field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        )

    @classmethod
    def from_options(cls, args: argparse.Namespace) -> RunConfig:
        """The configuration of a new run: each field from the parsed option of the same name
        (a field without an option keeps its default; a `PATH` field's value made absolute).

        Args:
            args: the parsed command line.
        """
        fields = [field for field in dataclasses.fields(cls) if field.name != "other" and hasattr(args, field.name)]
        return cls(**{field.name: _absolute(field, getattr(args, field.name)) for field in fields})

    @classmethod
    def option_value(cls, name: str, value: Any) -> Any:
        """`value` of the option `name` as a run saves it (a `PATH` field's made absolute), to
        compare with a saved run's."""
        field = next((f for f in dataclasses.fields(cls) if f.name == name), None)
        return _absolute(field, value) if field is not None else value

    @classmethod
    def from_saved(cls, saved: Mapping[str, Any], args: argparse.Namespace) -> RunConfig:
        """The configuration of a resumed run: the saved fields from `saved` (a run's config.json
        or its checkpoint's ``"config"``; a field it lacks, from an older version, keeps its
        default), the per-command ones from `args`.

        Args:
            saved: the configuration saved with the run.
            args: the parsed command line of the resuming command.
        """
        fields = dataclasses.fields(cls)
        values = {field.name: saved[field.name] for field in fields if _saved(field) and field.name in saved}
        values.update(
            {
                field.name: getattr(args, field.name)
                for field in fields
                if not _saved(field) and hasattr(args, field.name)
            }
        )
        known = {field.name for field in fields}
        return cls(**values, other={key: value for key, value in saved.items() if key not in known})

    def saved(self) -> dict[str, Any]:
        """The saved fields and the `other` values, by name: what ``config.json`` and every
        checkpoint's ``"config"`` hold, and what `from_saved` reads back."""
        return {**{name: getattr(self, name) for name in self.saved_fields()}, **self.other}

    def update(self, **values: Any) -> None:
        """Set the fields named in `values` (e.g. the precision once it is chosen); a name that is
        no field of the class is a `TypeError`, as in its constructor."""
        names = {field.name for field in dataclasses.fields(self)}
        unknown = [name for name in values if name not in names]
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field {unknown[0]!r}")
        for name, value in values.items():
            setattr(self, name, value)


def _absolute(field: dataclasses.Field, value: Any) -> Any:
    """`value` as an absolute path for a `PATH` field (None stays None), else as it is."""
    if field.metadata.get("path") and value is not None:
        return os.path.abspath(os.fspath(value))
    return value
