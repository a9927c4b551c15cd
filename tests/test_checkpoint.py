"""`trainer.callbacks.checkpoint` and `trainer.checkpoint`: ModelCheckpoint (save_top_k too) and exact resume."""

from __future__ import annotations

import errno
import os
import pickle
import warnings
import zipfile

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader

from tests.conftest import make_classification, torch_save_on_a_full_disk
from tests.helpers import Validations, make
from trainer import Callback, Trainer, load_model
from trainer.callbacks import EarlyStopping, ModelCheckpoint, TensorBoardCallback
from trainer.checkpoint import atomic_save, load_checkpoint
from trainer.rng import rng_state, set_rng_state


def build(callbacks, epochs, init_seed=0):
    torch.manual_seed(init_seed)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)
    data = make_classification(40)
    train = DataLoader(data, batch_size=8, shuffle=True)
    val = DataLoader(data, batch_size=16)
    trainer = Trainer(
        model,
        optimizer,
        nn.CrossEntropyLoss(),
        callbacks=callbacks,
        max_epochs=epochs,
        device="cpu",
        scheduler=scheduler,
        seed=7,
        metrics={"acc": lambda p, t: (p.argmax(1) == t).float().mean()},
    )
    return trainer, train, val


def test_resume_is_bit_identical_to_uninterrupted_run(tmp_path):
    full, train, val = build([ModelCheckpoint(tmp_path / "full")], epochs=4)
    full_history = full.fit(train, val)

    first, train, val = build([ModelCheckpoint(tmp_path / "cut")], epochs=2)
    first.fit(train, val)
    stopper = EarlyStopping("val_loss", patience=10)
    resumed, train, val = build([stopper, ModelCheckpoint(tmp_path / "cut")], epochs=4, init_seed=99)
    history = resumed.fit(train, val, resume_from=tmp_path / "cut" / "last.pt")

    assert history == full_history
    assert resumed.global_step == full.global_step == 20
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["epochs_done"] == 4


def test_checkpoint_contents_and_best(tmp_path):
    checkpoint = ModelCheckpoint(tmp_path, monitor="val_acc", mode="max", config={"lr": 0.01})
    trainer, train, val = build([checkpoint], epochs=3)
    history = trainer.fit(train, val)
    last, best = load_checkpoint(checkpoint.last_path), load_checkpoint(checkpoint.best_path)
    assert set(last) >= {
        "model",
        "optimizer",
        "scheduler",
        "epochs_done",
        "global_step",
        "history",
        "rng",
        "callbacks",
        "config",
    }
    assert last["config"] == {"lr": 0.01} and last["epochs_done"] == 3
    best_epoch = max(range(3), key=lambda e: (history[e]["val_acc"], -e))
    assert best["epochs_done"] == best_epoch + 1 == checkpoint.best_epoch + 1
    assert last["callbacks"]["ModelCheckpoint"]["best"] == history[best_epoch]["val_acc"]
    assert sorted(os.listdir(tmp_path)) == ["best.pt", "last.pt"]  # no temporary files left


def test_atomic_save_keeps_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "state.pt"
    atomic_save({"v": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError):
        atomic_save({"v": Unpicklable()}, path)
    assert load_checkpoint(path) == {"v": 1}
    assert os.listdir(tmp_path) == ["state.pt"]


def test_bad_checkpoint_paths_have_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "missing.pt")
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_checkpoint(broken)


def test_empty_random_and_non_dict_checkpoints_say_what_is_wrong(tmp_path):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty.pt' is empty \(0 bytes\), not a checkpoint"):
        load_checkpoint(empty)
    noise = tmp_path / "noise.pt"
    noise.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError) as info:
        load_checkpoint(noise)
    message = str(info.value)
    assert "noise.pt' is not a readable checkpoint" in message and "\n" not in message
    assert "weights_only" not in message  # never the advice to unpickle arbitrary objects
    a_list = tmp_path / "list.pt"
    torch.save([torch.ones(2)], a_list)
    with pytest.raises(ValueError, match=r"list.pt' holds a list, not a checkpoint"):
        load_checkpoint(a_list)


