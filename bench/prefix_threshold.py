"""`triton-rerank bench-prefix-threshold`: from how many shared tokens a request's head pays to compute once.

The scoring step runs a decoder-reranker request's common prompt head once when it is at least
`min_shared_prefix` tokens long (serving/prefix_sharing.py). Computing the head once saves
(documents - 1) x head tokens of every layer's projections and MLP, against costs that do not
shrink with the head: the plan and gather of the head, a second attention form (own rows against
head and own keys), the head's rows beside the documents'. This benchmark measures where the
saving overtakes them, in process, on the scoring step itself (`score_requests` on the packed
decoder, the server's code path without the server):

- one synthetic request per point: `documents` documents whose prompts share exactly `head` leading
  tokens, each document's own tokens a length drawn from --own-tokens (60-130 by default, a DL19
  passage with the prompt's tail), random token ids (speed does not depend on them); the same
  documents behind every head length of a request size;
- each point scored with sharing off (every prompt whole) and on (min_shared_prefix 1), interleaved,
  --repeat times after a warm-up, the order swapped every repeat, each repeat on other documents
  (a matmul's speed moves with its row count alone: see measure_point);
- the measured gain (whole time over shared time, median of the repeats' ratios, with its quartiles)
  beside the gain the token counts predict (whole tokens over the server's plan's tokens).

The threshold is the shortest head from which the shared path is faster in at least 3 of 4 repeats
(the gain's lower quartile 1 or more) there and at every longer head measured, for every request
size: a rule that a gain within the machine's noise of 1 does not pass. Writes threshold.csv and threshold.md to --out, and prints the table.
The committed measurement (the 0.6B shape in bfloat16 on 2 cores, about 10 minutes):

    triton-rerank bench-prefix-threshold --out results/cpu-prefix-threshold
"""

from __future__ import annotations

import argparse
import csv
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..models.dtypes import DTYPE_NAMES
from . import report
from .decoder_reranker import config_file as decoder_config_file
from .long_documents import _levels

QUICK = {"docs": [2, 4], "heads": [1, 8, 32], "repeat": 2}
FULL = {"docs": [2, 8], "heads": [1, 2, 4, 8, 12, 16, 24, 32, 64], "repeat": 7}
# Token ids are drawn from here: inside every Qwen3 vocabulary, clear of the special tokens at its end.
_TOKEN_RANGE = (1000, 100_000)


def synthetic_request(documents: int, head: int, own_tokens: tuple[int, int], rng: np.random.Generator):
    """A PackedRequest of `documents` prompts sharing exactly `head` leading tokens.

    Each prompt's own tokens (after the head) number uniformly in own_tokens (inclusive); their first
    token differs from every other prompt's, so the common prefix ends where the head does.
    """
    from ..serving.packed_inputs import PackedRequest

    low, high = own_tokens
    # The documents first, the head last: one seed gives the same documents behind every head length.
    first = rng.choice(np.arange(*_TOKEN_RANGE), size=documents, replace=False)
    own = [np.concatenate([[first[i]], rng.integers(*_TOKEN_RANGE, size=int(n) - 1)])
           for i, n in enumerate(rng.integers(low, high + 1, size=documents))]
    head_ids = rng.integers(*_TOKEN_RANGE, size=head)
    prompts = [np.concatenate([head_ids, o]) for o in own]
    ids = np.concatenate(prompts).astype(np.int32)
    return PackedRequest(ids, np.zeros_like(ids), np.array([len(p) for p in prompts], dtype=np.int32),
                         np.ones(documents, dtype=np.int32))


def planned_tokens(request, head: int, max_batch_tokens: int) -> int:
    """Tokens the server's shared plan computes for `request`: its head once per micro-batch, every own token."""
    from ..serving.prefix_sharing import SharingPairs, plan_shared_micro_batches

    pairs = SharingPairs.split([(request.input_ids, request.lengths, head)])
    batches = plan_shared_micro_batches(pairs.own_lengths, pairs.group, np.array([head]), max_batch_tokens)
    return int(pairs.own_lengths.sum()) + head * len(batches)


