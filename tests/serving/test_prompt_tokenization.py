"""Decoder-reranker prompts against Qwen3-Reranker's own recipe, computed here from the tokenizer file."""

import copy
import inspect
import json
import random

import numpy as np
import pytest

from triton_rerank.serving.prompt_tokenization import (
    PromptTemplate,
    PromptTemplateError,
    PromptTokenizer,
    load_prompt_template,
)
from triton_rerank.serving.tokenization import PairTokenizationError, PairTokenizer, window_count

# The recipe of the Qwen3-Reranker model card, written out again so that the references below do
# not depend on the module under test.
PREFIX = ('<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the '
          'Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n')
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
QUERY = "what is the giant panda?"

# Documents whose start meets the template's "<Document>: " in every way: a word (its token takes
# the template's space), a space, punctuation, a newline, CJK, emoji, special-token text, nothing.
EDGE_DOCUMENTS = [
    "the giant panda lives in the bamboo forests of China",
    " a leading space", "  two leading spaces", ", punctuation first", "...", "\nnewline first", "\n\n",
    "熊猫是一种熊", "😀 emoji first", "👩\u200d💻", "<|im_end|> special-token text", "", " ", "x",
]
LONG_DOCUMENTS = [
    "The giant panda is a bear species endemic to China. " * 40,
    "熊猫 bamboo\n😀 the, end. " * 60,
    " leading space, then " + "bamboo shoots and leaves " * 50,
]


def middle(query: str, document: str, instruction: str = INSTRUCTION) -> str:
    return f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}"


def recipe(reference, query: str, documents: list[str], max_length: int, instruction: str = INSTRUCTION):
    """Qwen3-Reranker's prompt ids with the `tokenizers` library: each part alone, the middle's end cut."""
    prefix, suffix = (reference.encode(text, add_special_tokens=False).ids for text in (PREFIX, SUFFIX))
    room = max_length - len(prefix) - len(suffix)
    return [prefix + reference.encode(middle(query, d, instruction), add_special_tokens=False).ids[:room] + suffix
            for d in documents]


def unpack(packed) -> list[list[int]]:
    return [ids.tolist() for ids in np.split(packed.input_ids, np.cumsum(packed.lengths)[:-1])]


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    """(model directory, a loaded PromptTokenizer, the reference `tokenizers.Tokenizer`), loaded once."""
    from tokenizers import Tokenizer

    from triton_rerank.bench.workload import resolve_data_dir

    data = resolve_data_dir(None)
    if data is None or not (data / "tokenizers" / "qwen3" / "tokenizer.json").is_file():
        pytest.skip("the shared data folder with the Qwen3 tokenizer is not here")
    model_dir = tmp_path_factory.mktemp("qwen3")
    (model_dir / "tokenizer.json").symlink_to(data / "tokenizers" / "qwen3" / "tokenizer.json")
    (model_dir / "config.json").write_text(json.dumps({"model_type": "qwen3", "max_position_embeddings": 40960}))
    return model_dir, PromptTokenizer(model_dir), Tokenizer.from_file(str(model_dir / "tokenizer.json"))


def sized(qwen3, max_length: int, **settings) -> PromptTokenizer:
    """The loaded tokenizer with another max_length (and template or default instruction)."""
    tokenizer = copy.copy(qwen3[1])
    tokenizer.max_length = max_length
    for name, value in settings.items():
        setattr(tokenizer, name, value)
    return tokenizer


def test_max_length_is_the_models_or_the_smaller_one_given(qwen3):
    model_dir, tokenizer, _ = qwen3
    assert tokenizer.max_length == 40960  # Qwen3 numbers positions from 0: all of max_position_embeddings
    assert PromptTokenizer(model_dir, max_length=8192).max_length == 8192
    # The tokenizer step calls either class the same way.
    for name in ("encode", "encode_chunked"):
        pair = inspect.signature(getattr(PairTokenizer, name)).parameters
        prompt = inspect.signature(getattr(PromptTokenizer, name)).parameters
        assert list(prompt)[:len(pair)] == list(pair)
        assert all(prompt[p].default == pair[p].default for p in pair)


