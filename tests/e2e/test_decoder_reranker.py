"""A decoder reranker (Qwen3-Reranker) served end to end by `triton-rerank serve --model-path DIR`.

The model is a tiny random-weight Qwen3ForCausalLM with the real Qwen3 tokenizer (from the shared
data folder; skipped without it). The reference is Qwen3-Reranker's own recipe run with
transformers alone, one document at a time in float32: the prompt built from its PREFIX, the
instruction/query/document middle (truncated to max_length less the prefix and suffix) and its
SUFFIX, each encoded separately; P(yes) = softmax over the last token's (no, yes) logits.
Tolerance: 1e-4 on logit(yes) - logit(no), float32 (different kernels sum in different orders).
"""

import json
import math
import signal
import subprocess
import sys

import numpy as np
import pytest
import requests
import torch

from triton_rerank.launcher.server import free_ports, process_group_alive

PREFIX = ('<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct '
          'provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n')
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
QUERY = "What is the capital of China?"
DOCUMENTS = [
    "The capital of China is Beijing.",
    "Gravity is a force that attracts two bodies towards each other.",
    "",
    " Beijing, 北京, has been the capital for centuries 🏯.",
    "The giant panda lives in the mountains of central China and eats bamboo. " * 3,
]
MAX_LENGTH = 2048  # the tiny model's max_position_embeddings
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def decoder_dir(tmp_path_factory):
    from triton_rerank.bench.random_model import make_test_decoder, qwen3_tokenizer_file

    try:
        qwen3_tokenizer_file()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    return make_test_decoder(tmp_path_factory.mktemp("qwen3") / "model")


class Reference:
    """Qwen3-Reranker's recipe with transformers alone, float32, one document at a time."""

    def __init__(self, model_dir):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                          attn_implementation="eager").eval()
        self.yes, self.no = self.tokenizer.convert_tokens_to_ids("yes"), self.tokenizer.convert_tokens_to_ids("no")
        self.prefix = self.tokenizer.encode(PREFIX, add_special_tokens=False)

    def prompt(self, query: str, document: str, instruction: str | None = None, suffix: str = SUFFIX) -> list[int]:
        suffix_ids = self.tokenizer.encode(suffix, add_special_tokens=False)
        middle = f"<Instruct>: {instruction or DEFAULT_INSTRUCTION}\n<Query>: {query}\n<Document>: {document}"
        ids = self.tokenizer(middle, truncation="longest_first", add_special_tokens=False,
                             max_length=MAX_LENGTH - len(self.prefix) - len(suffix_ids))["input_ids"]
        return self.prefix + ids + suffix_ids

    @torch.inference_mode()
    def logits(self, query: str, documents: list[str], instruction: str | None = None,
               suffix: str = SUFFIX) -> np.ndarray:
        """logit(yes) - logit(no) of each document (the prompt may end in another suffix)."""
        out = []
        for document in documents:
            last = self.model(torch.tensor([self.prompt(query, document, instruction, suffix)])).logits[0, -1]
            out.append(float(last[self.yes] - last[self.no]))
        return np.array(out)

    def p_yes(self, query: str, documents: list[str], instruction: str | None = None) -> np.ndarray:
        """The official score: softmax over (no, yes) of the last token, P(yes)."""
        return 1 / (1 + np.exp(-self.logits(query, documents, instruction)))


@pytest.fixture(scope="module")
def reference(decoder_dir):
    return Reference(decoder_dir)


@pytest.fixture(scope="module")
def served(decoder_dir, tmp_path_factory, serve_banner):
    """`triton-rerank serve --model-path DIR` on the tiny Qwen3 reranker: {http, grpc, api} ports."""
    run = tmp_path_factory.mktemp("serve-qwen3")
    http, grpc, metrics, api = free_ports(4)
    command = [sys.executable, "-m", "triton_rerank", "serve", "--model-path", str(decoder_dir), "--device", "cpu",
               "--dtype", "float32", "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port",
               str(metrics), "--api-port", str(api), "--run-dir", str(run / "run"), "--max-documents", "64"]
    serve = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    banner = serve_banner(serve, 240)
    try:
        assert "is ready" in banner, banner
        yield {"http": http, "grpc": grpc, "api": api, "run": run / "run", "banner": banner}
    finally:
        serve.send_signal(signal.SIGINT)
        try:
            serve.wait(60)
        except subprocess.TimeoutExpired:
            serve.kill()
        assert not process_group_alive(serve.pid), "serve left processes behind"


