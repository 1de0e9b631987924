"""GPU-check stage 3, ``attention``: our varlen attention kernel against torch's best.

Packs of DL19 pair lengths are timed with our Triton ``varlen_attention`` and with torch at
equal work (its varlen flash attention; SDPA flash on groups of identical length), plus the
padded ways a padded model would run them (SDPA on 64-token buckets, one padded masked batch),
whose padding FLOPs are counted apart. Ours is also checked against the reference.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ...models.dtypes import torch_dtype
from ..report import fmt
from ..workload import (
    DL19_PAIRS,
    attention_cases,
    attention_flops,
    cu_seqlens_of,
    length_groups,
    load_workload,
    resolve_data_dir,
    synthetic_lengths,
)
from .stage_recorder import StageRecorder, error_text, guarded, log
from .timing import bench_ms

XLMR_VOCAB_SIZE = 250002  # only lengths are used here; ids need not fit a model
# Methods timed at exactly our work: their best time is the target's reference.
EQUAL_WORK_METHODS = ("torch_varlen_flash", "sdpa_flash_grouped_exact")

# A method: a zero-argument call and the FLOPs it executes (padding included).
Method = tuple[Callable[[], Any], float]


def _sdpa_context(device: str, backend_name: str):
    """Pin SDPA to one CUDA backend (flash, efficient); on CPU only the math one exists."""
    if device != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(getattr(SDPBackend, backend_name))


def _torch_varlen_fn():
    """torch's public varlen flash attention (torch >= 2.9), else the aten flash op, else None."""
    try:
        from torch.nn.attention.varlen import varlen_attn

        def run(q, k, v, cu, max_len):
            return varlen_attn(q, k, v, cu, cu, max_len, max_len)

        return run, "torch.nn.attention.varlen.varlen_attn"
    except Exception:
        pass
    op = getattr(torch.ops.aten, "_flash_attention_forward", None)
    if op is None:
        return None, None

    def run_aten(q, k, v, cu, max_len):
        return op(q, k, v, cu, cu, max_len, max_len, 0.0, False, False)[0]

    return run_aten, "torch.ops.aten._flash_attention_forward"


def _padded_heads(t: torch.Tensor, cu: Sequence[int], idx: Sequence[int], width: int) -> torch.Tensor:
    """Sequences `idx` of packed t [T, H, D], zero-padded to `width`, in SDPA's layout [n, H, width, D]."""
    x = torch.zeros(len(idx), width, t.shape[1], t.shape[2], device=t.device, dtype=t.dtype)
    for j, i in enumerate(idx):
        x[j, : cu[i + 1] - cu[i]] = t[cu[i] : cu[i + 1]]
    return x.transpose(1, 2)


def _sdpa_over(groups: list[list[torch.Tensor]], device: str, backend: str) -> Callable[[], list[torch.Tensor]]:
    def run():
        with _sdpa_context(device, backend):
            return [F.scaled_dot_product_attention(q, k, v) for q, k, v in groups]

    return run


