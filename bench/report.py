"""The one report writer of the benchmarks: run context, atomic files, markdown tables, bench output.

Shared by every benchmark (the serving bench here, the GPU check's results in `gpu/results.py`):
- the run context: machine, CPU model name, cores, GPU, Python and package versions, git commit,
  date (`run_context`); every report names the CPU model, the GPU and the commit it ran on;
- atomic file writes (`atomic_write`, `atomic_path`): a reader, or a kill mid-write, never sees half
  a file;
- markdown tables (`markdown_table`, cells formatted by `fmt`).

Standard library only at import time (matplotlib inside `write_plot`): the GPU check's parent
process, which must never import torch, uses this module; versions come from package metadata.

The serving bench's output is one row per measurement, written as CSV, a markdown table and a PNG
plot (`write_bench_report`). Each file records the run's context (machine, CPU, model, dtype,
device, workload, git commit): the CSV in columns of every row, the markdown in its header, the
PNG in its title.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import importlib.metadata
import io
import os
import platform
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .workload import REPO_ROOT

# --------------------------------------------------------------------------------------------
# Run context
# --------------------------------------------------------------------------------------------

# Versions named in every report (from package metadata: nothing is imported).
CONTEXT_PACKAGES = ("torch", "triton", "transformers", "tokenizers", "numpy", "tritonclient")


def git_commit(root: Path = REPO_ROOT) -> str:
    """Short commit hash, '-dirty' when the work tree has changes; 'unknown' outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return (head + ("-dirty" if dirty else "")) if head else "unknown"


def cpu_model() -> str:
    """'Intel(R) Xeon(R) Processor (family 6 model 207, avx512, amx)' from /proc/cpuinfo."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    fields_: dict[str, str] = {}
    for line in info.splitlines():
        key, _, value = line.partition(":")
        fields_.setdefault(key.strip(), value.strip())
    flags = set(fields_.get("flags", "").split())
    features = [name for name, flag in (("avx512", "avx512f"), ("amx", "amx_tile"), ("avx2", "avx2")) if flag in flags]
    features = features[:2] if "avx512" in features else features
    detail = ", ".join(filter(None, [f"family {fields_.get('cpu family', '?')} model {fields_.get('model', '?')}",
                                     *features]))
    return f"{fields_.get('model name', platform.machine())} ({detail})"


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def machine_name() -> str:
    """'host (Linux x86_64)'."""
    return f"{platform.node()} ({platform.system()} {platform.machine()})"


def gpu_name() -> str:
    """The GPUs as nvidia-smi names them ('NVIDIA H200 x 1'), without importing torch; 'none' without one."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "none"
    try:
        out = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=15).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (nvidia-smi failed)"
    names = [line.strip() for line in out.splitlines() if line.strip()]
    if not names:
        return "none"
    return ", ".join(f"{name} x {names.count(name)}" for name in dict.fromkeys(names))


def package_versions(packages: Sequence[str] = CONTEXT_PACKAGES) -> dict[str, str]:
    """Installed versions from package metadata ('-' where a package is absent); imports nothing."""
    out = {}
    for name in packages:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "-"
    return out


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class RunContext:
    """Where and with what a benchmark ran."""

    machine: str
    cpu: str
    cores: int
    gpu: str
    python: str
    versions: dict[str, str] = field(default_factory=dict)
    commit: str = "unknown"
    date: str = ""

    def describe(self) -> str:
        """One line: machine; CPU and cores; GPU; python and package versions; commit; date."""
        versions = "".join(f", {k} {v}" for k, v in self.versions.items() if v != "-")
        return (f"{self.machine}; CPU {self.cpu}, {self.cores} cores; GPU {self.gpu}; python {self.python}"
                f"{versions}; commit {self.commit}; {self.date}")


def run_context(packages: Sequence[str] = CONTEXT_PACKAGES) -> RunContext:
    """The context of this run, gathered without importing torch (a GPU check's parent must not)."""
    return RunContext(machine=machine_name(), cpu=cpu_model(), cores=usable_cores(), gpu=gpu_name(),
                      python=platform.python_version(), versions=package_versions(packages), commit=git_commit(),
                      date=now_iso())