def test_resumed_curves_have_no_duplicated_or_orphaned_steps(tmp_path):
    run = tmp_path / "run"
    first, train, val = build([TensorBoardCallback(run, every_n_steps=2), ModelCheckpoint(run)], epochs=2)
    first.fit(train, val)
    # An interrupted process logged past its last checkpoint: these points must disappear.
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(run) as orphan:
        for step in (12, 14):
            orphan.add_scalar("Loss/training loss", 99.0, step)
    resumed, train, val = build([TensorBoardCallback(run, every_n_steps=2), ModelCheckpoint(run)], epochs=4)
    history = resumed.fit(train, val, resume_from=run / "last.pt")
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
    acc.Reload()
    for tag in acc.Tags()["scalars"]:
        steps = [e.step for e in acc.Scalars(tag)]
        assert len(steps) == len(set(steps)), tag
    assert 99.0 not in [e.value for e in acc.Scalars("Loss/training loss")]
    assert [e.step for e in acc.Scalars("Loss/training (epoch mean)")] == [5, 10, 15, 20]
    assert [e.value for e in acc.Scalars("Loss/training (epoch mean)")] == pytest.approx([h["loss"] for h in history])


def test_non_finite_loss_caught_at_log_point_names_step_and_checkpoint(tmp_path):
    from trainer import NonFiniteLossError

    class PoisonAfterEpochOne(Callback):
        def on_epoch_start(self, trainer):
            if trainer.epoch == 1:
                with torch.no_grad():
                    trainer.module[0].weight.fill_(float("nan"))

    checkpoint = ModelCheckpoint(tmp_path)
    trainer, train, val = build(
        [PoisonAfterEpochOne(), TensorBoardCallback(tmp_path / "tb", every_n_steps=2), checkpoint], epochs=3
    )
    with pytest.raises(NonFiniteLossError) as info:
        trainer.fit(train, val)
    assert "global step 6" in str(info.value)  # the first log point after the weights broke (epoch 1: steps 6..10)
    assert info.value.__notes__ == [f"last good checkpoint: {checkpoint.last_path}"]
    state = load_checkpoint(checkpoint.last_path)
    assert state["epochs_done"] == 1 and all(torch.isfinite(t).all() for t in state["model"].values())


def test_cli_reports_non_finite_loss_in_one_line(capsys):
    from recipes.cli import run_cli
    from trainer import NonFiniteLossError

    def main(argv):
        error = NonFiniteLossError("training loss is nan at global step 3 (epoch 0)")
        error.add_note("last good checkpoint: runs/x/last.pt")
        raise error

    assert run_cli(main, []) == 1
    assert capsys.readouterr().err == (
        "error: training loss is nan at global step 3 (epoch 0); last good checkpoint: runs/x/last.pt\n"
    )


def test_atomic_save_on_a_full_disk_names_the_file_keeps_the_old_one_and_leaves_no_partial_file(small_disk):
    folder = small_disk.mount("1m")
    path = folder / "last.pt"
    atomic_save({"v": 1}, path)
    with pytest.raises(OSError) as full:  # torch.save's RuntimeError, turned into the OSError behind it
        atomic_save({"v": torch.zeros(1_000_000)}, path)
    assert full.value.errno == errno.ENOSPC and full.value.filename == str(path)
    assert load_checkpoint(path) == {"v": 1} and os.listdir(folder) == ["last.pt"]


def test_atomic_save_turns_torch_saves_full_disk_error_into_an_oserror_naming_the_file(tmp_path, mocker):
    """The same without root: torch.save as it fails on a full disk, part of the file written."""
    path = tmp_path / "last.pt"
    atomic_save({"v": 1}, path)

    mocker.patch("trainer.checkpoint.torch.save", side_effect=torch_save_on_a_full_disk())
    with pytest.raises(OSError, match="No space left on device") as full:
        atomic_save({"v": 2}, path)
    assert full.value.errno == errno.ENOSPC and full.value.filename == str(path)
    assert os.listdir(tmp_path) == ["last.pt"]


