"""Results of the GPU check: derived metrics, target checks and their markdown.

The results dict is the single record of a run: the parent fills it stage by stage and
`write_results` turns it into OUT/gpu_results.json and OUT/gpu_results.md after every change,
so a run killed at any moment still leaves readable files. Rendering tolerates missing and
partial stages for the same reason. The files are written, the run context (machine, CPU model,
GPU, versions, commit) described and the tables drawn by the benchmarks' one report writer,
`bench/report.py`. Only the standard library is imported.
"""

from __future__ import annotations

import json
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..report import atomic_write, context_of, fmt, markdown_table

RESULTS_JSON = "gpu_results.json"
RESULTS_MD = "gpu_results.md"

# Project targets checked in the results.
TARGET_ATTENTION_VS_TORCH = 0.8  # ours / best torch at equal work (speed ratio), fp16 DL19 pack
TARGET_PACKED_VS_HF = 1.5  # packed-triton pairs/s / HF padded-32 pairs/s
TARGET_MFU = 0.5  # packed-triton useful FLOP/s / measured bf16 dense matmul FLOP/s


def dig(d: Any, *keys, default=None):
    """d[k0][k1]..., or `default` where a level is missing or not a dict."""
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


# --------------------------------------------------------------------------------------------
# Derived metrics and targets
# --------------------------------------------------------------------------------------------


def _served_derived(results: dict, peaks: dict, variants: dict) -> None:
    """MFU of each served level (vs the measured matmul rate of the run's dtype, bf16 when unknown) and
    its pairs/s as a fraction of the in-process packed encoder's (Triton attention) in the same run."""
    served = dig(results, "stages", "served", "data", default={}) or {}
    peak = peaks.get(served.get("dtype")) or peaks.get("bfloat16")
    in_process = (variants.get("packed_triton") or {}).get("pairs_per_s")
    for level in served.get("levels") or []:
        if not isinstance(level, dict) or not level.get("pairs_per_s"):
            continue
        if peak and level.get("tflops") is not None:
            level["mfu"] = level["tflops"] / peak
        if in_process:
            level["vs_in_process"] = level["pairs_per_s"] / in_process
    if in_process:
        served["in_process_pairs_per_s"] = in_process


SHARED_SUFFIX = "_shared"


def _decoder_derived(results: dict, peaks: dict) -> None:
    """Per decoder shape and variant: MFU vs the measured bf16 matmul rate (the stage runs in bf16) and
    pairs/s as a multiple of Hugging Face's recipe on the same prompts (``vs_hf``)."""
    decoder = dig(results, "stages", "decoder", "data", default={}) or {}
    peak = peaks.get("bfloat16")
    for shape in (decoder.get("shapes") or {}).values():
        if not isinstance(shape, dict):
            continue
        variants = shape.get("variants") or {}
        hf = (variants.get("hf_padded") or {}).get("pairs_per_s")
        for vname, v in variants.items():
            if not isinstance(v, dict) or not v.get("pairs_per_s"):
                continue
            # A `_shared` variant runs each request's head once, so the whole prompts' useful FLOPs over its
            # time is an equivalent rate, not work done (it exceeded the card's matmul peak on the 4B shape):
            # no MFU for it.
            if peak and v.get("tflops") is not None and not vname.endswith(SHARED_SUFFIX):
                v["mfu_vs_bf16_matmul"] = v["tflops"] / peak
            if hf:
                v["vs_hf"] = v["pairs_per_s"] / hf


def _target(name: str, value: float, target: float, unit: str) -> dict:
    return {"name": name, "value": value, "target": target, "unit": unit, "met": value >= target}


