"""Pair tokenization against the Hugging Face tokenizer of the same model directory."""

import copy
import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from triton_rerank.serving.tokenization import PairTokenizationError, PairTokenizer


@pytest.mark.parametrize("arch", ["xlm-roberta", "bert"])
def test_packed_pairs_equal_hf_pair_encoding(tiny_model_dirs, arch):
    model_dir = tiny_model_dirs[arch]
    documents = ["the giant panda", "hi", "a search engine ranks documents by relevance"]
    packed = PairTokenizer(model_dir).encode("what is panda?", documents)
    hf = AutoTokenizer.from_pretrained(model_dir)
    expected = [hf("what is panda?", doc) for doc in documents]
    assert packed.lengths.tolist() == [len(e["input_ids"]) for e in expected]
    assert packed.input_ids.tolist() == [i for e in expected for i in e["input_ids"]]
    assert packed.input_ids.dtype == np.int32 and packed.lengths.dtype == np.int32
    if arch == "bert":
        assert packed.token_type_ids.tolist() == [t for e in expected for t in e["token_type_ids"]]
    else:
        assert not packed.token_type_ids.any()


def test_truncation_cuts_the_document_and_keeps_the_query(tiny_model_dirs):
    model_dir = tiny_model_dirs["bert"]
    tokenizer = PairTokenizer(model_dir, max_length=24)
    query = "what is the capital city"
    packed = tokenizer.encode(query, ["bamboo " * 50, "hi"])
    assert packed.lengths.tolist()[0] == 24
    hf = AutoTokenizer.from_pretrained(model_dir)
    expected = hf(query, "bamboo " * 50, truncation="only_second", max_length=24)["input_ids"]
    assert packed.input_ids[:24].tolist() == expected
    # The short pair after the truncated one is untouched.
    assert packed.input_ids[24:].tolist() == hf(query, "hi")["input_ids"]


def test_truncate_false_names_the_document_and_its_length(tiny_model_dirs):
    tokenizer = PairTokenizer(tiny_model_dirs["bert"], max_length=24)
    with pytest.raises(PairTokenizationError, match=r"document 1 makes a pair of \d+ tokens"):
        tokenizer.encode("query", ["short", "bamboo " * 50], truncate=False)
    # The failed request left no truncation behind.
    assert tokenizer.encode("query", ["bamboo " * 50]).lengths[0] == 24


def test_query_longer_than_the_limit_is_an_error(tiny_model_dirs):
    tokenizer = PairTokenizer(tiny_model_dirs["bert"], max_length=16)
    with pytest.raises(PairTokenizationError, match="shorten the query"):
        tokenizer.encode("panda " * 40, ["doc"])


def test_empty_document_list_is_an_error(tiny_model_dirs):
    with pytest.raises(PairTokenizationError, match="DOCUMENTS is empty"):
        PairTokenizer(tiny_model_dirs["bert"]).encode("query", [])


def test_missing_tokenizer_file_says_how_to_fix(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "max_position_embeddings": 512}))
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        PairTokenizer(tmp_path)


# --------------------------------------------------------------------------------------------
# Long documents are cut before tokenizing; the result must not change
# --------------------------------------------------------------------------------------------

QUERY = "what is the capital city"


def whole_then_truncated(tokenizer_file, max_length: int, query: str, documents: list[str], truncate: bool):
    """The reference: every document tokenized whole, then truncated (only_second) when asked."""
    from tokenizers import Tokenizer

    reference = Tokenizer.from_file(str(tokenizer_file))
    reference.no_padding()
    if truncate:
        reference.enable_truncation(max_length, strategy="only_second")
    else:
        reference.no_truncation()
    return reference.encode_batch([(query, doc) for doc in documents])