def context_of(record: Any) -> RunContext | None:
    """A RunContext back from its dict (as stored in a results JSON); None when absent or malformed."""
    if not isinstance(record, dict):
        return None
    try:
        return RunContext(**{f.name: record[f.name] for f in fields(RunContext) if f.name in record})
    except TypeError:
        return None


# --------------------------------------------------------------------------------------------
# Files and markdown
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path to write; it replaces `path` in one step when the block ends without error."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Replace `path` in one step, so a reader (or a kill mid-write) never sees half a file."""
    with atomic_path(path) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")
    return Path(path)


def fmt(x, digits: int = 3) -> str:
    """A table cell: "-" for None, thousands separators, 3 significant digits for extremes."""
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if x != x:
            return "nan"
        if x != 0 and (abs(x) >= 1e5 or abs(x) < 1e-3):
            return f"{x:.{digits}g}"
        return f"{x:.{digits}f}" if abs(x) < 100 else f"{x:,.1f}"
    return str(x).replace("|", "/").replace("\n", " ")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table; cells go through `fmt` (text stays as it is, minus '|' and line breaks)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# The serving bench: rows, run info, CSV
# --------------------------------------------------------------------------------------------

# Contender names; "triton-*" rows are the served ensemble.
HF = "hf-padded"
PACKED = "packed"
INFINITY = "infinity-http"


@dataclass
class Row:
    contender: str  # triton-grpc, triton-http, infinity-http, hf-padded, packed
    kind: str  # server | in-process
    measure: str  # sweep (server, one concurrency level) | offline (in-process, all pairs) | latency (1 request)
    concurrency: int  # in flight at once; 0 for in-process offline
    variant: str  # server settings, e.g. "delay=0us inst=1 thr=2" or "bs=32"
    backend: str
    requests: int  # requests measured
    requests_per_s: float
    pairs_per_s: float
    p50_ms: float | None = None
    p99_ms: float | None = None
    avg_ms: float | None = None
    # Triton at concurrency 1, per request, from the server's metrics: the tokenizer step, the
    # encoder forwards, and the rest of the client latency (gRPC/HTTP, ensemble, queue, stub IPC).
    tokenizer_ms: float | None = None
    encoder_ms: float | None = None
    overhead_ms: float | None = None
    run: int = 0  # bench_runs.csv: which run (1..N); bench.csv: 0
    runs: int = 1  # runs whose median this row is


def aggregate(rows: list[Row]) -> list[Row]:
    """One row per (contender, measure, concurrency, settings): the median over runs, requests summed."""
    import statistics

    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        groups.setdefault((r.contender, r.kind, r.measure, r.concurrency, r.variant, r.backend), []).append(r)
    out = []
    for group in groups.values():
        def med(name: str, group: list[Row] = group) -> float | None:
            values = [getattr(r, name) for r in group if getattr(r, name) is not None]
            return statistics.median(values) if values else None

        first = group[0]
        out.append(Row(first.contender, first.kind, first.measure, first.concurrency, first.variant, first.backend,
                       sum(r.requests for r in group), med("requests_per_s"), med("pairs_per_s"), med("p50_ms"),
                       med("p99_ms"), med("avg_ms"), med("tokenizer_ms"), med("encoder_ms"), med("overhead_ms"),
                       run=0, runs=len(group)))
    return out


@dataclass
class RunInfo:
    machine: str
    cpu: str
    cores: int
    torch: str
    model: str
    dtype: str
    device: str
    workload: str
    docs_per_request: int
    commit: str
    date: str
    command: str = ""
    gpu: str = ""

    def title(self) -> str:
        return (f"{self.model.split(' (')[0]}, {self.workload}, {self.dtype} on {self.device}\n"
                f"{self.cpu}, {self.cores} cores{self.gpu_suffix()}, torch {self.torch}, commit {self.commit}")

    def gpu_suffix(self, sep: str = ", ") -> str:
        """'<sep>GPU <name>' when the machine has one, else ''."""
        return f"{sep}GPU {self.gpu}" if self.gpu and self.gpu != "none" else ""


