"""Prompts for decoder-LLM rerankers (Qwen3-Reranker), packed like the cross-encoders' pairs.

A decoder reranker reads one prompt per (query, document) and answers "yes" or "no". The
built-in prompt is Qwen3-Reranker's own recipe, token for token:

    ids = encode(PREFIX) + encode(middle)[:max_length - len(prefix ids) - len(suffix ids)] + encode(SUFFIX)
    middle = f"<Instruct>: {instruction}\\n<Query>: {query}\\n<Document>: {document}"

each part encoded on its own, without special tokens added. `PromptTokenizer` has the surface of
`PairTokenizer` (max_length, encode, encode_chunked, the same errors), so the tokenizer step calls
either; token types are all zeros.

Every prompt is three separately encoded texts: a head, a middle `before + document + after`,
and a tail (PREFIX, the middle above with nothing after the document, SUFFIX). The document's
tokens are the middle's tokens whose characters overlap the document's, except that one running
past its end belongs to the text after it: a token straddling the document's start (" word", its
space the template's) is the document's, as the recipe's truncation needs, while the template's
text after the document stays whole (" \n" of a document ending in a space and a template
newline is the template's). Truncation, windows and
max_document_tokens act on those tokens only, so the head (system prompt, instruction, query)
and the tail are never cut. Cutting the document's end keeps the middle's first tokens, which
is the recipe's truncation. Long documents are cut before tokenizing as `PairTokenizer` does
(`cut_documents`), exact because the document ends the middle (a template with text between the
document and the next special token has its documents tokenized whole).

A Jinja template (`--chat-template FILE`, as SGLang and vLLM serve Qwen3-Reranker) may replace
the recipe. It is rendered in a sandbox with `query`, `document`, `instruction` and `instruct`
(both the instruction; left undefined when none is given, so that the template's own default
applies) and `messages` = [{"role": "query", ...}, {"role": "document", ...}], which covers the
templates of both servers. The options are those Hugging Face renders chat templates with:
trim_blocks, lstrip_blocks, and Jinja's default of dropping one newline at the end of the file
(end a prompt that must end in a newline with an expression, {{ "\\n" }}).

The template is rendered with a sentinel in place of the document and split around it; one that
does not render the document exactly once and verbatim is refused. Servers encode the rendered
text as one string. The tokenizer splits text at added tokens (<|im_start|>, <|im_end|>) before
anything else, so the text is split there too: the head ends at the last such token before the
document, the tail starts at the first one after it, and encoding the three apart gives the one
string's tokens. Every request checks this on its document-less prompt, and keeps the prompt in
one piece where it does not hold.
"""

from __future__ import annotations

import bisect
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .tokenization import (
    PackedPairs,
    PairParts,
    PairTokenizationError,
    cut_documents,
    load_model_tokenizer,
    pack_windows,
    prefix_cuts_are_exact,
)

PREFIX = ('<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the '
          'Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n')
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"


class PromptTemplateError(ValueError):
    """A prompt template that cannot be used; the message says why and what to change."""


@dataclass(frozen=True)
class _Prompt:
    """The separately encoded texts of a prompt around its document: head, before + document + after, tail."""

    head: str
    before: str
    after: str
    tail: str


class PromptTemplate:
    """A Jinja prompt template, rendered around a document (see the module docstring)."""

    # Documents that a template rendering its document verbatim and nothing else from it must
    # show as they are: empty, spaced, markup and Jinja syntax, longer than `truncate`'s 255.
    _PROBES = ("", "x", "  spaced\tout \n", "<b>&amp;'\"{{ x }}</b>", "word " * 100)

    def __init__(self, source: str, name: str = "the prompt template"):
        # Imported here: only servers given a template pay for Jinja.
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        self.name = name
        # The options Hugging Face renders chat templates with; StrictUndefined makes a misspelled
        # variable an error instead of an empty string.
        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                    extensions=["jinja2.ext.loopcontrols"],
                                                    undefined=jinja2.StrictUndefined)
        try:
            self._template = environment.from_string(source)
        except jinja2.TemplateSyntaxError as error:
            raise PromptTemplateError(f"{name} is not valid Jinja: {error.message} (line {error.lineno})") from None
        self._sentinel = f"DOCUMENT{secrets.token_hex(16)}"
        for instruction in (None, "an instruction"):
            head, tail = self.render_around("a query", instruction)
            for document in self._PROBES:
                if self._render("a query", document, instruction) != head + document + tail:
                    raise PromptTemplateError(
                        f"{name} changes the document or depends on it ({document!r} does not appear as it is "
                        "between the same text): write the document once, as {{ document }}, with no filter or "
                        "condition on it")

    def render_around(self, query: str, instruction: str | None) -> tuple[str, str]:
        """The rendered text before the document and after it."""
        text = self._render(query, self._sentinel, instruction)
        if text.count(self._sentinel) != 1:
            raise PromptTemplateError(
                f"{self.name} renders the document {text.count(self._sentinel)} times as it is: a prompt holds "
                "it exactly once and unchanged, written {{ document }} (or messages[1].content) with no filter")
        head, tail = text.split(self._sentinel)
        return head, tail

    def _render(self, query: str, document: str, instruction: str | None) -> str:
        import jinja2

        variables = {"query": query, "document": document,
                     "messages": [{"role": "query", "content": query}, {"role": "document", "content": document}]}
        if instruction is not None:
            variables["instruction"] = variables["instruct"] = instruction
        try:
            return self._template.render(variables)
        except jinja2.UndefinedError as error:
            raise PromptTemplateError(
                f"{self.name} uses an undefined variable ({error.message}): it is given query, document, "
                "messages and, when there is one, instruction (also named instruct); give an optional one a "
                "default, as in {{ instruction | default(\"...\") }}") from None
        except jinja2.TemplateError as error:
            raise PromptTemplateError(f"{self.name} failed to render: {error}") from None


