"""Builds the CPU kernel: a plain C shared library (no Python or torch headers) loaded with ctypes.

The extension is optional: where no C compiler works, the install still succeeds and srupp runs the
recurrence with plain torch ops (it warns once). The flags name no host CPU: the library carries a
baseline, an AVX2+FMA and an AVX-512 copy of the kernels and picks one at load time, so a wheel built
here runs on any x86-64 (or aarch64) Linux.
"""

from setuptools import Extension, setup

# -ffp-contract=fast: a * b + c as one fused multiply-add where the variant has FMA (-std=c99 alone turns that
# off, and the kernels' arithmetic took a third longer). tests/ops/test_cpu_kernel.py builds its check with these.
FLAGS = ["-O3", "-fopenmp-simd", "-fno-math-errno", "-std=c99", "-ffp-contract=fast", "-pthread"]

setup(
    ext_modules=[
        Extension(
            "srupp.ops._sru_cpu",
            sources=["src/srupp/ops/csrc/sru_cpu.c"],
            depends=[
                "src/srupp/ops/csrc/sru_cpu_impl.h",
                "src/srupp/ops/csrc/sru_cpu_isa.h",
                "src/srupp/ops/csrc/sru_token_impl.h",
            ],
            extra_compile_args=FLAGS,
            extra_link_args=["-pthread"],
            optional=True,
        )
    ]
)
