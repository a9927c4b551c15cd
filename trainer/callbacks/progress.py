"""`ProgressBar`: a tqdm bar per epoch with the running loss, refreshed at log points only."""

from __future__ import annotations

from typing import IO, Any

from tqdm.std import tqdm as text_bar

from trainer.board.notebook import has_widgets, in_notebook
from trainer.callback import Callback
from trainer.every import Every
from trainer.options import renamed_option
from trainer.running import RunningLoss


def bar_class() -> type:
    """tqdm's notebook bar in a Jupyter kernel with ipywidgets installed, else its text bar (in a
    kernel without ipywidgets, tqdm's own choice would print an "IProgress not found" warning)."""
    if in_notebook() and has_widgets():
        from tqdm.notebook import tqdm as widget_bar

        return widget_bar
    return text_bar


def format_logs(logs: dict[str, float]) -> dict[str, str]:
    """Short, aligned strings for a progress bar's postfix."""
    return {key: f"{value:.3g}" if key == "lr" else f"{value:.4f}" for key, value in logs.items()}


class ProgressBar(Callback):
    """Show a tqdm progress bar per epoch (a widget in Jupyter where ipywidgets is installed,
    text elsewhere; see `bar_class`).

    The bar counts batches; it moves and shows the running training loss every `every_n_steps`
    optimizer steps, as `TensorBoardCallback` logs it (one device sync there, none in between);
    at the end of the epoch it shows the epoch's logs (loss, validation loss and metrics,
    learning rate).

    Args:
        every_n_steps: optimizer steps between updates of the bar.
        leave: keep each epoch's finished bar on screen (False clears it).
        file: where the bar is drawn (default: standard error).
        log_every: the former name of `every_n_steps` (deprecated).
    """

    rank_zero_only = True

    def __init__(
        self, every_n_steps: int = 20, leave: bool = True, file: IO[str] | None = None, *, log_every: int | None = None
    ) -> None:
        self.every_n_steps = renamed_option("ProgressBar", "log_every", log_every, "every_n_steps", every_n_steps)
        self._log_point = Every(self.every_n_steps, "every_n_steps")
        self.leave = leave
        self.file = file
        self._bar: Any = None
        self._shown = 0
        self._running = RunningLoss()

    def on_epoch_start(self, trainer) -> None:
        self._bar = bar_class()(
            total=trainer.num_batches,
            initial=trainer.batch_idx,  # above 0 when the run resumes inside this epoch
            desc=f"epoch {trainer.epoch + 1}/{trainer.max_epochs}",
            leave=self.leave,
            file=self.file,
            dynamic_ncols=True,
            unit="batch",
        )
        self._shown = trainer.batch_idx
        self._log_point.start(trainer.global_step)

    def on_batch_end(self, trainer, batch, outputs) -> None:
        if self._log_point(trainer.global_step):
            done = trainer.batch_idx + 1
            self._bar.update(done - self._shown)
            self._shown = done
            loss = self._running.pop(trainer)
            if loss is not None:
                self._bar.set_postfix(loss=f"{loss:.4f}")

    def on_epoch_end(self, trainer, logs) -> None:
        if self._bar is None:
            return
        self._bar.update(trainer.batch_idx + 1 - self._shown)
        self._bar.set_postfix(format_logs(logs))
        self._close()

    def on_exception(self, trainer, exception) -> None:
        self._close()

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
