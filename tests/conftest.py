"""Shared fixtures. Kernels run in Triton's interpreter when no GPU is present.

TRITON_INTERPRET must be set before any kernel module is imported (triton reads it when a
kernel is decorated), hence at the top of the top-level conftest.
"""

import os

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
