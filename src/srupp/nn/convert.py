"""Import of weights trained with the authors' ``sru`` package (3.0.0.dev6) into ``srupp.nn.SRUpp``.

Their layout, read from ``sru/modules.py`` and ``sru/ops.py``: ``transform_module.linear3`` (Wo)
emits, per direction and hidden unit, k interleaved values [candidate, forget, reset(, skip)];
``weight_c`` and ``bias`` are ``[(forget, reset), direction, hidden]`` flattened; ``linear1`` is Wq,
``linear2`` is ``[Wk; Wv]``; ``alpha`` has shape [1]; ``layer_norm`` of the transform is ours ``norm``
and the cell's ``layer_norm`` (pre-norm) is ours ``input_norm``. Their c state is
``[num_layers, B, dirs*hidden]``; ours is ``[num_layers*dirs, B, hidden]`` (see ``c_from_sru``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import Tensor, nn

from srupp.nn.layer import HIGHWAY_BIAS
from srupp.nn.srupp import SRUpp

_LAYER_KEY = re.compile(r"^rnn_lst\.(\d+)\.")


def _wo_rows(weight: Tensor, num_directions: int, hidden_size: int) -> Tensor:
    """Their interleaved Wo rows (direction, unit, k) -> our planar rows: per direction the
    candidate, forget and reset blocks, then the skip block of every direction when k = 4."""
    k = weight.shape[0] // (num_directions * hidden_size)
    per_unit = weight.reshape(num_directions, hidden_size, k, weight.shape[1])
    gates = per_unit[:, :, :3].permute(0, 2, 1, 3).reshape(num_directions * 3 * hidden_size, -1)
    if k == 3:
        return gates
    return torch.cat([gates, per_unit[:, :, 3].reshape(num_directions * hidden_size, -1)])


def c_from_sru(c: Tensor, num_directions: int) -> Tensor:
    """Their c state ``[num_layers, B, dirs*hidden]`` -> ours ``[num_layers*dirs, B, hidden]``."""
    layers, batch, width = c.shape
    hidden = width // num_directions
    return c.reshape(layers, batch, num_directions, hidden).transpose(1, 2).reshape(-1, batch, hidden)


def _check(name: str, given: object, found: object) -> None:
    if given is not None and given != found:
        raise ValueError(f"`{name}` = {given!r} does not match the weights, which have {name} = {found!r}")


def _from_module(module: nn.Module) -> dict:
    if getattr(module, "input_to_hidden", None) is not None:
        raise NotImplementedError("sru.SRUpp with proj_input_to_hidden_first=True is not supported")
    first = module.rnn_lst[0]
    if first.rescale:
        raise NotImplementedError("sru.SRUpp with rescale=True is not supported")
    if first.layer_norm is not None and first.normalize_after:
        raise NotImplementedError("sru.SRUpp with normalize_after=True (post-norm cells) is not supported")
    attention_dropout = [
        cell.transform_module.attn_dropout for cell in module.rnn_lst if hasattr(cell.transform_module, "alpha")
    ]
    for cell in module.rnn_lst:
        transform = cell.transform_module
        if transform.layer_norm is None:
            raise NotImplementedError("sru.SRUpp with attn_layer_norm=False is not supported")
        if getattr(transform, "normalize_after", True) is False:
            raise NotImplementedError("sru.SRUppAttention with normalize_after=False is not supported")
    return {
        "num_heads": module.num_heads,
        "bidirectional": module.bidirectional,
        "hidden_size": module.hidden_size,
        "dropout": float(module.dropout),
        "attn_dropout": attention_dropout[0] if attention_dropout else 0.0,
        "highway_bias": float(first.highway_bias),
    }


def _refuse_unsupported(state: Mapping[str, Tensor], layer_ids: list[int], layer_norm: bool, input_size: int) -> None:
    """NotImplementedError for the authors' options that ``SRUpp`` cannot represent."""
    for i in layer_ids:
        if f"rnn_lst.{i}.transform_module.layer_norm.weight" not in state:
            raise NotImplementedError("sru.SRUpp with attn_layer_norm=False is not supported")
        scale = state.get(f"rnn_lst.{i}.scale_x")
        if scale is not None and not torch.all(scale == 1):
            raise NotImplementedError(
                f"sru.SRUpp with rescale=True is not supported (`rnn_lst.{i}.scale_x` = {scale.flatten().tolist()}, "
                "not 1)"
            )
    if layer_norm and state["rnn_lst.0.layer_norm.weight"].numel() != input_size:
        raise NotImplementedError(
            "sru.SRUpp with normalize_after=True (post-norm cells) is not supported (`rnn_lst.0.layer_norm` has "
            f"{state['rnn_lst.0.layer_norm.weight'].numel()} features, the input {input_size})"
        )


