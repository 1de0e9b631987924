"""GPU-check stage 4, ``encoder``: the packed encoder against Hugging Face padded batches.

A random-weight bge-reranker-v2-m3 (weights do not change the speed) scores the DL19 pairs:
our packed encoder with Triton and with SDPA attention, cut into micro-batches exactly as the
server cuts them (`plan_micro_batches` under --token-budget), against Hugging Face on padded
batches of --hf-batch-size in workload order and length-sorted. Reported per variant: pairs/s,
real tokens/s and useful TFLOP/s (padding excluded); plus packed-vs-HF score agreement.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...models.dtypes import torch_dtype
from ...serving.micro_batches import gather_pairs, padded_inputs, plan_micro_batches
from ..random_model import random_model, save_model_dir
from ..workload import (
    Workload,
    encoder_flops,
    encoder_param_counts,
    fixed_size_batches,
    load_model_config,
    load_workload,
    padded_token_count,
    resolve_data_dir,
    spread_indices,
)
from .stage_recorder import StageRecorder, error_text, guarded, log
from .timing import time_passes

CONFIG_KEYS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "vocab_size")


def _flatten(rows: Sequence[Sequence[int]]) -> np.ndarray:
    return np.fromiter((t for row in rows for t in row), dtype=np.int64)


@dataclass
class DeviceBatches:
    """The workload as the server holds it (flat token arrays), cut into batches on the device.

    Batches are built before timing, so host-to-device copies stay out of the measured passes.
    """

    input_ids: np.ndarray
    token_type_ids: np.ndarray
    offsets: np.ndarray
    lengths: np.ndarray
    device: str
    pad_id: int
    with_types: bool

    @classmethod
    def of(cls, wl: Workload, device: str, pad_id: int, with_types: bool) -> DeviceBatches:
        lengths = np.asarray(wl.lengths, dtype=np.int64)
        offsets = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1], out=offsets[1:])
        return cls(_flatten(wl.input_ids), _flatten(wl.type_ids), offsets, lengths, device, pad_id, with_types)

    def packed(self, group: Sequence[int]) -> tuple:
        """(ids, cu_seqlens, max_seqlen, token types or None): the packed encoder's arguments."""
        b = gather_pairs(self.input_ids, self.token_type_ids, self.offsets, self.lengths, np.asarray(group))
        types = b.token_type_ids.to(self.device) if self.with_types else None
        return b.input_ids.to(self.device), b.cu_seqlens.to(self.device), b.max_seqlen, types

    def padded(self, group: Sequence[int]) -> dict[str, torch.Tensor]:
        """Hugging Face inputs of the group, padded to its longest pair (as the server's HFEngine pads)."""
        b = gather_pairs(self.input_ids, self.token_type_ids, self.offsets, self.lengths, np.asarray(group))
        return {name: t.to(self.device) for name, t in padded_inputs(b, self.pad_id, self.with_types).items()}


def _packed_forward(model, backend: str) -> Callable[[tuple], torch.Tensor]:
    # One loaded model serves both backends: the attention backend is a settable attribute.
    def fwd(batch):
        ids, cu, max_len, types = batch
        model.attention_backend = backend
        return model(ids, cu, max_len, token_type_ids=types)

    return fwd


def _hf_forward(hf) -> Callable[[dict], torch.Tensor]:
    return lambda inputs: hf(**inputs).logits[:, 0]


