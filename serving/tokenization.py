"""Pair tokenization for cross-encoders, packed without padding.

The tokenizer step of the ensemble turns one query and N documents into the packed form the
cross-encoder consumes: flat token ids of every (query, document) pair back to back, each
pair's length, and token types (all zeros for XLM-R, 0/1 segments for BERT).

Only `tokenizers` and numpy are imported here: the tokenizer instance runs in its own Triton
stub process and must not pay for torch or CUDA.

Long documents are cut before they are tokenized. A pair keeps at most
`room = max_length - special tokens - query tokens` document tokens, so only a prefix of the
document can matter; tokenizing a 1 MiB string whole costs about a second of CPU and hundreds
of MB for a few hundred kept tokens. The cut is exact (same ids, token types and lengths as
tokenizing the whole document and truncating it):

- It falls before an ASCII space that follows a word character (`_CUT_POINT`). The tokenizers
  accepted by `prefix_cuts_are_exact` treat text in a way that the text after such a space
  cannot change the words before it: their normalizers work character by character (or on
  Unicode normalization segments and grapheme clusters, which a space ends), their
  pre-tokenizers split at spaces or with regexes none of whose matches runs from a non-space
  into a space (and then the normalizers leave the word character a non-space), and their
  models encode each word alone. No added token contains whitespace, so none spans the cut.
- Only the tokens of words *before* the prefix's last word are trusted: whatever the text after
  the cut could still change (a run of spaces merging, a combining mark, a grapheme cluster)
  stays inside that last word. When these trusted tokens number more than `room`, the whole
  document's first `room + 1` tokens are these, so the whole document would be truncated to
  exactly the tokens the prefix is truncated to.
- Otherwise the prefix grows (at least doubling) and is tried again, up to tokenizing the whole
  document, which is also what happens when no cut point follows the budget (text without
  spaces) and for tokenizers this module cannot vouch for.

The same cut serves prompts (`prompt_tokenization`), where the document ends the text it is
encoded in: the text before it changes nothing above.
"""

from __future__ import annotations

import bisect
import functools
import json
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from ..models.families import max_input_length


class PairTokenizationError(ValueError):
    """The request cannot be tokenized as asked; the message says which input and why."""


@dataclass(frozen=True)
class PackedPairs:
    """Pairs of one request, packed back to back.

    input_ids:      [total_tokens] int32
    token_type_ids: [total_tokens] int32 (segment ids; zeros for models without token types)
    lengths:        [num_pairs] int32, tokens of each pair after truncation
    chunk_counts:   [num_documents] int32, pairs (windows) of each document, in order; all 1
                    unless documents are chunked
    """

    input_ids: np.ndarray
    token_type_ids: np.ndarray
    lengths: np.ndarray
    chunk_counts: np.ndarray

    @property
    def document_tokens(self) -> np.ndarray:
        """[num_documents] int32: tokens of every pair scored for each document."""
        starts = np.zeros(len(self.chunk_counts), dtype=np.int64)
        np.cumsum(self.chunk_counts[:-1], out=starts[1:])
        # Summed in int64: a request's tokens are bounded (max_documents full pairs), int32 output is enough.
        return np.add.reduceat(self.lengths.astype(np.int64), starts).astype(np.int32)

    @classmethod
    def pack(cls, encodings: list) -> PackedPairs:
        """Encodings of pairs, back to back, one per document."""
        lengths = np.fromiter((len(e) for e in encodings), dtype=np.int32, count=len(encodings))
        return cls(input_ids=np.concatenate([np.asarray(e.ids, dtype=np.int32) for e in encodings]),
                   token_type_ids=np.concatenate([np.asarray(e.type_ids, dtype=np.int32) for e in encodings]),
                   lengths=lengths, chunk_counts=np.ones(len(encodings), dtype=np.int32))


