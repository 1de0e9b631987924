"""Shared fixtures. Kernels run in Triton's interpreter when no GPU is present.

TRITON_INTERPRET must be set before any kernel module is imported (triton reads it when a
kernel is decorated), hence at the top of the top-level conftest.
"""

import os
import socket

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory):
    """Random-weight tiny cross-encoders with trained tokenizers: {"xlm-roberta": dir, "bert": dir}."""
    from triton_rerank.bench.random_model import ARCHES, make_test_model

    root = tmp_path_factory.mktemp("models")
    return {arch: make_test_model(root / arch, arch) for arch in ARCHES}


@pytest.fixture(scope="session")
def reference_scores():
    """Scores from Hugging Face transformers alone (its tokenizer and model, fp32, one pair at a time)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    cache = {}

    def score(model_dir, query: str, documents: list[str], max_length: int = 512) -> list[float]:
        if model_dir not in cache:
            model = AutoModelForSequenceClassification.from_pretrained(model_dir, attn_implementation="eager")
            cache[model_dir] = (AutoTokenizer.from_pretrained(model_dir), model.eval())
        tokenizer, model = cache[model_dir]
        scores = []
        with torch.inference_mode():
            for document in documents:
                inputs = tokenizer(query, document, truncation="only_second", max_length=max_length,
                                   return_tensors="pt")
                scores.append(float(model(**inputs).logits[0, 0]))
        return scores

    return score


@pytest.fixture(scope="session")
def chunked_crash_request():
    """The request that crashes tritonserver 2.51 (SIGSEGV; CVE-2025-23310/23311): one HTTP body of a
    million one-byte chunks, sent to 127.0.0.1:port. Tests send it to every port a deployment exposes."""

    def send(port: int, path: str = "/v2/models/reranker/generate", chunks: int = 1_000_000) -> bytes:
        """Returns the start of the answer (b"" when the connection was closed or reset instead)."""
        with socket.create_connection(("127.0.0.1", port), timeout=60) as connection:
            connection.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode()
                               + b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
            burst = b"1\r\nx\r\n" * 10_000
            try:
                for _ in range(chunks // 10_000):
                    connection.sendall(burst)
                connection.sendall(b"0\r\n\r\n")
                return connection.recv(200)
            except OSError:
                return b""  # refused mid-body (reset), or the server died under the request

    return send
