"""Choosing precision and memory format for the machine: hardware checks mocked, probe real, the
measured choice kept in a cache file and read back by later runs."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import trainer.precision_probe as precision_module
from trainer import Callback, Trainer
from trainer.callbacks import ModelCheckpoint
from trainer.native import cpu_features
from trainer.precision import PrecisionChoice
from trainer.precision_probe import Setting, choose_precision, probe, probe_key
from trainer.probe_cache import cache_path

AVX2_ONLY = {"avx2": True, "avx512": False, "avx512_bf16": False, "amx": False, "arm_bf16": False}
SAPPHIRE_RAPIDS = {"avx2": True, "avx512": True, "avx512_bf16": True, "amx": True, "arm_bf16": False}


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 1, 1))


def example_images(n: int = 4) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def fake_probe(timings):
    """A stand-in for `probe`: the given seconds per (precision, channels_last), or per
    (precision, channels_last, onednn) for PyTorch's own convolution kernels (10 s if not given)."""

    def run(model, device, example, candidates, samples=None, repeats=1):
        return {c: timings.get(tuple(c) if not c.onednn else tuple(c[:2]), 10.0) for c in candidates}

    return run


def test_avx2_only_cpu_trains_in_float32_without_trying_bf16(mocker):
    mocker.patch.object(precision_module, "cpu_features", return_value=AVX2_ONLY)
    spy = mocker.patch.object(
        precision_module, "probe", side_effect=fake_probe({("32", False): 1.0, ("32", True): 2.0})
    )
    choice = choose_precision(small_cnn(), torch.device("cpu"), example_images(), cache=False)
    assert (choice.precision, choice.channels_last) == ("32", False)
    assert "no native bf16" in choice.reason
    probed = spy.call_args.args[3]
    assert all(c.precision == "32" for c in probed)  # emulated bf16 is never even measured


def test_native_bf16_cpu_whose_probe_is_faster_picks_bf16(mocker):
    mocker.patch.object(precision_module, "cpu_features", return_value=SAPPHIRE_RAPIDS)
    mocker.patch.object(
        precision_module,
        "probe",
        side_effect=fake_probe({("32", False): 1.0, ("32", True): 0.95, ("bf16", False): 0.6, ("bf16", True): 0.4}),
    )
    choice = choose_precision(small_cnn(), torch.device("cpu"), example_images(), cache=False)
    assert (choice.precision, choice.channels_last) == ("bf16", True)
    assert "2.50x float32" in choice.reason and "AMX" in choice.reason


def test_native_bf16_cpu_whose_probe_is_slower_stays_float32(mocker):
    mocker.patch.object(precision_module, "cpu_features", return_value=SAPPHIRE_RAPIDS)
    mocker.patch.object(
        precision_module,
        "probe",
        side_effect=fake_probe({("32", False): 1.0, ("32", True): 1.2, ("bf16", False): 3.0, ("bf16", True): 1.5}),
    )
    choice = choose_precision(small_cnn(), torch.device("cpu"), example_images(), cache=False)
    assert (choice.precision, choice.channels_last) == ("32", False)


def test_gains_within_timer_noise_keep_float32_contiguous(mocker):
    mocker.patch.object(precision_module, "cpu_features", return_value=SAPPHIRE_RAPIDS)
    mocker.patch.object(
        precision_module,
        "probe",
        side_effect=fake_probe({("32", False): 1.0, ("32", True): 0.99, ("bf16", False): 0.995, ("bf16", True): 1.2}),
    )
    choice = choose_precision(small_cnn(), torch.device("cpu"), example_images(), cache=False)
    assert (choice.precision, choice.channels_last) == ("32", False)


def test_explicit_precision_is_respected_even_where_slow(mocker):
    mocker.patch.object(precision_module, "cpu_features", return_value=AVX2_ONLY)
    choice = choose_precision(small_cnn(), torch.device("cpu"), example_images(), precision="bf16", channels_last=False)
    assert (choice.precision, choice.channels_last) == ("bf16", False)
    assert "as asked" in choice.reason


def test_model_without_convolutions_stays_contiguous_without_a_probe(mocker):
    mocker.patch.object(precision_module, "cpu_features", return_value=AVX2_ONLY)
    spy = mocker.patch.object(precision_module, "probe")
    choice = choose_precision(nn.Linear(4, 2), torch.device("cpu"), torch.randn(3, 4))
    assert (choice.precision, choice.channels_last) == ("32", False)
    spy.assert_not_called()


