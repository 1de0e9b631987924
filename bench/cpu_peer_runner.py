"""One CPU reranker of another project, run in that project's own virtual environment.

Started by bench/cpu_peers.py as `PEER_PYTHON cpu_peer_runner.py` (by path: this file imports
nothing of ours, only what the peers' environment has). Reads one JSON job from stdin:

    {"contender": "st-onnx-int8", "model_dir": DIR, "threads": 2, "batch_size": 16,
     "pairs": [[query, document], ...], "warmup": 32}

loads the contender (exporting the model into DIR first where it needs an export), scores
`warmup` pairs, then times scoring all `pairs` once, and prints one JSON line to stdout:

    {"scores": [...], "seconds": S, "load_seconds": S, "versions": {...}}

Contenders (sentence-transformers `CrossEncoder.predict`, batches of `batch_size`, raw logits):
  st-torch-fp32   torch float32, the reference the others are checked against
  st-torch-bf16   torch bfloat16 weights and activations
  st-onnx-fp32    backend="onnx": ONNX Runtime on an export of the model
  st-onnx-o3      the same export optimized by ONNX Runtime (optimization level O3)
  st-onnx-int8    the same export quantized dynamically to int8 (avx512_vnni)
  st-openvino     backend="openvino": OpenVINO on its own export (its default precision hint)
"""

from __future__ import annotations

import json
import os
import sys
import time

CONTENDERS = ("st-torch-fp32", "st-torch-bf16", "st-onnx-fp32", "st-onnx-o3", "st-onnx-int8", "st-openvino")


def load(contender: str, model_dir: str, threads: int):
    import functools

    import torch

    torch.set_num_threads(threads)
    from sentence_transformers import CrossEncoder as SentenceTransformersCrossEncoder

    # Raw logits, as our server returns them (CrossEncoder puts a sigmoid on one-label models by default).
    CrossEncoder = functools.partial(SentenceTransformersCrossEncoder, activation_fn=torch.nn.Identity())

    if contender == "st-torch-fp32":
        return CrossEncoder(model_dir, device="cpu")
    if contender == "st-torch-bf16":
        return CrossEncoder(model_dir, device="cpu", model_kwargs={"torch_dtype": torch.bfloat16})
    if contender == "st-openvino":
        return CrossEncoder(model_dir, device="cpu", backend="openvino")
    exported = os.path.isfile(os.path.join(model_dir, "onnx", "model.onnx"))
    onnx = CrossEncoder(model_dir, device="cpu", backend="onnx")  # exports to a temporary folder on first use
    if not exported:  # kept for the next run (saving over the file it was loaded from fails)
        onnx.save_pretrained(model_dir)
    if contender == "st-onnx-fp32":
        return onnx
    if contender == "st-onnx-o3":
        from sentence_transformers import export_optimized_onnx_model

        export_optimized_onnx_model(onnx, "O3", model_dir)
        file_name = "onnx/model_O3.onnx"
    elif contender == "st-onnx-int8":
        from sentence_transformers import export_dynamic_quantized_onnx_model

        export_dynamic_quantized_onnx_model(onnx, "avx512_vnni", model_dir)
        file_name = "onnx/model_qint8_avx512_vnni.onnx"
    else:
        raise ValueError(f"unknown contender {contender!r}; choose from {', '.join(CONTENDERS)}")
    return CrossEncoder(model_dir, device="cpu", backend="onnx", model_kwargs={"file_name": file_name})


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("sentence-transformers", "transformers", "torch", "onnxruntime", "openvino", "optimum"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def main() -> int:
    job = json.load(sys.stdin)
    pairs = [tuple(p) for p in job["pairs"]]
    started = time.perf_counter()
    model = load(job["contender"], job["model_dir"], job["threads"])
    model.predict(pairs[: job.get("warmup", 32)], batch_size=job["batch_size"], show_progress_bar=False)
    loaded = time.perf_counter()
    scores = model.predict(pairs, batch_size=job["batch_size"], show_progress_bar=False)
    seconds = time.perf_counter() - loaded
    print(json.dumps({"scores": [float(s) for s in scores], "seconds": seconds, "load_seconds": loaded - started,
                      "versions": versions()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
