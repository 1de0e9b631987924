"""Ahead-of-time compile of every kernel variant the wrappers launch, for sm_80 and sm_90; no GPU needed.

Each variant is built with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``
using the wrappers' own ``_launch_config`` choices, down to PTX and a cubin (Triton ships ptxas).
This catches what the interpreter cannot: constructs that do not lower to NVIDIA code, tiles that
do not fit shared memory, and an fp32 attention that silently uses tf32 tensor cores.

Why a subprocess: under TRITON_INTERPRET=1 (set for the CPU test run before the kernel modules are
imported) ``@triton.jit`` returns InterpretedFunction objects, which cannot be compiled. The worker
below re-imports the kernels in a fresh interpreter with TRITON_INTERPRET removed, so it compiles
the real JITFunctions. Running this file as a script (``python test_compile_aot.py VARIANT...``)
is that worker; it prints one JSON object per variant.
"""

import importlib
import json
import os
import subprocess
import sys
import time

import pytest

# Variants are plain data so the pytest process never needs a compilable kernel. Every variant is
# built for sm_80 (Ampere, the oldest supported); sm_90 gets all but some attention variants, which
# take ~1.5-3.5 s each on a 2-core machine and only change tile widths, to keep this test < ~2 min.
# Attention: (dtype, head_dim, causal[, "prefix"]). Grouped-query attention is a runtime argument
# (kv heads per query head), so it needs no variant of its own; causal is a constexpr, built for the
# head dims decoders use (64, and 128: every Qwen3 size). "prefix" marks the shared-prefix variants
# (HAS_PREFIX: two more key loops, ~3-6 s each), which decoder rerankers launch causal in fp16/bf16;
# they are built for both targets (their shared memory matches the causal variants').
ATTENTION = (
    [
        ("attention", dtype, head_dim, False)
        for dtype in ("fp16", "bf16", "fp32")
        for head_dim in (32, 64, 96, 128)
    ]
    + [("attention", dtype, head_dim, True) for dtype in ("fp16", "bf16", "fp32") for head_dim in (64, 128)]
    + [("attention", dtype, head_dim, True, "prefix") for dtype in ("fp16", "bf16") for head_dim in (64, 128)]
)
# hidden picks BLOCK and num_warps only (n_cols is a runtime argument): 768 -> 1024/4 warps,
# 4096 -> 4096/8 warps, 16384 (the maximum) -> 16384/16 warps.
LAYER_NORM = [
    ("layer_norm", dtype, hidden, residual)
    for dtype in ("fp16", "bf16", "fp32")
    for hidden in (768, 4096, 16384)
    for residual in (True, False)
]
BIAS_GELU = [("bias_gelu", dtype) for dtype in ("fp16", "bf16", "fp32")]
# hidden 128: per-head q/k norms (one warp, never a residual); 4096 and 16384 as for LayerNorm.
RMS_NORM = [
    ("rms_norm", dtype, hidden, residual)
    for dtype in ("fp16", "bf16", "fp32")
    for hidden, residual in ((128, False), (4096, True), (4096, False), (16384, True))
]
SWIGLU = [("swiglu", dtype) for dtype in ("fp16", "bf16", "fp32")]
ELEMENTWISE = LAYER_NORM + BIAS_GELU + RMS_NORM + SWIGLU
VARIANTS = (
    [(*v, 80) for v in ATTENTION + ELEMENTWISE]
    + [(*v, 90) for v in ATTENTION if v[2] == 128 or (v[2] == 64 and not v[3]) or "prefix" in v]
    + [(*v, 90) for v in ELEMENTWISE]
)

# The most dynamic shared memory per block on sm_86 / sm_89 (A10, L4: typical inference GPUs);
# sm_80 allows 163 KB and sm_90 227 KB, so a variant under this limit launches on all of them.
SHARED_MEMORY_LIMIT = 99 * 1024


def variant_id(variant) -> str:
    return "-".join(str(int(p) if isinstance(p, bool) else p) for p in variant[:-1]) + f"-sm{variant[-1]}"


# --------------------------------------------------------------------------------------------
# Worker side (runs without TRITON_INTERPRET; imports triton and the kernels only here)
# --------------------------------------------------------------------------------------------


# The row-wise norms (module name = variant kind): their kernel and its pointer arguments. Both
# launch the same way: hidden picks BLOCK and num_warps, HAS_RESIDUAL is the only other constexpr.
ROW_NORMS = {
    "layer_norm": ("_add_layer_norm_fwd_kernel", ("X", "R", "W", "B", "Y")),
    "rms_norm": ("_rms_norm_fwd_kernel", ("X", "R", "W", "Y", "S")),
}


