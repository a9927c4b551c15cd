"""The recipes' command line: the parser with one-line errors, option types, the options every
recipe shares, which options a command line gave, the command that resumes a run, and `run_cli`."""

from __future__ import annotations

import argparse
import contextlib
import difflib
import math
import shlex
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch

from recipes.config import RunConfig
from recipes.errors import RunComplete, UsageError
from trainer import NonFiniteLossError
from trainer.distributed import end_process, is_distributed
from trainer.options import parse_duration
from trainer.options import positive_int as check_positive_int
from trainer.threads import affinity_cpus


class RecipeArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (exit code 2), with a hint for an
    unknown option close to a known one. It takes the arguments of `argparse.ArgumentParser`.

    Attributes:
        long_options: every ``--option`` added with `add_argument` (``--help`` included), in order.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.long_options: list[str] = []
        super().__init__(*args, **kwargs)

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        """As `argparse.ArgumentParser.add_argument`; the option's long names are kept in
        `long_options` for the hints of `parse_args`."""
        action = super().add_argument(*args, **kwargs)
        self.long_options.extend(option for option in action.option_strings if option.startswith("--"))
        return action

    def error(self, message: str) -> NoReturn:
        """Print ``PROG: error: MESSAGE (see --help)`` on stderr and exit with code 2."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

    def parse_args(self, args: Any = None, namespace: Any = None) -> argparse.Namespace:  # type: ignore[override]
        """As `argparse.ArgumentParser.parse_args`, with a hint for each unknown option that is
        close to a known one: ``--checkpoint_every`` gets "did you mean --checkpoint-every?"."""
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            message = f"unrecognized arguments: {' '.join(extras)}"
            hints = [hint for hint in map(self._hint, extras) if hint]
            self.error(message + (f"; did you mean {', '.join(hints)}?" if hints else ""))
        return namespace

    def _hint(self, arg: str) -> str | None:
        """The known option `arg` (an unknown ``--option[=value]``) most likely stands for."""
        if not arg.startswith("--"):
            return None
        name = arg.split("=", 1)[0]
        spelled = "--" + name[2:].replace("_", "-").lower()
        if spelled in self.long_options:
            return spelled
        close = difflib.get_close_matches(name, self.long_options, n=1, cutoff=0.75)
        return close[0] if close else None


@dataclass
class CommandLine:
    """A recipe's parsed command line.

    Attributes:
        args: every option's value (given or default).
        given: the options the command line gave (abbreviated or ``--option=value`` forms
            included), as ``{dest: option}`` with the option spelled ``--dest-with-dashes``.
        argv: the arguments as given.
    """

    args: argparse.Namespace
    given: dict[str, str]
    argv: list[str]


def parse_command_line(parser: argparse.ArgumentParser, argv: Sequence[str]) -> CommandLine:
    """Parse `argv` with `parser` (exits 2 on bad options) and tell the given options from the defaults.

    A second parse starts from a namespace in which every option holds a marker: argparse fills
    in a default only where the namespace has no value, so what no longer holds the marker was given.

    With ``--resume`` no option is required: the resumed run takes its options from its saved
    configuration (`recipes.run_dir.resume_run`), so an option the recipe declares with
    ``required=True`` (a ``--data``) never stops the command that resumes a run, as
    `resume_command` prints it; an option given compares with the saved one as usual.

    Args:
        parser: the recipe's parser.
        argv: the command-line arguments (without the program).
    """
    argv = list(argv)
    if _may_resume(parser, argv):
        with _nothing_required(parser):
            args = parser.parse_args(argv)
            if getattr(args, "resume", None) is not None:
                return _given(parser, args, argv)
    return _given(parser, parser.parse_args(argv), argv)


def _given(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str]) -> CommandLine:
    """The `CommandLine` of `argv`, parsed into `args` (see `parse_command_line`)."""
    unset = object()
    probe = parser.parse_args(argv, argparse.Namespace(**dict.fromkeys(vars(args), unset)))
    given = {dest: "--" + dest.replace("_", "-") for dest, value in vars(probe).items() if value is not unset}
    return CommandLine(args=args, given=given, argv=argv)


def _may_resume(parser: argparse.ArgumentParser, argv: list[str]) -> bool:
    """Whether `argv` holds what may be ``--resume`` (abbreviated, or ``--resume=RUN``); the parse
    decides."""
    names = [name for action in parser._actions if action.dest == "resume" for name in action.option_strings]
    for arg in argv:
        spelled = arg.split("=", 1)[0]
        if any(name == spelled or (len(spelled) > 2 and name.startswith(spelled)) for name in names):
            return True
    return False


@contextlib.contextmanager
def _nothing_required(parser: argparse.ArgumentParser) -> Iterator[None]:
    """While the block runs, no option or group of options of `parser` is required."""
    items: list[Any] = [*parser._actions, *parser._mutually_exclusive_groups]
    required = [item for item in items if item.required]
    for item in required:
        item.required = False
    try:
        yield
    finally:
        for item in required:
            item.required = True


def _bounded(
    convert: Callable[[str], float],
    minimum: float,
    inclusive: bool,
    wanted: str,
    below: float = math.inf,
    maximum: float = math.inf,
) -> Callable[[str], Any]:
    """An argparse type: `convert`, then a finite value above (or, if `inclusive`, at) `minimum`,
    strictly below `below` and at most `maximum`."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}") from None
        if (
            not math.isfinite(value)
            or value < minimum
            or (value == minimum and not inclusive)
            or value >= below
            or value > maximum
        ):
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}")
        return value

    parse.__name__ = wanted
    return parse


