"""Two CPU processes under torchrun (gloo): same weights, one event stream, global val_loss, resume,
and the recipe's command line, streaming its data folder, each rank decoding its own shard.

Two torchrun launches serve every test: `worker` runs the fits of `tests/distributed_worker.py` one
after another in the same two processes, and `recipe` runs ``python -m recipes.nested_unet``."""

from __future__ import annotations

import glob
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util import tensor_util
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.utils.data import DataLoader, TensorDataset

from recipes import nested_unet
from recipes.cli import run_cli
from tests.distributed_worker import KillAt, Killed, accuracy, tiny_problem
from tests.helpers import tiny_args
from tests.processes import ROOT, checkout_env
from trainer import Callback, ResumableSampler, Trainer
from trainer.callbacks import ModelCheckpoint
from trainer.checkpoint import load_checkpoint
from trainer.distributed import FORCE_VARIABLE, PROCESS_GROUP_TIMEOUT, end_process, init_distributed, shard_loader
from trainer_datasets import SyntheticNuclei

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def torchrun(*args: str) -> subprocess.CompletedProcess:
    """Run torchrun with 2 processes on `args` from the repository root; it must succeed."""
    env = checkout_env(OMP_NUM_THREADS="1")
    result = subprocess.run([*TORCHRUN, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    # The ranks' own errors come before torchrun's summary of the failure.
    assert result.returncode == 0, result.stderr[-10000:]
    return result


@pytest.fixture(scope="module")
def worker(tmp_path_factory) -> Path:
    """The folder of the worker's fits: fresh, resumed, killed, one_validation_sample, drop_last."""
    out = tmp_path_factory.mktemp("ddp")
    torchrun("tests/distributed_worker.py", str(out))
    return out


@pytest.fixture(scope="module")
def rank_state(tmp_path_factory) -> list[dict]:
    """What each rank of `tests/distributed_worker.py`'s `rank_state` fits saved, in rank order."""
    out = tmp_path_factory.mktemp("rank_state")
    torchrun("tests/distributed_worker.py", str(out), "rank_state")
    return [torch.load(out / f"rank_state{rank}.pt") for rank in (0, 1)]


def test_a_non_finite_loss_is_raised_on_every_rank(rank_state):
    """Rank 1 meets an infinite input while rank 0 logs every step: both raise NonFiniteLossError
    (rank 0 raising alone at its log point would leave rank 1 in its next all-reduce until the
    process group's timeout)."""
    assert [state["non_finite"] for state in rank_state] == ["NonFiniteLossError"] * 2


def test_each_rank_gets_its_own_cuda_generator_back(rank_state):
    """Each rank's GPU generator (a stand-in of torch.cuda's API over the CPU processes, rank r at
    10 + r): the checkpoint rank 0 writes holds both ranks' states in rank order, gathered through
    the process group, and each rank restores its own on resume."""
    saved = rank_state[0]["cuda_rng"]["saved"]
    assert saved == [[10] * 16, [11] * 16]
    assert [state["cuda_rng"]["restored"] for state in rank_state] == saved


def test_uneven_training_loaders_are_refused_on_every_rank(rank_state):
    """Ranks with 2 and 3 training batches an epoch: both refuse before training (one would wait
    for the other in DDP's all-reduce of a step it never takes)."""
    for state in rank_state:
        assert state["uneven"].startswith("ValueError: the ranks' training loaders differ in length")
        assert "from 2 to 3 batches per epoch" in state["uneven"]


@pytest.mark.numerics
def test_validate_on_rank_zero_alone_evaluates_everything_without_the_others(rank_state):
    """Trainer.validate outside a fit, called on rank 0 only: it evaluates the whole validation
    set by itself (no collective that would wait for rank 1) and logs what one process logs. On
    the fit's sharded validation loader, both ranks validate together and get the same logs."""
    result = rank_state[0]["validate_alone"]
    assert rank_state[1]["validate_alone"]["alone"] is None
    single = evaluate_alone(result["model"], tiny_problem()[2])
    for logs in (result["alone"], result["sharded"], rank_state[1]["validate_alone"]["sharded"]):
        assert logs["val_loss"] == pytest.approx(single["val_loss"], rel=1e-6)
        assert logs["val_acc"] == pytest.approx(single["val_acc"], rel=1e-6)


def ranks(folder: Path) -> tuple[dict, dict]:
    """What rank 0 and rank 1 saved at the end of a fit: weights, history, global step."""
    return torch.load(folder / "rank0.pt"), torch.load(folder / "rank1.pt")


def assert_same_weights(rank0: dict, rank1: dict) -> None:
    for name, tensor in rank0["model"].items():
        assert torch.equal(tensor, rank1["model"][name]), name


def evaluate_alone(weights: dict, val: TensorDataset) -> dict[str, float]:
    """val_loss and val_acc of the tiny problem's model with `weights`, in this single process."""
    model, _, _ = tiny_problem()
    model.load_state_dict(weights)
    loss = torch.nn.CrossEntropyLoss()
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.0), loss, device="cpu", metrics={"acc": accuracy})
    return trainer.validate(DataLoader(val, batch_size=13))


