"""Triton glue for the cross-encoder step; the logic is triton_rerank.serving.scoring."""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from triton_rerank.serving.metrics import ScoringMetrics
from triton_rerank.serving.scoring import EncoderSettings, build_engine, non_finite_error, score_pairs


class TritonPythonModel:
    def initialize(self, args):
        params = {k: v["string_value"] for k, v in json.loads(args["model_config"])["parameters"].items()}
        self.settings = EncoderSettings.from_parameters(
            params, instance_kind=args["model_instance_kind"], device_id=int(args["model_instance_device_id"])
        )
        self.engine = build_engine(self.settings)
        self.metrics = ScoringMetrics(pb_utils, {"model": args["model_name"], "version": args["model_version"]})

    def execute(self, requests):
        # Pack every pair of every request together, score, and split back per request.
        inputs = [
            [pb_utils.get_input_tensor_by_name(r, name).as_numpy().reshape(-1)
             for name in ("INPUT_IDS", "TOKEN_TYPE_IDS", "SEQ_LENGTHS")]
            for r in requests
        ]
        input_ids, token_type_ids, lengths = (np.concatenate(parts) for parts in zip(*inputs, strict=True))
        scores = score_pairs(self.engine, input_ids, token_type_ids, lengths, self.settings.max_batch_tokens,
                             observe=self.metrics.observe_micro_batch)
        self.metrics.observe_pairs(len(lengths))
        splits = np.cumsum([len(per_request[2]) for per_request in inputs])[:-1]
        return [self._response(part) for part in np.split(scores, splits)]

    def _response(self, scores):
        # A NaN or inf is never returned as a score.
        error = non_finite_error(scores, self.settings.dtype)
        if error is not None:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(error, pb_utils.TritonError.INTERNAL))
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("SCORES", scores[np.newaxis])])