#: The largest float32: model weights and optimizer values are float32, so no option may be larger.
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
#: Seeds torch's generators take, and that stay in range with an epoch or offset added.
MAX_SEED = 2**63 - 1


def positive_int(text: str) -> int:
    """argparse type of a count: a positive integer, by the rule of `trainer.options.positive_int`."""
    try:
        value = check_positive_int("value", int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    assert value is not None
    return value


positive_int.__name__ = "a positive integer"


def thread_count(text: str) -> int:
    """argparse type of ``--threads``: from 1 to the CPUs this process may use (more threads than
    CPUs only wait for each other)."""
    cpus = affinity_cpus()
    value = positive_int(text)
    if value > cpus:
        raise argparse.ArgumentTypeError(
            f"expected 1 to {cpus}, the CPUs this process may use, got {text!r}; more threads than CPUs slow training"
        )
    return value


non_negative_int = _bounded(int, 0, True, "an integer >= 0")
positive_float = _bounded(
    float, 0.0, False, f"a positive number up to {FLOAT32_MAX:.4g} (the float32 limit)", maximum=FLOAT32_MAX
)
non_negative_float = _bounded(
    float, 0.0, True, f"a number from 0 to {FLOAT32_MAX:.4g} (the float32 limit)", maximum=FLOAT32_MAX
)
fraction = _bounded(float, 0.0, False, "a number between 0 and 1", below=1.0)
seed_int = _bounded(int, 0, True, f"an integer from 0 to {MAX_SEED}", maximum=MAX_SEED)


def duration(text: str) -> float:
    """argparse type of ``--max-time``: ``HH:MM:SS`` (or ``D:HH:MM:SS``) in seconds, above zero."""
    try:
        return parse_duration(text, "--max-time")
    except ValueError:
        parts = text.strip().split(":")
        if len(parts) in (3, 4) and all(part.isdigit() and int(part) == 0 for part in parts):
            raise argparse.ArgumentTypeError(
                f"must be above zero, got {text!r} (e.g. 00:30:00 for half an hour)"
            ) from None
        raise argparse.ArgumentTypeError(f"expected HH:MM:SS (or D:HH:MM:SS), got {text!r}") from None


duration.__name__ = "HH:MM:SS"


def device_option(text: str) -> str:
    """argparse type of ``--device``: ``auto``, ``cpu``, or ``cuda``/``cuda:N`` with that GPU
    present; anything else (``mps``, ``meta``, ``cuda:7`` on a 1-GPU machine) is refused at once."""
    wanted = "auto, cpu, cuda or cuda:N"
    if text == "auto":
        return text
    try:
        device = torch.device(text)
    except (RuntimeError, TypeError):
        raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r} (the recipes train on the CPU or CUDA only)")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"{text!r} was asked for but no CUDA GPU is available; use cpu or auto")
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(
                f"{text!r} was asked for but this machine has {count} CUDA GPU(s): cuda:0 to cuda:{count - 1}"
            )
    return text


device_option.__name__ = "device"


def layout_option(text: str) -> bool | str:
    """argparse type of ``--channels-last``: ``on`` -> True, ``off`` -> False, ``auto``."""
    values: dict[str, bool | str] = {"on": True, "off": False, "auto": "auto"}
    if text not in values:
        raise argparse.ArgumentTypeError(f"expected auto, on or off, got {text!r}")
    return values[text]