@pytest.mark.parametrize("capability, native, expected", [((7, 0), False, "16-mixed"), ((8, 0), True, "bf16")])
def test_gpu_choice_follows_native_bf16(mocker, capability, native, expected):
    mocker.patch("torch.cuda.get_device_capability", return_value=capability)
    mocker.patch.object(precision_module, "cuda_native_bf16", return_value=native)
    choice = choose_precision(small_cnn(), torch.device("cuda", 0), example_images())
    assert (choice.precision, choice.channels_last) == (expected, True)
    assert f"{capability[0]}.{capability[1]}" in choice.reason
    linear = choose_precision(nn.Linear(4, 2), torch.device("cuda", 0))
    assert linear.channels_last is False


def test_real_probe_times_each_candidate_and_leaves_the_model_as_it_was():
    model = small_cnn().train()
    model(example_images(8)).sum().backward()  # running stats and .grad that must survive
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    rng = torch.random.get_rng_state()
    candidates = [Setting("32", False), Setting("32", True), Setting("bf16", False), Setting("32", False, False)]
    timings = probe(model, torch.device("cpu"), example_images(), candidates, repeats=2)
    assert set(candidates[:3]) <= set(timings) <= set(candidates)
    assert all(t > 0 for t in timings.values())
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    assert torch.equal(rng, torch.random.get_rng_state())
    assert model[0].weight.is_contiguous()


def raced(mocker, seconds: dict[tuple, float], repeats: int = 5) -> tuple[dict[Setting, float], list[tuple]]:
    """`probe` with passes that take `seconds` per setting (as a tuple): its timings and each
    pass run, in order."""
    passes: list[tuple] = []

    def timed(run):
        passes.append(run())
        return seconds[passes[-1]]

    mocker.patch.object(
        precision_module, "_pass", side_effect=lambda model, inputs, setting, device: lambda: tuple(setting)
    )
    mocker.patch.object(precision_module, "_timed", side_effect=timed)
    timings = probe(
        small_cnn(), torch.device("cpu"), example_images(), [Setting(*key) for key in seconds], repeats=repeats
    )
    return timings, passes


def test_the_probe_stops_timing_settings_that_cannot_win(mocker):
    """A setting 1.5x the fastest after a timed round is not timed again (its fastest stands),
    and PyTorch's own convolution kernels are not tried once no float32 setting is in the race:
    16 passes instead of 30 for the default run's five settings."""
    seconds = {
        ("32", False, True): 0.36,
        ("32", True, True): 0.34,
        ("bf16", False, True): 0.20,
        ("bf16", True, True): 0.18,
        ("32", False, False): 0.87,
    }
    timings, passes = raced(mocker, seconds)
    assert len(passes) == 4 + 4 + 2 * 4 and ("32", False, False) not in passes
    assert set(timings) == {Setting(*key) for key in list(seconds)[:4]}
    assert passes.count(("bf16", True, True)) == 6 and passes.count(("32", False, True)) == 2


def test_pytorchs_own_kernels_are_timed_while_float32_can_still_win(mocker):
    """Without a fast bf16 (e.g. float32 only), PyTorch's own kernels are warmed up after the
    first timed round and raced from then on; one of them that wins is kept."""
    seconds = {("32", False, True): 1.0, ("32", True, True): 1.1, ("32", False, False): 0.7}
    timings, passes = raced(mocker, seconds)
    assert passes.count(("32", False, False)) == 1 + 4 and timings[Setting("32", False, False)] == 0.7
    assert passes.count(("32", False, True)) == 6
    assert passes.count(("32", True, True)) == 3  # out of the race once 0.7 is known


def test_native_convolution_kernels_where_they_measure_faster(mocker):
    mocker.patch.object(precision_module, "cpu_features", return_value=AVX2_ONLY)
    mocker.patch.object(
        precision_module,
        "probe",
        side_effect=fake_probe({("32", False): 1.0, ("32", True): 1.1, ("32", False, False): 0.7}),
    )
    choice = choose_precision(small_cnn(), torch.device("cpu"), example_images(), cache=False)
    assert (choice.precision, choice.channels_last, choice.onednn) == ("32", False, False)
    assert str(choice) == "precision: 32, contiguous, native conv (no native bf16, measured)"
    assert "1.43x float32" in choice.reason