@pytest.mark.parametrize("max_length", [80, 96, 150, 40960])
def test_right_truncation_equals_the_official_recipe(qwen3, max_length):
    """Against transformers' own truncation call of the model card, and the `tokenizers` recipe."""
    from transformers import PreTrainedTokenizerFast

    model_dir, _, reference = qwen3
    documents = EDGE_DOCUMENTS + LONG_DOCUMENTS
    hf = PreTrainedTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"))
    prefix, suffix = (hf.encode(text, add_special_tokens=False) for text in (PREFIX, SUFFIX))
    inputs = hf([middle(QUERY, d) for d in documents], padding=False, truncation="longest_first",
                return_attention_mask=False, max_length=max_length - len(prefix) - len(suffix))
    official = [prefix + ids + suffix for ids in inputs["input_ids"]]
    assert official == recipe(reference, QUERY, documents, max_length)

    packed = sized(qwen3, max_length).encode(QUERY, documents)
    assert unpack(packed) == official
    assert packed.input_ids.dtype == np.int32 and packed.lengths.dtype == np.int32
    assert not packed.token_type_ids.any() and packed.token_type_ids.shape == packed.input_ids.shape
    assert packed.chunk_counts.tolist() == [1] * len(documents)
    if max_length == 40960:  # nothing cut: each prompt is its three parts whole
        assert all(len(ids) < max_length for ids in official)
    else:
        assert max(packed.lengths) == max_length


def test_the_instruction_is_the_requests_else_the_servers_else_the_recipes(qwen3):
    _, _, reference = qwen3
    tokenizer = sized(qwen3, 40960)
    documents = ["bamboo", "a panda eats bamboo"]
    default = unpack(tokenizer.encode(QUERY, documents))
    assert default == recipe(reference, QUERY, documents, 40960)
    assert unpack(tokenizer.encode(QUERY, documents, instruction=INSTRUCTION)) == default
    custom = unpack(tokenizer.encode(QUERY, documents, instruction="Find the passage that answers the question"))
    assert custom != default
    assert custom == recipe(reference, QUERY, documents, 40960, "Find the passage that answers the question")
    server = sized(qwen3, 40960, default_instruction="Find the passage that answers the question")
    assert unpack(server.encode(QUERY, documents)) == custom
    assert unpack(server.encode(QUERY, documents, instruction=INSTRUCTION)) == default
    chunked = server.encode_chunked(QUERY, documents, instruction="Find the passage that answers the question")
    assert unpack(chunked) == custom


def head_and_suffix(reference, query: str = QUERY) -> tuple[list[int], list[int]]:
    """The ids before a document that starts with a space (the template's space is then its own
    token), and the suffix's."""
    head = (reference.encode(PREFIX, add_special_tokens=False).ids
            + reference.encode(middle(query, ""), add_special_tokens=False).ids)
    return head, reference.encode(SUFFIX, add_special_tokens=False).ids


@pytest.mark.parametrize("direction", ["left", "right"])
def test_truncation_cuts_only_the_document(qwen3, direction):
    _, _, reference = qwen3
    document = " the giant panda " * 30 + " eats bamboo shoots" * 30  # its start and its end differ
    document_ids = reference.encode(document, add_special_tokens=False).ids
    head, suffix = head_and_suffix(reference)
    # The document starts with a space: the template's own space stays a token of its own.
    assert (reference.encode(middle(QUERY, document), add_special_tokens=False).ids
            == reference.encode(middle(QUERY, ""), add_special_tokens=False).ids + document_ids)
    max_length = len(head) + len(suffix) + 25
    packed = sized(qwen3, max_length).encode(QUERY, [document, "short"], direction=direction)
    first, second = unpack(packed)
    kept = document_ids[-25:] if direction == "left" else document_ids[:25]
    assert first == head + kept + suffix
    assert second == recipe(reference, QUERY, ["short"], max_length)[0]  # a document that fits is left whole
    # A document whose first token holds the template's space: head and suffix are kept all the same.
    words = "the giant panda " * 30 + "eats bamboo shoots " * 30
    ids = unpack(sized(qwen3, max_length).encode(QUERY, [words], direction=direction))[0]
    assert len(ids) == max_length and ids[-len(suffix):] == suffix
    assert ids[:len(head) - 1] == head[:-1]  # all but the template's space, which the document's first word took


