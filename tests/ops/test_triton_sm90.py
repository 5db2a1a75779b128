"""The Triton kernels compiled offline for an H100/H200 (sm_90), no GPU needed: Triton ships its own ptxas.

The interpreter checks what the kernels compute; this checks how they compile: every step's loads become
asynchronous copies issued ahead (cp.async in the PTX, LDGSTS in the SASS) when STAGES > 1, nothing spills to
local memory, and the lean kernels' time loop stays within its budget of SASS instructions per time step (the
kernels are bound by time per step, not by bandwidth: BENCHMARKS.md, "GPU"). STAGES = 1 is the control: the
same kernels with plain loads. The prefetch kernels load into registers by hand at one lane per thread: their
loads of a block come before the block before it is computed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

from srupp.ops import triton_kernel  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")

# Loads per time step: u_c, u_f, u_r, x and the padding flag; the backward adds grad_h and c_{t-1}.
LOADS_PER_STEP = {"forward": 5, "backward": 7}
# (activation dtype, BLOCK_D, num_warps) as the launcher picks them on an H200 for B*D in the thousands:
# one 4-byte element per thread for fp32, two 2-byte elements for bf16.
CONFIGS = {"fp32": ("fp32", 128, 4), "bf16": ("bf16", 256, 4)}
ALL_CONFIGS = {**CONFIGS, "fp64": ("fp64", 128, 4)}
# One-warp programs, as the launcher picks them at the paper's enwik8 shape (T=1024, B=4, D=3072) on an H200.
ONE_WARP = {"fp32": ("fp32", 32, 1), "bf16": ("bf16", 64, 1)}
# SASS instructions per time step in the lean kernels' main loop (issue 21's targets), without padding and
# mask_c as benchmarks.gpu times them (and as issue 21 counted the legacy loop: 117, 166, 194, 274 with 3.6).
PER_STEP_BUDGET = {
    ("forward", "fp32"): 60,
    ("forward", "bf16"): 95,
    ("backward", "fp32"): 110,
    ("backward", "bf16"): 160,
}
# The prefetch kernels' own budgets per step: one lane per thread for every dtype, the loads of a whole block of
# steps issued before the block before it is computed.
PREFETCH_BUDGET = {("forward", "fp32"): 36, ("forward", "bf16"): 34, ("backward", "fp32"): 62, ("backward", "bf16"): 62}
PAPER_SHAPE = (1024, 4, 3072)
KERNELS = {
    ("legacy", "forward"): "_sru_forward_kernel",
    ("legacy", "backward"): "_sru_backward_kernel",
    ("lean", "forward"): "_sru_lean_forward_kernel",
    ("lean", "backward"): "_sru_lean_backward_kernel",
    ("prefetch", "forward"): "_sru_prefetch_forward_kernel",
    ("prefetch", "backward"): "_sru_prefetch_backward_kernel",
}


def _nvidia_tool(name: str) -> Path | None:
    """The tool Triton itself uses (for ptxas, the one that compiles sm_90), else the one it ships."""
    try:
        from triton import knobs
        from triton.backends.nvidia import compiler

        tool = compiler.get_ptxas(90) if name == "ptxas" else getattr(knobs.nvidia, name)
        path = Path(tool.path)
    except (ImportError, AttributeError, TypeError, RuntimeError):
        path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return path if path.exists() else None


def compile_sm90(
    kind: str, dtype: str, stages: int, reverse: bool = False, variant: str = "legacy", config=None, masks=True
):
    """triton.compile of one kernel for sm_90 with saved states and, when ``masks``, padding and mask_c; the lean
    kernels with STEPS steps per iteration (the prefetch forward with PREFETCH_STEPS, at the paper's B=4, D=3072)
    and, for 16-bit activations, the fast reciprocal, as on a GPU."""
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as err:
        pytest.skip(f"this triton cannot compile offline (no ASTSource/GPUTarget): {err}")
    activation, block, warps = config or ALL_CONFIGS[dtype]
    compute = "fp64" if dtype == "fp64" else "fp32"
    pointers = {
        "u": activation,
        "x": activation,
        "h": activation,
        "grad_h": activation,
        "grad_u": activation,
        "grad_x": activation,
        # The lean backward reads the padding flags as a row of its tile, in the state's dtype (FLAG_COPIES each).
        "mask_pad": compute if (variant, kind) == ("lean", "backward") else "i32",
    }
    kernel = getattr(triton_kernel, KERNELS[variant, kind])
    constexprs = {"HAS_MASK_PAD": masks, "HAS_MASK_C": masks, "REVERSE": reverse, "BLOCK_D": block, "STAGES": stages}
    if kind == "forward":
        constexprs["SAVE_C"] = True
    if variant != "legacy":
        constexprs.update(K=triton_kernel.STEPS, FAST=activation in ("fp16", "bf16"))
    if variant == "prefetch":
        constexprs.update(K=prefetch_steps(kind), B=PAPER_SHAPE[1], D=PAPER_SHAPE[2])
    function = triton.JITFunction(kernel)
    signature = {}
    for name in function.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*" + pointers.get(name.removesuffix("_ptr"), compute)
        else:
            signature[name] = "i32"
    # What the launcher tells the compiler for 16-byte aligned tensors and D a multiple of 16.
    aligned = {
        (i,): [["tt.divisibility", 16]]
        for i, n in enumerate(function.arg_names)
        if (n.endswith("_ptr") or n == "D") and n not in constexprs
    }
    try:
        source = ASTSource(function, signature, constexprs, aligned)
    except TypeError:
        source = ASTSource(function, signature, constexprs)
    try:
        return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    except Exception as err:
        # Only a missing toolchain is a reason to skip; a kernel that does not compile is a failure.
        if "ptxas" in str(err) and _nvidia_tool("ptxas") is None:
            pytest.skip(f"triton cannot compile offline here: {err}")
        raise


def ptxas_report(ptx: str, tmp_path: Path) -> str:
    ptxas = _nvidia_tool("ptxas")
    if ptxas is None:
        pytest.skip("triton ships no ptxas here")
    source = tmp_path / "kernel.ptx"
    source.write_text(ptx)
    arch = re.search(r"^\.target\s+(\S+)", ptx, re.MULTILINE).group(1)
    result = subprocess.run(
        [str(ptxas), "-v", f"--gpu-name={arch}", str(source), "-o", str(tmp_path / "kernel.cubin")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout + result.stderr


def sass(cubin: bytes, tmp_path: Path) -> str | None:
    cuobjdump = _nvidia_tool("cuobjdump") or (shutil.which("cuobjdump") and Path(shutil.which("cuobjdump")))
    if cuobjdump is None:
        return None
    path = tmp_path / "kernel.cubin"
    path.write_bytes(cubin)
    result = subprocess.run([str(cuobjdump), "-sass", str(path)], capture_output=True, text=True, timeout=120)
    return result.stdout if result.returncode == 0 else None


@pytest.mark.parametrize("variant, stages", [("legacy", 4), ("legacy", 8), ("lean", 3)])
@pytest.mark.parametrize("dtype", CONFIGS)
@pytest.mark.parametrize("kind", ["forward", "backward"])
def test_loads_are_asynchronous_and_nothing_spills(kind, dtype, variant, stages, tmp_path):
    compiled = compile_sm90(kind, dtype, stages, variant=variant)
    ptx = compiled.asm["ptx"]
    copies = re.findall(r"cp\.async\.c[ag]\.shared\.global\S*\s+\[[^]]*\],\s*\[[^]]*\],\s*(0x[0-9a-f]+|\d+)", ptx)
    # Each step's loads are issued in the loop and again in the prologue that fills the pipeline.
    assert len(copies) >= 2 * LOADS_PER_STEP[kind], f"{len(copies)} cp.async in the PTX"
    assert all(int(size, 0) >= 4 for size in copies), f"copy sizes {sorted(set(copies))}"
    assert "cp.async.wait_group" in ptx
    assert ".local" not in ptx, "the PTX uses local memory"
    report = ptxas_report(ptx, tmp_path)
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    assert re.search(r"\b0 bytes spill stores, 0 bytes spill loads", report), report
    assert "bytes stack frame" not in report or re.search(r"\b0 bytes stack frame", report), report
    # The lean loop holds STEPS steps of loads in flight; up to 168 registers (triton 3.6, backward) a 4-warp
    # program still leaves room for three per SM, more than the launcher's two.
    assert registers <= (192 if variant == "lean" else 128), report
    code = sass(compiled.asm["cubin"], tmp_path)
    if code is not None:
        assert code.count("LDGSTS") >= LOADS_PER_STEP[kind], "no LDGSTS in the SASS"
        assert not re.search(r"\b(LDL|STL)\b", code), "local-memory loads or stores in the SASS"
        if variant == "lean":
            # With padding the backward reads the flags as a row of its tile; the forward loads them on their own.
            groups = sum(text.split()[0] == "LDGDEPBAR" for text in time_loop(code)) / triton_kernel.STEPS
            assert groups == (1 if kind == "backward" else 2), f"{groups:g} commit groups per step"


@pytest.mark.parametrize("kind", ["forward", "backward"])
def test_one_stage_is_not_pipelined(kind):
    """The control: without num_stages > 1 the same kernels load synchronously, so the test above can fail."""
    ptx = compile_sm90(kind, "fp32", 1).asm["ptx"]
    assert "cp.async" not in ptx
    assert len(re.findall(r"ld\.global", ptx)) >= LOADS_PER_STEP[kind]


# The lean kernels compile for fp32 and bf16 in the tests above (each lean compile takes seconds); here fp64.
COMPILE_CASES = [
    *(
        pytest.param(dtype, reverse, "legacy", id=f"{dtype}-{'reverse' if reverse else 'forward-order'}-legacy")
        for dtype in ALL_CONFIGS
        for reverse in (False, True)
    ),
    pytest.param("fp64", True, "lean", id="fp64-reverse-lean"),
]


@pytest.mark.parametrize("dtype, reverse, variant", COMPILE_CASES)
def test_every_dtype_compiles_with_the_default_stages(dtype, reverse, variant):
    stages = triton_kernel.LEAN_STAGES if variant == "lean" else triton_kernel.STAGES
    for kind in ("forward", "backward"):
        assert compile_sm90(kind, dtype, stages, reverse, variant=variant).asm["cubin"]


def time_loop(code: str) -> list[str]:
    """The instructions of the compiled time loop: the longest stretch that a backward branch closes."""
    lines = [re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+([^;]*);", line) for line in code.splitlines()]
    instructions = [(int(m.group(1), 16), m.group(2).strip()) for m in lines if m]
    loops = []
    for address, text in instructions:
        branch = re.search(r"\bBRA\s+(?:`\(\S+\)\s*)?0x([0-9a-f]+)", text)
        if branch and int(branch.group(1), 16) < address:
            start = int(branch.group(1), 16)
            loops.append([t for a, t in instructions if start <= a <= address and not t.startswith("NOP")])
    assert loops, "no loop in the SASS"
    return max(loops, key=len)


def sass_per_step(variant: str, kind: str, dtype: str, tmp_path: Path, masks: bool = False) -> tuple[float, float, str]:
    """(SASS instructions per time step of the main loop, commit groups of asynchronous copies per time step,
    ptxas's report) for the launcher's H200 choice. A commit group is one LDGDEPBAR (cp.async.commit_group)."""
    stages = triton_kernel.LEAN_STAGES if variant == "lean" else triton_kernel.STAGES
    compiled = compile_sm90(kind, dtype, stages, variant=variant, config=ONE_WARP[dtype], masks=masks)
    code = sass(compiled.asm["cubin"], tmp_path)
    if code is None:
        pytest.skip("triton ships no cuobjdump here")
    steps = triton_kernel.STEPS if variant == "lean" else 1
    loop = time_loop(code)
    groups = sum(instruction.split()[0] == "LDGDEPBAR" for instruction in loop)
    return len(loop) / steps, groups / steps, ptxas_report(compiled.asm["ptx"], tmp_path)


@pytest.mark.parametrize("dtype", ONE_WARP)
@pytest.mark.parametrize("kind", ["forward", "backward"])
def test_lean_loop_fits_its_instruction_budget(kind, dtype, tmp_path):
    """The lean kernels' time loop, per time step, within issue 21's budget, with no spills and one commit group
    for all of a step's loads; the legacy loop (one step per iteration, one group per load) is the control that
    the counts can fail: it is well over both."""
    lean, lean_groups, report = sass_per_step("lean", kind, dtype, tmp_path)
    legacy, legacy_groups, _ = sass_per_step("legacy", kind, dtype, tmp_path)
    print(
        f"\nSASS per step, {kind} {dtype}, triton {triton.__version__}: lean {lean:.1f} ({lean_groups:g} commit "
        f"groups), legacy {legacy:.1f} ({legacy_groups:g})"
    )
    assert re.search(r"\b0 bytes spill stores, 0 bytes spill loads", report), report
    assert lean <= PER_STEP_BUDGET[kind, dtype], f"{lean:.1f} SASS instructions per step"
    assert lean_groups == 1, f"{lean_groups:g} commit groups per step"
    assert legacy > 1.4 * lean, (legacy, lean)
    assert legacy_groups == LOADS_PER_STEP[kind] - 1, legacy_groups  # one per load; no padding flag here


def prefetch_steps(kind: str) -> int:
    return triton_kernel.PREFETCH_STEPS if kind == "forward" else triton_kernel.PREFETCH_BACKWARD_STEPS


PREFETCH_CASES = [
    pytest.param(kind, dtype, masks, reverse, id=f"{kind}-{dtype}-{'pad-maskc-reverse' if masks else 'plain'}")
    for kind in ("forward", "backward")
    for dtype, masks, reverse in (
        ("fp32", False, False),
        ("bf16", False, False),
        ("bf16", True, True),
        ("fp16", True, True),
    )
]


@pytest.mark.parametrize("kind, dtype, masks, reverse", PREFETCH_CASES)
def test_prefetch_loads_a_block_ahead_at_one_lane_per_thread(kind, dtype, masks, reverse, tmp_path):
    """The prefetch kernels at one lane per thread (32 lanes per warp whatever the dtype): plain loads, no
    asynchronous copies, no spills; the main loop issues all loads of the next block before the first sigmoid
    of this one (so each waits a whole block of steps), and fits its budget per step."""
    config = (dtype, 32, 1)
    compiled = compile_sm90(kind, dtype, triton_kernel.PREFETCH_STAGES, reverse, "prefetch", config, masks)
    ptx = compiled.asm["ptx"]
    assert "cp.async" not in ptx and ".local" not in ptx
    report = ptxas_report(ptx, tmp_path)
    assert re.search(r"\b0 bytes spill stores, 0 bytes spill loads", report), report
    assert int(re.search(r"Used (\d+) registers", report).group(1)) <= 192, report
    code = sass(compiled.asm["cubin"], tmp_path)
    if code is None:
        pytest.skip("triton ships no cuobjdump here")
    loop = time_loop(code)
    loads = [i for i, text in enumerate(loop) if re.search(r"\bLDG\b", text)]
    steps = prefetch_steps(kind)
    # u_c, u_f, u_r, x and the padding flag; the backward adds grad_h and the state before the step.
    per_step = (4 if kind == "forward" else 6) + masks
    assert len(loads) == steps * per_step, loop
    # Loads (L) and sigmoids (S) in the order they issue: all loads of a block before the compute of the last one.
    events = "".join("L" if re.search(r"\bLDG\b", text) else "S" for text in loop if "LDG" in text or "EX2" in text)
    assert re.sub(r"(.)\1+", r"\1", events) == "LS", events
    # One lane per thread: each activation load moves one element (LDG.E.U16 for 16-bit activations).
    width = "LDG.E " if dtype == "fp32" else "LDG.E.U16"
    assert sum(width in loop[i] for i in loads) >= 4 * steps, loop
    count = len(loop) / steps
    print(f"\nSASS per step, prefetch {kind} {dtype} masks={masks}, triton {triton.__version__}: {count:.1f}")
    if not masks:
        assert count <= PREFETCH_BUDGET[kind, dtype], f"{count:.1f} per step"