def run_info(model: str, dtype: str, device: str, workload: str, docs_per_request: int, command: str = "",
             context: RunContext | None = None) -> RunInfo:
    """The serving bench's RunInfo: what it measured, on the machine of `context` (default: this run's)."""
    ctx = context or run_context(("torch",))
    return RunInfo(machine=ctx.machine, cpu=ctx.cpu, cores=ctx.cores, torch=ctx.versions.get("torch", "-"),
                   model=model, dtype=dtype, device=device, workload=workload, docs_per_request=docs_per_request,
                   commit=ctx.commit, date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                   command=command, gpu=ctx.gpu)


def write_csv(path: Path, rows: list[Row], info: RunInfo) -> Path:
    """One line per row, the run's context in columns of every line."""
    names = [f.name for f in fields(Row)] + [f.name for f in fields(RunInfo)]
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=names)
    writer.writeheader()
    for row in rows:
        writer.writerow({**_rounded(asdict(row)), **asdict(info)})
    return atomic_write(path, text.getvalue())


def _rounded(values: dict) -> dict:
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in values.items()}


# --------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    measured: float | None
    goal: str
    met: bool | None
    detail: str


def _best(rows: list[Row], contender: str, variant: str | None = None) -> Row | None:
    cands = [r for r in rows if r.contender == contender and r.measure == "sweep"
             and (variant is None or r.variant == variant)]
    return max(cands, key=lambda r: r.pairs_per_s, default=None)


def _one(rows: list[Row], contender: str, measure: str) -> Row | None:
    return next((r for r in rows if r.contender == contender and r.measure == measure), None)


def targets(rows: list[Row]) -> list[Target]:
    """The project's CPU targets, for each served Triton contender (protocol and settings variant)."""
    hf, packed = _one(rows, HF, "offline"), _one(rows, PACKED, "offline")
    packed_latency = _one(rows, PACKED, "latency")
    infinity = _best(rows, INFINITY)
    out: list[Target] = []
    served = sorted({(r.contender, r.variant) for r in rows if r.contender.startswith("triton-")})
    for contender, variant in served:
        best = _best(rows, contender, variant)
        label = f"{contender} [{variant}]"
        where = f"best {best.pairs_per_s:.1f} pairs/s at concurrency {best.concurrency}"
        for other, goal, name in ((hf, 1.3, "vs HF padded in-process"), (infinity, 1.5, "vs Infinity (best)"),
                                  (packed, 0.85, "vs packed in-process")):
            if other is None or other.pairs_per_s <= 0:
                continue
            ratio = best.pairs_per_s / other.pairs_per_s
            out.append(Target(f"{label} {name}", ratio, f">= {goal:.2f}x", ratio >= goal,
                              f"{where} / {other.pairs_per_s:.1f} pairs/s"))
        c1 = next((r for r in rows if r.contender == contender and r.variant == variant and r.measure == "sweep"
                   and r.concurrency == 1), None)
        if c1 is not None and packed_latency is not None and c1.p50_ms is not None:
            delta = c1.p50_ms - packed_latency.p50_ms
            out.append(Target(f"{label} p50 at concurrency 1 minus in-process", delta, "<= 5 ms", delta <= 5.0,
                              f"{c1.p50_ms:.1f} ms served (perf_analyzer) vs {packed_latency.p50_ms:.1f} ms "
                              "in-process, separate runs"))
        if c1 is not None and c1.overhead_ms is not None:
            out.append(Target(f"{label} serving overhead of one request", c1.overhead_ms, "<= 5 ms",
                              c1.overhead_ms <= 5.0,
                              f"mean latency {c1.avg_ms:.1f} ms at concurrency 1 = tokenizer step {c1.tokenizer_ms:.1f} + "
                              f"encoder forwards {c1.encoder_ms:.1f} + the rest (server metrics, same requests)"))
            if packed_latency is not None and packed_latency.tokenizer_ms is not None:
                added = c1.overhead_ms + c1.tokenizer_ms - packed_latency.tokenizer_ms
                out.append(Target(
                    f"{label} latency added by serving one request", added, "<= 5 ms", added <= 5.0,
                    f"overhead {c1.overhead_ms:.1f} + tokenizer step {c1.tokenizer_ms:.1f} served vs "
                    f"{packed_latency.tokenizer_ms:.1f} in-process (the encoder forward is the same code; its "
                    "run-to-run drift is left out)"))
        served = next((r for r in rows if r.contender == contender and r.variant == variant
                       and r.measure == "paired"), None)
        local = next((r for r in rows if r.contender == PACKED and r.measure == "paired"
                      and r.variant == f"paired with [{variant}]"), None)
        if served is not None and local is not None:
            delta = served.p50_ms - local.p50_ms
            out.append(Target(f"{label} p50 of one request minus in-process, alternating", delta, "<= 5 ms",
                              delta <= 5.0, f"{served.p50_ms:.1f} ms served (tritonclient) vs {local.p50_ms:.1f} ms "
                              f"in-process, {served.requests} requests each, interleaved"))
    return out


