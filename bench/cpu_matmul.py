"""`triton-rerank bench-cpu-matmul`: this CPU's matmul rates by precision, at an encoder's own linear shapes.

What a CPU path can reach depends on the CPU's matrix instructions: float32 FMA, bfloat16 through
AVX512-BF16 or AMX, int8 through VNNI or AMX. This measures, with the torch ops a CPU path would
call, at one micro-batch of tokens through each linear layer of an encoder (query/key/value, attention
output, FFN in, FFN out) and at a large square (the peak):

- float32 and bfloat16: `F.linear` (oneDNN);
- int8-dynamic: weights int8 per output channel, activations quantized to int8 on every call
  (torch's dynamically quantized linear, the x86 engine: VNNI where the CPU has it);
- int8-weights: weights int8 per output channel, activations bfloat16 (`_weight_int8pack_mm`:
  the weights are widened in the kernel, the arithmetic is bfloat16).

Each op's error is its max |output - float64 output| over the float64 output's largest magnitude.
Rates are 2 x tokens x in x out FLOPs over the median time. Writes matmul.csv and matmul.md to --out
and prints the table. The peak rates are the denominators a benchmark's "% of this CPU's matmul peak"
uses; the per-layer sums say what an int8 path could save over bfloat16 before any other cost.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from . import report

PRECISIONS = ("float32", "bfloat16", "int8-dynamic", "int8-weights")
# The cross-encoder/ms-marco-MiniLM-L-6-v2 shape: hidden 384, intermediate 1536.
DEFAULT_SHAPE = (384, 1536)


def layer_linears(hidden: int, intermediate: int) -> dict[str, tuple[int, int]]:
    """(in, out) features of each linear layer of one encoder layer."""
    return {"qkv": (hidden, 3 * hidden), "attn_out": (hidden, hidden), "ffn_in": (hidden, intermediate),
            "ffn_out": (intermediate, hidden)}


@dataclass
class Rate:
    shape: str  # a layer's name, or "square"
    precision: str
    tokens: int
    in_features: int
    out_features: int
    ms: float
    gflops: float
    rel_error: float


def linear_op(precision: str, weight, bias):
    """A callable x (float32 [tokens, in]) -> y for `precision`, and the input it takes (cast once, as a
    model's activations already are)."""
    import torch
    import torch.nn.functional as F

    if precision == "float32":
        return lambda x: F.linear(x, weight, bias), lambda x: x
    if precision == "bfloat16":
        w, b = weight.bfloat16(), bias.bfloat16()
        return lambda x: F.linear(x, w, b), lambda x: x.bfloat16()
    scales = weight.abs().amax(dim=1).clamp(min=1e-12) / 127  # per output channel
    if precision == "int8-weights":
        w8 = torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8)
        s, b = scales.bfloat16(), bias.bfloat16()
        return lambda x: torch.ops.aten._weight_int8pack_mm(x, w8, s) + b, lambda x: x.bfloat16()
    if precision == "int8-dynamic":
        with warnings.catch_warnings():  # torch.ao's eager quantization is deprecated, not removed (torch 2.13)
            warnings.simplefilter("ignore")
            from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

            qw = torch.quantize_per_channel(weight, scales.double(), torch.zeros_like(scales, dtype=torch.long), 0,
                                            torch.qint8)
            layer = DynamicLinear(weight.shape[1], weight.shape[0], dtype=torch.qint8)
            layer.set_weight_bias(qw, bias)
        return layer, lambda x: x
    raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def measure(precision: str, tokens: int, in_features: int, out_features: int, repeats: int, seed: int = 0,
            shape: str = "") -> Rate:
    import torch

    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=g) * in_features**-0.5
    bias = torch.randn(out_features, generator=g) * 0.1
    x = torch.randn(tokens, in_features, generator=g)
    op, cast = linear_op(precision, weight, bias)
    xin = cast(x)
    with torch.inference_mode():
        out = op(xin)
        for _ in range(2):
            op(xin)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            op(xin)
            times.append(time.perf_counter() - start)
    reference = torch.nn.functional.linear(x.double(), weight.double(), bias.double())
    rel_error = float((out.double() - reference).abs().max() / reference.abs().max())
    ms = 1e3 * sorted(times)[len(times) // 2]
    return Rate(shape, precision, tokens, in_features, out_features, ms,
                2 * tokens * in_features * out_features / (ms * 1e6), rel_error)


def int8_instructions() -> str:
    from ..models.dtypes import cpu_flags

    flags = cpu_flags()
    names = [name for flag, name in (("amx_int8", "AMX-INT8"), ("avx512_vnni", "AVX512-VNNI"),
                                     ("avx_vnni", "AVX-VNNI")) if flag in flags]
    return ", ".join(names) if names else "none (no VNNI or AMX-INT8)"


def layer_totals(rates: list[Rate]) -> dict[str, float]:
    """ms of one encoder layer's linears, per precision."""
    totals: dict[str, float] = {}
    for r in rates:
        if r.shape != "square":
            totals[r.precision] = totals.get(r.precision, 0.0) + r.ms
    return totals


def table(rates: list[Rate]) -> str:
    rows = [[r.shape, r.precision, f"{r.tokens} x {r.in_features} x {r.out_features}", f"{r.ms:.2f}",
             f"{r.gflops:,.0f}", f"{r.rel_error:.1e}"] for r in rates]
    return report.markdown_table(["linear", "precision", "tokens x in x out", "ms (median)", "GFLOP/s",
                                  "max rel. error vs float64"], rows)


def totals_line(rates: list[Rate]) -> str:
    totals = layer_totals(rates)
    if "bfloat16" not in totals:
        return ""
    parts = [f"{p} {ms:.2f} ms ({totals['bfloat16'] / ms:.2f}x bfloat16's speed)" for p, ms in totals.items()]
    return "One encoder layer's linears: " + "; ".join(parts) + "."


def markdown(rates: list[Rate], context: dict[str, str]) -> str:
    return "\n".join([
        "# This CPU's matmul rates by precision", "",
        f"- machine: {context['machine']}; CPU {context['cpu']}; {context['cores']} cores; int8 instructions: "
        f"{context['int8']}; torch {context['torch']}, {context['threads']} torch threads",
        f"- commit {context['commit']}, {context['date']}", f"- command: `{context['command']}`",
        f"- layer shapes: hidden {context['hidden']}, intermediate {context['intermediate']}, {context['tokens']} "
        f"tokens (one micro-batch); square: {context['square']}^3; median of {context['repeats']} calls after 2",
        "", totals_line(rates), "", table(rates), "",
        "int8-dynamic quantizes activations on every call (torch's dynamically quantized linear, x86 engine); "
        "int8-weights keeps bfloat16 activations and widens int8 weights in the kernel. Errors are relative to "
        "the float64 output's largest magnitude.", ""])


def _pair(text: str) -> tuple[int, int]:
    try:
        hidden, intermediate = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HIDDEN,INTERMEDIATE (e.g. 384,1536), got {text!r}") from None
    if min(hidden, intermediate) < 1:
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return hidden, intermediate


def _precisions(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    if not names or any(n not in PRECISIONS for n in names):
        raise argparse.ArgumentTypeError(f"choose from {', '.join(PRECISIONS)}, got {text!r}")
    return names


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench-cpu-matmul",
        help="measure this CPU's matmul rates in float32, bfloat16 and int8 at an encoder's linear shapes",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="build/bench-cpu-matmul", help="folder for matmul.csv and matmul.md "
                   "(default: %(default)s)")
    p.add_argument("--shape", type=_pair, default=DEFAULT_SHAPE, help="HIDDEN,INTERMEDIATE of the encoder "
                   "(default: 384,1536, the MiniLM-L6 shape; bge-reranker-v2-m3 is 1024,4096)")
    p.add_argument("--tokens", type=int, default=2048, help="rows of one micro-batch (default: %(default)s, about "
                   "what the CPU default max_batch_tokens 4096 packs)")
    p.add_argument("--square", type=int, default=2048, help="N of the N x N x N peak measurement; 0 skips it "
                   "(default: %(default)s)")
    p.add_argument("--precisions", type=_precisions, default=list(PRECISIONS),
                   help=f"comma-separated, of {', '.join(PRECISIONS)} (default: all)")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per point (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch threads; default the cores this process may use")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    import shlex

    import torch

    if args.tokens < 1 or args.repeats < 1 or args.square < 0:
        raise SystemExit("--tokens and --repeats must be at least 1, --square at least 0")
    threads = args.threads or report.usable_cores()
    torch.set_num_threads(threads)
    hidden, intermediate = args.shape
    points = [(name, args.tokens, k, n) for name, (k, n) in layer_linears(hidden, intermediate).items()]
    if args.square:
        points.append(("square", args.square, args.square, args.square))
    rates = [measure(precision, tokens, k, n, args.repeats, shape=name)
             for name, tokens, k, n in points for precision in args.precisions]
    ctx = report.run_context(("torch",))
    context = {"machine": ctx.machine, "cpu": ctx.cpu, "cores": str(ctx.cores), "torch": ctx.versions.get("torch", "-"),
               "threads": str(threads), "commit": ctx.commit, "date": ctx.date, "int8": int8_instructions(),
               "command": "triton-rerank bench-cpu-matmul " + " ".join(shlex.quote(a) for a in sys.argv[2:]),
               "hidden": str(hidden), "intermediate": str(intermediate), "tokens": str(args.tokens),
               "square": str(args.square), "repeats": str(args.repeats)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with report.atomic_path(out / "matmul.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, [*asdict(rates[0]), "cpu", "threads", "torch", "commit", "date"])
        writer.writeheader()
        for r in rates:
            writer.writerow({**asdict(r), **{k: context[k] for k in ("cpu", "threads", "torch", "commit", "date")}})
    report.atomic_write(out / "matmul.md", markdown(rates, context))
    print(table(rates))
    print()
    print(totals_line(rates))
    print(f"CPU {ctx.cpu}; int8 instructions: {context['int8']}; {threads} torch threads, commit {ctx.commit}")
    print(f"wrote {out / 'matmul.csv'}, {out / 'matmul.md'}")
    return 0
