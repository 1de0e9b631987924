"""OpenAI-Triton ops of the encoder, one op a file: kernel, validating host wrapper, torch reference.

Set ``TRITON_INTERPRET=1`` before importing this package to run the kernels on CPU tensors.
"""

from .bias_gelu import bias_gelu, bias_gelu_reference
from .layer_norm import add_layer_norm, add_layer_norm_reference
from .varlen_attention import varlen_attention, varlen_attention_reference

__all__ = [
    "add_layer_norm",
    "add_layer_norm_reference",
    "bias_gelu",
    "bias_gelu_reference",
    "varlen_attention",
    "varlen_attention_reference",
]