# --------------------------------------------------------------------------------------------
# Markdown and PNG
# --------------------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def summary_rows(rows: list[Row]) -> list[list[str]]:
    """One line per contender (and variant): best throughput, latency of one request alone."""
    out = []
    seen: list[tuple[str, str]] = []
    for r in rows:
        if (r.contender, r.variant) not in seen:
            seen.append((r.contender, r.variant))
    for contender, variant in seen:
        mine = [r for r in rows if r.contender == contender and r.variant == variant]
        tput = [r for r in mine if r.measure in ("sweep", "offline")]
        best = max(tput, key=lambda r: r.pairs_per_s, default=None)
        alone = next((r for r in mine if r.measure in ("latency", "paired")
                      or (r.measure == "sweep" and r.concurrency == 1)), None)
        at = "all pairs" if best and best.measure == "offline" else (f"c={best.concurrency}" if best else "-")
        out.append([contender, variant, mine[0].backend, f"{best.pairs_per_s:.1f}" if best else "-", at,
                    _ms(alone.p50_ms if alone else None), _ms(alone.p99_ms if alone else None)])
    return out


def per_run_targets(raw: list[Row]) -> dict[str, list[float]]:
    """Each target computed within each run alone (contenders measured minutes apart, not a run apart)."""
    out: dict[str, list[float]] = {}
    for run in sorted({r.run for r in raw}):
        for t in targets([r for r in raw if r.run == run]):
            out.setdefault(t.name, []).append(t.measured)
    return out


def markdown(rows: list[Row], info: RunInfo, plot_name: str | None, notes: list[str] | None = None,
             raw: list[Row] | None = None) -> str:
    parts = [
        f"# triton-rerank benchmark: {info.workload}",
        "",
        f"- model: {info.model}; {info.dtype} on {info.device}",
        f"- machine: {info.machine}; {info.cpu}; {info.cores} cores{info.gpu_suffix('; ')}; torch {info.torch}",
        f"- commit {info.commit}, {info.date}",
    ]
    if info.command:
        parts.append(f"- command: `{info.command}`")
    parts += ["", "## Summary", "",
              "Best throughput over the concurrency sweep (in-process: all pairs in one go); latency of one "
              f"request of 1 query x {info.docs_per_request} documents sent alone (concurrency 1).", "",
              markdown_table(["contender", "settings", "backend", "pairs/s", "at", "p50 ms (1 request)", "p99 ms (1 request)"],
                     summary_rows(rows))]
    goals = targets(rows)
    runs = per_run_targets(raw) if raw and len({r.run for r in raw}) > 1 else {}
    if goals:
        intro = ("From the medians over the runs; \"each run\" gives the same figure computed within each run."
                 if runs else "")
        parts += ["", "## Targets", "", *([intro, ""] if intro else []), markdown_table(
            ["target", "measured", "each run", "goal", "met", "how"],
            [[t.name, f"{t.measured:.2f}" + (" ms" if "ms" in t.goal else "x"),
              ", ".join(f"{v:.2f}" for v in runs.get(t.name, [])) or "-", t.goal, "yes" if t.met else "no",
              t.detail] for t in goals])]
    sweep = [r for r in rows if r.measure == "sweep"]
    if sweep:
        parts += ["", "## Concurrency sweep", "", markdown_table(
            ["contender", "settings", "concurrency", "runs", "requests", "requests/s", "pairs/s", "p50 ms", "p99 ms",
             "avg ms", "overhead ms"],
            [[r.contender, r.variant, str(r.concurrency), str(r.runs), str(r.requests), f"{r.requests_per_s:.2f}",
              f"{r.pairs_per_s:.1f}", _ms(r.p50_ms), _ms(r.p99_ms), _ms(r.avg_ms), _ms(r.overhead_ms)]
             for r in sweep])]
    if plot_name:
        parts += ["", f"![throughput and latency vs concurrency]({plot_name})"]
    if notes:
        parts += ["", "## Notes", "", *[f"- {n}" for n in notes]]
    return "\n".join(parts) + "\n"


