"""Micro-batch planning and scatter-back of scores."""

from pathlib import Path

import numpy as np
import pytest
import torch

from triton_rerank.models.dtypes import auto_dtype
from triton_rerank.models.families import auto_engine
from triton_rerank.serving.micro_batches import gather_pairs, padded_inputs, plan_micro_batches
from triton_rerank.serving.packed_inputs import PackedRequest
from triton_rerank.serving.prefix_sharing import DEFAULT_MIN_SHARED_PREFIX
from triton_rerank.serving.scoring import EncoderSettings, score_pairs, score_requests


@pytest.mark.parametrize("budget", [1, 50, 200, 10_000])
def test_plan_covers_every_pair_once_within_budget(budget):
    lengths = np.random.default_rng(0).integers(1, 120, size=97).astype(np.int32)
    groups = plan_micro_batches(lengths, budget)
    flat = np.concatenate(groups)
    assert sorted(flat.tolist()) == list(range(len(lengths)))
    for group in groups:
        padded = len(group) * int(lengths[group].max())
        assert padded <= budget or len(group) == 1
    # Sorted by length: groups never interleave.
    maxima = [int(lengths[g].max()) for g in groups]
    minima = [int(lengths[g].min()) for g in groups]
    assert all(mx <= mn for mx, mn in zip(maxima[:-1], minima[1:], strict=True))


def test_gather_pairs_packs_selected_pairs_in_group_order():
    lengths = np.array([2, 3, 1], dtype=np.int32)
    ids = np.array([10, 11, 20, 21, 22, 30], dtype=np.int32)
    offsets = np.array([0, 2, 5])
    batch = gather_pairs(ids, ids + 100, offsets, lengths, np.array([2, 0]))
    assert batch.input_ids.tolist() == [30, 10, 11]
    assert batch.token_type_ids.tolist() == [130, 110, 111]
    assert batch.cu_seqlens.tolist() == [0, 1, 3] and batch.max_seqlen == 2


def test_padded_inputs_pad_right_to_the_longest_pair():
    lengths = np.array([2, 3, 1], dtype=np.int32)
    ids = np.array([10, 11, 20, 21, 22, 30], dtype=np.int32)
    batch = gather_pairs(ids, ids % 2, np.array([0, 2, 5]), lengths, np.array([2, 0, 1]))
    inputs = padded_inputs(batch, pad_token_id=1, with_token_types=True)
    assert inputs["input_ids"].tolist() == [[30, 1, 1], [10, 11, 1], [20, 21, 22]]
    assert inputs["attention_mask"].tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    assert inputs["token_type_ids"].tolist() == [[0, 0, 0], [0, 1, 0], [0, 1, 0]]
    assert "token_type_ids" not in padded_inputs(batch, pad_token_id=1, with_token_types=False)


def test_score_pairs_scatters_back_in_input_order():
    lengths = np.array([5, 1, 3, 4, 2], dtype=np.int32)
    ids = np.arange(int(lengths.sum()), dtype=np.int32)

    def first_token_engine(batch):  # score = first token id of each pair
        return batch.input_ids[batch.cu_seqlens[:-1].long()].float()

    scores = score_pairs(first_token_engine, ids, np.zeros_like(ids), lengths, max_batch_tokens=6)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    np.testing.assert_array_equal(scores, starts.astype(np.float32))


def test_score_requests_packs_all_requests_and_answers_each_its_own():
    def first_token_engine(batch):
        return batch.input_ids[batch.cu_seqlens[:-1].long()].float()

    def request(ids, lengths, chunk_counts=None):
        ids = np.asarray(ids, dtype=np.int32)
        chunk_counts = np.ones(len(lengths), dtype=np.int32) if chunk_counts is None else chunk_counts
        return PackedRequest(ids, np.zeros_like(ids), np.asarray(lengths, dtype=np.int32),
                             np.asarray(chunk_counts, dtype=np.int32))

    requests = [request([7, 1, 8, 2, 2], [1, 4]), request([9], [1]), request([4, 4, 5, 6, 6, 6], [2, 1, 3]),
                # Windows of one document: its score is their max, wherever the max falls.
                request([3, 8, 8, 1, 5, 5, 2], [1, 2, 1, 2, 1], [3, 1, 1])]
    scores = score_requests(first_token_engine, requests, max_batch_tokens=4)
    assert [s.tolist() for s in scores] == [[7.0, 1.0], [9.0], [4.0, 5.0, 6.0], [8.0, 5.0, 2.0]]


