import importlib
import subprocess
import sys

import srupp


def test_all_names_are_the_public_objects():
    from srupp.models import LMConfig, SRUppLM
    from srupp.nn import SRU, SRUpp, SRUppState
    from srupp.ops import sru_recurrence

    expected = {
        "SRU": SRU,
        "SRUpp": SRUpp,
        "SRUppLM": SRUppLM,
        "LMConfig": LMConfig,
        "SRUppState": SRUppState,
        "sru_recurrence": sru_recurrence,
    }
    assert sorted(srupp.__all__) == sorted([*expected, "__version__"])
    for name, obj in expected.items():
        assert getattr(srupp, name) is obj, name
    namespace: dict = {}
    exec("from srupp import *", namespace)
    assert {name: namespace[name] for name in expected} == expected
    assert isinstance(srupp.__version__, str) and srupp.__version__[0].isdigit()


def test_importing_the_package_loads_neither_training_nor_cli():
    code = "import sys, srupp; print(sorted(m for m in sys.modules if m.startswith(('srupp.train', 'srupp.cli'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    importlib.import_module("srupp.nn")


def test_importing_the_layers_loads_no_compiler_stack():
    """``torch.nn.attention.bias`` imports torch._dynamo and triton (a second or more, hundreds of MB): the
    layers import it only when attention over memory first runs, so ``import srupp`` stays light."""
    code = (
        "import sys, srupp, srupp.nn, srupp.models\n"
        "print(sorted(m for m in ('torch._dynamo', 'triton', 'matplotlib') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
