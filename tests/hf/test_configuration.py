import pytest

pytest.importorskip("transformers")

from srupp.hf import SRUppConfig  # noqa: E402
from srupp.models import LMConfig  # noqa: E402


def test_lm_config_round_trips():
    lm_config = LMConfig(
        vocab_size=300,
        hidden_size=32,
        proj_size=8,
        num_layers=3,
        attention_layers=[1],
        cutoffs=[40, 120],
        embed_size=16,
        div_value=2.0,
        layer_norm=True,
    )
    config = SRUppConfig.from_lm_config(lm_config, bidirectional=True, num_labels=4)
    assert config.to_lm_config() == lm_config
    assert config.num_hidden_layers == 3 and config.num_attention_heads == 1
    assert config.bidirectional and config.num_labels == 4 and config.pooling == "mean"


def test_save_and_load_keep_every_field(tmp_path):
    config = SRUppConfig(hidden_size=32, proj_size=8, num_layers=2, classifier_pooling="last", pad_token_id=0)
    config.save_pretrained(tmp_path)
    loaded = SRUppConfig.from_pretrained(tmp_path)
    assert loaded.to_lm_config() == config.to_lm_config()
    assert (loaded.classifier_pooling, loaded.pad_token_id, loaded.model_type) == ("last", 0, "srupp")


def test_defaults_are_lmconfig_defaults():
    assert SRUppConfig().to_lm_config() == LMConfig()


def test_invalid_fields_fail_like_lmconfig():
    with pytest.raises(ValueError, match="divisible by `num_heads`"):
        SRUppConfig(proj_size=10, num_heads=3)
    with pytest.raises(ValueError, match="classifier_pooling"):
        SRUppConfig(classifier_pooling="max")
    with pytest.raises(TypeError, match="LMConfig"):
        SRUppConfig.from_lm_config({"hidden_size": 8})
