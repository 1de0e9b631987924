"""CPU tests of the benchmark workloads: DL19 tokenization, synthetic pairs, batching, FLOP counts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from triton_rerank.bench import workload as bw

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"

TINY_XLMR = {
    "model_type": "xlm-roberta",
    "vocab_size": 100,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 40,
    "type_vocab_size": 1,
    "pad_token_id": 1,
    "id2label": {"0": "LABEL_0"},
}



# ------------------------------------------------------------------------------------------
# Workload building
# ------------------------------------------------------------------------------------------


def _tiny_tokenizer():
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    corpus = ["how long is the life cycle of a flea", "fleas live up to a year on a host",
              "the quick brown fox jumps over the lazy dog", "what is a cat", "cats sleep a lot"] * 5
    trainer = trainers.WordPieceTrainer(vocab_size=200, special_tokens=["[PAD]", "[CLS]", "[SEP]", "[UNK]"])
    tok.train_from_iterator(corpus, trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    return tok, cls, sep


def _write_dl19(path: Path) -> list[dict]:
    records = [
        {
            "qid": "1",
            "query": "life cycle of a flea",
            "candidates": [
                {"docid": "a", "text": "fleas live up to a year", "bm25_rank": 1, "label": 2},
                {"docid": "b", "text": " ".join(["the quick brown fox jumps over the lazy dog"] * 20),
                 "bm25_rank": 2, "label": None},
                {"docid": "c", "text": "what is a cat", "bm25_rank": 3, "label": 0},
            ],
        },
        {
            "qid": "2",
            "query": "cats",
            "candidates": [
                {"docid": "d", "text": "cats sleep a lot", "bm25_rank": 1, "label": 1},
                {"docid": "e", "text": "a host", "bm25_rank": 2, "label": 0},
                {"docid": "f", "text": "the dog", "bm25_rank": 3, "label": 0},
            ],
        },
    ]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")  # trailing blank line is fine
    return records


def test_tokenize_pairs_tiny_tokenizer(tmp_path):
    tok, cls, sep = _tiny_tokenizer()
    written = _write_dl19(tmp_path / "dl19.jsonl")
    records = bw.load_dl19(tmp_path / "dl19.jsonl")
    assert records == written
    wl = bw.tokenize_pairs(tok, records, max_length=24)

    assert len(wl) == 6
    assert wl.pair_ids == [("1", "a"), ("1", "b"), ("1", "c"), ("2", "d"), ("2", "e"), ("2", "f")]
    assert wl.lengths == [len(ids) for ids in wl.input_ids]
    assert wl.total_tokens == sum(wl.lengths)
    assert wl.truncated == 1  # only the long passage
    assert wl.lengths[1] == 24 and max(wl.lengths) == 24

    tok.no_truncation()
    enc = lambda s: tok.encode(s, add_special_tokens=False).ids  # noqa: E731
    for i, (qid, docid) in enumerate(wl.pair_ids):
        rec = next(r for r in records if r["qid"] == qid)
        query = rec["query"]
        text = next(c["text"] for c in rec["candidates"] if c["docid"] == docid)
        q_ids, d_ids = enc(query), enc(text)
        ids = wl.input_ids[i]
        # query kept whole, passage cut ("only_second"), template [CLS] q [SEP] d [SEP]
        assert ids[: len(q_ids) + 2] == [cls, *q_ids, sep]
        assert ids[-1] == sep
        if i != 1:
            assert ids == [cls, *q_ids, sep, *d_ids, sep]
        else:
            assert ids[len(q_ids) + 2 : -1] == d_ids[: 24 - len(q_ids) - 3]
        assert wl.type_ids[i] == [0] * (len(q_ids) + 2) + [1] * (len(ids) - len(q_ids) - 2)

    sub = wl.subset([4, 1])
    assert sub.pair_ids == [("2", "e"), ("1", "b")] and sub.lengths == [wl.lengths[4], wl.lengths[1]]
    assert sub.truncated == 1 and sub.input_ids[1] == wl.input_ids[1]

    limited = bw.tokenize_pairs(tok, records, max_length=24, max_pairs=4)
    assert limited.pair_ids == wl.pair_ids[:4] and limited.lengths == wl.lengths[:4]

    # A query that alone exceeds max_length: that pair falls back to "longest_first", others unchanged.
    long_query = {"qid": "3", "query": " ".join(["the lazy dog"] * 20),
                  "candidates": [{"docid": "g", "text": "a cat"}]}
    mixed = bw.tokenize_pairs(tok, [records[1], long_query], max_length=24)
    assert mixed.lengths[:3] == wl.lengths[3:] and mixed.lengths[3] == 24
    assert mixed.input_ids[3][0] == cls and mixed.input_ids[3][-1] == sep


def test_tokenize_pairs_real_xlmr_tokenizer():
    path, tok_path = SHARED / bw.DL19_FILE, SHARED / bw.TOKENIZER_FILE
    if not (path.is_file() and tok_path.is_file()):
        pytest.skip("shared DL19 data / XLM-R tokenizer not present")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_path))
    records = bw.load_dl19(path)[:3]
    wl = bw.tokenize_pairs(tok, records, max_length=64)
    assert len(wl) == sum(len(r["candidates"]) for r in records) == 300
    for ids in wl.input_ids:
        assert ids[0] == 0 and ids[-1] == 2 and len(ids) <= 64  # <s> ... </s>
        assert [2, 2] == ids[ids.index(2) : ids.index(2) + 2]  # </s></s> between query and passage
    assert wl.truncated > 0 and max(wl.lengths) == 64


def test_synthetic_workload_and_spread():
    wl = bw.synthetic_workload(200, vocab_size=1000, seed=1, max_length=128)
    assert len(wl) == 200 and all(8 <= n <= 128 for n in wl.lengths)
    assert all(ids[0] == 0 and ids[-1] == 2 and len(ids) == n for ids, n in zip(wl.input_ids, wl.lengths, strict=True))
    assert all(4 <= t < 1000 for ids in wl.input_ids for t in ids[1:-1])
    assert bw.synthetic_lengths(50, seed=3) == bw.synthetic_lengths(50, seed=3)
    idx = bw.spread_indices(4300, 1024)
    assert len(idx) == len(set(idx)) == 1024 and idx[0] == 0 and idx[-1] < 4300 and idx == sorted(idx)
    assert bw.spread_indices(5, 10) == [0, 1, 2, 3, 4]


# ------------------------------------------------------------------------------------------
# Batching and packing
# ------------------------------------------------------------------------------------------


def test_fixed_size_batches_and_padding():
    lengths = [3, 10, 2, 7, 5]
    assert bw.fixed_size_batches(lengths, 2) == [[0, 1], [2, 3], [4]]
    assert bw.fixed_size_batches(lengths, 2, sort=True) == [[2, 0], [4, 3], [1]]
    assert bw.padded_token_count(lengths, [[0, 1], [2, 3], [4]]) == 2 * 10 + 2 * 7 + 5
    assert bw.padded_token_count(lengths, [[2, 0], [4, 3], [1]]) == 2 * 3 + 2 * 7 + 10
    assert bw.padded_token_count(lengths, [[i] for i in range(5)]) == sum(lengths)
    with pytest.raises(ValueError):
        bw.fixed_size_batches(lengths, 0)


def test_attention_cases():
    lengths = bw.synthetic_lengths(4300, seed=0)
    cases = bw.attention_cases(lengths, "cuda", quick=False)
    assert [name for name, _ in cases] == ["dl19_pack128", "dl19_pack256", "uniform512_x32"]
    assert len(cases[0][1]) == 128 and len(cases[1][1]) == 256 and cases[2][1] == [512] * 32
    assert all(n in lengths for n in cases[0][1])
    assert cases == bw.attention_cases(lengths, "cuda", quick=False)  # deterministic
    quick = bw.attention_cases(lengths, "cuda", quick=True, source="synthetic")
    assert [name for name, _ in quick] == ["synthetic_pack128"]
    (name, small), = bw.attention_cases(lengths, "cpu", quick=True)
    assert name == "dl19_pack8" and len(small) == 8 and max(small) <= 96


def test_cu_seqlens_and_length_groups():
    assert bw.cu_seqlens_of([3, 1, 4]) == [0, 3, 4, 8]
    assert bw.length_groups([5, 3, 5, 64, 65]) == {3: [1], 5: [0, 2], 64: [3], 65: [4]}
    assert bw.length_groups([5, 3, 5, 64, 65], 64) == {64: [0, 1, 2, 3], 128: [4]}



def test_encoder_batches_pack_and_pad_like_the_server():
    """The encoder stage builds its batches with the server's gather_pairs / padded_inputs."""
    pytest.importorskip("torch")
    from triton_rerank.bench.gpu.stage_encoder import DeviceBatches

    wl = bw.synthetic_workload(10, vocab_size=50, seed=2, max_length=40)
    wl.type_ids = [[0] * 3 + [1] * (n - 3) for n in wl.lengths]
    batches = DeviceBatches.of(wl, "cpu", pad_id=1, with_types=True)
    group = [3, 0, 7]
    ids, cu, max_len, types = batches.packed(group)
    assert ids.tolist() == [t for i in group for t in wl.input_ids[i]]
    assert types.tolist() == [t for i in group for t in wl.type_ids[i]]
    assert cu.tolist() == bw.cu_seqlens_of([wl.lengths[i] for i in group])
    assert max_len == max(wl.lengths[i] for i in group)

    inputs = batches.padded(group)
    assert inputs["input_ids"].shape == (3, max_len)
    for row, i in enumerate(group):
        n = wl.lengths[i]
        assert inputs["input_ids"][row].tolist() == wl.input_ids[i] + [1] * (max_len - n)
        assert inputs["attention_mask"][row].tolist() == [1] * n + [0] * (max_len - n)
        assert inputs["token_type_ids"][row].tolist() == wl.type_ids[i] + [0] * (max_len - n)

    no_types = DeviceBatches.of(wl, "cpu", pad_id=1, with_types=False)
    assert no_types.packed([1])[3] is None and "token_type_ids" not in no_types.padded([1])