def _build_methods(q, k, v, cu: torch.Tensor, lens: list[int], device: str, torch_varlen) -> dict[str, Method]:
    from ...kernels.varlen_attention import varlen_attention

    useful = attention_flops(lens, q.shape[1], q.shape[2])
    max_len = max(lens)
    cu_list = cu_seqlens_of(lens)
    methods: dict[str, Method] = {}
    methods["ours"] = (lambda: varlen_attention(q, k, v, cu, max_len), useful)
    # As the encoder calls it: q, k, v are strided views of one fused [T, 3, H, D] projection.
    fq, fk, fv = torch.stack((q, k, v), dim=1).unbind(1)
    methods["ours_fused_qkv_views"] = (lambda: varlen_attention(fq, fk, fv, cu, max_len), useful)
    if torch_varlen is not None and device == "cuda":
        methods["torch_varlen_flash"] = (lambda: torch_varlen(q, k, v, cu, max_len), useful)
    flash = "FLASH_ATTENTION" if device == "cuda" else "MATH"
    # SDPA on groups of identical length: exactly the same work, one call per length.
    grouped = [[_padded_heads(t, cu_list, idx, n) for t in (q, k, v)] for n, idx in length_groups(lens, 1).items()]
    methods["sdpa_flash_grouped_exact"] = (_sdpa_over(grouped, device, flash), useful)
    # SDPA flash on buckets of 64: padded keys take part (timing only), padding FLOPs counted.
    buckets = length_groups(lens, 64)
    bucketed = [[_padded_heads(t, cu_list, idx, width) for t in (q, k, v)] for width, idx in buckets.items()]
    bucket_flops = sum(attention_flops([w] * len(idx), q.shape[1], q.shape[2]) for w, idx in buckets.items())
    methods["sdpa_flash_bucket64_padded"] = (_sdpa_over(bucketed, device, flash), bucket_flops)
    # One batch padded to the longest sequence (what a padded model does), key-masked.
    everyone = list(range(len(lens)))
    padded = [_padded_heads(t, cu_list, everyone, max_len) for t in (q, k, v)]
    positions = torch.arange(max_len, device=q.device)[None, None, None, :]
    keep = positions < torch.tensor(lens, device=q.device)[:, None, None, None]  # [B, 1, 1, max_len]
    efficient = "EFFICIENT_ATTENTION" if device == "cuda" else "MATH"

    def run_padded_masked():
        with _sdpa_context(device, efficient):
            return F.scaled_dot_product_attention(*padded, attn_mask=keep)

    padded_flops = attention_flops([max_len] * len(lens), q.shape[1], q.shape[2])
    methods["sdpa_efficient_padded_masked"] = (run_padded_masked, padded_flops)
    return methods


def _check_correctness(case: dict, q, k, v, cu: torch.Tensor, lens: list[int], methods: dict[str, Method]) -> None:
    """Max abs error of ours vs the reference, torch varlen (when timed) and SDPA grouped by length."""
    from ...kernels.varlen_attention import varlen_attention, varlen_attention_reference

    max_len = max(lens)
    out = varlen_attention(q, k, v, cu, max_len)
    ref = varlen_attention_reference(q, k, v, cu, max_len)
    case["max_abs_err_vs_reference"] = float((out.float() - ref.float()).abs().max())
    case["ours_finite"] = bool(torch.isfinite(out).all())
    if "torch_varlen_flash" in methods:
        tv = methods["torch_varlen_flash"][0]()
        case["max_abs_err_vs_torch_varlen"] = float((out.float() - tv.float()).abs().max())
    cu_list = cu_seqlens_of(lens)
    worst = 0.0
    grouped_out = methods["sdpa_flash_grouped_exact"][0]()
    for idx, o in zip(length_groups(lens, 1).values(), grouped_out, strict=True):
        for j, i in enumerate(idx):
            mine = out[cu_list[i] : cu_list[i + 1]].float()
            worst = max(worst, float((mine - o[j].transpose(0, 1).float()).abs().max()))
    case["max_abs_err_vs_sdpa_grouped"] = worst


def _time_method(rec: StageRecorder, case: dict, name: str, method: Method, device: str, where: str) -> None:
    fn, executed = method
    if rec.time_left() < 8:
        case["methods"][name] = {"error": "skipped: stage deadline near"}
        return
    useful = case["useful_flops"]
    entry: dict[str, Any] = {"executed_flops": executed, "executed_flops_ratio": executed / useful}
    case["methods"][name] = entry
    try:
        with torch.inference_mode():
            ms = bench_ms(fn, device, warmup=3, iters=20 if device == "cuda" else 2)
        entry["ms"] = ms
        entry["tflops"] = useful / (ms * 1e-3) / 1e12
        entry["tflops_executed"] = executed / (ms * 1e-3) / 1e12
    except Exception as exc:
        entry["error"] = error_text(exc)
        rec.error(f"{where}/{name}", exc)
    rec.flush()