def test_a_non_finite_window_is_never_hidden_by_the_max():
    from triton_rerank.serving.scoring import max_over_windows, non_finite_error

    scores = max_over_windows(np.array([1.0, np.nan, 0.5, 2.0, np.inf, 3.0, -np.inf], dtype=np.float32),
                              np.array([3, 2, 2]))
    assert np.isnan(scores[0]) and scores[1] == np.inf and scores[2] == -np.inf
    assert non_finite_error(scores, torch.float32).startswith("the model produced a non-finite score (nan) for "
                                                              "document 0 and 2 more")


def test_settings_read_the_per_request_limits_and_the_model_tables(tiny_model_dirs):
    import json

    params = {"model_path": str(tiny_model_dirs["bert"]), "max_documents": "12", "max_length": "20",
              "max_chunks_per_doc": "3"}
    limits = EncoderSettings.from_parameters(params).input_limits()
    config = json.loads((tiny_model_dirs["bert"] / "config.json").read_text())
    assert (limits.max_documents, limits.max_pairs, limits.max_length) == (12, 36, 20)
    assert (limits.vocab_size, limits.type_vocab_size) == (config["vocab_size"], config["type_vocab_size"])


def test_a_relative_model_path_is_found_in_the_model_directory(tiny_model_dirs, tmp_path):
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "hf_model").symlink_to(tiny_model_dirs["bert"])
    settings = EncoderSettings.from_parameters({"model_path": "1/hf_model"}, model_dir=tmp_path)
    assert Path(settings.model_path).resolve() == Path(tiny_model_dirs["bert"]).resolve()


def test_settings_resolve_auto_device_and_dtype(tiny_model_dirs):
    params = {"model_path": str(tiny_model_dirs["bert"]), "device": "auto", "dtype": "auto"}
    settings = EncoderSettings.from_parameters(params, instance_kind="CPU")
    # auto on a CPU: bfloat16 where this one has bf16 matrix instructions, float32 elsewhere.
    expected = {"bfloat16": torch.bfloat16, "float32": torch.float32}[auto_dtype("cpu")[0]]
    assert settings.device == torch.device("cpu") and settings.dtype == expected
    assert settings.dtype_reason.startswith("auto: this CPU has")
    # engine auto on a CPU: OpenVINO for this cross-encoder, with the padded engine's own budget.
    assert (settings.engine, settings.engine_reason) == ("openvino", "auto: a cross-encoder on the CPU")
    assert settings.max_batch_tokens == 1024
    packed = EncoderSettings.from_parameters({**params, "engine": "packed"})
    assert (packed.engine, packed.engine_reason) == ("packed", "set in config.pbtxt")
    assert packed.max_batch_tokens == 4096  # the CPU default when config.pbtxt says 0
    # quantize and compile run on the packed engine under auto.
    assert EncoderSettings.from_parameters({**params, "compile": "true"}).engine == "packed"
    # A budget set in config.pbtxt stands for every engine.
    assert EncoderSettings.from_parameters({**params, "engine": "openvino"}).max_batch_tokens == 1024
    assert EncoderSettings.from_parameters({**params, "engine": "openvino", "max_batch_tokens": "4096"}
                                           ).max_batch_tokens == 4096
    forced = EncoderSettings.from_parameters({**params, "dtype": "float32"}, instance_kind="CPU")
    assert (forced.dtype, forced.dtype_reason) == (torch.float32, "set in config.pbtxt")
    with pytest.raises(ValueError, match="dtype must be one of"):
        EncoderSettings.from_parameters({**params, "dtype": "float8"})


