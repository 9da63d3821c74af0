"""x-transformers-style models, tensor-parallel aware."""

from .cache import LayerIntermediates
from .contract import LossModel
from .encdec import EncoderDecoder
from .generate import FILTER_LOGITS_FN, min_p, top_k, top_p
from .layers import AttentionLayers, Decoder, Encoder
from .mlm import MaskedLMWrapper
from .wrappers import AutoregressiveWrapper, TransformerWrapper
from .xtransformer import XTransformer

__all__ = ["AttentionLayers", "Encoder", "Decoder", "TransformerWrapper", "AutoregressiveWrapper", "MaskedLMWrapper",
           "EncoderDecoder", "XTransformer", "LossModel", "LayerIntermediates", "FILTER_LOGITS_FN", "top_k", "top_p",
           "min_p"]