def test_weights_identical_on_both_ranks(worker):
    """After 2 epochs both ranks hold the same weights and history, each having run 4 steps an
    epoch (its 16 of the 32 samples, in batches of 4)."""
    rank0, rank1 = ranks(worker / "fresh")
    assert_same_weights(rank0, rank1)
    assert rank0["history"] == rank1["history"] and rank0["global_step"] == 2 * 4


def test_every_collective_gets_tensors_on_the_trainers_device(worker):
    """Every tensor the trainer hands a collective is on the trainer's device: NCCL refuses CPU
    tensors, so a tensor made without device=trainer.device would crash on GPUs."""
    for rank in (0, 1):
        saved = torch.load(worker / f"collectives{rank}.pt")
        names = {name for name, _ in saved["collectives"]}
        assert {"all_reduce", "broadcast"} <= names, names
        assert all(device == saved["device"] for _, device in saved["collectives"]), saved["collectives"]


def test_one_run_directory_with_one_event_stream(worker):
    """Only rank 0 writes: one run directory beside the ranks' own files, one event file in it."""
    fresh = worker / "fresh"
    assert sorted(p.name for p in fresh.iterdir()) == ["rank0.pt", "rank1.pt", "run"]
    assert len(glob.glob(str(fresh / "run" / "**" / "events.out.tfevents.*"), recursive=True)) == 1


@pytest.mark.numerics
def test_logged_val_loss_equals_single_process_evaluation(worker):
    """The val_loss and val_acc logged by 2 ranks, each evaluating its shard of the 13 validation
    samples, equal one process's evaluation of all of them with the saved weights."""
    state = load_checkpoint(worker / "fresh" / "run" / "last.pt")
    logs = evaluate_alone(state["model"], tiny_problem()[2])
    assert state["history"][-1]["val_loss"] == pytest.approx(logs["val_loss"], rel=1e-5)
    assert state["history"][-1]["val_acc"] == pytest.approx(logs["val_acc"], rel=1e-6)


def test_pr_curves_cover_every_ranks_validation_samples(worker):
    """The PR curves rank 0 writes count the validation samples of both ranks' shards."""
    events = EventAccumulator(str(worker / "fresh" / "run"), size_guidance={"tensors": 0})
    events.Reload()
    curve = events.Tensors("pr/0 a")[-1]
    counts = tensor_util.make_ndarray(curve.tensor_proto)  # rows: TP, FP, TN, FN, precision, recall
    assert counts[:4, 0].sum() == 13


def test_resumed_distributed_run_continues(worker):
    """The 2-epoch run resumed in its run directory to 3 epochs: 4 more steps, the same weights
    on both ranks, last.pt at epoch 3."""
    rank0, rank1 = ranks(worker / "resumed")
    assert len(rank0["history"]) == 3 and rank0["global_step"] == 12
    assert rank0["history"][:2] == ranks(worker / "fresh")[0]["history"]
    assert_same_weights(rank0, rank1)
    assert load_checkpoint(worker / "resumed" / "run" / "last.pt")["epochs_done"] == 3


def test_a_run_killed_after_a_step_checkpoint_logs_the_uninterrupted_epoch_loss(worker):
    """Both processes end at step 7 (epoch 2, batch 3), after the step-6 checkpoint: it holds every
    rank's loss sums of epoch 2 so far, so the resumed run logs the uninterrupted run's epoch loss
    (not an estimate from rank 0's share) and ends with the same history."""
    state = load_checkpoint(worker / "killed" / "last-at-kill.pt")
    assert state["global_step"] == 6 and state["position"]["batches"] == 2
    assert len(state["position"]["loss_samples"]) == 2
    expected = load_checkpoint(worker / "fresh" / "run" / "last.pt")["history"]
    rank0, rank1 = ranks(worker / "killed")
    assert rank0["history"] == expected and rank1["history"] == expected