def _our_weights(model: SRUpp, state: Mapping[str, Tensor], attention: list[int], layer_norm: bool) -> dict:
    """The authors' ``state`` under our names and layouts, for ``model``."""
    num_directions, hidden = model.num_directions, model.hidden_size
    ours: dict[str, Tensor] = {}
    for i, layer in enumerate(model.layers):
        theirs = f"rnn_lst.{i}."
        transform = f"{theirs}transform_module."
        ours[f"layers.{i}.transform.in_proj.weight"] = state[f"{transform}linear1.weight"]
        if i in attention:
            ours[f"layers.{i}.transform.kv_proj.weight"] = state[f"{transform}linear2.weight"]
            ours[f"layers.{i}.transform.alpha"] = state[f"{transform}alpha"].reshape(())
            wo = state[f"{transform}linear3.weight"]
        else:
            wo = state[f"{transform}linear2.weight"]
        expected_rows = layer.output_size * (4 if layer.project_skip else 3)
        if wo.shape[0] != expected_rows:
            raise ValueError(f"layer {i}: Wo has {wo.shape[0]} rows, expected {expected_rows}; check `bidirectional`")
        ours[f"layers.{i}.transform.out_proj.weight"] = _wo_rows(wo, num_directions, hidden)
        ours[f"layers.{i}.transform.norm.weight"] = state[f"{transform}layer_norm.weight"]
        ours[f"layers.{i}.transform.norm.bias"] = state[f"{transform}layer_norm.bias"]
        if layer_norm:
            ours[f"layers.{i}.input_norm.weight"] = state[f"{theirs}layer_norm.weight"]
            ours[f"layers.{i}.input_norm.bias"] = state[f"{theirs}layer_norm.bias"]
        for name, key in (("weight", "weight_c"), ("bias", "bias")):
            ours[f"layers.{i}.gates.{name}"] = state[f"{theirs}{key}"].reshape(2, num_directions, -1).transpose(0, 1)
    return ours


