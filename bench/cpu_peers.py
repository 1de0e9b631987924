"""The CPU rerankers people pick, as `triton-rerank bench` contenders (`--contenders peers`).

sentence-transformers' CrossEncoder on torch (float32, bfloat16), ONNX Runtime (the export as it
is, optimized O3, dynamically quantized to int8) and OpenVINO, each in its own process from a
virtual environment of their own (their pins clash with ours), on a copy of the same model
directory (exports are written there once and reused), scoring the workload's pairs in one go
(offline pairs/s, as our in-process contenders). Every peer's scores are compared with
st-torch-fp32's (transformers float32 under sentence-transformers) of the same run, and the
report says by how much they differ.

Create the environment once (CPU torch, the same release as ours):

    make bench-cpu-peers-setup    # build/cpu-peers-venv

then `triton-rerank bench --contenders peers,triton --peer-python build/cpu-peers-venv/bin/python`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .report import Row
from .workload import RequestSet

RUNNER = Path(__file__).with_name("cpu_peer_runner.py")
PEERS = ("st-torch-fp32", "st-torch-bf16", "st-onnx-fp32", "st-onnx-o3", "st-onnx-int8", "st-openvino")
REFERENCE = "st-torch-fp32"
PEER_SETUP = (
    "python3 -m venv build/cpu-peers-venv\n"
    'build/cpu-peers-venv/bin/pip install "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu\n'
    'build/cpu-peers-venv/bin/pip install "sentence-transformers[onnx,openvino]" onnxruntime'
)
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "vocab.txt")


@dataclass
class PeerResult:
    contender: str
    scores: list[float]
    seconds: float
    load_seconds: float
    versions: dict[str, str]


def model_copy(model_dir: Path, work: Path, contender: str) -> Path:
    """A copy of the model's files for one contender, whose exports then stay out of the original.

    transformers 5 names a plain tokenizer.json "TokenizersBackend", a class the peers'
    transformers 4 lacks; both read it as PreTrainedTokenizerFast.
    """
    target = work / "peers" / contender
    target.mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES:
        if (model_dir / name).is_file() and not (target / name).is_file():
            shutil.copy2(model_dir / name, target / name)
    config = target / "tokenizer_config.json"
    if config.is_file():
        settings = json.loads(config.read_text())
        if settings.get("tokenizer_class") == "TokenizersBackend":
            config.write_text(json.dumps({**settings, "tokenizer_class": "PreTrainedTokenizerFast"}, indent=1))
    return target


def run_peer(python: str, contender: str, model_dir: Path, pairs: list[tuple[str, str]], threads: int,
             batch_size: int, timeout: float = 3600.0) -> PeerResult:
    """One contender in its own process (see cpu_peer_runner.py for the protocol)."""
    if contender not in PEERS:
        raise ValueError(f"unknown peer {contender!r}; choose from {', '.join(PEERS)}")
    job = {"contender": contender, "model_dir": str(model_dir), "threads": threads, "batch_size": batch_size,
           "pairs": [list(p) for p in pairs], "warmup": min(32, len(pairs))}
    env = {"OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([python, str(RUNNER)], input=json.dumps(job), capture_output=True, text=True,
                          timeout=timeout, env={**_base_env(), **env})
    if done.returncode != 0:
        raise RuntimeError(f"{contender} failed (exit {done.returncode}): {done.stderr[-1500:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return PeerResult(contender, result["scores"], result["seconds"], result["load_seconds"], result["versions"])


def _base_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}


def workload_pairs(requests: RequestSet) -> list[tuple[str, str]]:
    return [(r.query, d) for r in requests.requests for d in r.documents]


def peer_rows(results: list[PeerResult], requests: RequestSet, threads: int, batch_size: int) -> list[Row]:
    """Offline rows, each naming its max |score - st-torch-fp32's| (when the reference ran)."""
    reference = next((r.scores for r in results if r.contender == REFERENCE), None)
    rows = []
    for r in results:
        checked = ""
        if reference is not None and r.contender != REFERENCE:
            worst = max(abs(a - b) for a, b in zip(r.scores, reference, strict=True))
            checked = f"; max |score - {REFERENCE}| {worst:.2g}"
        versions = ", ".join(f"{k} {v}" for k, v in sorted(r.versions.items()))
        rows.append(Row(r.contender, "in-process", "offline", 0, f"bs={batch_size} thr={threads}",
                        f"sentence-transformers CrossEncoder ({versions}){checked}", len(requests.requests),
                        len(requests.requests) / r.seconds, len(r.scores) / r.seconds))
    return rows


def run_peers(python: str, peers: list[str], model_dir: Path, requests: RequestSet, work: Path, threads: int,
              batch_size: int, note) -> list[Row]:
    """Every peer in turn (the reference first), as report rows."""
    pairs = workload_pairs(requests)
    ordered = [REFERENCE, *(p for p in peers if p != REFERENCE)]
    results = []
    for contender in ordered:
        note(f"{contender} ({len(pairs)} pairs)")
        results.append(run_peer(python, contender, model_copy(model_dir, work, contender), pairs, threads,
                                batch_size))
    return peer_rows(results, requests, threads, batch_size)