@pytest.mark.parametrize("direction", ["left", "right"])
def test_max_document_tokens_keeps_that_many_tokens_of_each_document(qwen3, direction):
    _, _, reference = qwen3
    documents = [" bamboo forest" * 40, " hi"]
    head, suffix = head_and_suffix(reference)
    packed = sized(qwen3, 40960).encode(QUERY, documents, direction=direction, max_document_tokens=5)
    document_ids = reference.encode(documents[0], add_special_tokens=False).ids
    first, second = unpack(packed)
    assert first == head + (document_ids[-5:] if direction == "left" else document_ids[:5]) + suffix
    assert second == head + reference.encode(" hi", add_special_tokens=False).ids + suffix
    with pytest.raises(PairTokenizationError, match="needs truncate=true"):
        sized(qwen3, 40960).encode(QUERY, documents, truncate=False, max_document_tokens=5)


def test_truncate_false_refuses_a_prompt_too_long_naming_the_document(qwen3):
    _, _, reference = qwen3
    tokenizer = sized(qwen3, 100)
    documents = ["short", "bamboo " * 40]
    length = len(recipe(reference, QUERY, documents, 10**6)[1])
    with pytest.raises(PairTokenizationError,
                       match=rf"document 1 makes a prompt of {length} tokens, more than the model's max input of "
                             r"100; shorten it, or send long_documents=truncate or chunk"):
        tokenizer.encode(QUERY, documents, truncate=False)
    # A document cut before tokenizing is at least as long as counted.
    with pytest.raises(PairTokenizationError, match=r"document 0 makes a prompt of (\d+) tokens or more \(counted on "
                                                    r"its first \d+ characters\), more than"):
        tokenizer.encode(QUERY, ["bamboo " * 50_000], truncate=False)
    fits = tokenizer.encode(QUERY, ["short"], truncate=False)
    assert unpack(fits) == recipe(reference, QUERY, ["short"], 100)


@pytest.mark.parametrize("method", ["encode", "encode_chunked"])
def test_a_head_without_room_for_the_document_is_refused(qwen3, method):
    _, _, reference = qwen3
    head, suffix = head_and_suffix(reference)
    tokenizer = sized(qwen3, len(head) + len(suffix))  # room for the prompt, none for a document
    with pytest.raises(PairTokenizationError, match=rf"the prompt head \(system prompt, instruction and query\) has "
                                                    rf"{len(head)} tokens and its suffix {len(suffix)}: they leave "
                                                    r"no room .*shorten the query or the instruction"):
        getattr(tokenizer, method)(QUERY, ["doc"])
    assert getattr(sized(qwen3, len(head) + len(suffix) + 1), method)(QUERY, [" doc"]).lengths.tolist() == [
        len(head) + len(suffix) + 1]
    with pytest.raises(PairTokenizationError, match="shorten the query or the instruction"):
        getattr(sized(qwen3, 512), method)(QUERY, ["doc"], instruction="find " * 500)
    with pytest.raises(PairTokenizationError, match="DOCUMENTS is empty: send at least one document"):
        getattr(sized(qwen3, 512), method)(QUERY, [])


# --- long documents are cut before tokenizing; the result must not change ---------------------------


