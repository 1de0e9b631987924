"""The cross-encoder on OpenVINO: our loaded checkpoint exported once at load, run on padded micro-batches.

The CPU engine for cross-encoders: what `engine: auto` (the default) picks there, or `engine:
openvino` in config.pbtxt, `serve --engine openvino`. On CPUs where torch's attention kernels are weak at small
head sizes (the MiniLM shape's 32-wide heads) OpenVINO's fused graph runs the same micro-batches
faster: 1.57x the packed engine served on a 2-core Zen 5 (`results/cpu-peers-zen5-openvino/`).

The model exported is our own (models/cross_encoder.py, loaded strictly), traced through its padded
forward: its last layer runs past attention only for the first tokens, which the head reads. The
head itself is a second graph, compiled in float32 (see padded_graph).

Supported: the cross-encoders models/cross_encoder.py loads (BERT, RoBERTa, XLM-R) on the
CPU, in float32 or bfloat16 (OpenVINO's inference precision; the output logits stay float32), and
`quantize: int8` (the encoder's projections in int8, calibrated at load: `openvino_int8.py`) on CPUs
with int8 dot-product instructions.
Not supported: decoder rerankers, GPUs, float16 and `compile` (refused at load).

The micro-batches are the server's own (length-sorted, each padded to its longest pair), so a
pair's score does not depend on what else is in its micro-batch beyond float rounding.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from ..models.cross_encoder import PackedCrossEncoder, load_cross_encoder
from ..models.dtypes import QUANTIZE_NAMES, int8_instructions
from .micro_batches import PackedBatch, padded_inputs
from .openvino_int8 import activation_ranges, calibration_inputs, quantize_linears

# torch dtype -> OpenVINO's INFERENCE_PRECISION_HINT on the CPU.
PRECISIONS = {torch.float32: "f32", torch.bfloat16: "bf16"}
INSTALL_HINT = "pip install 'triton-rerank[openvino]' (or pip install openvino)"


def openvino_module():
    try:
        import openvino
    except ImportError:
        raise ValueError(f"engine openvino needs the openvino package: {INSTALL_HINT}") from None
    return openvino


class _FirstTokenStates(torch.nn.Module):
    """The encoder's padded forward up to the head, as the module OpenVINO traces."""

    def __init__(self, encoder: PackedCrossEncoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.encoder.first_token_states(input_ids, attention_mask, token_type_ids)


def padded_graph(ov, encoder: PackedCrossEncoder):
    """The OpenVINO model of the encoder up to its head: inputs input_ids, attention_mask and, where the
    model has token types, token_type_ids, each [batch, tokens]; output each sequence's first-token state
    [batch, hidden].

    The head is left out so that it runs in float32 (OpenVINOEngine compiles it apart): inside a graph
    compiled with the bf16 hint it would run in bf16 too, and round every score to 8 significant bits
    (pairs of a query then tie; measured: 277 of 2,000 DL19 pairs, against 8 with the head in float32).
    """
    example = {"input_ids": torch.ones(2, 8, dtype=torch.long), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    if encoder.config.type_vocab_size > 1:
        example["token_type_ids"] = torch.zeros(2, 8, dtype=torch.long)
    with torch.no_grad():
        return ov.convert_model(_FirstTokenStates(encoder), example_input=example)


class OpenVINOEngine:
    """Scores packed batches with an OpenVINO compiled model of the checkpoint (CPU only)."""

    def __init__(self, model_path: str, dtype: torch.dtype, device: torch.device, num_threads: int = 0,
                 quantize: str = "none"):
        if quantize not in QUANTIZE_NAMES:
            raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_NAMES)}, got {quantize!r}")
        if quantize == "int8" and not int8_instructions():
            raise ValueError("quantize int8 needs a CPU with int8 dot-product instructions (AVX512-VNNI, AVX-VNNI or "
                             "AMX-INT8) and this one has none: without them int8 is slower than float32")
        if device.type != "cpu":
            raise ValueError(f"engine openvino runs on the CPU, not {device}; set device to cpu (or use the packed engine)")
        if dtype not in PRECISIONS:
            raise ValueError(f"engine openvino runs in float32 or bfloat16, not {str(dtype).removeprefix('torch.')}")
        ov = openvino_module()
        # Our own strictly loaded model, in float32: OpenVINO converts it to the inference precision itself.
        encoder = load_cross_encoder(model_path, dtype=torch.float32)
        self.pad_token_id = encoder.config.pad_token_id
        self.uses_token_types = encoder.config.type_vocab_size > 1
        self.max_seqlen = encoder.config.max_seqlen
        graph = padded_graph(ov, encoder)
        if quantize == "int8":
            batches = calibration_inputs(model_path, self.pad_token_id, self.uses_token_types)
            graph = quantize_linears(graph, activation_ranges(ov, graph, batches))
        threads = num_threads or torch.get_num_threads() or os.cpu_count() or 1
        # One request at a time per model instance: the latency hint keeps every thread on it.
        settings = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
        core = ov.Core()
        self.compiled = core.compile_model(graph, "CPU", {**settings, "INFERENCE_PRECISION_HINT": PRECISIONS[dtype]})
        self.request = self.compiled.create_infer_request()
        # The head, one row per pair, in float32 (see padded_graph) and on OpenVINO too: run by torch
        # between the encoder's calls, torch's own thread pool took the cores from OpenVINO's (9%
        # slower in process, measured on a 2-core Zen 5).
        with torch.no_grad():
            head = ov.convert_model(encoder.head, example_input=torch.zeros(2, encoder.config.hidden_size))
        self.head_request = core.compile_model(
            head, "CPU", {**settings, "INFERENCE_PRECISION_HINT": "f32"}).create_infer_request()
        self.input_names = [port.any_name for port in self.compiled.inputs]
        self.precision = PRECISIONS[dtype]
        self.quantize = quantize

    def __call__(self, batch: PackedBatch) -> torch.Tensor:
        if batch.max_seqlen > self.max_seqlen:  # the graph's position lookup would read zeros past its table
            raise ValueError(f"max_seqlen {batch.max_seqlen} exceeds the model's limit of {self.max_seqlen} tokens")
        inputs = padded_inputs(batch, self.pad_token_id, self.uses_token_types)
        feed = {name: inputs[name].numpy() for name in self.input_names}
        states = self.request.infer(feed)[0]  # [B, hidden], float32
        logits = self.head_request.infer([states])[0]  # [B]
        return torch.from_numpy(np.array(logits, dtype=np.float32))