def ensemble_scores(protocol: str, port: int, documents: list[str], **parameters) -> np.ndarray:
    """SCORES of the `reranker` ensemble, called with tritonclient as a user does."""
    if protocol == "grpc":
        import tritonclient.grpc as client
    else:
        import tritonclient.http as client
    with client.InferenceServerClient(f"127.0.0.1:{port}") as triton:
        query = client.InferInput("QUERY", [1], "BYTES")
        query.set_data_from_numpy(np.array([QUERY.encode()], dtype=object))
        docs = client.InferInput("DOCUMENTS", [len(documents)], "BYTES")
        docs.set_data_from_numpy(np.array([d.encode() for d in documents], dtype=object))
        result = triton.infer("reranker", [query, docs], parameters=parameters or None)
        return result.as_numpy("SCORES").reshape(-1)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_serve_detects_the_decoder_and_clients_can_ask(served, protocol):
    from triton_rerank.client import RerankClient

    with RerankClient(f"127.0.0.1:{served[protocol]}", protocol) as client:
        assert client.reranker_kind() == "decoder"


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_ensemble_scores_are_the_reference_logit_difference(served, reference, protocol):
    scores = ensemble_scores(protocol, served[protocol], DOCUMENTS)
    expected = reference.logits(QUERY, DOCUMENTS)
    assert np.abs(scores - expected).max() <= TOLERANCE, (scores, expected)
    assert expected.std() > 0.05, "the test model must tell these documents apart"


def test_instruction_parameter_changes_scores_as_the_reference(served, reference):
    instruction = "Given a question about pandas, find passages about animals"
    scores = ensemble_scores("grpc", served["grpc"], DOCUMENTS, instruction=instruction)
    expected = reference.logits(QUERY, DOCUMENTS, instruction)
    assert np.abs(scores - expected).max() <= TOLERANCE
    assert np.abs(expected - reference.logits(QUERY, DOCUMENTS)).max() > 1e-3


def test_a_document_scores_the_same_alone_and_packed_with_others(served):
    together = ensemble_scores("grpc", served["grpc"], DOCUMENTS * 3)
    for i, document in enumerate(DOCUMENTS):
        alone = ensemble_scores("grpc", served["grpc"], [document])[0]
        assert abs(alone - together[i]) <= 1e-5
        assert abs(together[i] - together[i + len(DOCUMENTS)]) <= 1e-5


def test_truncation_cuts_the_document_and_keeps_the_prompt_head_and_suffix(served, reference):
    long_document = "Beijing is the capital of China and a very large city. " * 400  # ~4,800 tokens
    assert len(reference.prompt(QUERY, long_document)) == MAX_LENGTH
    scores = ensemble_scores("grpc", served["grpc"], [long_document, DOCUMENTS[0]])
    assert np.abs(scores - reference.logits(QUERY, [long_document, DOCUMENTS[0]])).max() <= TOLERANCE


def test_sglang_route_answers_p_yes_with_and_without_instruct(served, reference):
    url = f"http://127.0.0.1:{served['api']}/v1/rerank"
    for instruct in (None, "Find passages that name a city"):
        body = {"query": QUERY, "documents": DOCUMENTS} | ({"instruct": instruct} if instruct else {})
        response = requests.post(url, json=body, timeout=120)
        assert response.status_code == 200, response.text
        got = {item["index"]: item["score"] for item in response.json()}
        expected = reference.p_yes(QUERY, DOCUMENTS, instruct)
        assert max(abs(got[i] - expected[i]) for i in range(len(DOCUMENTS))) <= TOLERANCE / 4
        # Sorted by P(yes), best first.
        assert [item["index"] for item in response.json()] == sorted(range(len(DOCUMENTS)),
                                                                    key=lambda i: (-got[i], i))


def test_tei_and_cohere_routes_take_an_instruction_and_answer_sigmoid(served, reference):
    instruction = "Find passages that name a city"
    expected = reference.p_yes(QUERY, DOCUMENTS, instruction)
    api = f"http://127.0.0.1:{served['api']}"
    tei = requests.post(f"{api}/rerank", json={"query": QUERY, "texts": DOCUMENTS, "instruction": instruction},
                        timeout=120)
    cohere = requests.post(f"{api}/v2/rerank", json={"query": QUERY, "documents": DOCUMENTS,
                                                     "instruction": instruction}, timeout=120)
    assert tei.status_code == 200 and cohere.status_code == 200, (tei.text, cohere.text)
    assert max(abs(r["score"] - expected[r["index"]]) for r in tei.json()) <= TOLERANCE / 4
    assert max(abs(r["relevance_score"] - expected[r["index"]]) for r in cohere.json()["results"]) <= TOLERANCE / 4


@pytest.mark.parametrize(("parameters", "message"), [
    ({"instruction": "x" * ((1 << 20) + 1)}, "bytes; this server takes at most"),
    ({"instruction": 7}, "must be a string"),
])
def test_bad_instructions_are_invalid_arg_and_the_server_carries_on(served, reference, parameters, message):
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException) as caught:
        ensemble_scores("grpc", served["grpc"], DOCUMENTS[:2], **parameters)
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT" and message in caught.value.message()
    assert np.abs(ensemble_scores("grpc", served["grpc"], DOCUMENTS[:2])
                  - reference.logits(QUERY, DOCUMENTS[:2])).max() <= TOLERANCE