def _select_workload(
    args: argparse.Namespace, rec: StageRecorder, data_dir: Path | None, cfg: dict, tiny: bool
) -> Workload:
    """The encoder's pairs (all DL19 pairs on CUDA, a spread subset with --quick/--pairs/CPU), recorded."""
    t0 = time.time()
    # Smoke mode: interpreted Triton kernels are slow, so short pairs and few of them.
    max_length = min(args.max_length, 128) if tiny else args.max_length
    wl = load_workload(data_dir, max_length, int(cfg["vocab_size"]))
    n_pairs = args.pairs or (16 if tiny else (1024 if args.quick else len(wl)))
    if n_pairs < len(wl):
        wl = wl.subset(spread_indices(len(wl), n_pairs))
    rec.data["workload"] = {
        "source": wl.source,
        "pairs": len(wl),
        "tokens": wl.total_tokens,
        "mean_length": wl.total_tokens / max(1, len(wl)),
        "max_length": max(wl.lengths),
        "truncated": wl.truncated,
        "tokenize_s": time.time() - t0,
    }
    return wl


def _check_agreement(rec: StageRecorder, batches: DeviceBatches, hf, packed_model, n: int) -> None:
    """Scores of the packed model (both backends) vs HF on the first n pairs (reported, not asserted)."""
    sub = list(range(n))
    ref = _hf_forward(hf)(batches.padded(sub)).float()
    agree: dict[str, Any] = {"n": len(sub), "hf_score_std": float(ref.std()) if len(sub) > 1 else None}
    for backend in ("sdpa", "triton") if packed_model is not None else ():
        try:
            got = _packed_forward(packed_model, backend)(batches.packed(sub)).float().reshape(-1)
            d = (got - ref).abs()
            agree[f"packed_{backend}_vs_hf"] = {
                "max_abs_diff": float(d.max()),
                "mean_abs_diff": float(d.mean()),
                "max_abs_diff_over_hf_std": float(d.max() / ref.std()) if len(sub) > 1 else None,
                "finite": bool(torch.isfinite(got).all()),
            }
        except Exception as exc:
            rec.error(f"agreement packed_{backend}", exc)
    rec.set("agreement", agree)
    log(f"encoder: agreement {json.dumps({k: v for k, v in agree.items() if isinstance(v, dict)})}")


def _time_variant(
    rec: StageRecorder, args: argparse.Namespace, name: str, fwd: Callable, plan: Sequence[Sequence[int]],
    packed: bool, batches: DeviceBatches, wl: Workload, flops_pass: float, passes: int,
) -> None:
    """Time `fwd` over the workload cut as `plan`; records the variant's entry, or its error."""
    entry: dict[str, Any] = {"batches": len(plan)}
    rec.data["variants"][name] = entry
    prepared = None
    try:
        if packed:
            prepared = [batches.packed(group) for group in plan]
            executed_tokens = wl.total_tokens
            entry["token_budget"] = args.token_budget
        else:
            prepared = [batches.padded(group) for group in plan]
            executed_tokens = padded_token_count(wl.lengths, plan)
            entry["batch_size"] = args.hf_batch_size
        entry["executed_tokens"] = executed_tokens
        entry["pad_fraction"] = 1.0 - wl.total_tokens / executed_tokens
        times = time_passes(fwd, prepared, args.device, passes, rec.time_left, entry)
        mean = sum(times) / len(times)
        entry.update(
            {
                "pass_times_s": times,
                "pass_s": mean,
                "pairs_per_s": len(wl) / mean,
                "pairs_per_s_best_pass": len(wl) / min(times),
                "tokens_per_s": wl.total_tokens / mean,
                "tflops": flops_pass / mean / 1e12,
            }
        )
        log(
            f"encoder {name}: {mean:.3f} s/pass, {len(wl) / mean:.1f} pairs/s, "
            f"{flops_pass / mean / 1e12:.1f} TFLOP/s, pad {entry['pad_fraction']:.2f}"
        )
    except Exception as exc:
        entry["error"] = error_text(exc)
        rec.error(f"variant {name}", exc)
    finally:
        prepared = None  # free this variant's batches before the next one allocates
        if args.device == "cuda":
            torch.cuda.empty_cache()
    rec.flush()