def assert_same_as_whole(tokenizer: PairTokenizer, reference, query: str, documents: list[str], truncate=True):
    """`tokenizer.encode` equals tokenizing each document whole (ids, type ids, lengths, refusals)."""
    expected = reference(query, documents, truncate)
    try:
        packed = tokenizer.encode(query, documents, truncate=truncate)
    except PairTokenizationError as error:
        first = next(i for i, e in enumerate(expected) if len(e) > tokenizer.max_length)
        assert not truncate and f"document {first} makes a pair of " in str(error)
        minimum = int(str(error).split("makes a pair of ")[1].split()[0])
        assert tokenizer.max_length < minimum <= len(expected[first])
        return
    assert packed.lengths.tolist() == [len(e) for e in expected]
    assert packed.input_ids.tolist() == [i for e in expected for i in e.ids]
    assert packed.token_type_ids.tolist() == [t for e in expected for t in e.type_ids]


def cut_count(tokenizer: PairTokenizer, query: str, documents: list[str]) -> int:
    room = tokenizer.max_length - tokenizer.num_special_tokens - len(tokenizer._tokenizer.encode(
        query, add_special_tokens=False))
    return len(tokenizer._cut(documents, room)[1])


@pytest.mark.parametrize("arch", ["xlm-roberta", "bert"])
def test_a_long_document_is_cut_and_scores_the_same_tokens(tiny_model_dirs, arch):
    model_dir = tiny_model_dirs[arch]
    tokenizer = PairTokenizer(model_dir, max_length=32)
    assert tokenizer.cuts_documents
    long = "the giant panda lives in the bamboo forest of china, " * 2000
    documents = [long, "hi", "panda " * 10, long + "x" * 5000]
    assert cut_count(tokenizer, QUERY, documents) == 2  # the two long ones; the others are too short to cut

    def reference(query, docs, truncate):
        return whole_then_truncated(model_dir / "tokenizer.json", 32, query, docs, truncate)

    assert_same_as_whole(tokenizer, reference, QUERY, documents)
    hf = AutoTokenizer.from_pretrained(model_dir)
    packed = tokenizer.encode(QUERY, [long])
    assert packed.input_ids.tolist() == hf(QUERY, long, truncation="only_second", max_length=32)["input_ids"]


def test_a_cut_document_refused_without_truncation_says_at_least_how_long(tiny_model_dirs):
    tokenizer = PairTokenizer(tiny_model_dirs["bert"], max_length=24)
    with pytest.raises(PairTokenizationError,
                       match=r"document 1 makes a pair of \d+ tokens or more \(counted on its first \d+ characters\), "
                             r"more than the model's max input of 24; shorten it, or send long_documents=truncate or chunk"):
        tokenizer.encode("query", ["short", "bamboo " * 50_000], truncate=False)
    # A document tokenized whole still gets its exact count.
    with pytest.raises(PairTokenizationError, match=r"document 0 makes a pair of \d+ tokens, more than"):
        tokenizer.encode("query", ["bamboo " * 30], truncate=False)


def test_documents_without_a_cut_point_are_tokenized_whole(tiny_model_dirs):
    model_dir = tiny_model_dirs["xlm-roberta"]
    tokenizer = PairTokenizer(model_dir, max_length=32)
    documents = ["熊猫" * 3000, "x" * 6000 + " tail", "panda\n" * 2000]
    assert cut_count(tokenizer, QUERY, documents) == 0

    def reference(query, docs, truncate):
        return whole_then_truncated(model_dir / "tokenizer.json", 32, query, docs, truncate)

    assert_same_as_whole(tokenizer, reference, QUERY, documents)
    # Enough spaced text before a long tail without spaces: cut at the last space before the budget.
    assert cut_count(tokenizer, QUERY, ["panda bamboo " * 30 + "熊" * 20_000]) == 1