def window_count(document_tokens: int, room: int, overlap: int) -> int:
    """Windows of `room` document tokens sharing `overlap` that cover a document: one, and past it one
    more every room - overlap tokens, the last reaching the document's end."""
    if document_tokens <= room:
        return 1
    return 1 + -(-(document_tokens - room) // (room - overlap))


@dataclass(frozen=True)
class PairParts:
    """One whole sequence scored for a document, as head (specials and query, or a prompt's head), the
    document's tokens, and tail (specials, or a prompt's suffix)."""

    ids: np.ndarray
    type_ids: np.ndarray
    head: int  # tokens before the document
    end: int  # index after the document's last token

    @classmethod
    def of(cls, encoding) -> PairParts:
        sequences = encoding.sequence_ids
        ids, types = np.asarray(encoding.ids, dtype=np.int32), np.asarray(encoding.type_ids, dtype=np.int32)
        if 1 not in sequences:  # an empty document: the pair is its only window
            return cls(ids, types, len(ids), len(ids))
        return cls(ids, types, sequences.index(1), len(sequences) - sequences[::-1].index(1))

    @property
    def document_tokens(self) -> int:
        return self.end - self.head

    def window_tokens(self, count: int, room: int, step: int) -> int:
        """Tokens of all `count` windows: every window but the last is full."""
        specials = len(self.ids) - self.document_tokens
        return count * specials + (count - 1) * room + self.document_tokens - (count - 1) * step

    def windows(self, count: int, room: int, step: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """(ids, types) of each window: the head, room document tokens from k x step on, the tail."""
        if count == 1:
            return [(self.ids, self.type_ids)]
        head_ids, tail_ids = self.ids[:self.head], self.ids[self.end:]
        head_types, tail_types = self.type_ids[:self.head], self.type_ids[self.end:]
        document_type = self.type_ids[self.head]
        out = []
        for k in range(count):
            start = self.head + k * step
            part = self.ids[start:min(start + room, self.end)]
            out.append((np.concatenate([head_ids, part, tail_ids]),
                        np.concatenate([head_types, np.full(len(part), document_type, dtype=np.int32), tail_types])))
        return out


def pack_windows(parts: list[PairParts], max_length: int, overlap: int, max_chunks_per_doc: int,
                 max_windows: int | None, max_tokens: int | None,
                 explain_room: Callable[[int], str]) -> PackedPairs:
    """The windows of every document, packed in order, each its head, a slice of its document and its tail.

    A document's window holds room = max_length - (head + tail) of its tokens, a new one starting every
    room - overlap tokens. The limits are checked before any window is built; `explain_room(room)` says
    in the refusal what the room is the max input less of.
    """
    rooms = [max_length - (len(part.ids) - part.document_tokens) for part in parts]
    narrow = [room for part, room in zip(parts, rooms, strict=True) if overlap >= room and part.document_tokens > room]
    if narrow:
        room = min(narrow)
        raise PairTokenizationError(
            f"chunk_overlap is {overlap}, but a window holds only {room} document tokens ({explain_room(room)}): "
            f"send a chunk_overlap below {room}")
    counts = np.array([window_count(part.document_tokens, room, overlap) for part, room in zip(parts, rooms, strict=True)],
                      dtype=np.int64)
    worst = int(counts.argmax())
    if counts[worst] > max_chunks_per_doc:
        raise PairTokenizationError(
            f"document {worst} makes {counts[worst]} windows of {rooms[worst]} tokens (overlap {overlap}), more than "
            f"max_chunks_per_doc={max_chunks_per_doc}: raise max_chunks_per_doc, shorten the document, "
            "or send long_documents=truncate")
    if max_windows is not None and counts.sum() > max_windows:
        raise PairTokenizationError(
            f"the documents make {counts.sum()} windows in all; this server scores at most {max_windows} per "
            "request (max_documents x max_chunks_per_doc): split the documents over several requests")
    tokens = sum(part.window_tokens(int(k), room, room - overlap) for part, k, room in zip(parts, counts, rooms, strict=True))
    if max_tokens is not None and tokens > max_tokens:
        raise PairTokenizationError(
            f"the windows of these documents hold {tokens} tokens in all; this server scores at most "
            f"{max_tokens} per request (max_documents full pairs): send fewer or shorter documents, or a "
            "smaller chunk_overlap")
    windows = [window for part, k, room in zip(parts, counts, rooms, strict=True)
               for window in part.windows(int(k), room, room - overlap)]
    lengths = np.fromiter((len(ids) for ids, _ in windows), dtype=np.int32, count=len(windows))
    return PackedPairs(input_ids=np.concatenate([ids for ids, _ in windows]),
                       token_type_ids=np.concatenate([types for _, types in windows]),
                       lengths=lengths, chunk_counts=counts.astype(np.int32))


# Where a document may be cut: before an ASCII space that follows a word character. A space is
# a boundary for every accepted normalizer (it starts a new Unicode normalization segment and
# grapheme cluster) and pre-tokenizer; a word character before it keeps the cut off runs of
# whitespace and punctuation that regex pre-tokenizers glue to newlines.
_CUT_POINT = re.compile(r"(?<=\w) ")

# Normalizers that map text piece by piece, where a space always starts a new piece: single
# characters, Unicode normalization segments, grapheme clusters (Precompiled), or the whole
# text for the ends-only ones (Strip, Prepend).
_LOCAL_NORMALIZERS = frozenset({
    "BertNormalizer", "Lowercase", "NFC", "NFD", "NFKC", "NFKD", "Nmt", "Precompiled", "Prepend", "Strip",
    "StripAccents",
})
# Of those, the ones that never turn a word character into whitespace or nothing, which regex
# pre-tokenizers need (BertNormalizer pads CJK characters with spaces; a charsmap may map
# anything). The cases and compatibility forms of a word character end in a non-space.
_WORD_KEEPING_NORMALIZERS = frozenset({"Lowercase", "NFC", "NFD", "NFKC", "NFKD", "Prepend", "Strip", "StripAccents"})
# Pre-tokenizers that split at characters of a kind (spaces, punctuation, digits, ▁), so
# that a split depends only on the characters around it.
_LOCAL_PRE_TOKENIZERS = frozenset({
    "BertPreTokenizer", "ByteLevel", "CharDelimiterSplit", "Digits", "Metaspace", "Punctuation", "Whitespace",
    "WhitespaceSplit",
})
# Split regexes of the GPT-2 family (GPT-2, which ByteLevel uses when use_regex is on; cl100k
# and Qwen2; Llama 3): each alternative matches only whitespace, or no whitespace, or one
# optional space or symbol at its start and no space after it, so no match runs from a
# non-space into a space, and the words before a space do not depend on what follows it.
_KNOWN_SPLIT_REGEXES = frozenset({
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
})
# Replace patterns that act on one character at a time, or on runs of spaces (the "collapse
# repeated spaces" step of SentencePiece tokenizers).
_ONE_CHARACTER_CLASS = re.compile(r"\[(?:\\.|[^\]\\])+\]")
_SPACE_RUN = re.compile(r"(?: |\\s)(?:\+|\{\d+,\d*\})")
_WORD_MODELS = frozenset({"BPE", "Unigram", "WordLevel", "WordPiece"})


@functools.cache
def _word_characters() -> str:
    """Every character `\\w` matches (what may stand before a cut), in one string."""
    return "".join(ch for ch in map(chr, range(sys.maxunicode + 1)) if ch.isalnum() or ch == "_")


def _component_is_local(spec: dict | None, allowed: frozenset[str], children: str, keep_words: bool) -> bool:
    if spec is None:
        return True
    kind = spec.get("type")
    if kind == "Sequence":
        return all(_component_is_local(child, allowed, children, keep_words) for child in spec.get(children, []))
    if kind == "Replace":
        return _replace_is_local(spec, keep_words)
    if kind == "Split":
        return _split_is_local(spec)
    return kind in allowed


def _replace_is_local(spec: dict, keep_words: bool) -> bool:
    pattern = spec.get("pattern", {})
    if "String" in pattern:
        literal = pattern["String"]
        # A literal without whitespace cannot match across the space at the cut.
        if not literal or any(ch.isspace() for ch in literal):
            return False
        return not keep_words or not any(ch.isalnum() or ch == "_" for ch in literal)
    regex = pattern.get("Regex", "")
    if _SPACE_RUN.fullmatch(regex):
        return True
    if not _ONE_CHARACTER_CLASS.fullmatch(regex):
        return False
    try:
        one_character = re.compile(regex)
    except re.error:
        return False
    # One character at a time; the space at the cut must stay a space and, for regex
    # pre-tokenizers, the word character before it a word character.
    return one_character.fullmatch(" ") is None and not (keep_words and one_character.search(_word_characters()))


def _split_is_local(spec: dict) -> bool:
    pattern = spec.get("pattern", {})
    if spec.get("invert"):
        return False
    if "String" in pattern:
        return len(pattern["String"]) == 1
    return spec.get("behavior") == "Isolated" and pattern.get("Regex") in _KNOWN_SPLIT_REGEXES


def _splits_with_a_regex(spec: dict | None) -> bool:
    if spec is None:
        return False
    if spec.get("type") == "Sequence":
        return any(_splits_with_a_regex(child) for child in spec.get("pretokenizers", []))
    return ((spec.get("type") == "Split" and "Regex" in spec.get("pattern", {}))
            or (spec.get("type") == "ByteLevel" and spec.get("use_regex", True)))


def prefix_cuts_are_exact(tokenizer: Tokenizer) -> bool:
    """Whether a document cut at a `_CUT_POINT` keeps every token before its last word.

    True only for pipelines made of the parts this module knows (see the module docstring);
    anything else, and BPE with dropout (not deterministic), keeps documents whole.
    """
    normalizer = json.loads(tokenizer.normalizer.__getstate__()) if tokenizer.normalizer else None
    pre_tokenizer = json.loads(tokenizer.pre_tokenizer.__getstate__()) if tokenizer.pre_tokenizer else None
    model = type(tokenizer.model).__name__
    if model not in _WORD_MODELS or (model == "BPE" and tokenizer.model.dropout):
        return False
    if any(ch.isspace() for token in tokenizer.get_added_tokens_decoder().values() for ch in token.content):
        return False
    # A regex pre-tokenizer's words before a space are safe only while the character before the
    # cut is still a non-space once normalized.
    keep_words = _splits_with_a_regex(pre_tokenizer)
    normalizers = _WORD_KEEPING_NORMALIZERS if keep_words else _LOCAL_NORMALIZERS
    return (_component_is_local(normalizer, normalizers, "normalizers", keep_words)
            and _component_is_local(pre_tokenizer, _LOCAL_PRE_TOKENIZERS, "pretokenizers", False))


def _cut_point(text: str, budget: int) -> int:
    """The first cut point at or after `budget`, else the last one before it; 0 when there is none.

    Looking back helps a document whose text past the budget has no space (a long run of code,
    CJK, a blob) when its start alone holds enough tokens.
    """
    point = _CUT_POINT.search(text, budget)
    if point is not None:
        return point.start()
    cut = text.rfind(" ", 0, budget)
    while cut > 0 and not _CUT_POINT.match(text, cut):
        cut = text.rfind(" ", 0, cut)
    return max(cut, 0)


def _tokens_before_last_word(word_ids: list[int | None]) -> int:
    """Tokens of an encoding that belong to words other than its last one."""
    if not word_ids or word_ids[-1] is None:
        return 0
    last, end = word_ids[-1], len(word_ids)
    while end and word_ids[end - 1] == last:
        end -= 1
    return end


def cut_documents(tokenizer: Tokenizer, documents: list[str], room: int, chars_per_token: int,
                  context: str = "") -> tuple[list[str], dict[int, int]]:
    """The texts to tokenize, and {index: tokens counted} for those cut.

    A document is replaced by a prefix only when `context + prefix` shows more than `room` trusted
    tokens of the document (see the module docstring); the others stay whole. `context` is the
    text the document follows in its encoding (a prompt's text before the document; none for a
    pair, whose document is a sequence of its own): the document must end that text, as a cut
    document only changes the end. Tokens counted include the context's.
    """
    texts = list(documents)
    counted: dict[int, int] = {}
    first = room * chars_per_token
    # A prefix and its pair encoding cost about twice the prefix: not worth it for a
    # document less than twice as long as the first guess.
    budgets = {i: first for i, doc in enumerate(documents) if len(doc) > 2 * first}
    tried: dict[int, int] = {}
    while budgets:
        cuts = {}
        for i, budget in budgets.items():
            cut = _cut_point(documents[i], budget)
            # No cut point, or none past the last one tried: the document stays whole.
            if cut > tried.get(i, 0):
                cuts[i] = tried[i] = cut
        probes = tokenizer.encode_batch([context + documents[i][:cut] for i, cut in cuts.items()],
                                        add_special_tokens=False)
        budgets = {}
        for (i, cut), probe in zip(cuts.items(), probes, strict=True):
            trusted = _tokens_before_last_word(probe.word_ids)
            # The context's own tokens (those ending before the document) are not the document's.
            before = bisect.bisect_right(probe.offsets, len(context), hi=trusted, key=lambda o: o[1]) if context else 0
            if trusted - before > room:
                texts[i], counted[i] = documents[i][:cut], trusted
                continue
            # Grow to where this prefix's token density says room + 1 tokens end, with a
            # margin, and at least double; stop when tokenizing the whole document once costs
            # about as much as another prefix and its pair.
            wanted = math.ceil(cut * 1.25 * (room + 1) / (trusted - before)) if trusted > before else 0
            budget = max(2 * cut, wanted)
            if 2 * budget <= len(documents[i]):
                budgets[i] = budget
    return texts, counted


def load_model_tokenizer(model_dir: str | Path, max_length: int | None = None) -> tuple[Tokenizer, int]:
    """The fast tokenizer of a model directory, and the most tokens one sequence may have: the
    model's limit (config.json), or the smaller `max_length` given."""
    model_dir = Path(model_dir)
    tokenizer_file = model_dir / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise FileNotFoundError(
            f"{tokenizer_file} not found: the tokenizer step needs a Hugging Face fast tokenizer file. "
            "Save one with `AutoTokenizer.from_pretrained(path).save_pretrained(path)`."
        )
    limit = max_input_length(json.loads((model_dir / "config.json").read_text()))
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    # The file may carry padding/truncation settings from training; we pack, so neither.
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer, min(limit, max_length) if max_length else limit


class PairTokenizer:
    """Encodes (query, document) pairs with the model's own fast tokenizer (`tokenizer.json`).

    The pair template of the tokenizer file gives the model's special tokens
    (`<s> q </s></s> d </s>` for XLM-R, `[CLS] q [SEP] d [SEP]` for BERT). Truncation removes
    document tokens first and keeps the query whole.
    """

    # First guess of the characters that hold one document token: English averages about 4
    # (XLM-R, BERT, Qwen), CJK about 1.5; twice that makes one try enough for ordinary text.
    chars_per_token = 8

    def __init__(self, model_dir: str | Path, max_length: int | None = None):
        self._tokenizer, self.max_length = load_model_tokenizer(model_dir, max_length)
        # Special tokens the pair template adds around (query, document).
        self.num_special_tokens = self._tokenizer.num_special_tokens_to_add(is_pair=True)
        self.cuts_documents = prefix_cuts_are_exact(self._tokenizer)

    @property
    def fast_tokenizer(self) -> Tokenizer:
        """The model's own `tokenizers.Tokenizer` (for its vocabulary and decoding; encode pairs with `encode`)."""
        return self._tokenizer

    def encode(self, query: str, documents: list[str], truncate: bool = True, direction: str = "right",
               max_document_tokens: int | None = None) -> PackedPairs:
        """The pairs of `query` with each document, packed. A pair that does not fit the model is cut
        (truncate: at the document's end, or with direction="left" at its start) or refused;
        max_document_tokens keeps at most that many tokens of each document (with truncate)."""
        if max_document_tokens is not None and not truncate:
            raise PairTokenizationError("max_tokens_per_doc shortens documents: it needs truncate=true")
        query_tokens, room = self._room(query, documents)
        if max_document_tokens is not None:
            room = min(room, max_document_tokens)
        # Cutting a prefix off before tokenizing is exact only where the end is what truncation drops.
        cuts = self.cuts_documents and direction == "right"
        texts, counted = self._cut(documents, room) if cuts else (list(documents), {})
        if truncate:
            # One batched call (Rust, parallel) for all pairs. Truncation leaves a pair that fits
            # as it is, so each document is tokenized once whether or not it is too long.
            self._tokenizer.enable_truncation(self.num_special_tokens + query_tokens + room,
                                              strategy="only_second", direction=direction)
            try:
                encodings = self._tokenizer.encode_batch([(query, text) for text in texts])
            finally:
                self._tokenizer.no_truncation()
        else:
            # Cut documents are known to be too long: a refusal, naming the first too-long one.
            whole = [i for i in range(len(texts)) if i not in counted]
            encodings = [None] * len(texts)
            for i, encoding in zip(whole, self._tokenizer.encode_batch([(query, texts[i]) for i in whole]),
                                   strict=True):
                encodings[i] = encoding
            too_long = [i for i in whole if len(encodings[i]) > self.max_length] + list(counted)
            if too_long:
                raise PairTokenizationError(self._too_long_message(min(too_long), encodings, counted, texts,
                                                                   query_tokens))
        return PackedPairs.pack(encodings)

    def encode_chunked(self, query: str, documents: list[str], overlap: int = 32, max_chunks_per_doc: int = 64,
                       max_windows: int | None = None, max_tokens: int | None = None) -> PackedPairs:
        """The pairs of `query` with windows of each document, packed, every document's windows in order.

        A document that fits is one pair, as with `encode`. A longer one is split into windows of
        W = room document tokens (the model's max input less the query's and the special tokens),
        a new one starting every W - overlap tokens; the last may be shorter: the windows the
        tokenizers library cuts with `stride=overlap` (what question-answering models use). More
        than max_chunks_per_doc windows for one document, max_windows for the request, or
        max_tokens in all its pairs is refused before any window is built.
        """
        query_tokens, room = self._room(query, documents)
        # Each pair whole, once; windows are cut from its ids. (The library's own overflowing
        # windows would be built before any limit could be checked, and it types an XLM-R
        # window's document tokens 1 where the pair template says 0.)
        pairs = [PairParts.of(encoding) for encoding in self._tokenizer.encode_batch(
            [(query, document) for document in documents])]
        return pack_windows(
            pairs, self.max_length, overlap, max_chunks_per_doc, max_windows, max_tokens,
            lambda room: (f"the model's max input of {self.max_length} less the query's {query_tokens} and "
                          f"{self.num_special_tokens} special tokens"))

    def _room(self, query: str, documents: list[str]) -> tuple[int, int]:
        """(query tokens, document tokens a pair has room for); refuses an empty request or a query too long."""
        if not documents:
            raise PairTokenizationError("DOCUMENTS is empty: send at least one document")
        query_tokens = len(self._tokenizer.encode(query, add_special_tokens=False))
        room = self.max_length - self.num_special_tokens - query_tokens
        if room < 1:
            raise PairTokenizationError(
                f"the query has {query_tokens} tokens; with the special tokens it leaves no room for a "
                f"document within the model's max input of {self.max_length} tokens: shorten the query"
            )
        return query_tokens, room

    def _too_long_message(self, i: int, encodings: list, counted: dict[int, int], texts: list[str],
                          query_tokens: int) -> str:
        if i in counted:
            # Counting stopped once the pair was known to be too long: a lower bound.
            tokens = query_tokens + self.num_special_tokens + counted[i]
            size = f"{tokens} tokens or more (counted on its first {len(texts[i])} characters)"
        else:
            size = f"{len(encodings[i])} tokens"
        return (f"document {i} makes a pair of {size}, more than the model's max input of {self.max_length}; "
                "shorten it, or send long_documents=truncate or chunk")

    def _cut(self, documents: list[str], room: int) -> tuple[list[str], dict[int, int]]:
        """The texts to tokenize, and {index: document tokens counted} for those cut."""
        return cut_documents(self._tokenizer, documents, room, self.chars_per_token)