def stage_encoder(args: argparse.Namespace, rec: StageRecorder) -> None:
    device = args.device
    dtype = torch_dtype(args.dtype)
    tiny = device != "cuda"
    data_dir = resolve_data_dir(args.data_dir)
    cfg, cfg_source = load_model_config(data_dir, tiny)
    counts = encoder_param_counts(cfg)
    rec.data.update(
        {
            "model": f"bge-reranker-v2-m3 shape ({cfg_source})",
            "config": {k: cfg[k] for k in CONFIG_KEYS},
            "dtype": args.dtype,
            "device": device,
            "params_non_embedding": counts["non_embedding"],
            "params_total_formula": counts["total"],
        }
    )
    rec.set("variants", {})
    variants: dict[str, dict] = rec.data["variants"]

    wl = _select_workload(args, rec, data_dir, cfg, tiny)
    flops_pass = encoder_flops(wl.lengths, cfg)
    rec.set("flops_per_pass", flops_pass)
    log(
        f"encoder: workload {len(wl)} pairs, {wl.total_tokens} tokens ({wl.source}), "
        f"{flops_pass / 1e12:.1f} TFLOP/pass"
    )

    tmp_root = Path(tempfile.mkdtemp(prefix="gpu_check_model_"))
    try:
        t0 = time.time()
        hf = random_model(cfg, device=device, dtype=dtype, attn_implementation="sdpa")
        save_model_dir(tmp_root / "model", hf)
        rec.data["params_total"] = sum(p.numel() for p in hf.parameters())
        rec.data["hf_attn_implementation"] = getattr(hf.config, "_attn_implementation", None)
        rec.set("build_model_s", time.time() - t0)
        log(
            f"encoder: random model built and saved in {time.time() - t0:.1f}s "
            f"({rec.data['params_total'] / 1e6:.0f}M params)"
        )

        from ...models.cross_encoder import load_cross_encoder

        packed_model = None
        with guarded(rec, "load packed model"):
            t0 = time.time()
            packed_model = load_cross_encoder(
                str(tmp_root / "model"), dtype=dtype, device=device, attention_backend="triton"
            )
            rec.set("load_packed_s", time.time() - t0)

        pad_id = int(cfg.get("pad_token_id", 1) or 0)
        batches = DeviceBatches.of(wl, device, pad_id, with_types=int(cfg.get("type_vocab_size", 1)) > 1)
        server_plan = plan_micro_batches(batches.lengths, args.token_budget)
        passes = 1 if (args.quick or tiny) else 3
        # Order: torch-only paths first, so a Triton kernel fault (which ends the CUDA context) cannot
        # cost the baselines; then the agreement check, then the Triton path.
        plans: list[tuple[str, str | None, Sequence[Sequence[int]]]] = [
            ("hf_padded", None, fixed_size_batches(wl.lengths, args.hf_batch_size, sort=False))
        ]
        if packed_model is not None:
            plans.append(("packed_sdpa", "sdpa", server_plan))
        plans.append(("agreement", None, []))
        if packed_model is not None:
            plans.append(("packed_triton", "triton", server_plan))
        plans.append(("hf_padded_sorted", None, fixed_size_batches(wl.lengths, args.hf_batch_size, sort=True)))

        for name, backend, plan in plans:
            if name == "agreement":
                with guarded(rec, "agreement"), torch.inference_mode():
                    _check_agreement(rec, batches, hf, packed_model, min(16 if tiny else 64, len(wl)))
                continue
            if rec.time_left() < 20:
                variants[name] = {"error": "skipped: stage deadline near"}
                rec.flush()
                continue
            fwd = _hf_forward(hf) if backend is None else _packed_forward(packed_model, backend)
            _time_variant(rec, args, name, fwd, plan, backend is not None, batches, wl, flops_pass, passes)
        tri, base = variants.get("packed_triton", {}), variants.get("hf_padded", {})
        if tri.get("pairs_per_s") and base.get("pairs_per_s"):
            rec.set("packed_triton_vs_hf_padded", tri["pairs_per_s"] / base["pairs_per_s"])
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
