"""Triton glue for the tokenizer step; the logic is triton_rerank.serving.tokenization."""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from triton_rerank.models.families import reranker_kind
from triton_rerank.serving.model_files import resolve_model_path
from triton_rerank.serving.prompt_tokenization import PromptTokenizer, load_prompt_template
from triton_rerank.serving.request_options import (
    RequestError,
    RequestLimits,
    read_options,
    read_query_and_documents,
)
from triton_rerank.serving.step_signature import sign_pairs, step_key
from triton_rerank.serving.tokenization import PairTokenizationError, PairTokenizer


class TritonPythonModel:
    def initialize(self, args):
        params = {k: v["string_value"] for k, v in json.loads(args["model_config"])["parameters"].items()}
        model_dir = resolve_model_path(params["model_path"], progress=False, base=args["model_repository"])
        max_length = int(params.get("max_length") or 0)
        config = json.loads((model_dir / "config.json").read_text())
        self.kind = reranker_kind(config, params.get("reranker_kind") or "auto")
        if self.kind == "decoder":
            template = params.get("prompt_template") or None
            if template is not None:
                # A rendered repository copies the file into this model's directory (relative path).
                template = load_prompt_template(Path(args["model_repository"]) / template)
            self.tokenizer = PromptTokenizer(model_dir, max_length=max_length, template=template,
                                             default_instruction=params.get("default_instruction") or None)
        else:
            self.tokenizer = PairTokenizer(model_dir, max_length=max_length)
        self.limits = RequestLimits.from_parameters(params)
        self.key = step_key()

    def execute(self, requests):
        return [self._encode(request) for request in requests]

    def _encode(self, request):
        try:
            options = read_options(request.parameters(), self.limits)
            query, documents = read_query_and_documents(
                pb_utils.get_input_tensor_by_name(request, "QUERY"),
                pb_utils.get_input_tensor_by_name(request, "DOCUMENTS"),
                self.limits,
            )
            # Only a decoder's prompt has a place for an instruction.
            prompt = {}
            if options.instruction is not None:
                if self.kind != "decoder":
                    raise RequestError("request parameter 'instruction' is for decoder rerankers (Qwen3-Reranker); "
                                       "this server runs a cross-encoder, which takes none: leave it out")
                prompt["instruction"] = options.instruction
            if options.long_documents == "chunk":
                packed = self.tokenizer.encode_chunked(query, documents, overlap=options.chunk_overlap,
                                                       max_chunks_per_doc=options.max_chunks_per_doc,
                                                       max_windows=self.limits.max_windows,
                                                       max_tokens=self.limits.max_documents * self.tokenizer.max_length,
                                                       **prompt)
            else:
                packed = self.tokenizer.encode(query, documents, truncate=options.truncate,
                                               direction=options.truncation_direction,
                                               max_document_tokens=options.max_tokens_per_doc, **prompt)
        except (RequestError, PairTokenizationError) as error:
            return pb_utils.InferenceResponse(
                error=pb_utils.TritonError(str(error), pb_utils.TritonError.INVALID_ARG)
            )
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("INPUT_IDS", packed.input_ids[np.newaxis]),
            pb_utils.Tensor("TOKEN_TYPE_IDS", packed.token_type_ids[np.newaxis]),
            pb_utils.Tensor("SEQ_LENGTHS", packed.lengths[np.newaxis]),
            pb_utils.Tensor("CHUNK_COUNTS", packed.chunk_counts[np.newaxis]),
            pb_utils.Tensor("TOKEN_COUNTS", packed.document_tokens[np.newaxis]),
            pb_utils.Tensor("SIGNATURE", sign_pairs(self.key, packed.input_ids, packed.token_type_ids,
                                                    packed.lengths, packed.chunk_counts)[np.newaxis]),
        ])
