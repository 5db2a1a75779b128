"""Argument checks shared by the SRU and SRU++ modules, and the rules for padded positions and causality."""

from __future__ import annotations

import torch
from torch import Tensor


def zero_padding(input: Tensor, mask_pad: Tensor | None) -> Tensor:
    """``input`` ``[T, B, *]`` with the positions ``mask_pad`` ``[T, B]`` marks (True = padding) set to 0, so that
    a NaN or inf there reaches no real output (0 times NaN is NaN in any sum over positions); ``input`` itself
    when there is no mask."""
    return input if mask_pad is None else input.masked_fill(mask_pad.unsqueeze(-1), 0.0)


def check_tensor(name: str, value: object) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_sequence(name: str, value: object, size: int, label: str = "input_size") -> Tensor:
    tensor = check_tensor(name, value)
    if tensor.dim() != 3 or tensor.shape[-1] != size:
        raise ValueError(f"`{name}` must have shape [T, B, {label}] = [T, B, {size}], got {list(tensor.shape)}")
    if tensor.shape[0] == 0:
        raise ValueError(f"`{name}` must have at least one time step, got shape {list(tensor.shape)}")
    return tensor


def check_mask_pad(mask_pad: object, steps: int, batch: int, batch_first: bool = False) -> Tensor:
    mask = check_tensor("mask_pad", mask_pad)
    expected, labels = ([batch, steps], "[B, T]") if batch_first else ([steps, batch], "[T, B]")
    if list(mask.shape) != expected:
        raise ValueError(f"`mask_pad` must have shape {labels} = {expected}, got {list(mask.shape)}")
    if mask.dtype != torch.bool:
        raise TypeError(f"`mask_pad` must be a bool tensor (True = padding), got dtype {mask.dtype}")
    return mask.t() if batch_first else mask


def check_state(
    name: str, value: object, expected: list[int], labels: str = "[num_layers*dirs, B, hidden_size]"
) -> Tensor:
    tensor = check_tensor(name, value)
    if list(tensor.shape) != expected:
        raise ValueError(f"`{name}` must have shape {labels} = {expected}, got {list(tensor.shape)}")
    return tensor


def check_stream_indices(indices: object, batch: int) -> Tensor:
    """``indices`` as int64 if it is a 1-D integer tensor of stream numbers in ``[0, batch)`` (repeats allowed)."""
    tensor = check_tensor("indices", indices)
    if tensor.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"`indices` must be an integer tensor of stream numbers, got {tensor.dtype}")
    if tensor.dim() != 1:
        raise ValueError(f"`indices` must have shape [N] (1 dim), got {list(tensor.shape)}")
    if tensor.numel():
        low, high = (int(bound) for bound in torch.aminmax(tensor))
        if low < 0 or high >= batch:
            raise ValueError(f"`indices` must lie in [0, {batch}) (the streams), got values in [{low}, {high}]")
    return tensor.long()


def check_probability(name: str, value: float) -> float:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"`{name}` must be in [0, 1), got {value}")
    return float(value)


def resolve_causal(causal: bool | None, bidirectional: bool) -> bool:
    """The causality rule of SRU++ layers: ``causal=None`` means causal for a unidirectional layer (each position
    attends only to itself, earlier positions and the memory, as a language model needs) and non-causal for a
    bidirectional one (an encoder); True or False is the caller's explicit choice."""
    if causal is None:
        return not bidirectional
    if not isinstance(causal, bool):
        raise TypeError(f"`causal` must be a bool or None, got {type(causal).__name__}")
    return causal