def compute_derived(results: dict) -> None:
    """Fill MFU of encoder variants and the target checks from the stage data (in place)."""
    peaks = dig(results, "stages", "env", "data", "matmul_tflops", default={}) or {}
    variants = dig(results, "stages", "encoder", "data", "variants", default={}) or {}
    for v in variants.values():
        if not isinstance(v, dict) or not v.get("tflops"):
            continue
        for dtype, key in (("bfloat16", "mfu_vs_bf16_matmul"), ("float16", "mfu_vs_fp16_matmul")):
            if peaks.get(dtype):
                v[key] = v["tflops"] / peaks[dtype]

    _served_derived(results, peaks, variants)
    _decoder_derived(results, peaks)

    targets = []
    for case in dig(results, "stages", "attention", "data", "cases", default=[]) or []:
        # Only packs of DL19-like lengths count; uniform512 is informative only.
        if "_pack" in case.get("case", "") and case.get("speedup_vs_best_torch") is not None:
            targets.append(
                _target(
                    f"attention {case['case']} {case['dtype']}: ours vs best torch (equal work)",
                    case["speedup_vs_best_torch"],
                    TARGET_ATTENTION_VS_TORCH,
                    "x",
                )
            )
    tri = variants.get("packed_triton") or {}
    hf = variants.get("hf_padded") or {}
    if tri.get("pairs_per_s") and hf.get("pairs_per_s"):
        targets.append(
            _target(
                "encoder: packed-triton vs HF padded-batch pairs/s",
                tri["pairs_per_s"] / hf["pairs_per_s"],
                TARGET_PACKED_VS_HF,
                "x",
            )
        )
    if tri.get("mfu_vs_bf16_matmul") is not None:
        targets.append(
            _target(
                "encoder: packed-triton MFU (vs measured bf16 matmul)",
                tri["mfu_vs_bf16_matmul"],
                TARGET_MFU,
                "fraction",
            )
        )
    results["targets"] = targets


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    return markdown_table(headers, rows).split("\n")


def _header_section(results: dict, env: dict) -> list[str]:
    card = env.get("device_name") or results.get("device", "?")
    lines = [f"# GPU check: {card}", ""]
    context = context_of(results.get("context"))
    if context is not None:
        lines.append(f"Ran on {context.describe()}.")
    lines.append(
        f"Started {results.get('started', '?')}, last update {results.get('updated', '?')}, "
        f"elapsed {fmt(results.get('elapsed_s'))} s of {fmt(results.get('budget_s'))} s; "
        f"args `{' '.join(results.get('argv', []))}`."
    )
    files = results.get("data_files") or {}
    missing = [f for f, ok in files.items() if not ok]
    lines.append(
        f"Data: `{results.get('data_dir')}`"
        + (f" (missing: {', '.join(missing)}; the encoder stages use synthetic lengths / the built-in config "
           "instead of theirs, the decoder stage cannot run without its Qwen3 files)" if missing else "")
        + "."
    )
    lines.append("")
    lines += _table(
        ["stage", "status", "seconds", "note"],
        [
            [name, st.get("status"), st.get("seconds"), st.get("reason") or st.get("error_summary") or ""]
            for name, st in (results.get("stages") or {}).items()
        ],
    )
    return lines + [""]


def _targets_section(targets: list[dict]) -> list[str]:
    if not targets:
        return []
    rows = [[t["name"], t["value"], f">= {t['target']}", t["met"]] for t in targets]
    return ["## Targets", "", *_table(["check", "value", "target", "met"], rows), ""]


def _env_section(env: dict) -> list[str]:
    if not env:
        return []
    rows = [
        ["device", env.get("device_name")],
        ["compute capability", env.get("capability")],
        ["SMs", env.get("sm_count")],
        ["memory GiB", env.get("memory_gib")],
        ["torch / CUDA", f"{env.get('torch')} / {env.get('cuda')}"],
        ["triton", env.get("triton")],
        ["transformers", env.get("transformers")],
        ["python", env.get("python")],
    ]
    for dt, tf in (env.get("matmul_tflops") or {}).items():
        rows.append([f"{dt} matmul TFLOP/s (n={env.get('matmul_n')})", tf])
    if env.get("nvidia_smi"):
        rows.append(["nvidia-smi", env["nvidia_smi"]])
    return ["## Environment", "", *_table(["item", "value"], rows), ""]


def _tests_section(td: dict) -> list[str]:
    if not td:
        return []
    summary = (
        f"`{td.get('command', '')}` -> exit {td.get('returncode')}, counts {td.get('counts')}"
        + (f", progress before the cut {td['progress_counts']}" if td.get("progress_counts") else "")
    )
    return ["## Kernel tests", "", summary, "", "```", *(td.get("tail") or [])[-25:], "```", ""]