def test_an_empty_instruction_list_is_refused_by_the_gateway(served):
    response = requests.post(f"http://127.0.0.1:{served['api']}/v1/rerank",
                             json={"query": QUERY, "documents": DOCUMENTS, "instruct": []}, timeout=60)
    assert response.status_code == 422 and "instruct" in response.text


def test_a_cross_encoder_refuses_an_instruction(xlmr_server):
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException) as caught:
        ensemble_scores("grpc", xlmr_server.address.grpc_port, ["a"], instruction="Find recipes")
    assert "takes none" in caught.value.message()
    assert math.isfinite(ensemble_scores("grpc", xlmr_server.address.grpc_port, ["a"])[0])


def test_readme_decoder_example_runs_against_the_served_model(served, readme):
    examples = readme.examples(decoder=True)
    assert examples, "the README has a decoder reranker example"
    for example in examples:
        code = readme.localize(example, served["http"], served["grpc"], served["api"])
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("decoder"), result.stdout


def test_rerank_cli_sends_the_instruction(served, reference):
    instruction = "Find passages that name a city"
    command = [sys.executable, "-m", "triton_rerank", "rerank", "--url", f"127.0.0.1:{served['grpc']}", "--query",
               QUERY, "--json", "--instruction", instruction, *DOCUMENTS[:2]]
    printed = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert printed.returncode == 0, printed.stderr
    got = {r["index"]: r["score"] for r in json.loads(printed.stdout)}
    expected = reference.logits(QUERY, DOCUMENTS[:2], instruction)
    assert max(abs(got[i] - expected[i]) for i in range(2)) <= TOLERANCE


# A Jinja file that reads its variables the way SGLang's qwen3_reranker.jinja does (messages[0] the
# query, messages[1] the document, instruct with a default) and, like that file, ends the prompt at
# the assistant's turn, without the recipe's empty think block. Jinja drops a file's final newline,
# so the last one is an expression.
NO_THINK_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"
TEMPLATE = (PREFIX + "<Instruct>: {{ instruct | default(\"" + DEFAULT_INSTRUCTION + "\") }}\n"
            "<Query>: {{ messages[0]['content'] }}\n<Document>: {{ messages[1].content }}"
            + NO_THINK_SUFFIX[:-1] + "{{ '\\n' }}\n")


def test_a_chat_template_and_a_default_instruction_set_at_start(decoder_dir, reference, start_extra_server, tmp_path):
    template = tmp_path / "qwen3_reranker.jinja"
    template.write_text(TEMPLATE)
    instruction = "Given a question about cities, find passages that name one"
    running = start_extra_server(decoder_dir, "qwen3", prompt_template=str(template),
                                 default_instruction=instruction)
    port = running.address.grpc_port
    # The template's prompt is scored, with the server's default instruction for requests that send
    # none; a request's own instruction still wins.
    expected = reference.logits(QUERY, DOCUMENTS, instruction, suffix=NO_THINK_SUFFIX)
    assert np.abs(ensemble_scores("grpc", port, DOCUMENTS) - expected).max() <= TOLERANCE
    assert np.abs(expected - reference.logits(QUERY, DOCUMENTS, instruction)).max() > 1e-3, "the template counts"
    assert np.abs(ensemble_scores("grpc", port, DOCUMENTS, instruction=DEFAULT_INSTRUCTION)
                  - reference.logits(QUERY, DOCUMENTS, suffix=NO_THINK_SUFFIX)).max() <= TOLERANCE


def test_shared_heads_leave_every_score_unchanged(served, decoder_dir, start_extra_server):
    """The served model computes a request's shared prompt head once (the default); a server started
    with prefix_sharing off runs every prompt whole. Same scores (fp32, 1e-5), for requests of one and
    many documents, different instructions, documents that are prefixes of one another, empty,
    truncated and chunked documents, sent concurrently so that Triton batches them together."""
    from concurrent.futures import ThreadPoolExecutor

    whole = start_extra_server(decoder_dir, "qwen3", prefix_sharing=False)
    long_document = "Beijing is the capital of China and a very large city. " * 400
    requests = [
        (DOCUMENTS, {}),
        (DOCUMENTS[:1], {}),
        (["Beijing", "Beijing is", "Beijing is the capital", "", ""], {"instruction": "Find the capital"}),
        ([long_document, "short", long_document[:500]], {}),
        ([long_document, "tiny"], {"long_documents": "chunk", "chunk_overlap": 64}),
        (DOCUMENTS[::-1], {"instruction": "Another task entirely, described at some length to shift the head"}),
    ]

    def both(request):
        documents, parameters = request
        return (ensemble_scores("grpc", served["grpc"], documents, **parameters),
                ensemble_scores("grpc", whole.address.grpc_port, documents, **parameters))

    with ThreadPoolExecutor(len(requests)) as pool:
        for shared, unshared in pool.map(both, requests * 2):
            assert np.abs(shared - unshared).max() <= 1e-5, (shared, unshared)
