"""ONNX translations of the fused recurrence ops, for ``torch.onnx.export(..., dynamo=True)``.

The fused backends are custom ops (``srupp::sru_cpu_forward``, ``srupp::sru_triton_forward``) that the exporter
cannot see into. ``translation_table()`` maps each to an ONNX ``Scan`` over time whose body is one step of the
recurrence (the equations of ``srupp.ops.naive``), so an exported model keeps dynamic time and batch axes and runs
in any ONNX runtime. Needs the optional packages ``onnx``, ``onnxscript`` (``pip install srupp[onnx]``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def _require_onnxscript():
    try:
        import onnx_ir as ir
        from onnxscript import opset18 as op
    except ImportError as error:
        raise RuntimeError("ONNX export needs the packages onnx and onnxscript: pip install 'srupp[onnx]'") from error
    try:
        # The exporter's own helper for nodes with several outputs (present in torch 2.13, the tested version).
        from torch.onnx._internal.exporter._torchlib.ops.hop import call_op
    except ImportError as error:
        raise RuntimeError(
            f"ONNX export of the recurrence needs a newer torch (tested with 2.13), got {torch.__version__}"
        ) from error
    return ir, op, call_op


def sru_forward_onnx(u, x, v, b, c0, mask_pad, mask_c, reverse: bool = False, save_c: bool = False):
    """Translate one call of a fused forward op into an ONNX ``Scan`` over the time axis.

    Inputs are ONNX values with the op's shapes: ``u [T, B, 3*D]``, ``x [T, B, D]``, ``v, b [2, D]``,
    ``c0 [B, D]``, ``mask_pad [T, B]`` bool or None, ``mask_c [B, D]`` or None. Returns ``(h, c_last, c_all)``
    like the op; ``c_all`` (every step's c, which only the backward pass reads) is ``[T, B, D]`` when
    ``save_c`` and an empty ``[0]`` tensor otherwise. ``reverse`` runs the scan from the last step.
    """
    ir, op, call_op = _require_onnxscript()
    u_c, u_f, u_r = op.Split(u, axis=2, num_outputs=3)
    v_f, v_r = op.Split(v, axis=0, num_outputs=2)
    b_f, b_r = op.Split(b, axis=0, num_outputs=2)
    one = op.CastLike(op.Constant(value_float=1.0), x)
    zero = op.CastLike(op.Constant(value_float=0.0), x)
    scan_inputs = [u_c, u_f, u_r, x]
    if mask_pad is not None:
        scan_inputs.append(op.Unsqueeze(mask_pad, op.Constant(value_ints=[2])))  # [T, B, 1]: broadcasts over D

    # The step body: captured outer values (v, b, mask_c, constants) are read from the enclosing graph.
    def value(name: str):
        return ir.Value(name=name)

    step_in = [value("c_prev"), value("u_c_t"), value("u_f_t"), value("u_r_t"), value("x_t")]
    if mask_pad is not None:
        step_in.append(value("pad_t"))
    c_prev, uc_t, uf_t, ur_t, x_t = step_in[:5]
    nodes: list = []

    def node(op_type: str, *inputs):
        nodes.append(ir.Node("", op_type, inputs, num_outputs=1))
        return nodes[-1].outputs[0]

    f = node("Sigmoid", node("Add", node("Add", uf_t, node("Mul", v_f, c_prev)), b_f))
    r = node("Sigmoid", node("Add", node("Add", ur_t, node("Mul", v_r, c_prev)), b_r))
    c = node("Add", node("Mul", f, c_prev), node("Mul", node("Sub", one, f), uc_t))
    gate = r if mask_c is None else node("Mul", mask_c, r)
    h = node("Add", x_t, node("Mul", gate, node("Sub", c, x_t)))
    if mask_pad is not None:
        # A padded step carries c unchanged and outputs 0.
        c = node("Where", step_in[5], c_prev, c)
        h = node("Where", step_in[5], zero, h)
    step_out = [node("Identity", c), node("Identity", h)]
    if save_c:
        step_out.append(node("Identity", c))
    body = ir.Graph(step_in, step_out, nodes=nodes, name="sru_step")
    num_scan_out = len(step_out) - 1
    # onnxscript's op.Scan reports one output (the schema's outputs are variadic); the exporter's own helper
    # creates the node with every output, as torch's translation of its scan higher-order op does.
    results = call_op(
        "Scan",
        c0,
        *scan_inputs,
        _num_outputs=1 + num_scan_out,
        body=body,
        num_scan_inputs=len(scan_inputs),
        scan_input_directions=[int(reverse)] * len(scan_inputs),
        scan_output_directions=[int(reverse)] * num_scan_out,
    )
    c_last, h = results[0], results[1]
    c_all = results[2] if save_c else op.CastLike(op.ConstantOfShape(op.Constant(value_ints=[0])), x)
    return h, c_last, c_all


def translation_table() -> dict[Callable, Callable]:
    """``custom_translation_table`` for ``torch.onnx.export(..., dynamo=True)``: every fused recurrence op
    registered in this process mapped to ``sru_forward_onnx``."""
    import srupp.ops.cpu  # noqa: F401  (registers srupp::sru_cpu_forward)

    table: dict[Callable, Callable] = {torch.ops.srupp.sru_cpu_forward.default: sru_forward_onnx}
    if hasattr(torch.ops.srupp, "sru_triton_forward"):
        table[torch.ops.srupp.sru_triton_forward.default] = sru_forward_onnx
    return table