# ------------------------------------------------------------------------------------------
# FLOPs
# ------------------------------------------------------------------------------------------


def test_param_counts_bge_reranker_v2_m3():
    counts = bw.encoder_param_counts(bw.BGE_RERANKER_V2_M3_CONFIG)
    # XLMRobertaForSequenceClassification of this config: 567,755,777 parameters ("568M").
    assert counts["total"] == 567_755_777
    assert counts["non_embedding"] == 24 * 12_596_224
    assert counts["embedding"] == 250_002 * 1024 + 8194 * 1024 + 1024 + 2 * 1024


@pytest.mark.parametrize("model_type", ["xlm-roberta", "bert"])
def test_param_counts_match_transformers(model_type):
    transformers = pytest.importorskip("transformers")
    cfg = dict(TINY_XLMR, model_type=model_type, type_vocab_size=2 if model_type == "bert" else 1)
    config = transformers.AutoConfig.for_model(**cfg)
    model = transformers.AutoModelForSequenceClassification.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == bw.encoder_param_counts(cfg)["total"]


def test_encoder_and_attention_flops():
    cfg = dict(TINY_XLMR)
    counts = bw.encoder_param_counts(cfg)
    h, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    expected = 2 * counts["non_embedding"] * 8 + layers * 4 * (3 * 3 + 5 * 5) * h + 2 * counts["head"] * 2
    assert bw.encoder_flops([3, 5], cfg) == pytest.approx(expected, rel=1e-12)
    # additive over pairs, and more than linear in length (attention)
    assert bw.encoder_flops([3, 5], cfg) == pytest.approx(bw.encoder_flops([3], cfg) + bw.encoder_flops([5], cfg))
    assert bw.encoder_flops([8], cfg) > bw.encoder_flops([4, 4], cfg)
    assert bw.attention_flops([100], 16, 64) == 4 * 100 * 100 * 16 * 64
    assert bw.attention_flops([3, 4], 2, 8) == 4 * (9 + 16) * 2 * 8
    # bge-reranker-v2-m3, one 100-token pair: ~2 * 302M * 100 = 60 GFLOP plus attention
    f = bw.encoder_flops([100], bw.BGE_RERANKER_V2_M3_CONFIG)
    assert 6.0e10 < f < 6.2e10

