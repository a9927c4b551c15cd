"""The HParams tab's summaries, written with TensorBoard's own protos.

`torch.utils.tensorboard.summary.hparams` stores booleans as numbers (they show as ``0.0000``)
and leaves the order of the columns to TensorBoard, which sorts hyperparameters by name and
shows only the first five by default. Here:

- booleans are booleans, strings strings, real numbers numbers; integers are text (``2``), because
  TensorBoard shows every number with four decimals (``2.0000``) and has no integer type; ``None``
  is left out (TensorBoard has no empty value) and anything else is shown as text (lists as ``a, b``);
- the run's main options come first, in the order given, so that they are the ones TensorBoard
  shows by default. Each hyperparameter is shown under its own name (``display_name``); its
  stored name carries a rank prefix (``"00 lr"``), because TensorBoard orders columns by stored
  name. The rank is the option's place in `MAIN_HPARAMS` (the same for every recipe, so runs of
  different recipes line up); the other options keep their plain names and follow, in
  alphabetical order. TensorBoard shows the first five columns by default: the learning rate,
  epochs, batch size, precision and architecture (or, where a run names none, optimizer);
- the metrics are existing scalar curves, whose last value TensorBoard shows: no one-point
  summary scalar is written.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from numbers import Integral, Number
from typing import Any

from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

#: The main options of a run, in the order the HParams tab shows them.
MAIN_HPARAMS = ("lr", "epochs", "batch_size", "precision", "arch", "optimizer")


def hparam_name(key: str, main: Sequence[str] = MAIN_HPARAMS) -> str:
    """The name an option is stored under: ``"NN key"`` for a main option (NN its place in
    `main`), else the key itself."""
    return f"{list(main).index(key):02d} {key}" if key in main else key


def hparam_value(value: Any) -> bool | float | str | None:
    """What the HParams tab can show: bool, real number or string (None: left out; an integer
    becomes its digits, so that it shows as ``2``, not ``2.0000``)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, Integral):
        return str(value)
    if isinstance(value, Number):
        return float(value)  # type: ignore[arg-type]  # the Number ABC declares no __float__
    if isinstance(value, (list, tuple)):
        return ", ".join(str(item) for item in value)
    return str(value)


def _summary(tag: str, data: plugin_data_pb2.HParamsPluginData) -> Summary:
    return Summary(
        value=[Summary.Value(tag=tag, metadata=metadata.create_summary_metadata(data), tensor=metadata.NULL_TENSOR)]
    )


def hparams_summaries(
    hparams: Mapping[str, Any], metric_tags: Sequence[str], main: Sequence[str] = MAIN_HPARAMS
) -> tuple[Summary, Summary, Summary]:
    """The experiment, session-start and session-end summaries of one run.

    Args:
        hparams: option name -> value.
        metric_tags: scalar tags whose last value the HParams tab shows, in this order (the
            first five show by default).
        main: the main options; those in `hparams` come first, in this order.
    """
    values = {key: hparam_value(value) for key, value in hparams.items()}
    values = {key: value for key, value in values.items() if value is not None}
    start = plugin_data_pb2.SessionStartInfo()
    infos = []
    for key, value in values.items():
        name = hparam_name(key, main)
        info = api_pb2.HParamInfo(name=name, display_name=key)
        if isinstance(value, bool):
            start.hparams[name].bool_value = value
            info.type = api_pb2.DATA_TYPE_BOOL
            info.domain_discrete.extend([False, True])
        elif isinstance(value, float):
            start.hparams[name].number_value = value
            info.type = api_pb2.DATA_TYPE_FLOAT64
        else:
            start.hparams[name].string_value = value
            info.type = api_pb2.DATA_TYPE_STRING
            info.domain_discrete.extend([value])  # what TensorBoard itself infers from one run
        infos.append(info)
    infos.sort(key=lambda info: info.name)  # TensorBoard's own order
    metrics = [
        api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag), description="the last value of the curve")
        for tag in metric_tags
    ]
    experiment = api_pb2.Experiment(hparam_infos=infos, metric_infos=metrics)
    end = plugin_data_pb2.SessionEndInfo(status=api_pb2.STATUS_SUCCESS)
    return (
        _summary(metadata.EXPERIMENT_TAG, plugin_data_pb2.HParamsPluginData(experiment=experiment)),
        _summary(metadata.SESSION_START_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_start_info=start)),
        _summary(metadata.SESSION_END_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_end_info=end)),
    )
