import pytest

from srupp.models import LMConfig, SRUppLM

TINY = {"hidden_size": 32, "proj_size": 8, "num_layers": 2}


@pytest.mark.parametrize(
    "changes, field",
    [
        pytest.param({"hidden_size": 0}, "hidden_size", id="hidden_size"),
        pytest.param({"vocab_size": 1}, "vocab_size", id="vocab_size"),
        pytest.param({"num_heads": 3}, "proj_size", id="heads-divide"),
        pytest.param({"dropout": 1.0}, "dropout", id="dropout"),
        pytest.param({"cutoffs": [50, 20]}, "cutoffs", id="cutoffs-order"),
        pytest.param({"cutoffs": [10, 300]}, "cutoffs", id="cutoffs-range"),
        pytest.param({"attention_layers": [5]}, "attention_layers", id="attention-layers"),
        pytest.param({"cutoffs": [10], "div_value": 64.0}, "div_value", id="div-value"),
    ],
)
def test_invalid_values_name_the_field(changes, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        LMConfig(**{**TINY, **changes})


def test_json_round_trip_and_unknown_keys():
    cfg = LMConfig(**TINY, cutoffs=[20, 100], attention_layers=[1])
    assert LMConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="unknown LMConfig keys"):
        LMConfig.from_dict({**TINY, "hiden_size": 3})
    with pytest.raises(TypeError, match="`num_layers` must be an int"):
        LMConfig(**{**TINY, "num_layers": 2.0})


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param({}, id="byte"),
        pytest.param({"attention_every_n_layers": 2}, id="k2"),
        pytest.param({"vocab_size": 300, "cutoffs": [20, 100], "div_value": 2.0}, id="adaptive"),
        pytest.param({"vocab_size": 300, "cutoffs": [20, 100], "embed_size": 16}, id="adaptive-projected"),
    ],
)
def test_num_parameters_matches_the_model(extra):
    cfg = LMConfig(**TINY, **extra)
    assert cfg.num_parameters == sum(p.numel() for p in SRUppLM(cfg).parameters())


def test_paper_model_sizes():
    # The authors' README: enwik8 107.6M with the corpus's 205 byte values (srupp keeps all 256); WT103 147.7M with
    # per-cluster projections from d, where srupp's adaptive softmax projects d -> 1024 once (146.7M).
    assert abs(LMConfig(vocab_size=205).num_parameters / 1e6 - 107.6) < 0.1
    wt103 = LMConfig(vocab_size=267735, cutoffs=[19997, 39997, 199997], embed_size=1024, dropout=0.15)
    assert abs(wt103.num_parameters / 1e6 - 147.7) < 1.5


def test_backend_is_not_architecture():
    cfg = LMConfig(**TINY)
    assert "backend" not in cfg.to_dict()
    # srupp 0.1 saved `backend` in every checkpoint's config: it is dropped on load.
    assert LMConfig.from_dict({**cfg.to_dict(), "backend": "triton"}) == cfg


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param({"num_layers": 5, "attention_every_n_layers": 2}, id="k2"),
        pytest.param({"num_layers": 4, "attention_layers": [3, 0, 3]}, id="explicit"),
        pytest.param({"num_layers": 3, "attention_layers": []}, id="none"),
    ],
)
def test_attention_layers_follow_the_layer_rule(extra):
    cfg = LMConfig(**{**TINY, **extra})
    assert tuple(cfg.attention_layer_indices) == SRUppLM(cfg).rnn.attention_layers


def test_no_attention_layers_is_an_sru_stack():
    # `attention_layers=[]` (the quality benchmark's SRU): no attention anywhere, counted and saved as such.
    cfg = LMConfig(**{**TINY, "attention_layers": []})
    model = SRUppLM(cfg)

    def attention_parameters(model):
        return [name for name, _ in model.named_parameters() if name.endswith(("alpha", "kv_proj.weight"))]

    assert attention_parameters(model) == [] and attention_parameters(SRUppLM(LMConfig(**TINY)))
    assert cfg.num_parameters == sum(p.numel() for p in model.parameters())
    assert LMConfig.from_json(cfg.to_json()).attention_layers == []
