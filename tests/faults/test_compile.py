"""Issue 24, item 7: ``torch.compile(fullgraph=True)`` as a process's first srupp call traced into the lazy loader
of the CPU library (``posix.stat`` of its file) and failed; it worked only after one eager call. The library now
loads when ``srupp.ops`` is imported."""

import subprocess
import sys
import textwrap

import pytest

from srupp.ops import library

FIRST_CALL = textwrap.dedent(
    """
    import torch
    from srupp.nn import SRU
    from srupp.ops import library

    torch.manual_seed(0)
    model = SRU(8, 8, 1).eval()
    x = torch.randn(5, 2, 8)
    with torch.no_grad():
        compiled = torch.compile(model, fullgraph=True, dynamic=True)(x)[0]
        eager = model(x)[0]
    torch.testing.assert_close(compiled, eager)
    print("ok", library.cpu_kernel_info()["loaded"])
    """
)


@pytest.mark.slow
def test_compile_as_the_first_call_of_a_process():
    if not library.is_available():
        pytest.skip(library.unavailable_reason())
    done = subprocess.run([sys.executable, "-c", FIRST_CALL], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["ok", "True"]