def _compare(case: dict) -> None:
    """Speed of ours relative to every method, and to the best torch method at equal work."""
    ours_ms = case["methods"].get("ours", {}).get("ms")
    for m in case["methods"].values():
        if ours_ms and m.get("ms"):
            m["speed_ours_vs_this"] = m["ms"] / ours_ms
    equal = [case["methods"].get(n, {}).get("ms") for n in EQUAL_WORK_METHODS]
    equal = [x for x in equal if x]
    if ours_ms and equal:
        case["best_torch_equal_work_ms"] = min(equal)
        case["speedup_vs_best_torch"] = min(equal) / ours_ms
    bucket_ms = case["methods"].get("sdpa_flash_bucket64_padded", {}).get("ms")
    if ours_ms and bucket_ms:
        case["speedup_vs_sdpa_bucket64"] = bucket_ms / ours_ms


def _run_case(rec: StageRecorder, case: dict, lens: list[int], heads: int, head_dim: int, dtype, device: str,
              gen: torch.Generator, torch_varlen) -> None:
    where = f"{case['case']}/{case['dtype']}"
    q, k, v = (
        torch.randn(sum(lens), heads, head_dim, generator=gen).to(device=device, dtype=dtype) for _ in range(3)
    )
    cu = torch.tensor(cu_seqlens_of(lens), dtype=torch.int32, device=device)
    methods = _build_methods(q, k, v, cu, lens, device, torch_varlen)
    # torch baselines first: should our kernel take the CUDA context down, they are kept.
    for name in [n for n in methods if not n.startswith("ours")]:
        _time_method(rec, case, name, methods[name], device, where)
    with guarded(rec, f"{where}/correctness"), torch.inference_mode():
        _check_correctness(case, q, k, v, cu, lens, methods)
        rec.flush()
    for name in [n for n in methods if n.startswith("ours")]:
        _time_method(rec, case, name, methods[name], device, where)
    _compare(case)
    log(
        f"attention {where}: ours {fmt(case['methods'].get('ours', {}).get('ms'))} ms, "
        f"best torch {fmt(case.get('best_torch_equal_work_ms'))} ms, "
        f"ratio {fmt(case.get('speedup_vs_best_torch'))}, err {fmt(case.get('max_abs_err_vs_reference'))}"
    )
    rec.flush()


def stage_attention(args: argparse.Namespace, rec: StageRecorder) -> None:
    device = args.device
    heads, head_dim = (16, 64) if device == "cuda" else (2, 64)  # bge-reranker-v2-m3's heads; fewer on CPU
    rec.data.update({"heads": heads, "head_dim": head_dim, "device": device})
    try:
        wl = load_workload(resolve_data_dir(args.data_dir), args.max_length, XLMR_VOCAB_SIZE)
        lengths, source = wl.lengths, wl.source
    except Exception as exc:
        rec.error("tokenize DL19", exc)
        lengths, source = synthetic_lengths(DL19_PAIRS, max_length=args.max_length), "synthetic"
    rec.set("length_source", source)
    torch_varlen, torch_varlen_name = _torch_varlen_fn()
    rec.set("torch_varlen_impl", torch_varlen_name)
    cases_out: list[dict] = []
    rec.set("cases", cases_out)
    gen = torch.Generator(device="cpu").manual_seed(0)

    for dtype_name in ["float16", "bfloat16"] if device == "cuda" else ["float32"]:
        for case_no, (case_name, lens) in enumerate(attention_cases(lengths, device, args.quick, source=source)):
            if dtype_name == "bfloat16" and case_no > 0:
                continue  # bf16: the main pack is enough
            where = f"{case_name}/{dtype_name}"
            if rec.time_left() < 15:
                rec.error(where, TimeoutError("stage deadline near; case skipped"))
                continue
            try:
                total = int(sum(lens))
                case: dict[str, Any] = {
                    "case": case_name,
                    "dtype": dtype_name,
                    "n_seqs": len(lens),
                    "total_tokens": total,
                    "max_len": int(max(lens)),
                    "mean_len": total / len(lens),
                    "useful_flops": attention_flops(lens, heads, head_dim),
                    "methods": {},
                }
                cases_out.append(case)
                _run_case(rec, case, lens, heads, head_dim, torch_dtype(dtype_name), device, gen, torch_varlen)
            except Exception as exc:  # this case only; the next one still runs
                rec.error(where, exc)
            if device == "cuda":
                torch.cuda.empty_cache()