def _attention_section(att: dict) -> list[str]:
    if not att.get("cases"):
        return []
    lines = ["## Attention kernel", ""]
    lines.append(
        f"H={att.get('heads')}, D={att.get('head_dim')}, lengths from {att.get('length_source')}. "
        "TFLOP/s count useful work (4 * sum L^2 * H * D); padded methods also list executed work. "
        "speed = that method's time / ours (>1: ours faster)."
    )
    lines.append("")
    rows = []
    for case in att["cases"]:
        for name, m in (case.get("methods") or {}).items():
            rows.append(
                [
                    case.get("case"), case.get("dtype"), case.get("n_seqs"), case.get("total_tokens"), name,
                    m.get("ms"), m.get("tflops"), m.get("executed_flops_ratio"), m.get("speed_ours_vs_this"),
                    m.get("error"),
                ]
            )
    lines += _table(
        ["case", "dtype", "seqs", "tokens", "method", "ms", "TFLOP/s", "exec/useful", "ours speed x", "error"], rows
    )
    lines.append("")
    lines += _table(
        ["case", "dtype", "max abs err vs ref", "max abs err vs torch", "ours vs best torch"],
        [
            [
                c.get("case"), c.get("dtype"), c.get("max_abs_err_vs_reference"),
                c.get("max_abs_err_vs_torch_varlen"), c.get("speedup_vs_best_torch"),
            ]
            for c in att["cases"]
        ],
    )
    return lines + [""]


def _encoder_section(enc: dict) -> list[str]:
    if not enc:
        return []
    lines = ["## Encoder", ""]
    wl = enc.get("workload") or {}
    lines.append(
        f"Model {enc.get('model')} ({fmt(enc.get('params_total'))} params, "
        f"{fmt(enc.get('params_non_embedding'))} non-embedding), dtype {enc.get('dtype')}, random weights. "
        f"Workload {wl.get('pairs')} pairs / {fmt(wl.get('tokens'))} tokens ({wl.get('source')}, "
        f"mean {fmt(wl.get('mean_length'))}, max {wl.get('max_length')}, truncated {wl.get('truncated')}); "
        f"useful FLOPs per pass {fmt(enc.get('flops_per_pass'))}."
    )
    lines.append("")
    rows = [
        [
            name, v.get("batches"), v.get("pass_s"), v.get("pairs_per_s"), v.get("tokens_per_s"), v.get("tflops"),
            v.get("mfu_vs_bf16_matmul"), v.get("pad_fraction"), v.get("error"),
        ]
        for name, v in (enc.get("variants") or {}).items()
    ]
    lines += _table(
        ["variant", "batches", "s/pass", "pairs/s", "tokens/s", "TFLOP/s", "MFU", "pad frac", "error"], rows
    )
    lines.append("")
    agree = enc.get("agreement") or {}
    if agree:
        lines += _table(
            ["score agreement", "max abs diff", "mean abs diff"],
            [[k, v.get("max_abs_diff"), v.get("mean_abs_diff")] for k, v in agree.items() if isinstance(v, dict)],
        )
        lines.append(f"\nHF score std on the subset: {fmt(agree.get('hf_score_std'))} (n={agree.get('n')}).")
        lines.append("")
    return lines


