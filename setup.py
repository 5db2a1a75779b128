"""Builds the CPU kernel: a plain C shared library (no Python or torch headers) loaded with ctypes."""

import os
import sys

from setuptools import Extension, setup

# The kernel is built on the machine that runs it, so it may use that CPU's vector units;
# SRUPP_PORTABLE=1 builds for the baseline instruction set instead (for wheels that travel).
flags = ["-O3", "-fopenmp-simd", "-fno-math-errno", "-std=c99", "-pthread"]
if os.environ.get("SRUPP_PORTABLE") != "1" and sys.platform.startswith("linux"):
    flags.append("-march=native")

setup(
    ext_modules=[
        Extension(
            "srupp.ops._sru_cpu",
            sources=["src/srupp/ops/csrc/sru_cpu.c"],
            depends=["src/srupp/ops/csrc/sru_cpu_impl.h"],
            extra_compile_args=flags,
            extra_link_args=["-pthread"],
        )
    ]
)
