"""The KServe v2 bodies of the `reranker` ensemble, checked strictly: requests in, responses out.

Triton 2.51's own HTTP frontend answers 500 to some malformed KServe v2 requests (a negative
shape, numbers in a BYTES tensor, a shape or id of the wrong JSON type, a truncated inference
header, a body that is not a JSON object). These models accept exactly what the ensemble
takes (QUERY [1] and DOCUMENTS [N] BYTES; its request parameters `truncate`, `long_documents`,
`truncation_direction`, `max_tokens_per_doc`, `chunk_overlap`, `max_chunks_per_doc`, `instruction`; outputs
SCORES / TOKEN_COUNTS / CHUNK_COUNTS) and say what is wrong with anything else, so that the
gateway answers 400 where Triton would answer 500. No FastAPI here: kserve.py is the route, this module is testable alone.

The binary tensor extension is supported as Triton specifies it, because tritonclient.http uses
it by default: the JSON header is the first `Inference-Header-Content-Length` bytes of the body,
each input with `binary_data_size` takes that many of the bytes after it (in input order), a
BYTES element is a 4-byte little-endian length and its bytes; outputs asked for with
`binary_data` come back the same way.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PositiveInt,
    ValidationError,
)

from ..client.ranking import ScoredDocuments
from ..client.triton_io import MODEL_NAME
from .protocol import Text

MODEL_VERSION = "1"  # the only version the packaged repository has
HEADER_LENGTH = "Inference-Header-Content-Length"
# name -> datatype, in the order the ensemble's config lists them (and the order answered)
OUTPUTS = {"SCORES": "FP32", "TOKEN_COUNTS": "INT32", "CHUNK_COUNTS": "INT32"}
_SHOWN_ERRORS = 5  # a body with a million bad elements gets a message of a few lines


class TensorError(ValueError):
    """The request is malformed (400), or carries more documents than the gateway takes (413)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class _Strict(BaseModel):
    # strict: no coercion, so 1 is not a string, "1" not an integer and 1 not a boolean (Triton's reader
    # takes none of them either, but answers 500); forbid: a field this endpoint does not implement
    # (shared memory, classification, sequence or priority parameters) is refused, not ignored.
    model_config = ConfigDict(extra="forbid", strict=True)


Count = Annotated[int, Field(ge=0)]


class InputParameters(_Strict):
    binary_data_size: Count | None = Field(None, description="bytes of this tensor after the JSON header")


class InputTensor(_Strict):
    name: Literal["QUERY", "DOCUMENTS"]
    datatype: Literal["BYTES"]
    shape: list[Count]
    parameters: InputParameters | None = None
    data: list[Text] | None = None


class OutputParameters(_Strict):
    binary_data: bool | None = None


class RequestedOutput(_Strict):
    name: Literal["SCORES", "TOKEN_COUNTS", "CHUNK_COUNTS"]
    parameters: OutputParameters | None = None


def _lower(value):
    # The ensemble reads its choice parameters in any case ("Left", "CHUNK").
    return value.lower() if isinstance(value, str) else value


# The ensemble's request parameters (serving/request_options.py), as ScoreOptions' fields.
SCORE_PARAMETERS = ("truncate", "long_documents", "truncation_direction", "max_tokens_per_doc", "chunk_overlap",
                    "max_chunks_per_doc", "instruction")


class ScoreParameters(_Strict):
    """The ensemble's request parameters; None = not sent (the ensemble's, or the server's, default)."""

    truncate: bool | None = None
    long_documents: Annotated[Literal["truncate", "chunk", "error"] | None, BeforeValidator(_lower)] = None
    truncation_direction: Annotated[Literal["right", "left"] | None, BeforeValidator(_lower)] = None
    max_tokens_per_doc: PositiveInt | None = None
    chunk_overlap: Count | None = None
    max_chunks_per_doc: PositiveInt | None = None
    instruction: Text | None = None

    def sent(self) -> dict[str, Any]:
        """ScoreOptions' fields that the request sets."""
        return {name: getattr(self, name) for name in SCORE_PARAMETERS if getattr(self, name) is not None}


class InferParameters(ScoreParameters):
    binary_data_output: bool = Field(False, description="binary_data of every output that does not set its own")