def _build(variant):
    """(kernel, signature, constexprs, options) exactly as the host wrapper would launch it."""
    import torch

    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    kind, dtype = variant[0], variant[1]
    pointers, floats = {}, set()
    if kind == "attention":
        mod = importlib.import_module("triton_rerank.kernels.varlen_attention")

        head_dim, causal, has_prefix = variant[2], variant[3], "prefix" in variant
        cfg = mod._launch_config(head_dim, torch_dtype[dtype], on_gpu=True)
        kernel = mod._varlen_attn_fwd_kernel
        pointers = {"Q": dtype, "K": dtype, "V": dtype, "Out": dtype, "cu_seqlens": "i32"}
        floats = {"qk_scale"}
        constexprs = dict(
            HEAD_DIM=head_dim,
            BLOCK_D=cfg.block_d,
            BLOCK_M=cfg.block_m,
            BLOCK_N=cfg.block_n,
            IEEE_DOT=dtype == "fp32",
            CAUSAL=causal,
            HAS_PREFIX=has_prefix,
        )
        if has_prefix:
            pointers.update(prefix_starts="i32", prefix_lens="i32")
        else:
            # The wrapper passes None without a prefix, which the JIT turns into a constexpr.
            constexprs.update(prefix_starts=None, prefix_lens=None)
        options = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    elif kind in ROW_NORMS:
        mod = importlib.import_module(f"triton_rerank.kernels.{kind}")

        kernel_name, pointer_args = ROW_NORMS[kind]
        hidden, residual = variant[2], variant[3]
        cfg = mod._launch_config(hidden)
        kernel = getattr(mod, kernel_name)
        pointers = dict.fromkeys(pointer_args, dtype)
        floats = {"eps"}
        constexprs = dict(BLOCK=cfg.block, HAS_RESIDUAL=residual)
        options = dict(num_warps=cfg.num_warps)
    elif kind == "swiglu":
        mod = importlib.import_module("triton_rerank.kernels.swiglu")

        cfg = mod._launch_config(4096, on_gpu=True)
        kernel = mod._silu_mul_fwd_kernel
        pointers = {"GU": dtype, "Y": dtype}
        constexprs = dict(BLOCK=cfg.block)
        options = dict(num_warps=cfg.num_warps)
    else:
        mod = importlib.import_module("triton_rerank.kernels.bias_gelu")

        cfg = mod._launch_config(on_gpu=True)
        kernel = mod._bias_gelu_fwd_kernel
        pointers = {"X": dtype, "B": dtype, "Y": dtype}
        constexprs = dict(BLOCK=cfg.block)
        options = dict(num_warps=cfg.num_warps)

    # Every argument must be classified, so a new kernel argument cannot slip through as "i32".
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = "*" + pointers[name]
        elif name in floats:
            signature[name] = "fp32"
        elif name.startswith(("stride_", "n_", "num_")):
            signature[name] = "i32"
        else:
            raise AssertionError(f"{kernel.__name__}: unclassified argument {name!r}")
    return kernel, signature, constexprs, options


def _compile(variant) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel, signature, constexprs, options = _build(variant)
    target = GPUTarget("cuda", variant[-1], 32)
    # Torch allocations are 16-byte aligned, so the JIT marks pointer arguments divisible by 16;
    # do the same so the AOT build vectorises like the real launch.
    try:
        from triton.compiler.compiler import make_backend

        divisible = make_backend(target).parse_attr("D")
    except (ImportError, AttributeError):  # older/newer layouts: fall back to the literal form
        divisible = [["tt.divisibility", 16]]
    attrs = {(i,): divisible for i, name in enumerate(kernel.arg_names) if signature[name].startswith("*")}
    start = time.perf_counter()
    compiled = triton.compile(
        ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
        target=target,
        options=options,
    )
    seconds = time.perf_counter() - start
    ptx = compiled.asm.get("ptx", "")
    return dict(
        id=variant_id(variant),
        seconds=round(seconds, 3),
        ptx_chars=len(ptx),
        cubin_bytes=len(compiled.asm.get("cubin", b"")),
        shared=int(compiled.metadata.shared),
        mma="mma" in ptx,  # mma.sync (sm_80) or wgmma (sm_90): tensor cores in use
        tf32=".tf32" in ptx,
        triton=triton.__version__,
    )


def _worker(ids) -> None:
    by_id = {variant_id(v): v for v in VARIANTS}
    for vid in ids:
        try:
            result = _compile(by_id[vid])
        except Exception as exc:  # report and keep going: one broken variant should not hide others
            result = dict(id=vid, error=f"{type(exc).__name__}: {exc}"[:2000])
        print(json.dumps(result), flush=True)


# --------------------------------------------------------------------------------------------
# pytest side
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def aot_results(tmp_path_factory):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # A fresh cache: measure (and test) real compiles, not cache hits from an earlier run.
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton_cache"))
    ids = [variant_id(v) for v in VARIANTS]
    # Compiles are CPU bound and single threaded: one worker process per core (at most 4).
    n_workers = max(1, min(4, os.cpu_count() or 1))
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, *ids[i::n_workers]],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(n_workers)
    ]
    results = {}
    start = time.perf_counter()
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=600)
        if proc.returncode != 0:
            pytest.fail(f"AOT worker failed (rc={proc.returncode}):\n{stderr[-4000:]}")
        for line in stdout.splitlines():
            if line.startswith("{"):
                record = json.loads(line)
                results[record["id"]] = record
    wall = time.perf_counter() - start
    compiled = [r for r in results.values() if "seconds" in r]
    slowest = sorted(compiled, key=lambda r: -r["seconds"])[:3]
    print(
        f"\nAOT: {len(compiled)}/{len(ids)} variants in {wall:.1f}s wall with {n_workers} workers; slowest: "
        + ", ".join(f"{r['id']} {r['seconds']:.2f}s" for r in slowest)
    )
    return results


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_compiles_to_cubin(aot_results, variant):
    result = aot_results.get(variant_id(variant))
    assert result is not None, "worker produced no result for this variant"
    assert "error" not in result, result.get("error")
    assert result["ptx_chars"] > 0 and result["cubin_bytes"] > 0
    assert result["shared"] <= SHARED_MEMORY_LIMIT, f"{result['shared']} bytes of shared memory"
    if variant[0] == "attention":
        # fp16/bf16 must hit tensor cores; fp32 must not be silently downgraded to tf32.
        if variant[1] == "fp32":
            assert not result["tf32"]
        else:
            assert result["mma"]


if __name__ == "__main__":
    _worker(sys.argv[1:])