def test_bf16_must_beat_the_fastest_float32_setting_not_only_the_plain_one(mocker):
    """bf16 1.25x plain float32, but float32 with PyTorch's own convolution kernels is faster
    still: float32 with those kernels wins."""
    mocker.patch.object(precision_module, "cpu_features", return_value=SAPPHIRE_RAPIDS)
    timings = {
        ("32", False): 1.0,
        ("32", True): 1.0,
        ("32", False, False): 0.5,
        ("bf16", False): 0.8,
        ("bf16", True): 0.85,
    }
    mocker.patch.object(precision_module, "probe", side_effect=fake_probe(timings))
    choice = choose_precision(small_cnn(), torch.device("cpu"), example_images(), cache=False)
    assert (choice.precision, choice.channels_last, choice.onednn) == ("32", False, False)


def test_trainer_runs_with_the_chosen_kernels_and_restores_them():
    seen = []

    class Watch(Callback):
        def on_batch_end(self, trainer, batch, outputs):
            seen.append(torch.backends.mkldnn.enabled)

    model = small_cnn()
    choice = PrecisionChoice("32", False, "measured", onednn=False)
    trainer = Trainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.01),
        nn.BCEWithLogitsLoss(),
        [Watch()],
        max_epochs=1,
        device="cpu",
        precision=choice,
    )
    before = torch.backends.mkldnn.enabled
    trainer.fit(loaders()[0])
    assert seen == [False] * 3 and torch.backends.mkldnn.enabled == before
    with pytest.raises(ValueError, match="contradicts the PrecisionChoice"):
        Trainer(
            model,
            torch.optim.SGD(model.parameters(), lr=0.01),
            nn.BCEWithLogitsLoss(),
            device="cpu",
            precision=choice,
            channels_last=True,
        )


def test_avx512_features_count_only_where_torch_dispatches_avx512_kernels(mocker):
    """With ATEN_CPU_CAPABILITY=avx2 (or a CPU torch holds at AVX2) bf16 is not native: float32."""
    for name in ("_is_avx2_supported", "_is_avx512_supported", "_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        mocker.patch(f"torch.cpu.{name}", return_value=True, create=True)
    mocker.patch("torch.backends.cpu.get_cpu_capability", return_value="AVX512")
    assert cpu_features()["avx512_bf16"] and cpu_features()["amx"]
    mocker.patch("torch.backends.cpu.get_cpu_capability", return_value="AVX2")
    features = cpu_features()
    assert features["avx2"] and not (features["avx512"] or features["avx512_bf16"] or features["amx"])
    choice = choose_precision(nn.Conv2d(3, 4, 3), torch.device("cpu"), torch.rand(1, 3, 16, 16), cache=False)
    assert choice.precision == "32" and "no native bf16" in choice.reason


def test_cpu_features_reports_booleans():
    features = cpu_features()
    assert set(features) == {"avx2", "avx512", "avx512_bf16", "amx", "arm_bf16"}
    assert all(isinstance(v, bool) for v in features.values())


def loaders():
    images = example_images(12)
    masks = (images[:, :1] > 0.5).float()
    data = TensorDataset(images, masks)
    return DataLoader(data, batch_size=4, shuffle=True), DataLoader(data, batch_size=6)


def test_trainer_auto_resolves_at_fit_prints_and_resume_keeps_it(mocker, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TRAINER_CACHE_DIR", str(tmp_path / "cache"))
    mocker.patch.object(precision_module, "cpu_features", return_value=SAPPHIRE_RAPIDS)
    mocker.patch.object(
        precision_module,
        "probe",
        side_effect=fake_probe({("32", False): 1.0, ("32", True): 0.9, ("bf16", False): 0.7, ("bf16", True): 0.5}),
    )
    model = small_cnn()
    ckpt = ModelCheckpoint(tmp_path, monitor=None)
    trainer = Trainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.01),
        nn.BCEWithLogitsLoss(),
        [ckpt],
        max_epochs=1,
        device="cpu",
        precision="auto",
        channels_last="auto",
    )
    assert trainer.precision == "auto"
    train, val = loaders()
    trainer.fit(train, val)
    assert (trainer.precision, trainer.channels_last) == ("bf16", True)
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    # What was chosen and why in a few words; the timings and the cache file are in the choice's reason.
    assert "Trainer: precision: bf16, channels-last (measured)\n" in capsys.readouterr().out
    assert str(tmp_path / "cache") in trainer.precision_choice.reason

    # This machine now measures float32 faster, but the resumed run keeps the saved choice.
    mocker.patch.object(
        precision_module,
        "probe",
        side_effect=fake_probe({("32", False): 0.1, ("32", True): 0.9, ("bf16", False): 0.7, ("bf16", True): 0.5}),
    )
    model = small_cnn()
    resumed = Trainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.01),
        nn.BCEWithLogitsLoss(),
        max_epochs=2,
        device="cpu",
        precision="auto",
        channels_last="auto",
    )
    with pytest.warns(RuntimeWarning, match=r"callbacks this trainer does not have \(ModelCheckpoint\)"):
        resumed.fit(train, val, resume_from=ckpt.last_path)
    assert (resumed.precision, resumed.channels_last) == ("bf16", True)
    assert resumed.precision_choice == PrecisionChoice("bf16", True, "saved in the checkpoint")


