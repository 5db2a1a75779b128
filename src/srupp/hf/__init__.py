"""srupp in Hugging Face ``transformers`` (the optional extra ``srupp[hf]``).

Importing this package registers the SRU++ classes with ``AutoConfig``, ``AutoModelForCausalLM``,
``AutoModelForSequenceClassification`` and ``AutoTokenizer`` (model type ``"srupp"``). An exported folder also
loads without that import through ``from_pretrained(folder, trust_remote_code=True)``: its ``config.json``
names a two-line module that imports these classes from the installed srupp.

Example:
    >>> import srupp.hf
    >>> srupp.hf.export_checkpoint("runs/demo/checkpoints/best.safetensors", "demo-hf")
    >>> from transformers import AutoModelForCausalLM, AutoTokenizer
    >>> model = AutoModelForCausalLM.from_pretrained("demo-hf")
"""

try:
    import transformers
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError("srupp.hf needs transformers and tokenizers: pip install 'srupp[hf]'") from err

from srupp.hf.configuration import SRUppConfig
from srupp.hf.export import export_checkpoint, export_model, load_export, model_card
from srupp.hf.modeling import (
    SRUppCache,
    SRUppForCausalLM,
    SRUppForSequenceClassification,
    SRUppPreTrainedModel,
)
from srupp.hf.tokenization import byte_tokenizer, tokenizer_for_vocab, word_tokenizer

transformers.AutoConfig.register(SRUppConfig.model_type, SRUppConfig, exist_ok=True)
transformers.AutoModelForCausalLM.register(SRUppConfig, SRUppForCausalLM, exist_ok=True)
transformers.AutoModelForSequenceClassification.register(SRUppConfig, SRUppForSequenceClassification, exist_ok=True)
transformers.AutoTokenizer.register(
    SRUppConfig, fast_tokenizer_class=transformers.PreTrainedTokenizerFast, exist_ok=True
)

__all__ = [
    "SRUppCache",
    "SRUppConfig",
    "SRUppForCausalLM",
    "SRUppForSequenceClassification",
    "SRUppPreTrainedModel",
    "byte_tokenizer",
    "export_checkpoint",
    "export_model",
    "load_export",
    "model_card",
    "tokenizer_for_vocab",
    "word_tokenizer",
]