def _decoder_section(dec: dict) -> list[str]:
    shapes = {k: v for k, v in (dec.get("shapes") or {}).items() if isinstance(v, dict)}
    if not shapes:
        return []
    lines = ["## Decoder (Qwen3-Reranker, packed causal decoder vs Hugging Face)", ""]
    lines.append(
        f"Random weights, dtype {dec.get('dtype')}; DL19 queries, each with its BM25 passages, as Qwen3-Reranker "
        f"prompts. Packed: micro-batches of at most {fmt(dec.get('token_budget'))} tokens, logit(yes) - logit(no) "
        f"from the two label rows. HF: AutoModelForCausalLM (SDPA), left-padded batches of "
        f"{dec.get('hf_batch_size')} in workload order, logits[:, -1, [no, yes]] of the full-vocabulary head at "
        "every position. TFLOP/s and MFU count useful work only (the last layer beyond its keys and values, and "
        "the head's two rows, at the last token); `HF exec/useful` is what HF's forward executes over that "
        "(padding, every layer at every position, the vocabulary head at every position). The `_shared` variants "
        "compute each request's prompt head once: their TFLOP/s is the same useful work over their time, an "
        "equivalent rate that can pass the card's peak, so they get no MFU."
    )
    lines.append("")
    for name, sh in shapes.items():
        wl = sh.get("workload") or {}
        build = sh.get("load_path") or {}
        text = (f"- **{name}**: {sh.get('model', '')}, {fmt(sh.get('params_total'))} params "
                f"({fmt(sh.get('params_non_embedding'))} non-embedding); status {sh.get('status')}")
        if wl:
            text += (f"; {wl.get('pairs')} prompts ({wl.get('queries')} queries x {wl.get('docs_per_query')}), "
                     f"{fmt(wl.get('tokens'))} tokens (mean {fmt(wl.get('mean_length'))}, max {wl.get('max_length')}); "
                     f"useful FLOPs per pass {fmt(sh.get('flops_per_pass'))}, HF exec/useful "
                     f"{fmt(sh.get('hf_executed_over_useful'))} (its vocabulary head alone "
                     f"{fmt(sh.get('hf_vocab_head_flops_per_pass'))})")
        if build.get("hf_build_s") is not None:
            text += (f"; HF model ready in {fmt(build.get('hf_build_s'))} s, our packed copy of its state dict "
                     f"{fmt(build.get('pack_direct_s'))} s")
        if build.get("save_s") is not None:
            text += (f" (through files: save {fmt(build.get('save_s'))} s + load {fmt(build.get('load_saved_s'))} s, "
                     f"same weights {build.get('saved_equals_direct')})")
        if sh.get("peak_memory_gib") is not None:
            text += f"; peak memory {fmt(sh.get('peak_memory_gib'))} GiB"
        if sh.get("reason") or sh.get("error"):
            text += f"; {sh.get('reason') or sh.get('error')}"
        shared = sh.get("shared_heads") or {}
        if shared.get("predicted_gain"):
            # The `_shared` variants: each request's head once; their gain over the plain variants set
            # beside the gain the token counts predict.
            text += (f"; shared heads (mean {fmt(shared.get('head_tokens_mean'))} tokens): "
                     f"{fmt(shared.get('tokens_shared'))} tokens run instead of {fmt(shared.get('tokens_whole'))}, "
                     f"predicted gain {fmt(shared.get('predicted_gain'))}x, scores vs the plain forward max |d| "
                     f"{fmt((shared.get('vs_plain') or {}).get('max_abs_diff'))}")
        elif shared.get("error"):
            text += f"; shared heads: {shared['error']}"
        lines.append(text + ".")
    lines.append("")
    rows = [
        [
            name, vname, v.get("batches"), v.get("pass_s"), v.get("pairs_per_s"), v.get("tokens_per_s"),
            v.get("tflops"), v.get("mfu_vs_bf16_matmul"), v.get("vs_hf"), v.get("pad_fraction"), v.get("error"),
        ]
        for name, sh in shapes.items()
        for vname, v in (sh.get("variants") or {}).items()
        if isinstance(v, dict)
    ]
    if rows:
        lines += _table(["shape", "variant", "batches", "s/pass", "pairs/s", "tokens/s", "TFLOP/s", "MFU", "vs HF",
                         "pad frac", "error"], rows)
        lines.append("")
    agree_rows = []
    for name, sh in shapes.items():
        agree = sh.get("agreement") or {}
        for key, v in agree.items():
            if isinstance(v, dict) and "max_abs_diff" in v:
                std = (agree.get("float32_reference") or {}).get("score_std") if key.endswith("_vs_float32") \
                    else agree.get("hf_score_std")
                agree_rows.append([name, key, v.get("n"), v.get("max_abs_diff"), v.get("mean_abs_diff"), std])
        skipped = (agree.get("float32_reference") or {}).get("skipped")
        if skipped:
            agree_rows.append([name, "float32 reference", None, None, None, f"skipped: {skipped}"])
    if agree_rows:
        lines += _table(["shape", "scores (logit(yes) - logit(no))", "n", "max abs diff", "mean abs diff",
                         "reference std"], agree_rows)
        lines.append("")
    return lines


