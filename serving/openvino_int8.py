"""int8 linears for the OpenVINO engine: the encoder's token-wise projections run on the CPU's int8
dot-product instructions (VNNI, AMX-INT8), with activation ranges calibrated once at load.

OpenVINO runs a matmul in int8 when its inputs pass through FakeQuantize nodes with fixed ranges
(its low-precision transformations then fold them into u8 x s8 kernels). Its dynamic quantization,
made for weight-compressed LLM graphs, ran float kernels on an AVX512-VNNI Zen 5, so the ranges are
static: per tensor for activations (min and max over the calibration pairs' real tokens, padding
excluded), per output channel for weights (symmetric, 255 levels).

Calibration pairs are synthetic and deterministic: random vocabulary tokens decoded to text and
encoded by the model's own tokenizer as query/document pairs, so the special tokens, token types
and lengths are the family's own, and a model gets the same int8 graph at every load. Measured on
the MiniLM-L6 shape (DL19): 1.4x OpenVINO's bf16 speed in process; fidelity and served numbers
are in the README (The OpenVINO engine): bfloat16's error at the default init, int8's where the
output depends more on the pair.

Quantized: MatMuls with a constant 2-D weight whose activation is [batch, tokens, features] (the
attention and FFN projections of every token; in the last layer, the keys and values). Not
quantized: what runs on one row per pair (the last layer past its keys and values: nothing to win),
attention's own products, layer norms and softmax (the run's dtype); the head runs outside the graph,
in float32.
"""

from __future__ import annotations

import numpy as np

from .micro_batches import micro_batches, padded_inputs
from .tokenization import PairTokenizer

CALIBRATION_QUERIES = 8
CALIBRATION_DOCUMENTS = 8
CALIBRATION_BATCH_TOKENS = 2048
# Token counts of the synthetic queries and documents, before the tokenizer's own re-encoding.
QUERY_TOKENS = (4, 24)
DOCUMENT_TOKENS = (16, 320)


def token_linears(graph) -> list:
    """The graph's MatMuls that multiply [batch, tokens, features] activations by a constant 2-D weight."""
    out = []
    for op in graph.get_ordered_ops():
        if op.get_type_name() != "MatMul":
            continue
        weight = op.input_value(1)
        if weight.get_node().get_type_name() == "Constant" and len(weight.get_partial_shape()) == 2 \
                and len(op.input_value(0).get_partial_shape()) == 3:
            out.append(op)
    return out


def calibration_inputs(model_path: str, pad_token_id: int, with_token_types: bool,
                       seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Padded input batches of CALIBRATION_QUERIES x CALIBRATION_DOCUMENTS synthetic pairs (see the
    module docstring), cut to the model's max input as requests are."""
    pairs = PairTokenizer(model_path)
    decoder = pairs.fast_tokenizer
    special = {token.content for token in decoder.get_added_tokens_decoder().values() if token.special}
    vocabulary = np.array(sorted(i for token, i in decoder.get_vocab().items() if token not in special))
    rng = np.random.default_rng(seed)

    def text(bounds: tuple[int, int]) -> str:
        return decoder.decode(rng.choice(vocabulary, int(rng.integers(*bounds))).tolist())

    packed = [pairs.encode(text(QUERY_TOKENS), [text(DOCUMENT_TOKENS) for _ in range(CALIBRATION_DOCUMENTS)])
              for _ in range(CALIBRATION_QUERIES)]
    batches = []
    for _, batch in micro_batches(np.concatenate([p.input_ids for p in packed]),
                                  np.concatenate([p.token_type_ids for p in packed]),
                                  np.concatenate([p.lengths for p in packed]), CALIBRATION_BATCH_TOKENS):
        inputs = padded_inputs(batch, pad_token_id, with_token_types)
        batches.append({name: tensor.numpy() for name, tensor in inputs.items()})
    return batches


def activation_ranges(ov, graph, batches: list[dict[str, np.ndarray]]) -> list[tuple[float, float]]:
    """(min, max) of each token linear's activation over the batches' real tokens, in float32."""
    probe = graph.clone()
    linears = token_linears(probe)
    sources = {}
    for op in linears:
        source = op.input_value(0)
        sources.setdefault((source.get_node().get_friendly_name(), source.get_index()), source)
    probe.add_outputs(list(sources.values()))
    compiled = ov.Core().compile_model(probe, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    # The probe's extra outputs follow its original ones, in the order they were added.
    extra = compiled.outputs[len(graph.outputs):]
    low = {key: np.inf for key in sources}
    high = {key: -np.inf for key in sources}
    request = compiled.create_infer_request()
    inputs = [port.any_name for port in compiled.inputs]
    for batch in batches:
        results = request.infer({name: batch[name] for name in inputs})
        real = batch["attention_mask"].astype(bool)
        for key, port in zip(sources, extra, strict=True):
            values = results[port][real]  # [real tokens, features]
            low[key] = min(low[key], float(values.min()))
            high[key] = max(high[key], float(values.max()))
    keys = [(op.input_value(0).get_node().get_friendly_name(), op.input_value(0).get_index()) for op in linears]
    return [(low[key], high[key]) for key in keys]


def quantize_linears(graph, ranges: list[tuple[float, float]]):
    """The graph (changed in place) with FakeQuantize on every token linear's activation (its range)
    and weight (per output channel)."""
    import openvino.opset13 as ops

    linears = token_linears(graph)
    if len(linears) != len(ranges):
        raise ValueError(f"{len(ranges)} activation ranges for {len(linears)} token linears")
    for op, (low, high) in zip(linears, ranges, strict=True):
        low, high = min(low, 0.0), max(high, 0.0)  # zero must be exact: padding and ReLU-like zeros
        lo, hi = ops.constant(np.float32(low)), ops.constant(np.float32(high))
        op.input(0).replace_source_output(ops.fake_quantize(op.input_value(0), lo, hi, lo, hi, 256).output(0))
        weight = op.input_value(1).get_node().get_data().astype(np.float32)
        # transpose_b: the weight is [out, in] (torch's Linear), so each output channel is a row.
        reduce_axis = 1 if op.get_attributes()["transpose_b"] else 0
        bound = np.abs(weight).max(axis=reduce_axis, keepdims=True)
        bound[bound == 0] = 1.0
        w_lo, w_hi = ops.constant(-bound), ops.constant(bound)
        op.input(1).replace_source_output(ops.fake_quantize(ops.constant(weight), w_lo, w_hi, w_lo, w_hi, 255).output(0))
    return graph