def srupp_from_sru(
    source: nn.Module | Mapping[str, Tensor],
    *,
    input_size: int | None = None,
    hidden_size: int | None = None,
    proj_size: int | None = None,
    num_layers: int | None = None,
    num_heads: int | None = None,
    bidirectional: bool | None = None,
    dropout: float | None = None,
    attn_dropout: float | None = None,
    highway_bias: float | None = None,
    batch_first: bool = False,
    backend: str = "auto",
) -> SRUpp:
    """Build a ``srupp.nn.SRUpp`` computing the same function as an authors' ``sru.SRUpp``.

    Sizes, the attention layers and layer norms are read from the weights; give ``num_heads`` and
    ``bidirectional`` (or ``hidden_size``) when converting a bare state_dict, as its shapes cannot
    tell them. Sizes given for a module are checked against it.

    One difference remains with ``layer_norm=True`` and memory: their cell normalises its input but
    not its memory; ours normalises both (so cached decoding equals the full forward).

    Refused with ``NotImplementedError``, as ``SRUpp`` cannot represent them: ``rescale=True`` (a state_dict
    shows it by its ``scale_x`` buffers), ``proj_input_to_hidden_first=True``, ``attn_layer_norm=False``,
    post-norm cells (``layer_norm=True, normalize_after=True``; a state_dict shows it only where the first
    layer's input size differs from its output size) and attention with ``normalize_after=False`` (a module
    only).

    Args:
        source: an ``sru.SRUpp`` module or its ``state_dict()``.
        input_size, hidden_size, proj_size, num_layers, num_heads, bidirectional: sizes (checked or
            needed, see above).
        dropout, attn_dropout, highway_bias: training hyper-parameters to carry over (taken from a
            module; defaults 0, 0, ``HIGHWAY_BIAS`` for a state_dict).
        batch_first, backend: options of the new module.

    Returns:
        an ``SRUpp`` on the device and dtype of ``source``'s weights, in training mode.

    Example:
        >>> import sru
        >>> theirs = sru.SRUpp(32, 32, 8, num_layers=2).eval()
        >>> ours = srupp_from_sru(theirs).eval()
    """
    if isinstance(source, nn.Module):
        found = _from_module(source)
        for name, given in (("num_heads", num_heads), ("bidirectional", bidirectional), ("hidden_size", hidden_size)):
            _check(name, given, found[name])
        num_heads, bidirectional = found["num_heads"], found["bidirectional"]
        dropout = found["dropout"] if dropout is None else dropout
        attn_dropout = found["attn_dropout"] if attn_dropout is None else attn_dropout
        highway_bias = found["highway_bias"] if highway_bias is None else highway_bias
        state = source.state_dict()
    elif isinstance(source, Mapping):
        state = source
    else:
        raise TypeError(f"`source` must be an sru.SRUpp module or its state_dict, got {type(source).__name__}")
    if any(key.startswith("input_to_hidden.") for key in state):
        raise NotImplementedError("sru.SRUpp with proj_input_to_hidden_first=True is not supported")
    sizes = _sizes(state, input_size, hidden_size, proj_size, num_layers, bidirectional)
    attention = [i for i in range(sizes.num_layers) if f"rnn_lst.{i}.transform_module.alpha" in state]
    layer_norm = "rnn_lst.0.layer_norm.weight" in state
    _refuse_unsupported(state, list(range(sizes.num_layers)), layer_norm, sizes.input_size)

    reference = state["rnn_lst.0.transform_module.linear1.weight"]
    model = SRUpp(
        sizes.input_size,
        sizes.hidden_size,
        sizes.proj_size,
        num_layers=sizes.num_layers,
        num_heads=1 if num_heads is None else num_heads,
        dropout=0.0 if dropout is None else dropout,
        attn_dropout=0.0 if attn_dropout is None else attn_dropout,
        bidirectional=sizes.bidirectional,
        batch_first=batch_first,
        layer_norm=layer_norm,
        highway_bias=HIGHWAY_BIAS if highway_bias is None else highway_bias,
        attention_layers=attention,
        backend=backend,
        device=reference.device,
        dtype=reference.dtype,
    )
    model.load_state_dict(_our_weights(model, state, attention, layer_norm))
    return model


class _Sizes(NamedTuple):
    input_size: int
    hidden_size: int
    proj_size: int
    num_layers: int
    bidirectional: bool


def _sizes(
    state: Mapping[str, Tensor],
    input_size: int | None,
    hidden_size: int | None,
    proj_size: int | None,
    num_layers: int | None,
    bidirectional: bool | None,
) -> _Sizes:
    """The sizes the weights in ``state`` have, checked against those given (None: not given)."""
    layer_ids = sorted({int(match.group(1)) for key in state if (match := _LAYER_KEY.match(key))})
    if not layer_ids or layer_ids != list(range(len(layer_ids))):
        raise ValueError("`source` has no sru.SRUpp layers (keys rnn_lst.0., rnn_lst.1., ...)")
    found_proj, found_input = state["rnn_lst.0.transform_module.linear1.weight"].shape
    output_size = state["rnn_lst.0.weight_c"].numel() // 2
    if hidden_size is not None and bidirectional is None:
        bidirectional = output_size == 2 * hidden_size
    num_directions = 2 if bidirectional else 1
    if output_size % num_directions:
        raise ValueError(f"weights of width {output_size} cannot be bidirectional")
    found = _Sizes(found_input, output_size // num_directions, found_proj, len(layer_ids), bool(bidirectional))
    given = {"input_size": input_size, "hidden_size": hidden_size, "proj_size": proj_size, "num_layers": num_layers}
    for name, value in given.items():
        _check(name, value, getattr(found, name))
    return found