@pytest.mark.numerics
def test_a_rank_without_validation_batches_neither_hangs_nor_raises(worker):
    """One validation sample for two ranks: rank 1 gets none. Validation runs the unwrapped model,
    so rank 0 does not wait for rank 1 inside DistributedDataParallel's forward; the logged
    val_loss is that of the one sample."""
    rank0, rank1 = ranks(worker / "one_validation_sample")
    assert rank0["history"] == rank1["history"] and len(rank0["history"]) == 2
    alone = evaluate_alone(rank0["model"], TensorDataset(*tiny_problem()[2][:1]))
    assert rank0["history"][-1]["val_loss"] == pytest.approx(alone["val_loss"], rel=1e-5)


def test_drop_last_is_decided_per_shard(worker):
    """10 samples, batch 8, drop_last: each rank's shard of 5 would otherwise yield no batch at all."""
    assert ranks(worker / "drop_last")[0]["global_step"] == 1


# The recipe's command line, each process appending every file it decodes to decoded-<rank>.txt.
RECORD_DECODES = """
import os, runpy, sys
import recipes  # first, as with python -m recipes.nested_unet: it sets OpenMP's wait policy before torch loads
from trainer_datasets import segmentation_folder
out = sys.argv.pop(1)
for name in ("read_image_rgb", "read_mask"):
    def reader(path, _original=getattr(segmentation_folder, name)):
        with open(os.path.join(out, f"decoded-{os.environ['RANK']}.txt"), "a") as file:
            file.write(f"{path}\\n")
        return _original(path)
    setattr(segmentation_folder, name, reader)
runpy.run_module("recipes.nested_unet", run_name="__main__", alter_sys=True)
"""


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The recipe under torchrun, streaming a folder of 12 images in batches of 5: its folder
    (data/, run/, decoded-<rank>.txt) and the finished torchrun."""
    out = tmp_path_factory.mktemp("recipe")
    data = SyntheticNuclei(12, image_size=16, seed=1).save(out / "data")
    script = out / "record_decodes.py"
    script.write_text(RECORD_DECODES)
    options = tiny_args(
        data=data, data_mode="stream", batch_size=5, train_samples=None, val_samples=None, log_dir=out / "run"
    )
    return out, torchrun(str(script), str(out), *options)


def test_recipe_runs_unchanged_under_torchrun(recipe):
    """The recipe's own command line under torchrun: rank 0 alone prints the summary and writes
    the run (one event file, last.pt)."""
    out, result = recipe
    assert result.stdout.count("best validation IoU") == 1
    assert len(glob.glob(str(out / "run" / "events.out.tfevents.*"))) == 1 and (out / "run" / "last.pt").is_file()


def test_two_gloo_processes_read_disjoint_files(recipe):
    """Streaming under torchrun with 2 processes, rank 0 alone checks the folder, and during training
    each rank decodes only its shard: the two ranks' images are disjoint and together the whole folder."""
    out, _ = recipe
    decoded = {rank: (out / f"decoded-{rank}.txt").read_text().splitlines() for rank in (0, 1)}
    images = {rank: [Path(p).name for p in files if "/images/" in p] for rank, files in decoded.items()}
    # Rank 0 checks every image once, then draws the fixed validation batch it logs (both validation
    # images), then trains and validates on its shard; rank 1 only trains and validates on its own.
    checked, fixed, shard0 = images[0][:12], images[0][12:14], images[0][14:]
    assert sorted(checked) == sorted(p.name for p in (out / "data" / "images").iterdir())
    assert len(fixed) == 2 and len(shard0) == len(images[1]) == 5 + 1  # of 10 training images (batch 5), 2 validation
    assert not set(shard0) & set(images[1])
    assert set(shard0) | set(images[1]) == set(checked)


def test_end_process_runs_the_exit_handlers_flushes_and_ends_with_the_code(mocker):
    """`end_process` ends a torchrun process as a normal exit would, less the interpreter teardown
    (where gloo's threads can abort the process): exit handlers first, then the output flushed,
    then the exit status."""
    steps = []
    mocker.patch("atexit._run_exitfuncs", side_effect=lambda: steps.append("exit handlers"))
    mocker.patch.object(sys.stdout, "flush", side_effect=lambda: steps.append("stdout flushed"))
    mocker.patch.object(sys.stderr, "flush", side_effect=lambda: steps.append("stderr flushed"))
    mocker.patch("os._exit", side_effect=lambda code: steps.append(f"exit {code}"))
    end_process(3)
    assert steps == ["exit handlers", "stdout flushed", "stderr flushed", "exit 3"]