class InferRequest(_Strict):
    id: str | None = None
    parameters: InferParameters = Field(default_factory=InferParameters)
    inputs: list[InputTensor]
    outputs: list[RequestedOutput] | None = None


def _as_list(value):
    # The generate extension maps a lone value onto a one-element tensor, as Triton does (a lone
    # number is then refused as element [0], like a number in a list).
    return value if isinstance(value, list) else [value]


def _one_query(queries: list[str]) -> list[str]:
    if len(queries) != 1:
        raise ValueError(f"the reranker takes one query string, got {len(queries)}")
    return queries


class GenerateRequest(ScoreParameters):
    """Triton's generate extension: the inputs by name; other keys are request parameters (as are those in
    `parameters`)."""

    QUERY: Annotated[list[Text], BeforeValidator(_as_list), AfterValidator(_one_query)]
    DOCUMENTS: Annotated[list[Text], BeforeValidator(_as_list)]
    parameters: ScoreParameters | None = None


@dataclass(frozen=True)
class RerankCall:
    """What a valid request asks of the ensemble, and how it wants the answer."""

    query: str
    documents: list[str]
    options: dict[str, Any] = field(default_factory=dict)  # ScoreOptions' fields: the parameters sent
    id: str | None = None
    outputs: tuple[tuple[str, bool], ...] = tuple((name, False) for name in OUTPUTS)  # (name, binary)


# --- reading requests ---------------------------------------------------------------------------


def read_infer_request(body: bytes, header_length: str | None, max_documents: int) -> RerankCall:
    """The call a KServe v2 infer request (JSON, or JSON plus binary tensors) asks for."""
    header, binary = split_body(body, header_length)
    raw = _json_object(header, "the inference header" if header_length is not None else "the body")
    request = _validate(InferRequest, raw)
    tensors = _one_each(request.inputs)
    documents = _count(tensors["DOCUMENTS"])
    # Checked before the binary part is read, so that reading it is bounded by the limit, not the shape.
    if documents > max_documents:
        raise TensorError(f"{documents} documents in one request; the limit is {max_documents} "
                          "(--max-documents): split the list", 413)
    elements = _elements(request.inputs, binary)
    query, documents = elements["QUERY"][0], elements["DOCUMENTS"]
    parameters = request.parameters
    return RerankCall(query, documents, parameters.sent(), request.id,
                      _requested_outputs(request.outputs, parameters.binary_data_output))


def read_generate_request(body: bytes) -> RerankCall:
    """The call a generate-extension request ({"QUERY": ..., "DOCUMENTS": [...], parameters}) asks for."""
    request = _validate(GenerateRequest, _json_object(body, "the body"))
    if not request.DOCUMENTS:
        raise TensorError("DOCUMENTS is empty: send at least one document")
    top, nested = request.sent(), (request.parameters or ScoreParameters()).sent()
    twice = sorted(set(top) & set(nested))
    if twice:
        one = len(twice) == 1
        raise TensorError(f"{', '.join(twice)} {'is' if one else 'are'} given twice (top level and in parameters): "
                          f"send {'it' if one else 'each'} once")
    return RerankCall(request.QUERY[0], request.DOCUMENTS, top | nested)


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """The JSON header and the binary tensors after it (none without Inference-Header-Content-Length)."""
    if header_length is None:
        return body, b""
    value = header_length.strip()
    # Triton reads a number prefix ("20abc" -> 20) and then fails on the cut JSON with 500.
    if not (value.isascii() and value.isdigit()):
        raise TensorError(f"{HEADER_LENGTH} must be the JSON header's length in bytes, got {header_length!r}")
    length = int(value)
    if not 0 < length <= len(body):
        raise TensorError(f"{HEADER_LENGTH} is {length}, but the body has {len(body)} bytes: it must be the "
                          "length of the JSON header at the start of the body, at least 1")
    return body[:length], body[length:]


def _json_object(data: bytes, what: str):
    try:
        return json.loads(data)
    except RecursionError:
        raise TensorError(f"{what} nests JSON arrays or objects too deeply") from None
    except ValueError as error:  # JSONDecodeError, or bytes that are not UTF-8
        hint = " (is Inference-Header-Content-Length the JSON header's length?)" if "header" in what else ""
        raise TensorError(f"{what} is not valid JSON: {error}{hint}") from None