@dataclass
class Point:
    documents: int
    head: int
    own_tokens_mean: float
    whole_tokens: int
    shared_tokens: int
    whole_ms: float
    shared_ms: float
    gain: float  # median over repeats of whole time / shared time
    gain_q1: float
    gain_q3: float
    max_abs_diff: float  # scores (logit(yes) - logit(no)), shared against whole

    @property
    def predicted(self) -> float:
        return self.whole_tokens / self.shared_tokens


def measure_point(engine, requests: list, head: int, max_batch_tokens: int) -> Point:
    """Times score_requests with sharing off and on, interleaved, once per request (a repeat each)
    after one warm-up of each setting on the first.

    Each repeat has its own documents: a bfloat16 matmul's speed moves by 10-20% with its row count
    alone, so documents fixed across the repeats would lend every point a bias of that size, larger
    than what a short head saves; different documents per repeat turn it into spread.
    """
    from ..serving.scoring import score_requests

    def timed(request, min_shared_prefix: int | None) -> tuple[float, np.ndarray]:
        start = time.perf_counter()
        (scores,) = score_requests(engine, [request], max_batch_tokens, min_shared_prefix=min_shared_prefix)
        return time.perf_counter() - start, scores

    for warm_up in (None, 1):
        timed(requests[0], warm_up)
    whole, shared, diff = [], [], 0.0
    for r, request in enumerate(requests):
        times = {}
        for setting in ((None, 1) if r % 2 == 0 else (1, None)):
            times[setting] = timed(request, setting)
        whole.append(times[None][0])
        shared.append(times[1][0])
        diff = max(diff, float(np.abs(times[1][1] - times[None][1]).max()))
    ratios = np.array(whole) / np.array(shared)
    own = np.concatenate([request.lengths for request in requests]) - head
    return Point(len(requests[0].lengths), head, float(own.mean()), sum(int(r.lengths.sum()) for r in requests),
                 sum(planned_tokens(r, head, max_batch_tokens) for r in requests), 1e3 * float(np.median(whole)),
                 1e3 * float(np.median(shared)), float(np.median(ratios)), float(np.quantile(ratios, 0.25)),
                 float(np.quantile(ratios, 0.75)), diff)


def break_even(points: list[Point]) -> int | None:
    """The shortest head from which the shared path is faster in at least 3 of 4 repeats (the gain's lower
    quartile at least 1) at it and every longer head of the same request size, for every size; None
    when the longest head measured does not pay."""
    worst = None
    for documents in sorted({p.documents for p in points}):
        heads = sorted((p for p in points if p.documents == documents), key=lambda p: p.head)
        paying = None
        for p in reversed(heads):
            if p.gain_q1 < 1.0:
                break
            paying = p.head
        if paying is None:
            return None
        worst = paying if worst is None else max(worst, paying)
    return worst


def table(points: list[Point]) -> str:
    headers = ["documents", "head tokens", "own tokens (mean)", "whole ms", "shared ms", "measured gain",
               "quartiles", "predicted gain (tokens)", "measured / predicted", "max |d| score"]
    rows = [[p.documents, p.head, f"{p.own_tokens_mean:.0f}", f"{p.whole_ms:,.0f}", f"{p.shared_ms:,.0f}",
             f"**{p.gain:.3f}x**", f"{p.gain_q1:.3f} .. {p.gain_q3:.3f}", f"{p.predicted:.3f}x",
             f"{100 * p.gain / p.predicted:.0f}%", f"{p.max_abs_diff:.1e}"] for p in points]
    return report.markdown_table(headers, rows)


def conclusion(points: list[Point], current: int) -> str:
    threshold = break_even(points)
    if threshold is None:
        return ("The longest head measured does not pay at every request size: no threshold from this run "
                f"(the server's min_shared_prefix is {current}).")
    return (f"Shared heads pay from **{threshold} tokens** at every request size measured (faster in at least 3 "
            "of 4 repeats there and at every longer head: the gain's lower quartile is 1 or more); the server's "
            f"min_shared_prefix is {current}.")