def test_cuts_only_for_tokenizers_whose_words_do_not_look_ahead(tiny_model_dirs):
    from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers

    from triton_rerank.serving.tokenization import prefix_cuts_are_exact

    def tokenizer(model=None, normalizer=None, pre_tokenizer=None, added=()):
        t = Tokenizer(model or models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
        if normalizer:
            t.normalizer = normalizer
        if pre_tokenizer:
            t.pre_tokenizer = pre_tokenizer
        t.add_tokens(list(added))
        return t

    assert prefix_cuts_are_exact(tokenizer(pre_tokenizer=pre_tokenizers.Metaspace()))
    assert prefix_cuts_are_exact(tokenizer(normalizer=normalizers.Sequence(
        [normalizers.Replace(Regex("[\t\n]"), " "), normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])))
    assert prefix_cuts_are_exact(tokenizer(pre_tokenizer=pre_tokenizers.ByteLevel()))  # GPT-2's regex
    # A replacement that can join the words on both sides of a space, an unknown split regex, a
    # pre-tokenizer that reads script runs, an added token containing a space, random BPE merges.
    assert not prefix_cuts_are_exact(tokenizer(normalizer=normalizers.Replace("a b", "c")))
    assert not prefix_cuts_are_exact(tokenizer(normalizer=normalizers.Replace(Regex("[ x]"), "")))
    assert not prefix_cuts_are_exact(tokenizer(pre_tokenizer=pre_tokenizers.Split(Regex(r"\w+ \w+"), "isolated")))
    assert not prefix_cuts_are_exact(tokenizer(pre_tokenizer=pre_tokenizers.UnicodeScripts()))
    assert not prefix_cuts_are_exact(tokenizer(added=[AddedToken("new york")]))
    assert not prefix_cuts_are_exact(tokenizer(model=models.BPE(dropout=0.1)))
    # A regex pre-tokenizer also needs the word character before the cut to stay one: no
    # normalizer that may turn it into a space (BertNormalizer pads CJK with spaces).
    gpt2 = pre_tokenizers.ByteLevel()
    assert prefix_cuts_are_exact(tokenizer(normalizer=normalizers.Replace(Regex("[\t\n]"), " "), pre_tokenizer=gpt2))
    assert not prefix_cuts_are_exact(tokenizer(normalizer=normalizers.Replace(Regex("[x]"), " "), pre_tokenizer=gpt2))
    assert not prefix_cuts_are_exact(tokenizer(normalizer=normalizers.BertNormalizer(), pre_tokenizer=gpt2))
    assert prefix_cuts_are_exact(tokenizer(normalizer=normalizers.BertNormalizer(),
                                           pre_tokenizer=pre_tokenizers.BertPreTokenizer()))
    # The test models' own tokenizers are cut.
    assert all(PairTokenizer(path).cuts_documents for path in tiny_model_dirs.values())


# The real tokenizers of ../shared/data (skipped without it): SentencePiece Unigram behind a
# Metaspace (XLM-R), WordPiece behind BertPreTokenizer with its 100-character word cap (BERT),
# byte-level BPE behind the Qwen2 split regex (Qwen3).
REAL_TOKENIZERS = {
    "xlm-roberta": {"model_type": "xlm-roberta", "max_position_embeddings": 514, "pad_token_id": 1},
    "bert-base-uncased": {"model_type": "bert", "max_position_embeddings": 512, "pad_token_id": 0},
    "qwen3": {"model_type": "qwen3", "max_position_embeddings": 40960},
}
# Pieces of adversarial text: long words (past WordPiece's cap), whitespace runs and exotic
# spaces, control characters (removed by some normalizers), combining marks, compatibility
# characters NFKC rewrites (ligatures, one character becoming several words), CJK, emoji with
# joiners, Hangul jamo that NFC composes, grapheme-prepending letters, special-token text,
# contractions the Qwen regex splits off.
FRAGMENTS = [
    "word ", "the ", "of ", "a", "Z", "_", "9", "½", "ﬁ", "ﷺ", "İ", "ß", "e\u0301", "\u0301", " \u0301", "\u0308",
    " ", "  ", "\t", "\n", "\r\n", "\r", "\x0b", "\x0c", "\x01", "\x1c", "\x7f", "\x85", "\xa0", "\u2003", "\u3000",
    "\u2028", "\u200b", "\u200d", "\ufeff", "\u00ad", "\ufffd", "熊猫", "日本語", "😀", "👩\u200d💻", "🇫🇷", "\u1100\u1161",
    "\u11a8", "\u0600", "\u0d4e ", "</s>", "<s>", "[SEP]", "<|endoftext|>", "'s", "'LL", ".", "!?", "...", "%",
    "a" * 101, "x" * 150, "é" * 60, "ǅ", "Ⅻ", "①", "¹", "_ ", "a ", "a  ", "1 ",
]


@pytest.fixture(scope="module")
def real_tokenizers(tmp_path_factory):
    """(data folder, {name: (PairTokenizer, reference Tokenizer)}), each file loaded once."""
    from tokenizers import Tokenizer

    from triton_rerank.bench.workload import resolve_data_dir

    data = resolve_data_dir(None)
    if data is None or not (data / "tokenizers").is_dir():
        pytest.skip("the shared data folder with the real tokenizers is not here")
    root = tmp_path_factory.mktemp("real-tokenizers")
    loaded = {}
    for name, config in REAL_TOKENIZERS.items():
        (root / name).mkdir()
        (root / name / "tokenizer.json").symlink_to(data / "tokenizers" / name / "tokenizer.json")
        (root / name / "config.json").write_text(json.dumps(config))
        loaded[name] = (PairTokenizer(root / name), Tokenizer.from_file(str(root / name / "tokenizer.json")))
    return data, loaded


def _real(real_tokenizers, name: str, max_length: int):
    """The PairTokenizer of a real tokenizer at `max_length`, and its whole-then-truncate reference."""
    _, loaded = real_tokenizers
    shared, reference = loaded[name]
    tokenizer = copy.copy(shared)  # the loaded Rust tokenizer, another window
    tokenizer.max_length = max_length

    def whole(query, documents, truncate):
        if truncate:
            reference.enable_truncation(max_length, strategy="only_second")
        try:
            return reference.encode_batch([(query, doc) for doc in documents])
        finally:
            reference.no_truncation()

    return tokenizer, whole


@pytest.mark.parametrize("name", list(REAL_TOKENIZERS))
def test_cut_equals_whole_on_adversarial_text(real_tokenizers, name):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    tokenizer, whole = _real(real_tokenizers, name, max_length=16)
    assert tokenizer.cuts_documents
    text = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=4)), min_size=30, max_size=250).map("".join)
    seen = {"documents": 0, "cut": 0}

    # chars_per_token 1 starts from a prefix far too short, so that the prefix has to grow.
    @settings(max_examples=150, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(documents=st.lists(text, min_size=1, max_size=4), chars_per_token=st.sampled_from([1, 2, 8]),
           truncate=st.booleans())
    def check(documents, chars_per_token, truncate):
        tokenizer.chars_per_token = chars_per_token
        seen["documents"] += len(documents)
        seen["cut"] += cut_count(tokenizer, "what is it?", documents)
        assert_same_as_whole(tokenizer, whole, "what is it?", documents, truncate)

    check()
    assert seen["cut"] > seen["documents"] / 3, seen  # the cut path was exercised, not only whole documents


@pytest.mark.parametrize("name", list(REAL_TOKENIZERS))
def test_cut_equals_whole_on_dl19_passages(real_tokenizers, name):
    data, _ = real_tokenizers
    rows = [json.loads(line) for line in (data / "msmarco-dl19-bm25top100.jsonl").read_text().splitlines()]
    passages = [c["text"] for row in rows for c in row["candidates"]]
    # Documents of 20 real passages (~8 KB) from all over the file, and single passages.
    documents = [" ".join(passages[i:i + 20]) for i in range(0, len(passages), 500)]
    for max_length in (24, 128):
        tokenizer, whole = _real(real_tokenizers, name, max_length=max_length)
        assert cut_count(tokenizer, rows[0]["query"], documents) == len(documents)
        for row in rows[::10]:
            assert_same_as_whole(tokenizer, whole, row["query"], documents + passages[::400])
        assert_same_as_whole(tokenizer, whole, rows[0]["query"], documents, truncate=False)


# --- which part of a long document is kept ----------------------------------------------------------


def hf_pair(model_dir, query: str, document: str, max_length: int, side: str) -> list[int]:
    """Hugging Face's own truncation of the pair: the document only, from the given side."""
    hf = AutoTokenizer.from_pretrained(model_dir)
    hf.truncation_side = side
    return hf(query, document, truncation="only_second", max_length=max_length)["input_ids"]


@pytest.mark.parametrize("arch", ["xlm-roberta", "bert"])
def test_left_truncation_keeps_the_last_tokens_of_the_document(tiny_model_dirs, arch):
    model_dir = tiny_model_dirs[arch]
    query = "what is the capital city"
    document = "the giant panda " * 20 + "eats bamboo shoots " * 20  # its start and its end differ
    tokenizer = PairTokenizer(model_dir, max_length=32)
    left = tokenizer.encode(query, [document, "hi"], direction="left")
    assert left.lengths.tolist()[0] == 32
    assert left.input_ids[:32].tolist() == hf_pair(model_dir, query, document, 32, "left")
    assert left.input_ids[32:].tolist() == AutoTokenizer.from_pretrained(model_dir)(query, "hi")["input_ids"]
    right = tokenizer.encode(query, [document], direction="right")
    assert right.input_ids.tolist() == hf_pair(model_dir, query, document, 32, "right")
    assert left.input_ids[:32].tolist() != right.input_ids.tolist()


@pytest.mark.parametrize("direction", ["right", "left"])
def test_max_document_tokens_keeps_that_many_tokens_of_each_document(tiny_model_dirs, direction):
    model_dir = tiny_model_dirs["xlm-roberta"]
    query = "panda"
    documents = [" ".join(["bamboo forest"] * 30), "hi"]
    tokenizer = PairTokenizer(model_dir)
    packed = tokenizer.encode(query, documents, direction=direction, max_document_tokens=5)
    query_tokens = len(AutoTokenizer.from_pretrained(model_dir)(query, add_special_tokens=False)["input_ids"])
    limit = tokenizer.num_special_tokens + query_tokens + 5  # a pair of the query and 5 document tokens
    first = packed.input_ids[: packed.lengths[0]].tolist()
    assert packed.lengths[0] == limit and first == hf_pair(model_dir, query, documents[0], limit, direction)
    # A document shorter than 5 tokens is left whole.
    assert packed.input_ids[packed.lengths[0]:].tolist() == hf_pair(model_dir, query, "hi", 512, direction)
    with pytest.raises(PairTokenizationError, match="needs truncate=true"):
        tokenizer.encode(query, documents, truncate=False, max_document_tokens=5)


@pytest.mark.parametrize("arch", ["xlm-roberta", "bert"])
@pytest.mark.parametrize("overlap", [0, 3, 13])
def test_chunk_windows_slide_over_the_whole_document(tiny_model_dirs, arch, overlap):
    """Window k holds document tokens [k(W - overlap), k(W - overlap) + W), each after the query."""
    model_dir = tiny_model_dirs[arch]
    tokenizer = PairTokenizer(model_dir, max_length=32)
    hf = AutoTokenizer.from_pretrained(model_dir)
    query, long_document = "capital city", " ".join(["river water city language"] * 20)
    packed = tokenizer.encode_chunked(query, ["hi", long_document, "water"], overlap=overlap,
                                     max_chunks_per_doc=1000)
    # The short documents are one pair each, exactly as encode makes them.
    plain = tokenizer.encode(query, ["hi"])
    assert packed.input_ids[:plain.lengths[0]].tolist() == plain.input_ids.tolist()
    document_ids = hf(long_document, add_special_tokens=False)["input_ids"]
    query_part = hf(query, "x")["input_ids"]
    prefix = query_part[:query_part.index(hf.sep_token_id) + (2 if arch == "xlm-roberta" else 1)]
    window = 32 - len(prefix) - 1
    step = window - overlap
    starts = range(0, max(len(document_ids) - overlap, 1), step)
    assert packed.chunk_counts.tolist() == [1, len(starts), 1]
    offsets = np.concatenate([[0], np.cumsum(packed.lengths)])
    for k, start in enumerate(starts):
        pair = packed.input_ids[offsets[1 + k]:offsets[2 + k]].tolist()
        assert pair == prefix + document_ids[start:start + window] + [hf.sep_token_id]
        # Token types as the pair template gives them: BERT's segments 0 then 1, XLM-R's all 0.
        document_type = 1 if arch == "bert" else 0
        expected_types = [0] * len(prefix) + [document_type] * (len(pair) - len(prefix))
        assert packed.token_type_ids[offsets[1 + k]:offsets[2 + k]].tolist() == expected_types
    # The last window reaches the document's end; only it may be shorter.
    assert packed.lengths[1:-2].tolist() == [32] * (len(starts) - 1) and packed.lengths[-2] <= 32
    assert packed.document_tokens.tolist() == [packed.lengths[0], int(packed.lengths[1:-1].sum()), packed.lengths[-1]]


@pytest.mark.parametrize("arch", ["xlm-roberta", "bert"])
@pytest.mark.parametrize("overlap", [0, 5, 17])
def test_chunk_windows_equal_hf_overflowing_tokens(tiny_model_dirs, arch, overlap):
    model_dir = tiny_model_dirs[arch]
    hf = AutoTokenizer.from_pretrained(model_dir)
    query, document = "what is a panda", "the giant panda eats bamboo in the mountains of china " * 12
    packed = PairTokenizer(model_dir, max_length=40).encode_chunked(query, [document, "panda"], overlap=overlap,
                                                                    max_chunks_per_doc=1000)
    expected = [hf(query, text, truncation="only_second", max_length=40, stride=overlap,
                   return_overflowing_tokens=True)["input_ids"] for text in (document, "panda")]
    assert packed.chunk_counts.tolist() == [len(expected[0]), 1]
    assert packed.lengths.tolist() == [len(ids) for windows in expected for ids in windows]
    assert packed.input_ids.tolist() == [i for windows in expected for ids in windows for i in ids]


def test_chunking_refuses_what_it_cannot_do_and_says_how_to_fix_it(tiny_model_dirs):
    tokenizer = PairTokenizer(tiny_model_dirs["bert"], max_length=24)
    long_document = "bamboo " * 200  # 200 document tokens; windows of 24 - 3 - 1 = 20
    with pytest.raises(PairTokenizationError, match=r"chunk_overlap is 20, but a window holds only 20 document "
                                                    r"tokens .*send a chunk_overlap below 20"):
        tokenizer.encode_chunked("query", [long_document], overlap=20)
    # ceil((200 - 4) / 16) = 13 windows with overlap 4.
    assert tokenizer.encode_chunked("query", [long_document], overlap=4, max_chunks_per_doc=13).chunk_counts.tolist() == [13]
    with pytest.raises(PairTokenizationError, match=r"document 1 makes 13 windows of 20 tokens \(overlap 4\), more "
                                                    r"than max_chunks_per_doc=12: raise max_chunks_per_doc"):
        tokenizer.encode_chunked("query", ["short", long_document], overlap=4, max_chunks_per_doc=12)
    with pytest.raises(PairTokenizationError, match=r"the documents make 26 windows in all; this server scores at "
                                                    r"most 25 per request"):
        tokenizer.encode_chunked("query", [long_document] * 2, overlap=4, max_windows=25)
    # 13 windows of 24 tokens less what the last one lacks: 3 + 1 + 200 - 12 x 16 = 12 tokens.
    assert tokenizer.encode_chunked("query", [long_document], overlap=4).lengths.sum() == 12 * 24 + 12
    with pytest.raises(PairTokenizationError, match=r"the windows of these documents hold 600 tokens in all; this "
                                                    r"server scores at most 599 per request"):
        tokenizer.encode_chunked("query", [long_document, long_document], overlap=4, max_tokens=599)
    with pytest.raises(PairTokenizationError, match="DOCUMENTS is empty"):
        tokenizer.encode_chunked("query", [])
    # The overlap matters only where a document is chunked.
    assert tokenizer.encode_chunked("query", ["short"], overlap=50).chunk_counts.tolist() == [1]
    # Windows are cut by hand: the tokenizer's own truncation stays off.
    assert tokenizer._tokenizer.truncation is None