def test_ctrl_c_inside_torch_save_is_a_keyboard_interrupt_and_keeps_the_old_file(tmp_path, mocker):
    """Ctrl-C while torch.save writes leaves its zip writer failing on the cut-off record: it raises
    `RuntimeError: [enforce fail at inline_container.cc...]` with the KeyboardInterrupt as its
    context. atomic_save gives the KeyboardInterrupt (one "interrupted" line from the command line,
    not that traceback), keeps the old file and leaves no temporary file."""
    path = tmp_path / "last.pt"
    atomic_save({"v": 1}, path)

    def interrupted_save(obj, file, *args, **kwargs):  # what torch.save does when Ctrl-C lands inside
        file.write(b"part of a checkpoint")
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 32005568 vs 32005520")  # noqa: B904

    mocker.patch("trainer.checkpoint.torch.save", side_effect=interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"v": 2}, path)
    assert os.listdir(tmp_path) == ["last.pt"] and load_checkpoint(path) == {"v": 1}


def test_a_checkpoint_whose_records_are_compressed_is_refused_before_it_is_inflated(tmp_path):
    """torch.save stores every record as it is; an archive re-packed with deflate (200 MB of zeros
    in a few hundred kB) would be inflated by torch.load before anything could be checked."""
    saved, packed = tmp_path / "saved.pt", tmp_path / "packed.pt"
    torch.save({"model": {"weight": torch.zeros(1000, 1000)}}, saved)
    with zipfile.ZipFile(saved) as source, zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            target.writestr(info.filename, source.read(info))
    assert packed.stat().st_size < saved.stat().st_size / 50
    with pytest.raises(
        ValueError, match=r"packed\.pt' is not a readable checkpoint \(refused as unsafe: \d+ of its records"
    ):
        load_checkpoint(packed)
    assert load_checkpoint(saved)["model"]["weight"].shape == (1000, 1000)


# ------------------------------------------------------------------------------------------ save_top_k
def test_save_top_k_keeps_the_k_best_with_the_value_in_the_name(tmp_path):
    seen = Validations()
    checkpoint = ModelCheckpoint(tmp_path, monitor="val_loss", save_top_k=2)
    trainer, train, val = make([seen, checkpoint], epochs=4, val_every_n_steps=5, val_at_epoch_end=False)
    trainer.fit(train, val)
    ranked = sorted(seen.seen, key=lambda v: v[2])[:2]
    names = [f"epoch={step // 10 + (step % 10 > 0)}-step={step}-val_loss={loss:.4f}.pt" for step, _, loss in ranked]
    assert [p.name for p in checkpoint.top_k_paths()] == names
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*names, "best.pt", "last.pt"])
    assert load_checkpoint(tmp_path / names[0])["global_step"] == ranked[0][0]
    assert load_checkpoint(tmp_path / "last.pt")["callbacks"]["ModelCheckpoint"]["top_k"] == [
        [loss, name] for (_, _, loss), name in zip(ranked, names)
    ]


def test_save_top_k_needs_a_monitor(tmp_path):
    with pytest.raises(ValueError, match="save_top_k needs a monitor"):
        ModelCheckpoint(tmp_path, monitor=None, save_top_k=3)


class RunsACommand:
    """What a malicious pickle holds: unpickling it calls ``os.system`` (here: touch a marker file)."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["torch.save", "pickle", "pickle protocol 4"])
def test_a_malicious_pickle_is_refused_as_unsafe_and_never_runs(tmp_path, writer):
    """Refused in one line: no traceback, and no warning of torch's about the pickle protocol."""
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    state = {"format_version": 2, "model": {}, "config": RunsACommand(marker)}
    if writer == "torch.save":
        torch.save(state, path)
    else:
        path.write_bytes(pickle.dumps(state, protocol=4 if writer.endswith("4") else 2))
    for load in (load_checkpoint, load_model):
        with pytest.raises(ValueError) as info, warnings.catch_warnings():
            warnings.simplefilter("error")
            load(path)
        message = str(info.value)
        assert f"{str(path)!r} is not a readable checkpoint (refused as unsafe:" in message
        assert "weights_only" not in message and "safe_globals" not in message and "\n" not in message
        if writer != "pickle protocol 4":  # whose STACK_GLOBAL torch's reader refuses before it names anything
            assert "posix.system" in message or "nt.system" in message  # what it would have called
    assert not marker.exists()