@pytest.mark.parametrize(("flags", "expected"), [
    ({"avx2", "avx512f", "amx_tile", "amx_bf16"}, ("bfloat16", "this CPU has AMX")),
    ({"avx2", "avx512f", "avx512_bf16"}, ("bfloat16", "this CPU has AVX512-BF16")),
    ({"avx2", "avx512f", "avx512_vnni"}, ("float32", "this CPU has no AMX or AVX512-BF16")),
    (set(), ("float32", "this CPU has no AMX or AVX512-BF16")),
])
def test_auto_dtype_follows_the_cpus_bf16_instructions(flags, expected):
    assert auto_dtype("cpu", flags) == expected
    assert auto_dtype("cuda", flags) == ("float16", "CUDA")


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    from triton_rerank.models.dtypes import cpu_flags

    (tmp_path / "cpuinfo").write_text("processor\t: 0\nmodel name\t: X\nflags\t\t: fpu avx512_bf16 sse\n")
    assert cpu_flags(tmp_path / "cpuinfo") == {"fpu", "avx512_bf16", "sse"}
    assert cpu_flags(tmp_path / "missing") == set()


def test_non_finite_scores_become_an_error():
    from triton_rerank.serving.scoring import non_finite_error

    assert non_finite_error(np.array([0.5, -2.0], dtype=np.float32), torch.float16) is None
    message = non_finite_error(np.array([0.5, np.nan, np.inf], dtype=np.float32), torch.float16)
    assert "document 1 and 1 more" in message and "float16" in message


@pytest.mark.parametrize("engine", ["packed", "hf"])
def test_remote_code_in_a_model_directory_is_never_run(tiny_model_dirs, tmp_path, engine):
    import json
    import shutil

    from triton_rerank.serving.scoring import build_engine

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dirs["bert"], model_dir)
    marker = tmp_path / "remote-code-ran"
    (model_dir / "custom_model.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    config = json.loads((model_dir / "config.json").read_text())
    config.update(model_type="custom-reranker", auto_map={
        "AutoConfig": "custom_model.CustomConfig",
        "AutoModelForSequenceClassification": "custom_model.CustomModel",
    })
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises((ValueError, OSError, KeyError)):
        build_engine(EncoderSettings(model_path=str(model_dir), engine=engine))
    assert not marker.exists()


def test_heads_are_shared_only_for_packed_decoders_and_only_when_on(tiny_model_dirs, tmp_path):
    decoder = tmp_path / "decoder"
    decoder.mkdir()
    (decoder / "config.json").write_text('{"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"]}')
    on = EncoderSettings.from_parameters({"model_path": str(decoder)})
    assert (on.reranker_kind, on.shared_prefix_threshold) == ("decoder", DEFAULT_MIN_SHARED_PREFIX)
    assert EncoderSettings.from_parameters({"model_path": str(decoder), "min_shared_prefix": "40"}
                                           ).shared_prefix_threshold == 40
    for params in ({"prefix_sharing": "false"}, {"engine": "hf"}):
        assert EncoderSettings.from_parameters({"model_path": str(decoder), **params}).shared_prefix_threshold is None
    # A cross-encoder's query tokens attend to the document: nothing before the document is shareable.
    assert EncoderSettings.from_parameters({"model_path": str(tiny_model_dirs["bert"])}).shared_prefix_threshold is None
    with pytest.raises(ValueError, match="prefix_sharing must be true or false"):
        EncoderSettings.from_parameters({"model_path": str(decoder), "prefix_sharing": "sometimes"})


@pytest.mark.parametrize(("args", "expected"), [
    (("cross-encoder", "cpu", "bfloat16"), ("openvino", "a cross-encoder on the CPU")),
    (("cross-encoder", "cpu", "float32"), ("openvino", "a cross-encoder on the CPU")),
    (("decoder", "cpu", "bfloat16"), ("packed", "a decoder reranker")),
    (("cross-encoder", "cuda", "float16"), ("packed", "on cuda")),
    (("cross-encoder", "cpu", "float16"), ("packed", "float16")),
    (("cross-encoder", "cpu", "bfloat16", "int8"), ("packed", "quantize int8")),
    (("cross-encoder", "cpu", "float32", "none", True), ("packed", "compile")),
])
def test_auto_engine_picks_openvino_only_where_it_runs(args, expected):
    pytest.importorskip("openvino")
    assert auto_engine(*args) == expected


def test_auto_engine_without_openvino_is_the_packed_engine(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))
    assert auto_engine("cross-encoder", "cpu", "bfloat16") == ("packed", "the openvino package is not installed")