def test_announce_precision_replaces_the_trainer_line_and_sees_the_choice_callbacks_read(
    mocker, tmp_path, capsys, monkeypatch
):
    """A caller that prints the choice its own way (as the recipes do) gets the one choice, before
    any callback's on_fit_start reads the same in trainer.precision_choice; the trainer prints nothing."""
    mocker.patch.object(precision_module, "cpu_features", return_value=AVX2_ONLY)
    mocker.patch.object(precision_module, "probe", side_effect=fake_probe({("32", False): 1.0, ("32", True): 0.5}))
    monkeypatch.setenv("TRAINER_CACHE_DIR", str(tmp_path))
    seen = []

    class Reads(Callback):
        def on_fit_start(self, trainer):
            seen.append(("on_fit_start", trainer.precision_choice))

    model = small_cnn()
    trainer = Trainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.01),
        nn.BCEWithLogitsLoss(),
        [Reads()],
        device="cpu",
        precision="auto",
        channels_last="auto",
    )
    trainer.announce_precision = lambda choice: seen.append(("announced", choice))
    trainer.fit(loaders()[0])
    assert [event for event, _ in seen] == ["announced", "on_fit_start"]
    assert seen[0][1] is seen[1][1] is trainer.precision_choice
    assert (trainer.precision_choice.precision, trainer.precision_choice.channels_last) == ("32", True)
    assert "precision:" not in capsys.readouterr().out


def test_trainer_auto_keeps_explicit_half_of_the_choice(mocker, tmp_path, monkeypatch):
    monkeypatch.setenv("TRAINER_CACHE_DIR", str(tmp_path))
    mocker.patch.object(precision_module, "cpu_features", return_value=AVX2_ONLY)
    mocker.patch.object(precision_module, "probe", side_effect=fake_probe({("bf16", False): 1.0, ("bf16", True): 0.5}))
    model = small_cnn()
    trainer = Trainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.01),
        nn.BCEWithLogitsLoss(),
        max_epochs=1,
        device="cpu",
        precision="bf16",
        channels_last="auto",
    )
    trainer.fit(loaders()[0])
    assert (trainer.precision, trainer.channels_last) == ("bf16", True)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"precision": "fp8"}, "unknown precision 'fp8'"),
        ({"channels_last": "yes"}, "channels_last must be True, False or 'auto'"),
    ],
)
def test_bad_precision_options_are_refused(kwargs, message):
    model = small_cnn()
    with pytest.raises(ValueError, match=message):
        Trainer(model, torch.optim.SGD(model.parameters(), lr=0.01), nn.BCEWithLogitsLoss(), device="cpu", **kwargs)


def test_measured_choice_is_kept_and_later_runs_read_it_however_the_machine_measures(mocker, tmp_path):
    """Same command, same machine: the second run chooses what the first measured, without timing."""
    mocker.patch.object(precision_module, "cpu_features", return_value=AVX2_ONLY)
    cache = tmp_path / "precision.json"
    mocker.patch.object(
        precision_module,
        "probe",
        side_effect=fake_probe({("32", False): 1.0, ("32", True): 0.5, ("32", False, False): 2.0}),
    )
    first = choose_precision(small_cnn(), torch.device("cpu"), example_images(), cache=cache)
    assert (first.precision, first.channels_last, first.onednn) == ("32", True, True)
    assert f"kept in {cache}" in first.reason and cache.is_file()

    # Busy now: this probe would pick PyTorch's own kernels. It is not even run.
    busy = mocker.patch.object(
        precision_module,
        "probe",
        side_effect=fake_probe({("32", False): 1.0, ("32", True): 3.0, ("32", False, False): 0.2}),
    )
    again = choose_precision(small_cnn(), torch.device("cpu"), example_images(), cache=cache)
    busy.assert_not_called()
    assert (again.precision, again.channels_last, again.onednn) == ("32", True, True)
    assert "measured once on this machine" in again.reason and str(cache) in again.reason
    assert str(again) == "precision: 32, channels-last (no native bf16, from cache)"

    # Another batch shape is another measurement, kept beside the first.
    other = choose_precision(small_cnn(), torch.device("cpu"), example_images(8), cache=cache)
    assert busy.call_count == 1 and other.onednn is False
    assert len(json.loads(cache.read_text())) == 2