def markdown(points: list[Point], context: dict[str, str], current: int) -> str:
    lines = ["# Shared prompt heads: from how many tokens they pay", "",
             f"- model: {context['model']}", f"- machine: {context['machine']}; CPU {context['cpu']}; "
             f"{context['cores']} cores; torch {context['torch']}, {context['threads']} torch threads",
             f"- commit {context['commit']} (when the run started), {context['date']}",
             f"- command: `{context['command']}`",
             f"- requests: synthetic, each document's own tokens {context['own_tokens']} (uniform), its first "
             "own token unlike every other document's; the scoring step in process (`score_requests`, "
             f"max_batch_tokens {context['max_batch_tokens']}, {context['attention_backend']} attention)", "",
             conclusion(points, current), "",
             "Measured gain: time with every prompt whole over time with the head computed once, each repeat's "
             "ratio, then the median (quartiles beside it). Predicted: whole tokens over the shared plan's "
             "tokens (the head once per micro-batch, every own token). Below the threshold the saving is a few "
             "tokens in hundreds and the gain is 1 within the noise of the machine.", "",
             table(points), "",
             f"- {context['repeat']} repeats per point after one warm-up of each setting, sharing off and on "
             "interleaved, the order swapped every repeat; each repeat its own documents (the same ones behind "
             "every head length of a request size), as a bfloat16 matmul's speed moves by 10-20% with its row "
             "count alone; token counts and milliseconds are over all repeats' requests (ms: the median)", f"- whole run {context['elapsed']}", ""]
    return "\n".join(lines)


def write_csv(path: Path, points: list[Point], context: dict[str, str]) -> Path:
    keys = ["model", "cpu", "cores", "threads", "torch", "commit", "date"]
    with report.atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        names = list(asdict(points[0])) + ["predicted"] if points else []
        writer.writerow(names + keys)
        for p in points:
            writer.writerow([*asdict(p).values(), round(p.predicted, 4), *(context[k] for k in keys)])
    return path


