"""The compiled CPU kernel: every instruction-set variant's hot loops are vector code.

gcc 12 once left the recurrence scalar on AVX2 (a float comparison that might trap kept a branch in
the loop) and nothing noticed; this reads the built library's machine code so it cannot happen again.
"""

from __future__ import annotations

import ast
import collections
import platform
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from srupp.ops import library

# Floating-point arithmetic: packed (..ps/..pd) against scalar (..ss/..sd) forms, SSE or VEX/EVEX.
ARITH = re.compile(r"^v?(add|sub|mul|div|max|min|f[n]?m(add|sub)\d*)(ps|pd|ss|sd)$")
WIDEST = {"baseline": "xmm", "avx2": "ymm", "avx512": "zmm", "avx512bf16": "zmm"}
# float64 on the baseline x86-64 keeps its exp loops scalar: its exp clamps through 64-bit integer compares,
# which SSE2 lacks. The speed path is float32; float64 is there for gradcheck-grade reference runs.
KNOWN_SCALAR = {("f64", "baseline")}


def library_flags() -> list[str]:
    """The compiler flags setup.py builds the library with (its ``FLAGS``), so that the check is built alike."""
    tree = ast.parse((Path(__file__).resolve().parents[2] / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["FLAGS"]:
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py no longer defines FLAGS")


def disassembly(library: str) -> str:
    return subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", library], capture_output=True, text=True, check=True
    ).stdout


def widest_register(operands: str) -> str | None:
    """The widest vector register kind an instruction's operands name, if any."""
    return next((register for register in ("zmm", "ymm", "xmm") if register in operands), None)


def hot_loops(text: str) -> dict[str, dict]:
    """Per *_items function (the per-thread loops): the vector registers it names, and per innermost loop (a
    backward conditional jump and the code it spans, holding no other such loop) that does floating-point
    arithmetic, the counts of packed and scalar arithmetic, the widest register it computes in and whether it
    divides."""
    functions: dict[str, list[tuple[int, str, str]]] = {}
    current = None
    for line in text.splitlines():
        header = re.match(r"^[0-9a-f]+ <(\w+)>:$", line)
        if header:
            current = functions.setdefault(header.group(1), []) if "_items_" in header.group(1) else None
            continue
        instruction = re.match(r"^\s*([0-9a-f]+):\t(\S+)\s*(.*)$", line)
        if current is not None and instruction:
            current.append((int(instruction.group(1), 16), instruction.group(2), instruction.group(3)))
    result = {}
    for name, code in functions.items():
        spans = []
        for address, mnemonic, operands in code:
            target = re.match(r"[0-9a-f]+", operands)
            if mnemonic.startswith("j") and mnemonic != "jmp" and target and int(target.group(0), 16) <= address:
                spans.append((int(target.group(0), 16), address))
        innermost = [s for s in spans if not any(o != s and s[0] <= o[0] and o[1] <= s[1] for o in spans)]
        loops = []
        for begin, end in innermost:
            loop = collections.Counter()
            for address, mnemonic, operands in code:
                match = ARITH.match(mnemonic) if begin <= address <= end else None
                if match:
                    loop["packed" if match.group(3) in ("ps", "pd") else "scalar"] += 1
                    loop["divides"] |= match.group(1) == "div"
                    loop[widest_register(operands) or "xmm"] += 1
            if loop["packed"] or loop["scalar"]:
                loops.append(loop)
        registers = collections.Counter(widest_register(operands) for _, _, operands in code)
        registers.pop(None, None)
        result[name] = {"loops": loops, "registers": registers}
    return result


def vectorised(loops: list[collections.Counter], widest: str) -> bool:
    """Whether a function's loops are vector code: it has a loop in ``widest`` registers, and its vector loops
    hold at least as much arithmetic as its scalar ones. Every vector loop may come with a scalar copy for the
    last D % width features (the same arithmetic), so with every loop vectorised the balance holds; a loop
    left scalar (all of the kernel, or one of the backward pass's three loops) tips it."""
    vector = [loop for loop in loops if loop["packed"] and not loop["scalar"] and loop[widest]]
    scalar = [loop for loop in loops if loop["scalar"] and not loop["packed"]]
    return bool(vector) and sum(loop["packed"] for loop in vector) >= sum(loop["scalar"] for loop in scalar)


@pytest.fixture(scope="module")
def library_text():
    """The built library's disassembly (objdump runs once for the module)."""
    kernel = library.kernel()
    if kernel is None:
        pytest.skip(library.unavailable_reason())
    if shutil.which("objdump") is None:
        pytest.skip("objdump (binutils) is not installed")
    return disassembly(kernel.lib._name)


@pytest.fixture(scope="module")
def functions(library_text):
    return hot_loops(library_text)


@pytest.mark.parametrize("dtype", ["f32", "f64", "bf16", "f16"])
@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("isa", library.ISAS)
def test_hot_loops_are_vectorised(functions, isa, direction, dtype):
    name = f"srupp_sru_{direction}_items_{dtype}_{isa}"
    if name not in functions:
        pytest.skip(f"{name} is not in this build (another architecture)")
    loops, registers = functions[name]["loops"], functions[name]["registers"]
    if (dtype, isa) in KNOWN_SCALAR:
        assert any(loop["divides"] for loop in loops if not loop["packed"]), (
            f"{name}'s exp loops now vectorise: drop it from KNOWN_SCALAR ({loops})"
        )
        assert not any(loop["divides"] and loop["packed"] for loop in loops), f"{name}: {loops}"
        return
    assert vectorised(loops, WIDEST[isa]), f"{name} has scalar hot loops: {loops}"
    if not isa.startswith("avx512"):
        assert registers["zmm"] == 0, f"{name} uses AVX-512 registers: {dict(registers)}"
    if isa == "baseline":
        assert registers["ymm"] == 0, f"{name} uses AVX registers: {dict(registers)}"


def test_hot_loop_reading_finds_a_scalar_loop():
    """The reading itself, on made-up code: a vector loop, its scalar copy, and a scalar loop with more
    arithmetic than the vector one (a loop the compiler did not vectorise)."""
    text = """
0000000000001000 <srupp_sru_backward_items_f32_avx2>:
    1000:\tvfmadd231ps %ymm1,%ymm2,%ymm3
    1004:\tvdivps %ymm0,%ymm2,%ymm6
    1008:\tjne    1000 <srupp_sru_backward_items_f32_avx2+0x0>
    100a:\tvmulss %xmm1,%xmm2,%xmm3
    100e:\tvdivss %xmm0,%xmm2,%xmm6
    1012:\tjb     100a <srupp_sru_backward_items_f32_avx2+0xa>
    1014:\tvaddss %xmm1,%xmm2,%xmm3
    1018:\tvsubss %xmm1,%xmm2,%xmm3
    101c:\tvmulss %xmm1,%xmm2,%xmm3
    1020:\tjne    1014 <srupp_sru_backward_items_f32_avx2+0x14>
    1022:\tret
"""
    loops = hot_loops(text)["srupp_sru_backward_items_f32_avx2"]["loops"]
    assert [(loop["packed"], loop["scalar"], loop["ymm"], loop["divides"]) for loop in loops] == [
        (2, 0, 2, True),
        (0, 2, 0, True),
        (0, 3, 0, False),
    ]
    assert not vectorised(loops, "ymm")
    assert vectorised(loops[:2], "ymm")  # without the unvectorised loop
    assert not vectorised(loops[:2], "zmm")  # no loop in the widest registers


def test_library_is_built_for_any_cpu(library_text):
    """No host-specific code outside the dispatched variants: the entry points the loader calls first
    (ISA queries) and the baseline kernels use nothing beyond SSE2."""
    current, offenders = None, set()
    for line in library_text.splitlines():
        header = re.match(r"^[0-9a-f]+ <(\w+)>:$", line)
        if header:
            current = header.group(1)
            continue
        if current and not current.endswith(("_avx2", "_avx512", "_avx512bf16")) and re.search(r"\b[yz]mm\d", line):
            offenders.add(current)
    assert not offenders, f"AVX code outside the AVX variants: {sorted(offenders)}"


CHECK = Path(__file__).resolve().parent / "csrc" / "kernel_check.c"
X86 = platform.machine() in ("x86_64", "AMD64")
# target: (compiler, runner, the variants the emulated CPU must report: a mask of 1 baseline, 2 avx2, 4 avx512,
# 8 avx512bf16)
TOOLCHAINS = {
    "native": ("cc", [], None),
    # aarch64 (NEON is its baseline), cross-compiled and run under qemu-user where both are installed
    # (Debian: gcc-aarch64-linux-gnu qemu-user).
    "aarch64": ("aarch64-linux-gnu-gcc", ["qemu-aarch64"], 1),
    # x86-64 CPUs this machine is not: qemu-user emulates AVX2 + FMA but no AVX-512 (a typical laptop), and
    # a CPU without AVX. The dispatch must pick what the CPU has, and nothing else may run there (an AVX-512
    # instruction in the avx2 variant would die with SIGILL).
    "x86-64-avx2-only": ("cc", ["qemu-x86_64", "-cpu", "Haswell"], 3),
    "x86-64-no-avx": ("cc", ["qemu-x86_64", "-cpu", "Nehalem"], 1),
}


@pytest.mark.parametrize("target", list(TOOLCHAINS))
def test_c_kernel_matches_a_scalar_loop(target, tmp_path):
    """Every variant the (real or emulated) CPU runs against a scalar loop with libm's exp: forward, state and
    all gradients, with padding and a dropout mask, in float32 and in bfloat16 and float16 storage (against the
    loop on the same rounded inputs, outputs within two units in the last place), every 16-bit value read and
    float32 values written against round-to-nearest-even (ties, subnormals, overflow, NaN), and the one-token
    decoding step (outputs, state, the cached key and value; heads, input layer norm, masked cache); under
    emulation, also which variants the CPU reports."""
    compiler, runner, expected = TOOLCHAINS[target]
    if target.startswith("x86-64") and not X86:
        pytest.skip("an x86-64 target, checked on x86-64 hosts")
    missing = [tool for tool in [compiler, *runner[:1]] if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed")
    binary = tmp_path / "kernel_check"
    static = ["-static"] if runner else []
    flags = [*library_flags(), *static]
    subprocess.run([compiler, *flags, str(CHECK), "-o", str(binary), "-lm"], check=True, timeout=120)
    args = [] if expected is None else [str(expected)]
    result = subprocess.run([*runner, str(binary), *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "variant baseline" in result.stdout and "token h" in result.stdout
    assert "bf16 storage" in result.stdout and "f16 storage" in result.stdout
