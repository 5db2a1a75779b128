"""ONNX export of SRU++ layers and language models (``pip install 'srupp[onnx]'``).

``export_onnx`` runs ``torch.onnx.export(..., dynamo=True)`` with the recurrence op translated into an ONNX ``Scan``
over time (``srupp.ops.onnx_translation``), so one exported file accepts any sequence length and batch size.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from srupp.errors import name_path
from srupp.files import make_temp_dir_beside, move_aside, remove_orphans
from srupp.models import SRUppLM
from srupp.nn import SRUpp
from srupp.nn.checks import resolve_causal
from srupp.ops.onnx_translation import translation_table


class _LayerGraph(nn.Module):
    def __init__(self, module: SRUpp, causal: bool, with_state: bool) -> None:
        super().__init__()
        self.module, self.causal, self.with_state = module, causal, with_state

    def forward(self, input: Tensor, state: Tensor | None = None):
        output, new_state = self.module(input, state, causal=self.causal)
        return (output, new_state.c) if self.with_state else output


class _LMGraph(nn.Module):
    def __init__(self, model: SRUppLM, with_state: bool) -> None:
        super().__init__()
        self.model, self.with_state = model, with_state

    def forward(self, input_ids: Tensor, state: Tensor | None = None):
        # Each exported call is one segment: the recurrent state may be carried, the attention memory is not.
        hidden, new_state = self.model.rnn(self.model.embed(input_ids), state, causal=True)
        log_probs = self.model.log_probs(hidden)
        return (log_probs, new_state.c) if self.with_state else log_probs


def _is_onnx(path: Path) -> bool:
    """An ONNX model file: a protobuf ``ModelProto`` opens with field 1, ``ir_version`` (tag byte 0x08)."""
    try:
        with open(path, "rb") as f:
            return path.is_file() and not path.is_symlink() and f.read(1) == b"\x08"
    except OSError:
        return False


def _make_room(path: Path, targets: list[Path], overwrite: bool) -> None:
    """Move the files of an earlier export at ``targets`` (the graph ``path`` and its external-data files)
    aside into ``<path>.replaced/<UTC time>/``; refuse anything else, and anything at all without ``overwrite``."""
    existing = [t for t in targets if t.exists() or t.is_symlink()]
    if not existing:
        return
    if not overwrite:
        raise FileExistsError(f"{', '.join(map(str, existing))} already exist(s); pass overwrite=True to replace")
    earlier = _is_onnx(path)  # the graph file itself, which makes the files beside it an export's
    for target in existing:
        if target.is_dir() or target.is_symlink() or not earlier:
            raise FileExistsError(
                f"{target} is not part of an earlier ONNX export at {path}, which an export never replaces (even "
                f"with overwrite); choose another path"
            )
    moved = move_aside(existing, Path(f"{path}.replaced"))
    print(f"srupp export: moved the previous export at {path} to {moved}", file=sys.stderr)


def export_onnx(
    model: SRUpp | SRUppLM,
    path: str | os.PathLike,
    *,
    causal: bool | None = None,
    with_state: bool = False,
    example_length: int = 7,
    example_batch: int = 3,
    opset_version: int | None = None,
    overwrite: bool = True,
) -> Path:
    """Export an ``SRUpp`` module or an ``SRUppLM`` to an ONNX file with dynamic time and batch axes.

    Graph inputs and outputs (``T`` and ``B`` dynamic):

    - ``SRUpp``: ``input [T, B, input_size]`` (``[B, T, ...]`` with ``batch_first``) -> ``output [T, B,
      dirs*hidden_size]``; ``causal`` as in ``SRUpp.forward`` (None: causal iff unidirectional).
    - ``SRUppLM``: ``input_ids [T, B]`` int64 -> ``log_probs [T, B, vocab_size]`` (causal).
    - ``with_state``: an extra input ``state [num_layers*dirs, B, hidden_size]`` (the initial c; zeros for a fresh
      stream) and output ``state_out`` (the final c), to stream a long sequence segment by segment. Only c is
      carried: a segment's attention sees that segment, not the previous one.

    The model is exported in eval mode (no dropout); padding masks, attention memory and ``attn_window`` are not
    graph inputs. The file is written next to ``path`` and renamed into place.

    Args:
        model: the module to export (float32 weights on the CPU, tested; a fused recurrence backend: the
            "naive" backend is a Python loop over time, which fixes T in the traced graph).
        path: the ``.onnx`` file to write.
        causal: for an ``SRUpp`` module, attend only to earlier positions (None: the module's rule, causal iff
            unidirectional).
        with_state: expose the recurrent state as an input and an output.
        example_length, example_batch: the sizes of the example traced (any others run).
        opset_version: ONNX opset (default: the exporter's).
        overwrite: move an earlier export at ``path`` (and the external-data file beside it, large models)
            aside into ``<path>.replaced/<UTC time>/``; a file there that is not an ONNX model is never
            replaced. With False an existing one raises ``FileExistsError`` and nothing is written.

    Returns:
        The path written.

    Example:
        >>> layer = SRUpp(32, 32, proj_size=8, num_layers=2, bidirectional=True)
        >>> export_onnx(layer, "srupp.onnx")  # doctest: +SKIP
        >>> import onnxruntime  # doctest: +SKIP
        >>> session = onnxruntime.InferenceSession("srupp.onnx")  # doctest: +SKIP
        >>> (output,) = session.run(None, {"input": x.numpy()})  # x [T, B, 32], doctest: +SKIP
    """
    graph, example, names, outputs = _graph(model, causal, with_state, example_length, example_batch)
    if example_length < 2 or example_batch < 2 or example_length == example_batch:
        # torch.export specialises sizes 0 and 1, and equal example sizes can be taken for one dimension.
        raise ValueError(
            f"`example_length` and `example_batch` must be >= 2 and differ, got {example_length} and {example_batch}"
        )
    path = Path(path)
    if path.is_dir():
        raise FileExistsError(f"`path` {path} is a folder; an ONNX export is a file: choose a new file name")
    was_training = model.training
    graph.eval()
    try:
        with torch.no_grad():
            program = torch.onnx.export(
                graph,
                example.args,
                dynamo=True,
                custom_translation_table=translation_table(),
                dynamic_shapes=example.dynamic,
                input_names=names,
                output_names=outputs,
                opset_version=opset_version,
                verbose=False,
            )
    finally:
        model.train(was_training)
    _save(program, path, overwrite)
    return path


class _Example(NamedTuple):
    args: tuple[Tensor, ...]  # the example inputs traced
    dynamic: tuple[dict, ...]  # per input, its dynamic axes


def _graph(
    model: SRUpp | SRUppLM, causal: bool | None, with_state: bool, length: int, batch_size: int
) -> tuple[nn.Module, _Example, list[str], list[str]]:
    """The module to trace for ``model``, its example inputs with their dynamic axes, and the input and output
    names."""
    if isinstance(model, SRUppLM):
        if model.config.adaptive:
            raise NotImplementedError(
                "export_onnx supports language models with a plain embedding and softmax; the adaptive input "
                f"(cutoffs={model.config.cutoffs}) selects rows by token value: export `model.rnn` instead"
            )
        rnn = model.rnn
        graph: nn.Module = _LMGraph(model, with_state)
        device = next(model.parameters()).device
        example = torch.randint(0, model.config.vocab_size, (length, batch_size), device=device)
        names, axes, outputs = ["input_ids"], {0: "T", 1: "B"}, ["log_probs"]
    elif isinstance(model, SRUpp):
        causal = resolve_causal(causal, model.bidirectional)
        if causal and model.bidirectional:
            raise NotImplementedError("a bidirectional SRUpp cannot be causal: export it with causal=False")
        rnn = model
        graph = _LayerGraph(model, causal, with_state)
        reference = next(model.parameters())
        shape = (batch_size, length) if model.batch_first else (length, batch_size)
        example = torch.randn(*shape, model.input_size, dtype=reference.dtype, device=reference.device)
        names, axes, outputs = ["input"], {1: "T", 0: "B"} if model.batch_first else {0: "T", 1: "B"}, ["output"]
    else:
        raise TypeError(f"`model` must be an SRUpp or an SRUppLM, got {type(model).__name__}")
    time, batch = torch.export.Dim("T"), torch.export.Dim("B")
    dims = {index: time if name == "T" else batch for index, name in axes.items()}
    args: tuple[Tensor, ...] = (example,)
    dynamic: tuple[dict, ...] = (dims,)
    if with_state:
        reference = next(rnn.parameters())
        state = reference.new_zeros(rnn.num_layers * rnn.num_directions, batch_size, rnn.hidden_size)
        args, dynamic = (*args, state), (*dynamic, {1: batch})
        names, outputs = [*names, "state"], [*outputs, "state_out"]
    return graph, _Example(args, dynamic), names, outputs


def _save(program, path: Path, overwrite: bool) -> None:
    """Write ``program`` in a fresh folder beside ``path`` (with any external-data file), then rename it into
    place (an earlier export moved aside by ``_make_room``)."""
    remove_orphans(path.parent)
    staging = make_temp_dir_beside(path)
    try:
        try:
            program.save(staging / path.name)
        except OSError as err:  # a full disk: name the user's file, not the staging one
            raise name_path(err, path, replace=True) from err
        written = sorted(staging.iterdir())
        _make_room(path, [path.parent / item.name for item in written], overwrite)
        for item in written:
            os.replace(item, path.parent / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
