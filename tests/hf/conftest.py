import pytest
import torch

from srupp.models import LMConfig, SRUppLM
from tests.helpers import assert_all_close

# The `tiny` preset's sizes, without dropout, so the eval-mode models are deterministic.
TINY = dict(hidden_size=32, proj_size=8, num_layers=2, dropout=0.0, attn_dropout=0.0)
LM_CONFIGS = {
    "bytes": dict(TINY),
    "every-second-layer-two-heads-layer-norm": dict(
        TINY, num_layers=3, attention_every_n_layers=2, num_heads=2, layer_norm=True
    ),
    "adaptive": dict(TINY, vocab_size=300, cutoffs=[40, 120], div_value=2.0),
}


def make_lm(seed: int = 0, **config) -> SRUppLM:
    torch.manual_seed(seed)
    lm = SRUppLM(LMConfig(**config))
    with torch.no_grad():
        # A non-zero attention weight, so that attention (and what it may see) matters.
        for layer in lm.rnn.layers:
            if layer.has_attention:
                layer.transform.alpha.fill_(0.8)
    return lm.eval()


@pytest.fixture
def assert_close():
    def check(actual, expected, atol=1e-5, rtol=1e-5, name="tensor"):
        assert_all_close([name], [actual], [expected], atol=atol, rtol=rtol)

    return check