def _validate(model: type[BaseModel], raw):
    if not isinstance(raw, dict):
        raise TensorError(f"the request must be a JSON object, got {type(raw).__name__}: "
                          + ('{"inputs": [{"name": "QUERY", ...}, {"name": "DOCUMENTS", ...}]}' if model is InferRequest
                             else '{"QUERY": "...", "DOCUMENTS": ["..."]}'))
    try:
        return model.model_validate(raw)
    except ValidationError as error:
        raise TensorError(describe(error, raw)) from None


def describe(error: ValidationError, raw: dict) -> str:
    """One clause per problem, naming the field and the tensor: 'inputs[1] (DOCUMENTS).shape[0]: ...'."""
    problems = error.errors()
    parts = []
    for item in problems[:_SHOWN_ERRORS]:
        field = ""
        for position, part in enumerate(item["loc"]):
            if isinstance(part, int):
                field += f"[{part}]"
                if position == 1 and item["loc"][0] == "inputs":
                    field += _tensor_name(raw, part)
            else:
                field += f".{part}" if field else str(part)
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown field: this endpoint does not take it"
        elif item["type"] in ("model_type", "model_attributes_type", "dict_type"):
            message = "should be a JSON object"
        parts.append(f"{field}: {message}" if field else message)
    if len(problems) > _SHOWN_ERRORS:
        parts.append(f"and {len(problems) - _SHOWN_ERRORS} more")
    return "; ".join(parts)


def _tensor_name(raw: dict, index: int) -> str:
    inputs = raw.get("inputs")
    name = inputs[index].get("name") if isinstance(inputs, list) and isinstance(inputs[index], dict) else None
    return f" ({name})" if isinstance(name, str) else ""


def _one_each(inputs: Sequence[InputTensor]) -> dict[str, InputTensor]:
    names = [tensor.name for tensor in inputs]
    for name in ("QUERY", "DOCUMENTS"):
        if names.count(name) > 1:
            raise TensorError(f"input {name} is given {names.count(name)} times; send it once")
    missing = [name for name in ("QUERY", "DOCUMENTS") if name not in names]
    if missing:
        raise TensorError(f"missing input {' and '.join(missing)}: the reranker takes QUERY (one string, shape [1]) "
                          "and DOCUMENTS (N >= 1 strings, shape [N])")
    return {tensor.name: tensor for tensor in inputs}


def _count(tensor: InputTensor) -> int:
    """The element count of a tensor's shape, checked against what the ensemble takes."""
    if len(tensor.shape) != 1:
        raise TensorError(f"{tensor.name}: shape {tensor.shape} is not one-dimensional; the reranker takes "
                          "QUERY with shape [1] and DOCUMENTS with shape [N]")
    (count,) = tensor.shape
    if tensor.name == "QUERY" and count != 1:
        raise TensorError(f"QUERY: shape {tensor.shape}; the reranker takes one query string (shape [1])")
    if tensor.name == "DOCUMENTS" and count == 0:
        raise TensorError("DOCUMENTS is empty (shape [0]): send at least one document")
    return count


def _elements(inputs: Sequence[InputTensor], binary: bytes) -> dict[str, list[str]]:
    """Each input's strings, from its JSON data or its share of the binary part, checked against its shape."""
    elements, offset = {}, 0
    for tensor in inputs:
        count = _count(tensor)
        size = tensor.parameters.binary_data_size if tensor.parameters else None
        if (tensor.data is None) == (size is None):
            raise TensorError(f"{tensor.name}: give its elements either as 'data' (JSON strings) or as "
                              "parameters.binary_data_size (binary tensor extension), "
                              + ("not both" if size is not None else "neither is set"))
        if tensor.data is not None:
            if len(tensor.data) != count:
                raise TensorError(f"{tensor.name}: shape {tensor.shape} holds {_elements_of(count)}, "
                                  f"but data has {len(tensor.data)}")
            elements[tensor.name] = tensor.data
            continue
        if offset + size > len(binary):
            raise TensorError(f"{tensor.name}: binary_data_size is {size}, but only {len(binary) - offset} bytes "
                              "of binary data are left after the JSON header and the inputs before it")
        elements[tensor.name] = _bytes_elements(tensor.name, binary[offset:offset + size], count)
        offset += size
    if offset != len(binary):
        raise TensorError(f"{len(binary) - offset} bytes after the binary tensors belong to no input "
                          "(check each input's binary_data_size and Inference-Header-Content-Length)")
    return elements