def write_plot(path: Path, rows: list[Row], info: RunInfo) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (ax_t, ax_l) = plt.subplots(1, 2, figsize=(13, 5.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    series = []
    for r in rows:
        if r.measure == "sweep" and (r.contender, r.variant) not in series:
            series.append((r.contender, r.variant))
    for i, (contender, variant) in enumerate(series):
        pts = sorted((r for r in rows if r.measure == "sweep" and r.contender == contender and r.variant == variant),
                     key=lambda r: r.concurrency)
        label = contender if len({v for c, v in series}) == 1 else f"{contender} [{variant}]"
        xs = [r.concurrency for r in pts]
        color = colors[i % len(colors)]
        ax_t.plot(xs, [r.pairs_per_s for r in pts], "o-", color=color, label=label)
        ax_l.plot(xs, [r.p50_ms for r in pts], "o-", color=color, label=f"{label} p50")
        ax_l.plot(xs, [r.p99_ms for r in pts], "x:", color=color, label=f"{label} p99")
    for j, name in enumerate((PACKED, HF)):
        color = colors[(len(series) + j) % len(colors)]
        offline, alone = _one(rows, name, "offline"), _one(rows, name, "latency")
        if offline:
            ax_t.axhline(offline.pairs_per_s, ls="--", color=color, label=f"{name} in-process (all pairs)")
        if alone and alone.p50_ms is not None:
            ax_l.axhline(alone.p50_ms, ls="--", color=color, label=f"{name} in-process, 1 request p50")
    levels = sorted({r.concurrency for r in rows if r.measure == "sweep"})
    for ax, ylabel in ((ax_t, "pairs / s"), (ax_l, "latency per request (ms)")):
        ax.set_xscale("log", base=2)
        if levels:
            ax.set_xticks(levels, [str(c) for c in levels])
        ax.set_xlabel("concurrency (requests in flight)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    ax_t.set_ylim(bottom=0)
    ax_l.set_yscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    ax_l.yaxis.set_major_formatter(plain)
    ax_l.yaxis.set_minor_formatter(plain)
    fig.suptitle(info.title(), fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format=Path(path).suffix.lstrip(".") or "png")
    plt.close(fig)
    return Path(path)


def write_bench_report(out: Path, rows: list[Row], raw: list[Row], info: RunInfo, notes: list[str]) -> list[Path]:
    """bench.csv (medians over runs), bench_runs.csv (each run), bench.md and, with rows, bench.png."""
    out = Path(out)
    written = [write_csv(out / "bench.csv", rows, info), write_csv(out / "bench_runs.csv", raw, info)]
    plot = write_plot(out / "bench.png", rows, info) if rows else None
    written.append(atomic_write(out / "bench.md", markdown(rows, info, plot.name if plot else None, notes, raw)))
    return written + ([plot] if plot else [])
