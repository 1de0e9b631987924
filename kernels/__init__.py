"""OpenAI-Triton ops of the packed encoder and decoder models, one op a file: kernel, validating host
wrapper, torch reference.

Set ``TRITON_INTERPRET=1`` before importing this package to run the kernels on CPU tensors.
"""

from .bias_gelu import bias_gelu, bias_gelu_reference
from .layer_norm import add_layer_norm, add_layer_norm_reference
from .rms_norm import rms_norm, rms_norm_reference
from .swiglu import silu_mul, silu_mul_reference
from .varlen_attention import varlen_attention, varlen_attention_reference

__all__ = [
    "add_layer_norm",
    "add_layer_norm_reference",
    "bias_gelu",
    "bias_gelu_reference",
    "rms_norm",
    "rms_norm_reference",
    "silu_mul",
    "silu_mul_reference",
    "varlen_attention",
    "varlen_attention_reference",
]