class FakeCudaRandom:
    """torch.cuda's generator API over `count` GPUs, each state a byte tensor filled with its index;
    a GPU that is not there raises IndexError, as torch's does."""

    def __init__(self, mocker, count: int, current: int = 0) -> None:
        self.states = {index: torch.full((16,), index, dtype=torch.uint8) for index in range(count)}
        self.current = current
        for module in (torch.cuda, torch.cuda.random):
            mocker.patch.object(module, "get_rng_state", side_effect=self.get)
            mocker.patch.object(module, "set_rng_state", side_effect=self.set)
            mocker.patch.object(module, "device_count", return_value=count)
            mocker.patch.object(module, "current_device", return_value=current)
        mocker.patch("torch.cuda.is_available", return_value=True)
        mocker.patch("torch.cuda.is_initialized", return_value=True)

    def index(self, device) -> int:
        if isinstance(device, int):
            return device
        device = torch.device(device)
        return self.current if device.index is None else device.index

    def get(self, device="cuda") -> torch.Tensor:
        return self.states[self.index(device)].clone()

    def set(self, state, device="cuda") -> None:
        index = self.index(device)
        if index not in self.states:
            raise IndexError(f"no GPU {index} here")
        self.states[index] = state.clone()


def crafted_rng(cuda_states: list[int]) -> dict:
    """A checkpoint's generator states whose CUDA part lists one state per value given."""
    state = rng_state()
    state["cuda"] = [torch.full((16,), value, dtype=torch.uint8) for value in cuda_states]
    return state


def test_a_checkpoint_from_two_gpus_resumes_on_one(mocker):
    """rng["cuda"] of a run on two GPUs, restored where one GPU is visible: the first state goes
    to it, none to a GPU that is not there (no IndexError)."""
    cuda = FakeCudaRandom(mocker, count=1)
    set_rng_state(crafted_rng([7, 8]), torch.device("cuda"))
    assert cuda.states[0].tolist() == [7] * 16 and list(cuda.states) == [0]


def test_each_rank_saves_and_restores_its_own_gpus_generator(mocker, monkeypatch):
    """Under torchrun rank 1 on cuda:1 saves the state of cuda:1 alone, and restores the second
    state of the list (every rank's, in rank order) to cuda:1, leaving cuda:0 to rank 0."""
    monkeypatch.setenv("RANK", "1")
    cuda = FakeCudaRandom(mocker, count=2, current=1)
    assert [s.tolist() for s in rng_state(torch.device("cuda", 1))["cuda"]] == [[1] * 16]
    set_rng_state(crafted_rng([7, 8]), torch.device("cuda", 1))
    assert cuda.states[1].tolist() == [8] * 16 and cuda.states[0].tolist() == [0] * 16


def test_a_rank_without_a_saved_cuda_state_keeps_its_generator(mocker, monkeypatch):
    """A checkpoint rank 0 saved alone (one state), resumed by rank 1: rank 1's GPU keeps its state."""
    monkeypatch.setenv("RANK", "1")
    cuda = FakeCudaRandom(mocker, count=2, current=1)
    set_rng_state(crafted_rng([7]), torch.device("cuda", 1))
    assert cuda.states[0].tolist() == [0] * 16 and cuda.states[1].tolist() == [1] * 16


def test_an_automatic_precision_chosen_on_a_gpu_is_chosen_again_on_the_cpu(tmp_path, capsys):
    """A checkpoint of an automatic run on a GPU (float16 with a scaler, which the CPU cannot run)
    resumed on the CPU with precision="auto": the choice is made again for this machine instead
    of kept (a CPU without native bf16 would otherwise run bf16 10-25x slower than float32)."""
    trainer, train, _ = make([ModelCheckpoint(tmp_path, monitor=None)], epochs=1)
    trainer.fit(train)
    state = load_checkpoint(tmp_path / "last.pt")
    assert state["precision"]["device"] == "cpu"
    state["precision"] = {"precision": "16-mixed", "channels_last": True, "onednn": True, "device": "cuda"}
    torch.save(state, tmp_path / "from-gpu.pt")
    resumed, train, _ = make(epochs=2, precision="auto", channels_last="auto")
    resumed.fit(train, resume_from=tmp_path / "from-gpu.pt")
    assert resumed.precision in ("32", "bf16") and "saved in the checkpoint" not in capsys.readouterr().out
