"""Triton glue for the cross-encoder step; the logic is triton_rerank.serving.scoring."""

import json

import triton_python_backend_utils as pb_utils

from triton_rerank.serving.metrics import ScoringMetrics
from triton_rerank.serving.packed_inputs import PackedInputError, check_packed_request
from triton_rerank.serving.scoring import EncoderSettings, build_engine, non_finite_error, score_requests
from triton_rerank.serving.step_signature import KEY_ENV, SignatureError, check_signature, step_key


class TritonPythonModel:
    def initialize(self, args):
        params = {k: v["string_value"] for k, v in json.loads(args["model_config"])["parameters"].items()}
        self.settings = EncoderSettings.from_parameters(
            params, instance_kind=args["model_instance_kind"], device_id=int(args["model_instance_device_id"]),
            model_dir=args["model_repository"],
        )
        self.limits = self.settings.input_limits()
        self.key = step_key()
        if self.key is None:
            pb_utils.Logger.log_warn(f"{KEY_ENV} is not set: cross_encoder accepts inputs the tokenizer step did "
                                     "not sign (each request is still checked); `triton-rerank serve` sets it")
        self.engine = build_engine(self.settings)
        settings = self.settings
        dtype = str(settings.dtype).removeprefix("torch.")
        linears = ("" if settings.quantize == "none" else f", {settings.quantize} linears") + (
            ", compiled" if settings.engine == "packed" and (settings.compile or settings.quantize != "none") else "")
        pb_utils.Logger.log_info(f"cross_encoder: {settings.reranker_kind} reranker, {settings.engine} engine, {dtype} "
                                 f"({settings.dtype_reason}){linears} on {settings.device}; engine "
                                 f"{settings.engine_reason}")
        self.metrics = ScoringMetrics(pb_utils, {"model": args["model_name"], "version": args["model_version"]})
        self.metrics.describe_encoder(settings.engine, dtype, str(settings.device), settings.quantize)

    def execute(self, requests):
        # Each request is checked alone; only those that pass are packed and scored together, so a
        # bad one is answered with its own error and cannot shift or fail its neighbours.
        responses, accepted, packed = [None] * len(requests), [], []
        for i, request in enumerate(requests):
            try:
                packed.append(self._read(request))
                accepted.append(i)
            except (PackedInputError, SignatureError) as error:
                responses[i] = pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(str(error), pb_utils.TritonError.INVALID_ARG))
        if packed:
            scores = score_requests(self.engine, packed, self.settings.max_batch_tokens,
                                    observe=self.metrics.observe_micro_batch,
                                    min_shared_prefix=self.settings.shared_prefix_threshold)
            self.metrics.observe_pairs(sum(len(p.lengths) for p in packed))
            for i, part in zip(accepted, scores, strict=True):
                responses[i] = self._response(part)
        return responses

    def _read(self, request):
        ids, types, lengths, counts, signature = (
            pb_utils.get_input_tensor_by_name(request, name).as_numpy()
            for name in ("INPUT_IDS", "TOKEN_TYPE_IDS", "SEQ_LENGTHS", "CHUNK_COUNTS", "SIGNATURE"))
        pairs = check_packed_request(ids, types, lengths, counts, self.limits)
        check_signature(self.key, signature, pairs.input_ids, pairs.token_type_ids, pairs.lengths, pairs.chunk_counts)
        return pairs

    def _response(self, scores):
        # One score per document (the best of its windows). A NaN or inf is never returned as a score.
        error = non_finite_error(scores, self.settings.dtype)
        if error is not None:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(error, pb_utils.TritonError.INTERNAL))
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("SCORES", scores[None])])