@pytest.mark.parametrize("cached", [False, True])
def test_the_printed_choice_is_short_however_long_the_reason(mocker, tmp_path, cached):
    """The choice a fit prints leaves out the timings and the cache file, however long they are;
    its reason keeps them."""
    mocker.patch.object(precision_module, "cpu_features", return_value=AVX2_ONLY)
    mocker.patch.object(
        precision_module,
        "probe",
        side_effect=fake_probe({("32", False): 1.0, ("32", True): 1.1, ("32", False, False): 0.7}),
    )
    cache = tmp_path.joinpath(*["a-rather-long-folder-name"] * 12, "precision.json")
    choice = choose_precision(small_cnn(), torch.device("cpu"), example_images(), cache=cache)
    if cached:
        choice = choose_precision(small_cnn(), torch.device("cpu"), example_images(), cache=cache)
    assert "1.43x float32" in choice.reason and str(cache) in choice.reason and len(choice.reason) > 300
    why = "from cache" if cached else "measured"
    assert str(choice) == f"precision: 32, contiguous, native conv (no native bf16, {why})"


def test_probe_key_follows_what_timings_depend_on():
    candidates = [Setting("32", False), Setting("32", True)]
    key = probe_key(small_cnn(), example_images(4), candidates)
    assert key == probe_key(small_cnn(), example_images(4), candidates)
    assert key != probe_key(small_cnn(), example_images(2), candidates)
    assert key != probe_key(nn.Sequential(nn.Conv2d(3, 4, 3)), example_images(4), candidates)
    assert key != probe_key(small_cnn(), example_images(4), candidates[:1])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads != 1 else 2)
        assert key != probe_key(small_cnn(), example_images(4), candidates)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", ""])
def test_a_damaged_cache_file_is_measured_again_and_rewritten(mocker, tmp_path, content):
    mocker.patch.object(precision_module, "cpu_features", return_value=AVX2_ONLY)
    spy = mocker.patch.object(precision_module, "probe", side_effect=fake_probe({("32", False): 1.0}))
    cache = tmp_path / "precision.json"
    cache.write_text(content)
    choice = choose_precision(small_cnn(), torch.device("cpu"), example_images(), cache=cache)
    assert spy.call_count == 1 and (choice.precision, choice.channels_last) == ("32", False)
    assert len(json.loads(cache.read_text())) == 1


@pytest.mark.parametrize("entry", ["a string", {"precision": "fp8"}, {"precision": "bf16", "channels_last": "yes"}])
def test_a_damaged_entry_is_measured_again_and_replaced(mocker, tmp_path, entry):
    mocker.patch.object(precision_module, "cpu_features", return_value=AVX2_ONLY)
    spy = mocker.patch.object(precision_module, "probe", side_effect=fake_probe({("32", False): 1.0}))
    cache = tmp_path / "precision.json"
    choose_precision(small_cnn(), torch.device("cpu"), example_images(), cache=cache)
    [key] = json.loads(cache.read_text())
    cache.write_text(json.dumps({key: entry}))
    choice = choose_precision(small_cnn(), torch.device("cpu"), example_images(), cache=cache)
    assert spy.call_count == 2 and (choice.precision, choice.channels_last) == ("32", False)
    assert json.loads(cache.read_text())[key]["precision"] == "32"


def test_an_unwritable_cache_still_trains_and_says_it_kept_nothing(mocker, tmp_path):
    mocker.patch.object(precision_module, "cpu_features", return_value=AVX2_ONLY)
    mocker.patch.object(precision_module, "probe", side_effect=fake_probe({("32", False): 1.0}))
    blocked = tmp_path / "file"
    blocked.write_text("a file where the cache folder should be")
    choice = choose_precision(small_cnn(), torch.device("cpu"), example_images(), cache=blocked / "precision.json")
    assert (choice.precision, choice.channels_last) == ("32", False) and "not kept" in choice.reason


def test_cache_path_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("TRAINER_CACHE_DIR", str(tmp_path / "t"))
    assert cache_path() == tmp_path / "t" / "precision.json"
    monkeypatch.delenv("TRAINER_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache_path() == tmp_path / "x" / "trainer" / "precision.json"