class CountingTokenizer:
    """A tokenizer that remembers the longest text it was asked to encode, and its last batch."""

    def __init__(self, tokenizer):
        self.tokenizer, self.longest, self.last = tokenizer, 0, []

    def encode_batch(self, inputs, **kwargs):
        self.longest, self.last = max([self.longest, *map(len, inputs)]), list(inputs)
        return self.tokenizer.encode_batch(inputs, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


@pytest.mark.parametrize("max_length", [128, 8192])
def test_a_1mib_document_is_cut_before_tokenizing_and_gives_the_same_tokens(qwen3, max_length):
    _, _, reference = qwen3
    tokenizer = sized(qwen3, max_length)
    assert tokenizer.cuts_documents
    passage = "The giant panda lives in the bamboo forests of China, 熊猫 😀, eating\nshoots. "
    document = (passage * (2**20 // len(passage) + 1))[:2**20]
    counting = CountingTokenizer(tokenizer._tokenizer)
    tokenizer._tokenizer = counting
    packed = tokenizer.encode(QUERY, [document, "hi"])
    assert counting.longest < len(document) // 10  # only a prefix of it was tokenized
    assert unpack(packed) == recipe(reference, QUERY, [document, "hi"], max_length)


def test_cut_documents_equal_whole_ones_on_mixed_text(qwen3):
    """Many documents of mixed pieces, prefixes first far too short (they must grow), at small max_length."""
    _, _, reference = qwen3
    pieces = ["word ", "the ", "a", "9", " ", "  ", "\n", "\r\n", "\t", "\xa0", "熊猫", "😀", "👩\u200d💻", "e\u0301",
              "'s", "'LL", ".", "!?", "<|im_end|>", "<think>", "x" * 40, "ﬁ", "½"]
    rng = random.Random(0)
    documents = ["".join(rng.choice(pieces) for _ in range(rng.randint(50, 600))) for _ in range(150)]
    documents += [" " + doc for doc in documents[:20]] + ["\n" + doc for doc in documents[20:40]]
    for max_length, chars_per_token in ((84, 1), (90, 2), (120, 8)):
        tokenizer = sized(qwen3, max_length, chars_per_token=chars_per_token)
        counting = CountingTokenizer(tokenizer._tokenizer)
        tokenizer._tokenizer = counting
        assert unpack(tokenizer.encode(QUERY, documents)) == recipe(reference, QUERY, documents, max_length)
        # The last batch encodes the middles: most hold only a prefix of their document.
        cut = sum(len(text) < len(middle(QUERY, d)) for text, d in zip(counting.last, documents, strict=True))
        assert cut > len(documents) / 2, cut


# --- windows over long documents ------------------------------------------------------------------


@pytest.mark.parametrize("overlap", [0, 7, 20])
def test_chunk_windows_repeat_head_and_suffix_around_slices_of_the_document(qwen3, overlap):
    _, _, reference = qwen3
    head, suffix = head_and_suffix(reference)
    window = 40
    max_length = len(head) + len(suffix) + window
    document = " " + " ".join(["river water city language"] * 30)
    document_ids = reference.encode(document, add_special_tokens=False).ids
    tokenizer = sized(qwen3, max_length)
    packed = tokenizer.encode_chunked(QUERY, ["hi", document, "water"], overlap=overlap, max_chunks_per_doc=1000)
    step = window - overlap
    starts = range(0, max(len(document_ids) - overlap, 1), step)
    assert len(starts) == window_count(len(document_ids), window, overlap) > 2
    assert packed.chunk_counts.tolist() == [1, len(starts), 1]
    prompts = unpack(packed)
    # The documents that fit are one prompt each, as encode makes them.
    assert [prompts[0], prompts[-1]] == unpack(tokenizer.encode(QUERY, ["hi", "water"]))
    for k, start in enumerate(starts):
        assert prompts[1 + k] == head + document_ids[start:start + window] + suffix
    assert packed.lengths[1:-2].tolist() == [max_length] * (len(starts) - 1) and packed.lengths[-2] <= max_length
    assert not packed.token_type_ids.any()
    assert packed.document_tokens.tolist() == [packed.lengths[0], int(packed.lengths[1:-1].sum()), packed.lengths[-1]]


def test_chunking_refuses_what_it_cannot_do_and_says_how_to_fix_it(qwen3):
    _, _, reference = qwen3
    head, suffix = head_and_suffix(reference)
    tokenizer = sized(qwen3, len(head) + len(suffix) + 20)  # windows of 20 document tokens
    document = " bamboo" * 200  # 200 document tokens
    others = len(head) + len(suffix)
    with pytest.raises(PairTokenizationError, match=rf"chunk_overlap is 20, but a window holds only 20 document "
                                                    rf"tokens \(the model's max input of {others + 20} less the "
                                                    rf"prompt's {others} other tokens: .*send a chunk_overlap below 20"):
        tokenizer.encode_chunked(QUERY, [document], overlap=20)
    # ceil((200 - 4) / 16) = 13 windows with overlap 4.
    assert tokenizer.encode_chunked(QUERY, [document], overlap=4, max_chunks_per_doc=13).chunk_counts.tolist() == [13]
    with pytest.raises(PairTokenizationError, match=r"document 1 makes 13 windows of 20 tokens \(overlap 4\), more "
                                                    r"than max_chunks_per_doc=12: raise max_chunks_per_doc"):
        tokenizer.encode_chunked(QUERY, ["short", document], overlap=4, max_chunks_per_doc=12)
    with pytest.raises(PairTokenizationError, match=r"the documents make 26 windows in all; this server scores at "
                                                    r"most 25 per request"):
        tokenizer.encode_chunked(QUERY, [document] * 2, overlap=4, max_windows=25)
    tokens = 2 * (13 * others + 12 * 20 + 200 - 12 * 16)
    with pytest.raises(PairTokenizationError, match=rf"the windows of these documents hold {tokens} tokens in all"):
        tokenizer.encode_chunked(QUERY, [document] * 2, overlap=4, max_tokens=tokens - 1)
    assert tokenizer.encode_chunked(QUERY, ["short", ""], overlap=50).chunk_counts.tolist() == [1, 1]


# --- prompt templates -------------------------------------------------------------------------------

# The recipe as templates, in the three ways servers name their variables; the final newline of a
# template file is dropped by Jinja, so each ends with an expression.
TEMPLATES = {
    "plain": PREFIX + "<Instruct>: {{ instruction | default('" + INSTRUCTION + "') }}\n<Query>: {{ query }}\n"
             "<Document>: {{ document }}" + SUFFIX[:-2] + "{{ '\\n\\n' }}\n",
    "indexed messages": PREFIX + "<Instruct>: {{ instruct | default(\"" + INSTRUCTION + "\") }}\n"
                        "<Query>: {{ messages[0]['content'] }}\n<Document>: {{ messages[1].content }}"
                        + SUFFIX.replace("\n\n</think>\n\n", "\n\n</think>\n{{ '\\n' }}\n"),
    "message roles": PREFIX + "<Instruct>: {{ instruction | default(instruct | default('" + INSTRUCTION + "')) }}\n"
                     "<Query>: {{ messages | selectattr('role', 'eq', 'query') | map(attribute='content') | first }}\n"
                     "{% for m in messages if m.role == 'document' %}<Document>: {{ m.content }}{% endfor %}\n"
                     + SUFFIX + "\n",
}


@pytest.mark.parametrize("name", list(TEMPLATES))
@pytest.mark.parametrize("max_length", [90, 40960])
def test_a_template_of_the_recipe_gives_the_recipes_tokens(qwen3, tmp_path, name, max_length):
    model_dir, _, reference = qwen3
    path = tmp_path / "reranker.jinja"
    path.write_text(TEMPLATES[name])
    template = load_prompt_template(path)
    tokenizer = PromptTokenizer(model_dir, max_length=max_length, template=template)
    builtin = sized(qwen3, max_length)
    documents = EDGE_DOCUMENTS + LONG_DOCUMENTS
    assert unpack(tokenizer.encode(QUERY, documents)) == recipe(reference, QUERY, documents, max_length)
    for options in ({"instruction": "Find the answer"}, {"direction": "left"}, {"max_document_tokens": 3}):
        assert unpack(tokenizer.encode(QUERY, documents, **options)) == unpack(builtin.encode(QUERY, documents, **options))
    if max_length == 90:
        chunked = tokenizer.encode_chunked(QUERY, documents, overlap=3, max_chunks_per_doc=1000)
        expected = builtin.encode_chunked(QUERY, documents, overlap=3, max_chunks_per_doc=1000)
        assert unpack(chunked) == unpack(expected) and chunked.chunk_counts.tolist() == expected.chunk_counts.tolist()
    else:
        # What servers do with a template: render it whole and encode that as one string.
        whole = [reference.encode(PREFIX + middle(QUERY, d) + SUFFIX, add_special_tokens=False).ids for d in documents]
        assert unpack(tokenizer.encode(QUERY, documents)) == whole


def test_a_template_with_text_after_the_document_keeps_it(qwen3):
    model_dir, _, reference = qwen3
    source = "<|im_start|>user\nQuery: {{ query }}\nDocument: {{ document }}\nRelevant?<|im_end|>\n{{ '\\n' }}"
    tokenizer = PromptTokenizer(model_dir, max_length=40, template=PromptTemplate(source))
    rendered = "<|im_start|>user\nQuery: {}\nDocument: {}\nRelevant?<|im_end|>\n\n"
    short = ["hi", " panda", "熊猫", ""]
    assert unpack(tokenizer.encode("q", short)) == [
        reference.encode(rendered.format("q", d), add_special_tokens=False).ids for d in short]
    for direction in ("right", "left"):
        (ids,) = unpack(tokenizer.encode("q", ["bamboo " * 100], direction=direction))
        text = reference.decode(ids, skip_special_tokens=False)
        assert len(ids) == 40 and text.startswith("<|im_start|>user\nQuery: q\nDocument: bamboo")
        # The token " \n" holds the document's last space and the template's newline: it is kept.
        assert text.endswith("bamboo \nRelevant?<|im_end|>\n\n")
    with pytest.raises(PairTokenizationError, match="document 0 makes a prompt of"):
        tokenizer.encode("q", ["bamboo " * 100], truncate=False)


@pytest.mark.parametrize(("source", "error"), [
    ("<|im_start|>{{ query }}{% if %}", r"is not valid Jinja: .*\(line 1\)"),
    ("{{ query }}", "renders the document 0 times as it is"),
    ("{{ document }} and again {{ document }}", "renders the document 2 times as it is"),
    ("{{ document | upper }}", "renders the document 0 times as it is"),
    ("{{ document | truncate(100) }}", "changes the document or depends on it"),
    ("{{ document | trim }}", "changes the document or depends on it"),
    ("{{ document | e }}", "changes the document or depends on it"),
    ("{% if document %}Document: {% endif %}{{ document }}", "changes the document or depends on it"),
    ("{{ document }} ({{ document | length }} characters)", "changes the document or depends on it"),
    ("{{ qurey }} {{ document }}", r"uses an undefined variable \('qurey' is undefined\)"),
    ("{{ instruction }} {{ document }}", r"uses an undefined variable .*give an optional one a default"),
    ("{{ query.__class__.__mro__ }} {{ document }}", "unsafe"),
])
def test_templates_that_cannot_be_used_are_refused_with_the_reason(source, error):
    with pytest.raises(PromptTemplateError, match=error):
        PromptTemplate(source)


def test_loading_a_template_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"prompt template .*missing\.jinja not found"):
        load_prompt_template(tmp_path / "missing.jinja")
    (tmp_path / "bad.jinja").write_text("{{ document }\n")
    with pytest.raises(PromptTemplateError, match=r"prompt template .*bad\.jinja is not valid Jinja"):
        load_prompt_template(tmp_path / "bad.jinja")
    (tmp_path / "good.jinja").write_text("Query: {{ query }}\nDocument: {{ document }}\n")
    assert load_prompt_template(tmp_path / "good.jinja").render_around("q", None) == ("Query: q\nDocument: ", "")


def test_a_template_split_that_would_change_tokens_keeps_the_prompt_in_one_piece(qwen3):
    model_dir, _, reference = qwen3
    tokenizer = PromptTokenizer(model_dir, template=PromptTemplate(TEMPLATES["plain"]))
    # Splitting inside a word ("Judg|e") changes its tokens: the check catches it.
    tokenizer._splitters = ["Judg"]
    documents = ["a panda", " bamboo", ""]
    assert unpack(tokenizer.encode(QUERY, documents)) == recipe(reference, QUERY, documents, 40960)