def test_run_cli_ends_a_torchrun_process_through_end_process(mocker):
    ended = mocker.patch("recipes.cli.end_process", side_effect=SystemExit)
    assert run_cli(lambda argv: 0, []) == 0 and not ended.called  # one process: it returns
    mocker.patch("recipes.cli.is_distributed", return_value=True)
    with pytest.raises(SystemExit):
        run_cli(lambda argv: 2, [])
    ended.assert_called_once_with(2)


@pytest.fixture
def launched(monkeypatch, mocker):
    """The variables of a 2-process torchrun launch (this process rank 1, LOCAL_RANK 1) and a
    process group that records how it was started instead of starting."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    mocker.patch("torch.distributed.is_initialized", return_value=False)
    mocker.patch("atexit.register")
    return mocker.patch("torch.distributed.init_process_group")


def test_the_process_group_waits_an_hour_for_rank_zeros_work_alone(launched):
    """NCCL's default (10 minutes) would end the ranks waiting while rank 0 alone indexes a large
    streamed folder; the group is started with `PROCESS_GROUP_TIMEOUT`, or the timeout given."""
    assert init_distributed(torch.device("cpu")) == torch.device("cpu")
    launched.assert_called_once_with("gloo", timeout=PROCESS_GROUP_TIMEOUT)
    assert PROCESS_GROUP_TIMEOUT >= timedelta(minutes=60)
    launched.reset_mock()
    init_distributed(torch.device("cpu"), timeout=timedelta(hours=3))
    launched.assert_called_once_with("gloo", timeout=timedelta(hours=3))


@pytest.mark.parametrize(("visible", "expected"), [(4, "cuda:1"), (1, "cuda:0")])
def test_each_process_takes_its_gpu_and_binds_nccl_to_it(launched, mocker, visible, expected):
    """With every GPU visible, rank 1 takes cuda:LOCAL_RANK; on a cluster that shows each process
    one GPU of its own (CUDA_VISIBLE_DEVICES per process), it takes that one, cuda:0, instead of
    an ordinal that does not exist. NCCL is bound to it (device_id)."""
    mocker.patch("torch.cuda.device_count", return_value=visible)
    set_device = mocker.patch("torch.cuda.set_device")
    device = init_distributed(torch.device("cuda"))
    assert device == torch.device(expected)
    set_device.assert_called_once_with(device)
    launched.assert_called_once_with("nccl", timeout=PROCESS_GROUP_TIMEOUT, device_id=device)


def test_more_processes_than_visible_gpus_is_refused_in_one_line(launched, mocker, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "3")
    mocker.patch("torch.cuda.device_count", return_value=2)
    with pytest.raises(ValueError, match="LOCAL_RANK=3 but this process sees 2 GPU"):
        init_distributed(torch.device("cuda"))
    launched.assert_not_called()


@pytest.fixture
def rank_one_of_two(mocker):
    """This process as rank 1 of an initialised group of 2 (torch.distributed's answers)."""
    mocker.patch("torch.distributed.is_initialized", return_value=True)
    mocker.patch("torch.distributed.get_world_size", return_value=2)
    mocker.patch("torch.distributed.get_rank", return_value=1)


def test_a_loader_built_with_a_batch_sampler_keeps_its_batches(rank_one_of_two):
    """A DataLoader built with batch_sampler= (its batch_size is None) is sharded by its batches:
    rank 1 takes every second batch; training repeats the first batch so both ranks take 3 steps,
    validation takes each batch once."""
    data = TensorDataset(torch.arange(10))
    batches = [[0, 1, 2], [3, 4], [5, 6, 7], [8], [9]]
    loader = DataLoader(data, batch_sampler=batches)
    train = shard_loader(loader, train=True)
    assert [b[0].tolist() for b in train] == [[3, 4], [8], [0, 1, 2]] and len(train) == 3
    val = shard_loader(loader, train=False)
    assert [b[0].tolist() for b in val] == [[3, 4], [8]] and len(val) == 2


def test_the_recipes_schedule_counts_the_steps_of_this_ranks_shard(rank_one_of_two):
    """The segmentation recipe's warm-up and cosine span the steps this process takes: under
    torchrun an epoch of 40 samples in batches of 4 is 5 steps on each of 2 ranks, not 10."""
    data = TensorDataset(torch.arange(40))
    loader = DataLoader(data, batch_size=4, sampler=ResumableSampler(data, seed=0))
    assert nested_unet.steps_per_epoch(loader) == len(shard_loader(loader, train=True)) == 5


def test_the_rebuilt_loader_keeps_every_setting(rank_one_of_two):
    """generator, multiprocessing_context, pin_memory_device and in_order survive the rebuild."""
    generator = torch.Generator().manual_seed(5)
    loader = DataLoader(
        TensorDataset(torch.arange(8)),
        batch_size=2,
        shuffle=True,
        num_workers=1,
        multiprocessing_context="spawn",
        generator=generator,
        pin_memory_device="cpu",
        in_order=False,
    )
    for train in (True, False):
        sharded = shard_loader(loader, train=train)
        assert sharded.generator is generator
        assert sharded.multiprocessing_context is loader.multiprocessing_context
        assert sharded.pin_memory_device == "cpu" and sharded.in_order is False


@pytest.fixture
def one_rank_group(monkeypatch):
    """This process as a torchrun launch of one, with the distributed path forced on
    (`FORCE_VARIABLE`): the Trainer starts a real one-rank gloo group and takes every path of
    several processes through it. The group ends with the test."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    variables = {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0", FORCE_VARIABLE: "1"}
    for name, value in {**variables, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(name, value)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def conv_trainer(**options) -> tuple[Trainer, DataLoader]:
    """A small convolutional classifier's Trainer on the CPU (with `options`) and its 4 batches."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 2, 3), nn.Flatten(), nn.LazyLinear(2))
    data = TensorDataset(torch.randn(16, 3, 10, 10), torch.arange(16) % 2)
    model(data.tensors[0][:1])  # the lazy layer takes its shape
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    return Trainer(model, optimizer, nn.CrossEntropyLoss(), device="cpu", **options), DataLoader(data, batch_size=4)


def test_channels_last_auto_is_settled_before_the_ddp_wrap(one_rank_group, tmp_path, recwarn):
    """A run resumed with channels_last="auto" from a channels-last checkpoint: the model is
    channels-last when DistributedDataParallel wraps it, so its gradient buckets have the
    gradients' strides (DDP warns "Grad strides do not match bucket view strides" otherwise,
    and copies every gradient once more at every step)."""
    first, loader = conv_trainer(channels_last=True, callbacks=[ModelCheckpoint(tmp_path, monitor=None)])
    first.fit(loader)
    resumed, loader = conv_trainer(channels_last="auto", max_epochs=2)
    resumed.fit(loader, resume_from=tmp_path / "last.pt")
    assert isinstance(resumed.model, nn.parallel.DistributedDataParallel) and resumed.channels_last is True
    assert resumed.module[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert not [w for w in recwarn if "bucket view strides" in str(w.message)]


class CountAllReduces(Callback):
    """Counts DistributedDataParallel's gradient all-reduces (its communication hook's calls)."""

    def __init__(self) -> None:
        self.calls = 0

    def on_fit_start(self, trainer) -> None:
        def hook(state, bucket):
            self.calls += 1
            return allreduce_hook(state, bucket)

        trainer.model.register_comm_hook(dist.group.WORLD, hook)


def test_accumulated_micro_batches_all_reduce_once_per_step(one_rank_group):
    """accumulate_grad_batches=3 over 4 batches a rank: the gradients are all-reduced with the
    window's last micro-batch (batch 3) and with the epoch's last (batch 4, whose shorter window
    steps at the epoch's end), not after every micro-batch: 2 all-reduces an epoch, not 4."""
    counter = CountAllReduces()
    trainer, loader = conv_trainer(callbacks=[counter], accumulate_grad_batches=3, max_epochs=2)
    trainer.fit(loader)
    assert trainer.global_step == 4 and counter.calls == 2 * 2


def test_a_checkpoint_inside_an_epoch_resumes_only_with_its_number_of_processes(tmp_path):
    """A step checkpoint of 2 processes (its position says so) resumed by 1: the batches each
    rank trained do not map onto another sharding, so the resume is refused before training."""
    trainer, loader = conv_trainer(callbacks=[ModelCheckpoint(tmp_path, monitor=None, every_n_steps=2), KillAt(2)])
    with pytest.raises(Killed):
        trainer.fit(loader)
    state = load_checkpoint(tmp_path / "last.pt")
    assert state["position"]["world_size"] == 1
    state["position"]["world_size"] = 2
    torch.save(state, tmp_path / "two.pt")
    resumed, loader = conv_trainer()
    with pytest.raises(ValueError, match=r"inside epoch 1 by 2 process\(es\), whose batches do not continue with 1"):
        resumed.fit(loader, resume_from=tmp_path / "two.pt")
