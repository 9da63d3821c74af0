"""x-transformers-style models, tensor-parallel aware."""

from .encdec import EncoderDecoder
from .layers import AttentionLayers, Decoder, Encoder
from .wrappers import AutoregressiveWrapper, TransformerWrapper

__all__ = ["AttentionLayers", "Encoder", "Decoder", "TransformerWrapper", "AutoregressiveWrapper",
           "EncoderDecoder"]