def load_prompt_template(path: str | Path) -> PromptTemplate:
    """The Jinja prompt template of a file; refuses a missing file and a template it cannot use."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt template {path} not found: give the path of a Jinja template file")
    return PromptTemplate(path.read_text(encoding="utf-8"), name=f"prompt template {path}")


def _document_span(encoding, start: int, end: int) -> tuple[int, int]:
    """The document's tokens in an encoding, (first, after the last), the document being characters
    [start, end): those that end past its start and not past its end (tokens end in order)."""
    offsets = encoding.offsets
    first = bisect.bisect_right(offsets, start, key=lambda offset: offset[1])
    return first, bisect.bisect_right(offsets, end, lo=first, key=lambda offset: offset[1])


class PromptTokenizer:
    """Encodes (query, document) prompts for a decoder reranker with the model's fast tokenizer.

    A request's instruction None is `default_instruction`, else the recipe's DEFAULT_INSTRUCTION
    (or the template's own default).
    """

    chars_per_token = 8  # the first guess of the document cut, as PairTokenizer's

    def __init__(self, model_dir: str | Path, max_length: int | None = None, template: PromptTemplate | None = None,
                 default_instruction: str | None = None):
        self._tokenizer, self.max_length = load_model_tokenizer(model_dir, max_length)
        self.template = template
        self.default_instruction = default_instruction
        self.cuts_documents = prefix_cuts_are_exact(self._tokenizer)
        # Where text may be split with no change to its tokens: at added tokens the tokenizer
        # matches on the raw text and that take no space around them.
        self._splitters = [token.content for token in self._tokenizer.get_added_tokens_decoder().values()
                           if not (token.normalized or token.lstrip or token.rstrip or token.single_word)]
        if template is not None:
            self._prompt("a query", default_instruction)  # a template the tokenizer cannot split fails now

    def encode(self, query: str, documents: list[str], truncate: bool = True, direction: str = "right",
               max_document_tokens: int | None = None, instruction: str | None = None) -> PackedPairs:
        """The prompt of `query` with each document, packed. A prompt that does not fit the model has its
        document cut (truncate: at its end, or with direction="left" at its start) or is refused;
        max_document_tokens keeps at most that many tokens of each document (with truncate)."""
        if max_document_tokens is not None and not truncate:
            raise PairTokenizationError("max_tokens_per_doc shortens documents: it needs truncate=true")
        prompt, head_ids, tail_ids = self._frame(query, documents, instruction)
        fixed = len(head_ids) + len(tail_ids)
        # No document keeps more tokens than this (each keeps fewer by the middle's own tokens
        # around it): enough for the cut, which needs only a bound.
        room = self.max_length - fixed
        if max_document_tokens is not None:
            room = min(room, max_document_tokens)
        cuts = self.cuts_documents and direction == "right" and not prompt.after
        texts, counted = (cut_documents(self._tokenizer, documents, room, self.chars_per_token, context=prompt.before)
                          if cuts else (list(documents), {}))
        start = len(prompt.before)
        encodings = self._tokenizer.encode_batch([prompt.before + text + prompt.after for text in texts],
                                                 add_special_tokens=False)
        sequences, too_long = [], []
        for i, (text, encoding) in enumerate(zip(texts, encodings, strict=True)):
            ids = np.asarray(encoding.ids, dtype=np.int32)
            first, last = _document_span(encoding, start, start + len(text))
            keep = max(0, self.max_length - fixed - first - (len(ids) - last))
            if max_document_tokens is not None:
                keep = min(keep, max_document_tokens)
            if i in counted or last - first > keep:
                if not truncate:
                    too_long.append(i)
                elif direction == "left":
                    ids = np.concatenate([ids[:first], ids[last - keep:]])
                else:
                    ids = np.concatenate([ids[:first + keep], ids[last:]])
            sequences.append(np.concatenate([head_ids, ids, tail_ids]))
        if too_long:
            i = too_long[0]
            size = (f"{fixed + counted[i]} tokens or more (counted on its first {len(texts[i])} characters)"
                    if i in counted else f"{len(sequences[i])} tokens")
            raise PairTokenizationError(
                f"document {i} makes a prompt of {size}, more than the model's max input of {self.max_length}; "
                "shorten it, or send long_documents=truncate or chunk")
        lengths = np.fromiter(map(len, sequences), dtype=np.int32, count=len(sequences))
        input_ids = np.concatenate(sequences)
        return PackedPairs(input_ids=input_ids, token_type_ids=np.zeros_like(input_ids), lengths=lengths,
                           chunk_counts=np.ones(len(sequences), dtype=np.int32))

    def encode_chunked(self, query: str, documents: list[str], overlap: int = 32, max_chunks_per_doc: int = 64,
                       max_windows: int | None = None, max_tokens: int | None = None,
                       instruction: str | None = None) -> PackedPairs:
        """The prompts of `query` with windows of each document, packed, every document's windows in order.

        As `PairTokenizer.encode_chunked`: a document that fits is one prompt; a longer one is split
        into windows of the document tokens the prompt has room for, a new one every room - overlap
        tokens, each window with the whole head and tail. The same limits, checked before any
        window is built.
        """
        prompt, head_ids, tail_ids = self._frame(query, documents, instruction)
        start = len(prompt.before)
        parts = []
        for document, encoding in zip(documents, self._tokenizer.encode_batch(
                [prompt.before + document + prompt.after for document in documents], add_special_tokens=False),
                strict=True):
            ids = np.concatenate([head_ids, np.asarray(encoding.ids, dtype=np.int32), tail_ids])
            first, last = _document_span(encoding, start, start + len(document))
            parts.append(PairParts(ids, np.zeros_like(ids), len(head_ids) + first, len(head_ids) + last))
        return pack_windows(
            parts, self.max_length, overlap, max_chunks_per_doc, max_windows, max_tokens,
            lambda room: (f"the model's max input of {self.max_length} less the prompt's {self.max_length - room} "
                          "other tokens: system prompt, instruction, query and suffix"))

    def _prompt(self, query: str, instruction: str | None) -> _Prompt:
        if instruction is None:
            instruction = self.default_instruction
        if self.template is None:
            if instruction is None:
                instruction = DEFAULT_INSTRUCTION
            return _Prompt(PREFIX, f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: ", "", SUFFIX)
        try:
            before, after = self.template.render_around(query, instruction)
        except PromptTemplateError as error:
            raise PairTokenizationError(f"this request's prompt cannot be built: {error}") from None
        # Split at the last added token before the document and the first after it.
        cut_head = max((before.rfind(token) + len(token) for token in self._splitters if token in before), default=0)
        cut_tail = min((after.find(token) for token in self._splitters if token in after), default=len(after))
        prompt = _Prompt(before[:cut_head], before[cut_head:], after[:cut_tail], after[cut_tail:])
        whole, *parts = self._tokenizer.encode_batch(
            [before + after, prompt.head, prompt.before + prompt.after, prompt.tail], add_special_tokens=False)
        if whole.ids != [i for part in parts for i in part.ids]:
            return _Prompt("", before, after, "")
        return prompt

    def _frame(self, query: str, documents: list[str], instruction: str | None) -> tuple[_Prompt, np.ndarray,
                                                                                        np.ndarray]:
        """The request's prompt and the ids of its head and tail; refuses an empty request or a head too long."""
        if not documents:
            raise PairTokenizationError("DOCUMENTS is empty: send at least one document")
        prompt = self._prompt(query, instruction)
        head, middle, tail = self._tokenizer.encode_batch([prompt.head, prompt.before + prompt.after, prompt.tail],
                                                          add_special_tokens=False)
        first, _ = _document_span(middle, len(prompt.before), len(prompt.before))
        head_tokens, tail_tokens = len(head) + first, len(middle) - first + len(tail)
        if head_tokens + tail_tokens >= self.max_length:
            raise PairTokenizationError(
                f"the prompt head (system prompt, instruction and query) has {head_tokens} tokens and its suffix "
                f"{tail_tokens}: they leave no room for a document within the model's max input of "
                f"{self.max_length} tokens: shorten the query or the instruction")
        return prompt, np.asarray(head.ids, dtype=np.int32), np.asarray(tail.ids, dtype=np.int32)
