"""xft_dist: x-transformers-style models with Megatron-style tensor parallelism under DeepSpeed ZeRO."""

__version__ = "0.1.0"

from .models import (AttentionLayers, AutoregressiveWrapper, Decoder, Encoder,  # noqa: E402
                     EncoderDecoder, TransformerWrapper)

__all__ = ["AttentionLayers", "Encoder", "Decoder", "TransformerWrapper", "AutoregressiveWrapper",
           "EncoderDecoder", "__version__"]
