"""Builds the CPU kernel: a plain C shared library (no Python or torch headers) loaded with ctypes.

The extension is optional: where no C compiler works, the install still succeeds and srupp runs the
recurrence with plain torch ops (it warns once). The flags name no host CPU: the library carries a
baseline, an AVX2+FMA and an AVX-512 copy of the kernels and picks one at load time, so a wheel built
here runs on any x86-64 (or aarch64) Linux.
"""

import os
import sysconfig

from setuptools import Extension, setup
from setuptools.command.bdist_wheel import bdist_wheel
from setuptools.command.build_ext import build_ext


class PlainLibrary(build_ext):
    """Names the library ``_sru_cpu.so``: it is loaded with ctypes and has no Python ABI, so no CPython tag."""

    def get_ext_filename(self, fullname: str) -> str:
        return super().get_ext_filename(fullname).replace(self._python_suffix(), ".so")

    @staticmethod
    def _python_suffix() -> str:
        return sysconfig.get_config_var("EXT_SUFFIX")


class PlatformWheel(bdist_wheel):
    """Tags the wheel ``py3-none-<platform>``: any Python 3, tied only to the platform the C library was built for
    (a wheel without the library, where no compiler worked, is pure Python and keeps ``py3-none-any``)."""

    def get_tag(self) -> tuple[str, str, str]:
        _, _, platform = super().get_tag()
        built = any(os.path.exists(path) for path in self.get_finalized_command("build_ext").get_outputs())
        return "py3", "none", platform if built else "any"


# -ffp-contract=fast: a * b + c as one fused multiply-add where the variant has FMA (-std=c99 alone turns that
# off, and the kernels' arithmetic took a third longer). tests/ops/test_cpu_kernel.py builds its check with these.
FLAGS = ["-O3", "-fopenmp-simd", "-fno-math-errno", "-std=c99", "-ffp-contract=fast", "-pthread"]

setup(
    cmdclass={"build_ext": PlainLibrary, "bdist_wheel": PlatformWheel},
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
    ],
)