def _elements_of(count: int) -> str:
    return "1 element" if count == 1 else f"{count} elements"


def _bytes_elements(name: str, data: bytes, count: int) -> list[str]:
    """A binary BYTES tensor's strings: each a 4-byte little-endian length, then that many UTF-8 bytes."""
    texts, offset = [], 0
    while offset < len(data):
        if len(texts) == count:  # stop at once: never walk a long tail of tiny elements
            raise TensorError(f"{name}: shape holds {_elements_of(count)}, but its binary data has more")
        if offset + 4 > len(data):
            raise TensorError(f"{name}[{len(texts)}]: the binary data ends inside its 4-byte length")
        (length,) = struct.unpack_from("<I", data, offset)
        offset += 4
        if offset + length > len(data):
            raise TensorError(f"{name}[{len(texts)}]: its length says {length} bytes, "
                              f"but only {len(data) - offset} are left in binary_data_size")
        texts.append(_utf8(name, len(texts), data[offset:offset + length]))
        offset += length
    if len(texts) != count:
        raise TensorError(f"{name}: shape holds {_elements_of(count)}, but its binary data has {len(texts)}")
    return texts


def _utf8(name: str, index: int, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise TensorError(f"{name}[{index}] is not valid UTF-8 ({error.reason} at byte {error.start})") from None


def _requested_outputs(outputs: Sequence[RequestedOutput] | None, binary_default: bool) -> tuple[tuple[str, bool], ...]:
    if not outputs:  # none listed: all of them, as Triton answers
        return tuple((name, binary_default) for name in OUTPUTS)
    names = [output.name for output in outputs]
    for name in OUTPUTS:
        if names.count(name) > 1:
            raise TensorError(f"output {name} is requested {names.count(name)} times; request it once")
    return tuple((output.name, binary_default if output.parameters is None or output.parameters.binary_data is None
                  else output.parameters.binary_data) for output in outputs)


# --- writing responses --------------------------------------------------------------------------


def infer_response(call: RerankCall, scored: ScoredDocuments) -> tuple[bytes, int | None]:
    """The KServe v2 response body, and the JSON header's length when binary outputs follow it.

    Shapes and datatypes are the ensemble's: SCORES [1, N] FP32, TOKEN_COUNTS and CHUNK_COUNTS [1, N] INT32.
    """
    values = {"SCORES": scored.scores.astype("<f4"), "TOKEN_COUNTS": scored.token_counts.astype("<i4"),
              "CHUNK_COUNTS": scored.chunk_counts.astype("<i4")}
    outputs, blobs = [], []
    for name, binary in call.outputs:
        array = values[name]
        output = {"name": name, "datatype": OUTPUTS[name], "shape": [1, int(array.size)]}
        if binary:
            output["parameters"] = {"binary_data_size": array.nbytes}
            blobs.append(array.tobytes())
        else:
            output["data"] = array.tolist()
        outputs.append(output)
    response = ({"id": call.id} if call.id is not None else {}) | {
        "model_name": MODEL_NAME, "model_version": MODEL_VERSION, "outputs": outputs}
    header = json.dumps(response).encode()
    return (header + b"".join(blobs), len(header)) if blobs else (header, None)


def generate_response(scored: ScoredDocuments) -> dict:
    """Triton's generate answer: each output flattened, a single element as a bare value."""
    def flat(array: np.ndarray):
        values = array.reshape(-1).tolist()
        return values[0] if len(values) == 1 else values

    return {"model_name": MODEL_NAME, "model_version": MODEL_VERSION,
            "SCORES": flat(scored.scores.astype(np.float32)), "TOKEN_COUNTS": flat(scored.token_counts),
            "CHUNK_COUNTS": flat(scored.chunk_counts)}