def option_list(dests: Sequence[str]) -> str:
    """The options of the argparse destinations `dests` in words: ``--epochs, --device and --threads``."""
    names = ["--" + dest.replace("_", "-") for dest in dests]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def add_run_options(
    parser: argparse.ArgumentParser, runs_root: str, resumable: Sequence[str] = RunConfig.RESUMABLE
) -> None:
    """Add the thirteen options every recipe has, which `RunConfig` holds: ``--device``,
    ``--precision``, ``--channels-last``, ``--threads``, ``--seed``, ``--log-dir`` (default: a new
    ``runs_root/<timestamp>``), ``--resume``, ``--checkpoint-every``, ``--val-every``,
    ``--max-time``, ``--histograms``, ``--fast-dev-run`` and ``--verbose``.

    Args:
        parser: the recipe's parser (a `RecipeArgumentParser`).
        runs_root: the folder new runs go to, for the help of ``--log-dir``.
        resumable: the options a resumed run may change, for the help of ``--resume``: the
            recipe's `RunConfig.RESUMABLE`.
    """
    parser.add_argument(
        "--device", type=device_option, default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)"
    )
    parser.add_argument(
        "--precision",
        choices=["auto", "32", "bf16", "16-mixed"],
        default="auto",
        help="auto: what this machine computes fastest, never slower than float32 (bf16 only "
        "on CPUs and GPUs with native bf16); 32: float32; bf16: bf16 autocast; 16-mixed: "
        "float16 with a grad scaler, CUDA only (default: %(default)s)",
    )
    parser.add_argument(
        "--channels-last",
        type=layout_option,
        default="auto",
        metavar="{auto,on,off}",
        help="memory format of the model and images: auto measures it with the precision once per "
        "machine, model and batch shape and keeps the result in a cache file (its path is in "
        "config.json and printed with --verbose), so every later run chooses the same (on CUDA: on "
        "for convolutions) "
        "(default: auto)",
    )
    parser.add_argument(
        "--threads",
        type=thread_count,
        metavar="N",
        help="CPU threads of each process, at most the CPUs it may use (default: OMP_NUM_THREADS "
        "where it is set outside torchrun, else the CPUs this process may use, after its "
        "container's CPU quota, shared among torchrun's local processes). The same "
        "command and --seed give bit-identical weights on the same machine, busy or idle; "
        "another thread count, precision, torch version or machine changes the last bits",
    )
    parser.add_argument("--seed", type=seed_int, default=0, help=f"random seed, 0 to {MAX_SEED} (default: %(default)s)")
    parser.add_argument(
        "--log-dir", metavar="DIR", help=f"run directory (default: a new {runs_root}/<timestamp>); must not hold a run"
    )
    parser.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its last checkpoint, with its options "
        f"(only {option_list(resumable)} may change)",
    )
    parser.add_argument(
        "--checkpoint-every",
        type=positive_int,
        metavar="N",
        help="also save last.pt every N optimizer steps; a resumed run continues at the next batch "
        "(default: at epoch ends only)",
    )
    parser.add_argument(
        "--val-every",
        type=positive_int,
        metavar="N",
        help="also validate every N optimizer steps, logged at the global step (default: at epoch ends only)",
    )
    parser.add_argument(
        "--max-time",
        type=duration,
        metavar="HH:MM:SS",
        help="stop after the first step past this much training time, save the position reached "
        "and print the command that resumes it (exit code 0)",
    )
    parser.add_argument(
        "--histograms",
        action="store_true",
        help="log weights and gradients per layer as TensorBoard histograms every epoch",
    )
    parser.add_argument(
        "--fast-dev-run",
        action="store_true",
        help="check the whole setup: one training and one validation batch through the model and "
        "every callback, in a temporary directory that is removed; prints one line",
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="print in full why the precision, layout, threads and OpenMP waiting were chosen (each "
        "setting's measured time, the cache file); config.json records it either way",
    )


def resume_command(recipe_module: str, run_dir: str | Path) -> str:
    """The command that resumes the run in `run_dir`, as this process was started: ``python -m
    MODULE --resume RUN`` for a recipe run with ``-m`` (or imported from an importable module),
    ``python path/to/recipe.py --resume RUN`` for a recipe file run as a script.

    Args:
        recipe_module: the module the recipe class is defined in (``__main__`` when it is the
            program that was started).
        run_dir: the run directory.
    """
    module = sys.modules.get(recipe_module)
    spec = getattr(module, "__spec__", None)
    if recipe_module != "__main__" and spec is not None:
        program = ["-m", recipe_module]
    elif spec is not None and spec.name:  # python -m package.module (a package's __main__ names the package)
        program = ["-m", spec.name.removesuffix(".__main__")]
    else:
        program = [sys.argv[0]]
    return shlex.join(["python", *program, "--resume", str(run_dir)])


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run a recipe's `main` and return its exit code: 0 for a run complete already (one line),
    2 for bad input (`UsageError` or a bad option: one line on stderr), 1 for a non-finite loss,
    130 for Ctrl-C, and the code of any `SystemExit` (``--help``: 0; a signal: 128 + its number).
    Use it as ``sys.exit(run_cli(main))``.

    In a process of a torchrun launch it does not return: the process ends with the exit code
    through `trainer.distributed.end_process` (see there why).

    Args:
        main: the recipe's entry point, ``main(argv) -> exit code``.
        argv: the command-line arguments (default: ``sys.argv[1:]``, read by `main`).
    """
    code = _exit_code(main, argv)
    if is_distributed():
        end_process(code)
    return code


def _exit_code(main: Callable[[list[str] | None], int], argv: list[str] | None) -> int:
    try:
        return main(argv)
    except RunComplete as exc:
        print(exc)
        return 0
    except UsageError as exc:
        # A data error may list several problems on separate lines; the command line shows one line.
        print("error: " + " ".join(line.strip() for line in str(exc).splitlines() if line.strip()), file=sys.stderr)
        return 2
    except NonFiniteLossError as exc:
        print("error: " + "; ".join([str(exc), *getattr(exc, "__notes__", [])]), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)  # what sys.exit("message") prints
        return 1
