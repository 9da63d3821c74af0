"""xft_dist: x-transformers-style models with Megatron-style tensor parallelism under DeepSpeed ZeRO.

The model API is loaded on first use, so tools that only need ``xft_dist.data`` or
``xft_dist.config`` start without importing torch.
"""

__version__ = "0.1.0"

_MODEL_API = ("AttentionLayers", "Encoder", "Decoder", "TransformerWrapper", "AutoregressiveWrapper", "MaskedLMWrapper",
              "EncoderDecoder", "XTransformer", "LayerIntermediates", "FILTER_LOGITS_FN", "top_k", "top_p", "min_p")
__all__ = [*_MODEL_API, "__version__"]


def __getattr__(name):
    if name in _MODEL_API:
        from . import models

        return getattr(models, name)
    raise AttributeError(f"module 'xft_dist' has no attribute {name!r}")