def _served_section(served: dict) -> list[str]:
    if not served:
        return []
    lines = ["## Served (tritonserver, the `reranker` ensemble, gRPC)", ""]
    lines.append(
        f"Model {served.get('model')}, dtype {served.get('dtype')}, {served.get('attention_backend')} attention, "
        f"token budget {served.get('token_budget')}, tokenizer {served.get('tokenizer')}; server ready in "
        f"{fmt(served.get('server_ready_s'))} s. Workloads: "
        + "; ".join(f"{docs} docs: {source}" for docs, source in (served.get("workloads") or {}).items())
        + ". MFU counts the encoder's model FLOPs of the pairs served (TOKEN_COUNTS) against the measured "
        "matmul rate; `vs in-process` divides pairs/s by stage 4's packed encoder (Triton attention)"
        + (f", {fmt(served['in_process_pairs_per_s'])} pairs/s." if served.get("in_process_pairs_per_s") else ".")
    )
    lines.append("")
    rows = [
        [
            level.get("docs"), level.get("concurrency"), level.get("requests"), level.get("pairs_per_s"),
            level.get("p50_ms"), level.get("p99_ms"), level.get("tokens_per_s"), level.get("tflops"), level.get("mfu"),
            level.get("vs_in_process"), level.get("tokenizer_ms_per_request"), level.get("encoder_ms_per_request"),
            level.get("error"),
        ]
        for level in served.get("levels") or []
    ]
    lines += _table(
        ["docs", "concurrency", "requests", "pairs/s", "p50 ms", "p99 ms", "tokens/s", "TFLOP/s", "MFU",
         "vs in-process", "tokenizer ms/req", "encoder ms/req", "error"], rows
    )
    return lines + [""]


def _errors_section(stages: dict) -> list[str]:
    errors = []
    for name, st in stages.items():
        for err in dig(st, "data", "errors", default=[]) or []:
            errors.append(f"- {name} / {err.get('where')}: {err.get('error')}")
        if st.get("error"):
            errors.append(f"- {name}: {st['error'].strip().splitlines()[-1] if st['error'].strip() else ''}")
    return ["## Errors", "", *errors, ""] if errors else []


def render_markdown(results: dict) -> str:
    """Readable summary of the results dict (robust to missing or partial stages)."""
    env = dig(results, "stages", "env", "data", default={}) or {}
    lines = _header_section(results, env)
    lines += _targets_section(results.get("targets") or [])
    lines += _env_section(env)
    lines += _tests_section(dig(results, "stages", "tests", "data", default={}) or {})
    lines += _attention_section(dig(results, "stages", "attention", "data", default={}) or {})
    lines += _encoder_section(dig(results, "stages", "encoder", "data", default={}) or {})
    lines += _decoder_section(dig(results, "stages", "decoder", "data", default={}) or {})
    lines += _served_section(dig(results, "stages", "served", "data", default={}) or {})
    lines += _errors_section(results.get("stages") or {})
    return "\n".join(lines) + "\n"


def write_results(out_dir: str | Path, results: dict) -> tuple[Path, Path]:
    """Write OUT/gpu_results.json and OUT/gpu_results.md (atomically) from the results dict."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    compute_derived(results)
    jp, mp = out / RESULTS_JSON, out / RESULTS_MD
    atomic_write(jp, json.dumps(results, indent=2, sort_keys=False, default=str) + "\n")
    try:
        md = render_markdown(results)
    except Exception:  # never lose the JSON because of a rendering bug
        md = "# GPU check\n\nRendering failed:\n\n```\n" + traceback.format_exc() + "```\n"
    atomic_write(mp, md)
    return jp, mp