def _range(text: str) -> tuple[int, int]:
    low, _, high = text.partition("-")
    try:
        bounds = (int(low), int(high or low))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW-HIGH (e.g. 60-130), got {text!r}") from None
    if not 1 <= bounds[0] <= bounds[1]:
        raise argparse.ArgumentTypeError(f"expected 1 <= LOW <= HIGH, got {text!r}")
    return bounds


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench-prefix-threshold",
        help="measure from how many shared prompt tokens computing a decoder request's head once pays "
        "(min_shared_prefix)",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="build/bench-prefix-threshold", help="folder for threshold.csv and "
                   "threshold.md (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="a smoke run: the tiny Qwen3 decoder (unless --model-dir), "
                   f"{', '.join(f'{k}={v}' for k, v in QUICK.items())} unless given")
    p.add_argument("--config", default="0.6B", help="the shape: 0.6B, 4B, 8B (Qwen3-Reranker-SIZE.json of the data "
                   "folder) or a config.json file, built with random weights as bench-decoder builds it "
                   "(default: %(default)s)")
    p.add_argument("--model-dir", default=None, help="an existing Qwen3ForCausalLM reranker directory instead")
    p.add_argument("--data-dir", default=None, help="the shared data folder; default ../shared/data if present")
    p.add_argument("--docs", type=_levels, default=None, help="documents per request, comma-separated (default "
                   f"{','.join(map(str, FULL['docs']))}): two is where a head saves least")
    p.add_argument("--heads", type=_levels, default=None, help="shared head lengths in tokens, comma-separated "
                   f"(default {','.join(map(str, FULL['heads']))})")
    p.add_argument("--own-tokens", type=_range, default=(60, 130), help="each document's own tokens, LOW-HIGH "
                   "(default 60-130)")
    p.add_argument("--repeat", type=int, default=None, help=f"timed repeats per point (default {FULL['repeat']})")
    p.add_argument("--dtype", choices=["auto", *DTYPE_NAMES], default="auto",
                   help="auto (default): what the server picks on this device")
    p.add_argument("--threads", type=int, default=None, help="torch threads; default the cores this process may use")
    p.add_argument("--max-batch-tokens", type=int, default=4096, help="the scoring step's token budget per "
                   "forward (default: %(default)s, the CPU default)")
    p.add_argument("--attention-backend", choices=("sdpa", "triton"), default=None,
                   help="default: triton on CUDA, sdpa elsewhere")
    p.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the requests and the random weights")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from ..models.dtypes import auto_dtype, torch_dtype
    from ..serving.prefix_sharing import DEFAULT_MIN_SHARED_PREFIX, shared_prefix_length
    from ..serving.scoring import PackedDecoderEngine
    from .decoder_reranker import build_model, build_tiny_model
    from .random_model import describe_model
    from .workload import resolve_data_dir

    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.repeat < 1 or args.max_batch_tokens < 1:
        raise SystemExit("--repeat and --max-batch-tokens must be at least 1")
    if min(args.docs) < 2:
        raise SystemExit("--docs: a request of one document has no head to share; give 2 or more")
    if args.dtype == "auto":
        args.dtype, _ = auto_dtype(torch.device(args.device).type)
    threads = args.threads or report.usable_cores()
    torch.set_num_threads(threads)
    started = time.monotonic()
    data_dir = resolve_data_dir(args.data_dir)
    if args.model_dir:
        model_dir = Path(args.model_dir)
    elif args.quick:
        model_dir = build_tiny_model(Path("build") / "bench-model-qwen3-tiny", data_dir, args.seed)
    else:
        config = decoder_config_file(args.config, data_dir)
        model_dir = build_model(Path("build") / f"bench-model-{config.stem.lower()}", config, data_dir, args.seed)
    engine = PackedDecoderEngine(str(model_dir), torch_dtype(args.dtype), torch.device(args.device),
                                 args.attention_backend)
    if engine.model.config.vocab_size < _TOKEN_RANGE[1]:
        raise SystemExit(f"the model's vocabulary ({engine.model.config.vocab_size} tokens) is smaller than the "
                         f"synthetic requests' token ids ({_TOKEN_RANGE[0]} .. {_TOKEN_RANGE[1] - 1})")
    ctx = report.run_context(("torch",))
    context = {"model": f"{describe_model(model_dir)}, {args.dtype}", "machine": ctx.machine, "cpu": ctx.cpu,
               "cores": str(ctx.cores), "threads": str(threads), "torch": ctx.versions.get("torch", "-"),
               "commit": ctx.commit, "date": ctx.date, "repeat": str(args.repeat),
               "command": "triton-rerank bench-prefix-threshold " + " ".join(shlex.quote(a) for a in sys.argv[2:]),
               "own_tokens": f"{args.own_tokens[0]}-{args.own_tokens[1]}", "max_batch_tokens": str(args.max_batch_tokens),
               "attention_backend": engine.model.attention_backend}
    points = []
    grid = [(d, h) for d in args.docs for h in args.heads]
    for documents, head in tqdm(grid, desc="prefix threshold", unit="point", dynamic_ncols=True, file=sys.stderr):
        # The same documents behind every head length of a request size: repeat r's come from seed (seed, size, r).
        requests = [synthetic_request(documents, head, args.own_tokens, np.random.default_rng([args.seed, documents, r]))
                    for r in range(args.repeat)]
        if any(shared_prefix_length(r.input_ids, r.lengths) != head for r in requests):
            raise RuntimeError(f"the synthetic requests' prompts do not share exactly {head} tokens")
        points.append(measure_point(engine, requests, head, args.max_batch_tokens))
    context["elapsed"] = f"{time.monotonic() - started:.0f} s"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = [write_csv(out / "threshold.csv", points, context),
             report.atomic_write(out / "threshold.md", markdown(points, context, DEFAULT_MIN_SHARED_PREFIX))]
    print(table(points).replace("**", ""))
    print()
    print(conclusion(points, DEFAULT_MIN_SHARED_PREFIX).replace("**", ""))
    print(f"{context['model']}; CPU {context['cpu']}, {threads} torch threads, commit {context['commit']}")
    print(f"wrote {', '.join(map(str, files))}")
    return 0
