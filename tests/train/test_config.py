import math

import pytest

from srupp.train import TrainConfig, apply_overrides, learning_rate, load_preset
from srupp.train.config import presets_dir


def test_overrides_are_coerced_and_unknown_keys_fail():
    cfg = apply_overrides(
        TrainConfig(),
        {"lr": "1e-3", "hidden_size": "64", "model.cutoffs": "[10, 20]", "progress": "false", "eval_tokens": "none"},
    )
    assert cfg.lr == 1e-3 and cfg.model.hidden_size == 64 and cfg.model.cutoffs == [10, 20]
    assert cfg.progress is False and cfg.eval_tokens is None
    with pytest.raises(ValueError, match="unknown config key 'lerning_rate'"):
        apply_overrides(TrainConfig(), {"lerning_rate": "1"})
    with pytest.raises(ValueError, match="`--max_steps` must be a int"):
        apply_overrides(TrainConfig(), {"max_steps": "many"})
    with pytest.raises(ValueError, match="unknown config keys"):
        TrainConfig.from_dict({"modle": {}})


def test_invalid_values_name_the_field():
    with pytest.raises(ValueError, match="`optimizer`"):
        TrainConfig(optimizer="sgd")
    with pytest.raises(ValueError, match="`batch_size`"):
        TrainConfig(batch_size=0)


@pytest.mark.parametrize("name", sorted(p.stem for p in presets_dir().glob("*.json")))
def test_presets_load_and_round_trip(name):
    cfg = load_preset(name)
    assert TrainConfig.from_json(cfg.to_json()) == cfg
    if name.startswith(("enwik8", "wt103")):
        assert cfg.paper, f"{name} must carry the paper's reported numbers"


def test_enwik8_base_is_the_paper_recipe():
    cfg = load_preset("enwik8-base")
    m = cfg.model
    assert (m.num_layers, m.hidden_size, m.proj_size, m.dropout) == (10, 3072, 768, 0.22)
    assert (cfg.unroll_size, cfg.lr, cfg.weight_decay, cfg.warmup_steps, cfg.max_steps) == (
        1024,
        3e-4,
        0.1,
        16000,
        400000,
    )
    assert (cfg.optimizer, cfg.clip_grad, cfg.precision) == ("radam", 1.0, "mixed")


def test_unknown_preset():
    with pytest.raises(FileNotFoundError, match="presets"):
        load_preset("enwik9-huge")


def test_schedule_warmup_then_cosine():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, max_steps=100)
    assert learning_rate(0, cfg) == pytest.approx(0.1)
    assert learning_rate(9, cfg) == pytest.approx(1.0)
    assert learning_rate(50, cfg) == pytest.approx(0.5)
    assert learning_rate(100, cfg) == pytest.approx(0.0)
    assert learning_rate(10, cfg) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.1)))


@pytest.mark.parametrize("value", ["0", "none", "None"])
def test_time_limit_zero_or_none_means_no_limit(value):
    cfg = apply_overrides(load_preset("demo"), {"time_limit_s": value})
    assert cfg.time_limit_s is None and cfg.anneal_by_time is False  # one flag: the time annealing goes with it
    assert learning_rate(10_000, cfg, elapsed_s=1e9) > 0.5 * cfg.lr  # the cosine follows steps, not the clock
    assert apply_overrides(load_preset("demo"), {"time_limit_s": "60"}).anneal_by_time is True
    with pytest.raises(ValueError, match="time_limit_s"):
        apply_overrides(load_preset("demo"), {"time_limit_s": "-1"})
