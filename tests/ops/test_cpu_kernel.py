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

from srupp.ops import cpu as cpu_backend

# Floating-point arithmetic: packed (..ps/..pd) against scalar (..ss/..sd) forms, SSE or VEX/EVEX.
ARITH = re.compile(r"^v?(add|sub|mul|div|max|min|f[n]?m(add|sub)\d*)(ps|pd|ss|sd)$")
WIDEST = {"baseline": "xmm", "avx2": "ymm", "avx512": "zmm"}
# float64 on the baseline x86-64 stays scalar: its exp clamps through 64-bit integer compares, which
# SSE2 lacks. The speed path is float32; float64 is there for gradcheck-grade reference runs.
KNOWN_SCALAR = {("f64", "baseline")}


def library_flags() -> list[str]:
    """The compiler flags setup.py builds the library with (its ``FLAGS``), so that the check is built alike."""
    tree = ast.parse((Path(__file__).resolve().parents[2] / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["FLAGS"]:
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py no longer defines FLAGS")


def hot_loop_counts(library: str) -> dict[str, collections.Counter]:
    """Per *_items function (the per-thread loops): counts of packed and scalar FP arithmetic and of
    the vector registers it names."""
    text = subprocess.run(["objdump", "-d", "--no-show-raw-insn", library], capture_output=True, text=True,
                          check=True).stdout  # fmt: skip
    counts: dict[str, collections.Counter] = {}
    current = None
    for line in text.splitlines():
        header = re.match(r"^[0-9a-f]+ <(\w+)>:$", line)
        if header:
            name = header.group(1)
            current = counts.setdefault(name, collections.Counter()) if "_items_" in name else None
            continue
        fields = line.split("\t")
        if current is None or len(fields) < 2 or not fields[1].split():
            continue
        match = ARITH.match(fields[1].split()[0])
        if match:
            current["packed" if match.group(3) in ("ps", "pd") else "scalar"] += 1
        for register in ("zmm", "ymm", "xmm"):
            if register in fields[1]:
                current[register] += 1
                break
    return counts


@pytest.fixture(scope="module")
def counts():
    kernel = cpu_backend._kernel()
    if kernel is None:
        pytest.skip(cpu_backend.unavailable_reason())
    if shutil.which("objdump") is None:
        pytest.skip("objdump (binutils) is not installed")
    return hot_loop_counts(kernel.lib._name)


@pytest.mark.parametrize("dtype", ["f32", "f64"])
@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("isa", cpu_backend.ISAS)
def test_hot_loops_are_vectorised(counts, isa, direction, dtype):
    name = f"srupp_sru_{direction}_items_{dtype}_{isa}"
    if name not in counts:
        pytest.skip(f"{name} is not in this build (another architecture)")
    c = counts[name]
    if (dtype, isa) in KNOWN_SCALAR:
        assert c["scalar"] > 0 and c["packed"] == 0, f"{name} now vectorises: drop it from KNOWN_SCALAR ({c})"
        return
    # The vector body comes with a scalar copy for the last D % width features; an unvectorised loop
    # has no packed arithmetic at all.
    assert c["packed"] >= c["scalar"] > 0, f"{name} has scalar hot loops: {dict(c)}"
    assert c[WIDEST[isa]] > 0, f"{name} does not use {WIDEST[isa]} registers: {dict(c)}"
    if isa != "avx512":
        assert c["zmm"] == 0, f"{name} uses AVX-512 registers: {dict(c)}"
    if isa == "baseline":
        assert c["ymm"] == 0, f"{name} uses AVX registers: {dict(c)}"


def test_library_is_built_for_any_cpu(counts):
    """No host-specific code outside the dispatched variants: the entry points the loader calls first
    (ISA queries) and the baseline kernels use nothing beyond SSE2."""
    text = subprocess.run(["objdump", "-d", "--no-show-raw-insn", cpu_backend._kernel().lib._name],
                          capture_output=True, text=True, check=True).stdout  # fmt: skip
    current, offenders = None, set()
    for line in text.splitlines():
        header = re.match(r"^[0-9a-f]+ <(\w+)>:$", line)
        if header:
            current = header.group(1)
            continue
        if current and not current.endswith(("_avx2", "_avx512")) and re.search(r"\b[yz]mm\d", line):
            offenders.add(current)
    assert not offenders, f"AVX code outside the AVX variants: {sorted(offenders)}"


CHECK = Path(__file__).resolve().parent / "csrc" / "kernel_check.c"
X86 = platform.machine() in ("x86_64", "AMD64")
# target: (compiler, runner, the variants the emulated CPU must report: a mask of 1 baseline, 2 avx2, 4 avx512)
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
    all gradients, with padding and a dropout mask, and the one-token decoding step (outputs, state, the cached
    key and value; heads, input layer norm, masked cache); under emulation, also which variants the CPU
    reports."""
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
