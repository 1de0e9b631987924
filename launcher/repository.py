"""The model repository: the packaged source, its config.pbtxt files as `ModelConfig` messages,
and the one renderer that fills in a run copy for one model and one placement.

config.pbtxt is read and written with the protobuf message tritonclient ships
(`tritonclient.grpc.model_config_pb2.ModelConfig`) and `google.protobuf.text_format`, never edited
as text: what the renderer writes is what tritonserver parses. The rendered copies lose the source
files' comments (they say where their commented source is); model_repository/ keeps them.

The source is the package's own `model_repository/` (package data, found through
importlib.resources, so a non-editable `pip install` works), or any directory laid out the same.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import text_format
from google.protobuf.message import Message
from tritonclient.grpc.model_config_pb2 import ModelConfig, ModelInstanceGroup

from ..models.dtypes import QUANTIZE_NAMES, int8_instructions
from ..models.families import ENGINE_CHOICES, RERANKER_KINDS, reranker_kind
from ..serving.request_options import LONG_DOCUMENT_MODES
from .errors import LauncherError

try:
    from importlib.resources.abc import Traversable
except ImportError:  # Python 3.10
    from importlib.abc import Traversable

CONFIG = "config.pbtxt"
# The ensemble's steps whose parameters the settings fill in.
TOKENIZER = "tokenizer"
SCORER = "cross_encoder"
ENSEMBLE = "reranker"
# Where a rendered step finds a local model: a link in its version directory, so that the config
# (readable by any client at /v2/models/<step>/config) names no host path.
MODEL_LINK = "1/hf_model"
# Where a rendered tokenizer step finds the prompt template it was given (a copy, for the same reason).
TEMPLATE_COPY = "1/prompt_template.jinja"


def packaged_model_repository() -> Traversable:
    """The model repository shipped in the package (a directory on disk for a regular install)."""
    return importlib.resources.files("triton_rerank") / "model_repository"


def parse_config(text: str, name: str = CONFIG) -> ModelConfig:
    try:
        return text_format.Parse(text, ModelConfig())
    except text_format.ParseError as error:
        raise LauncherError(f"{name} is not a Triton model configuration: {error}") from None


def read_config(path: Traversable | Path) -> ModelConfig:
    """A config.pbtxt (a file path, or a model directory holding one) as a ModelConfig."""
    if path.name != CONFIG:
        path = path / CONFIG
    return parse_config(path.read_text(), str(path))


def format_config(config: Message, header: str = "") -> str:
    comment = "".join(f"# {line}\n" for line in header.splitlines())
    return comment + text_format.MessageToString(config)


def write_config(config: ModelConfig, path: Path, header: str = "") -> Path:
    """Writes `config` as text format; the result parses back to the same message."""
    if path.name != CONFIG:
        path = path / CONFIG
    path.write_text(format_config(config, header))
    return path


def model_names(source: Traversable | Path) -> list[str]:
    """The models of a repository: its directories that hold a config.pbtxt."""
    return sorted(entry.name for entry in source.iterdir() if entry.is_dir() and (entry / CONFIG).is_file())


def read_repository(source: Traversable | Path | None = None) -> dict[str, ModelConfig]:
    """{model name: ModelConfig} of every model in `source` (default: the packaged repository)."""
    source = packaged_model_repository() if source is None else source
    if not source.is_dir():
        raise LauncherError(f"{source} is not a model repository directory")
    return {name: read_config(source / name) for name in model_names(source)}


@dataclass
class RepositorySettings:
    """What a rendered repository sets; everything else stays as in the source's config.pbtxt files."""

    model_path: str
    # auto: Triton places the encoder (GPU when it sees one); cpu; cuda (every visible GPU, or
    # those in `gpus`); cuda:N = cuda on GPU N.
    device: str = "auto"
    dtype: str = "auto"
    quantize: str = "none"  # or int8 (models/int8_linear.py)
    compile: bool = False  # torch.compile the packed cross-encoder at load
    engine: str = "auto"  # or one of ENGINE_NAMES; auto is resolved by the scoring step (models/families.py)
    attention_backend: str = ""
    max_length: int = 0
    # Documents per request, enforced by the tokenizer step and again by the scoring step.
    max_documents: int = 1000
    # What a request that does not say gets for a document longer than the model's window
    # (truncate, chunk or error), and the default windows per chunked document (a request may ask
    # for more, within max_documents x max_chunks_per_doc windows).
    long_documents: str = "truncate"
    max_chunks_per_doc: int = 64
    max_batch_tokens: int = 0  # 0 = the device default (4096 on CPU, 16384 on GPU)
    # cross_encoder instances: in all (cpu, auto), or on each GPU (cuda).
    instances: int = 1
    gpus: tuple[int, ...] = ()
    num_threads: int = 0
    # Waiting requests per model before new ones are refused (0 = as in config.pbtxt).
    max_queue_size: int = 0
    # The encoder's dynamic-batching wait (max_queue_delay_microseconds); None = as in config.pbtxt.
    queue_delay_us: int | None = None
    # "cross-encoder" or "decoder" (a Qwen3-Reranker); "auto" reads the model's config.json.
    reranker_kind: str = "auto"
    # Decoder rerankers: a Jinja prompt template file on this host ("" = the model's own prompt),
    # and the instruction of requests that send none ("" = the model's own default).
    prompt_template: str = ""
    default_instruction: str = ""
    # Decoder rerankers: compute each request's shared prompt head once (scores are unchanged).
    prefix_sharing: bool = True
    # More parameters, {model: {key: value}}; each key must be one the model's config.pbtxt has.
    extra: dict[str, dict[str, str]] = field(default_factory=dict)

    def placement(self) -> tuple[int | None, tuple[int, ...]]:
        """(instance kind or None for Triton's choice, GPU ids) of the encoder's instances."""
        device, _, index = self.device.partition(":")
        gpus = tuple(self.gpus)
        if device not in ("auto", "cpu", "cuda") or (index and (device != "cuda" or not index.isdigit())):
            raise LauncherError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if index:
            if gpus and gpus != (int(index),):
                raise LauncherError(f"device {self.device!r} and gpus {list(gpus)} disagree")
            gpus = (int(index),)
        if gpus and device != "cuda":
            raise LauncherError(f"GPU ids {list(gpus)} need device cuda, got {self.device!r}")
        if any(g < 0 for g in gpus) or len(set(gpus)) != len(gpus):
            raise LauncherError(f"gpus must be distinct non-negative GPU ids, got {list(gpus)}")
        kind = {"cpu": ModelInstanceGroup.KIND_CPU, "cuda": ModelInstanceGroup.KIND_GPU}.get(device)
        return kind, gpus

    def parameters(self) -> dict[str, dict[str, str]]:
        """{model: {parameter: value}} this rendering sets."""
        kind = self.resolved_kind()
        values = {
            TOKENIZER: {"model_path": self.model_path, "max_length": str(self.max_length),
                        "max_documents": str(self.max_documents), "long_documents": self.long_documents,
                        "max_chunks_per_doc": str(self.max_chunks_per_doc), "reranker_kind": kind,
                        "prompt_template": TEMPLATE_COPY if self.prompt_template else "",
                        "default_instruction": self.default_instruction},
            # What SCORES mean, for the gateway and other clients that read the ensemble's config.
            ENSEMBLE: {"reranker_kind": kind},
            SCORER: {
                "model_path": self.model_path,
                "reranker_kind": kind,
                "prefix_sharing": "true" if self.prefix_sharing else "false",
                "engine": self.engine,
                "attention_backend": self.attention_backend,
                "dtype": self.dtype,
                "quantize": self.quantize,
                "compile": "true" if self.compile else "false",
                # GPU instances keep "auto": each then runs on the GPU Triton placed it on, where
                # "cuda" would put every instance of a multi-GPU host on cuda:0.
                "device": "cpu" if self.device == "cpu" else "auto",
                "max_batch_tokens": str(self.max_batch_tokens),
                "num_threads": str(self.num_threads),
                "max_documents": str(self.max_documents),
                "max_chunks_per_doc": str(self.max_chunks_per_doc),
                "max_length": str(self.max_length),
            },
        }
        for model, extra in self.extra.items():
            values.setdefault(model, {}).update({key: str(value) for key, value in extra.items()})
        return values

    def resolved_kind(self) -> str:
        """The reranker kind: as set, else read from a local model's config.json ("auto" for a Hub id,
        which each step then reads itself)."""
        config = Path(self.model_path).expanduser() / "config.json"
        if not config.is_file():
            return self.reranker_kind
        try:
            return reranker_kind(json.loads(config.read_text()), self.reranker_kind)
        except ValueError as error:
            raise LauncherError(str(error)) from None

    def _check_compiled_encoder(self) -> None:
        """quantize and compile: what they need (the packed cross-encoder, a C++ compiler, int8 instructions)."""
        if self.quantize not in QUANTIZE_NAMES:
            raise LauncherError(f"quantize must be one of {', '.join(QUANTIZE_NAMES)}, got {self.quantize!r}")
        if not (self.compile or self.quantize != "none"):
            return
        what = "compile" if self.quantize == "none" else f"quantize {self.quantize}"
        # OpenVINO quantizes its own graph (no torch.compile, so no C++ compiler); it cannot compile it again.
        engines = ("packed",) if self.compile else ("packed", "openvino")
        # engine auto runs compile and quantize on the packed engine (auto_engine).
        if self.engine not in ("auto", *engines) or self.resolved_kind() == "decoder":
            raise LauncherError(f"{what} is for the {' and '.join(engines)} engine{'s' * (len(engines) > 1)} of "
                                f"cross-encoders, not the {self.engine} engine of a {self.resolved_kind()} reranker")
        # device auto is let through: on a host without a GPU it is the CPU (the scoring step refuses a GPU).
        if self.device.startswith("cuda"):
            raise LauncherError(f"{what} is for CPUs: set device cpu (got {self.device}), or use dtype float16 on "
                                "a GPU")
        if self.quantize == "int8" and not int8_instructions():
            raise LauncherError("quantize int8 needs a CPU with int8 dot-product instructions (AVX512-VNNI, AVX-VNNI "
                                "or AMX-INT8) and this one has none: without them int8 is slower than float32")
        if self.engine != "openvino" and not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "c++", "clang++")):
            raise LauncherError(f"{what} compiles the encoder with torch.compile, which needs a C++ compiler on "
                                "this host: install g++ (apt-get install g++)")

    def _check_engine(self) -> None:
        """The engine exists, and openvino gets what it runs on (a cross-encoder, the CPU, its package)."""
        if self.engine not in ENGINE_CHOICES:
            raise LauncherError(f"engine must be one of {', '.join(ENGINE_CHOICES)}, got {self.engine!r}")
        if self.engine != "openvino":
            return
        if self.resolved_kind() == "decoder":
            raise LauncherError("engine openvino is for cross-encoders; decoder rerankers run on the packed or hf "
                                "engine")
        if self.device.startswith("cuda"):
            raise LauncherError(f"engine openvino runs on the CPU: set device cpu (got {self.device})")
        if self.dtype == "float16":
            raise LauncherError("engine openvino runs in float32 or bfloat16 (dtype auto picks one), not float16")
        if importlib.util.find_spec("openvino") is None:
            raise LauncherError("engine openvino needs the openvino package: pip install 'triton-rerank[openvino]' "
                                "(or pip install openvino)")

    def check(self) -> None:
        if self.reranker_kind not in ("auto", *RERANKER_KINDS):
            raise LauncherError(f"reranker_kind must be auto or one of {', '.join(RERANKER_KINDS)}, "
                                f"got {self.reranker_kind!r}")
        if self.prompt_template and not Path(self.prompt_template).expanduser().is_file():
            raise LauncherError(f"prompt template {self.prompt_template} is not a file")
        if (self.prompt_template or self.default_instruction) and self.resolved_kind() == "cross-encoder":
            raise LauncherError("a prompt template and a default instruction are for decoder rerankers "
                                "(Qwen3-Reranker); this model is a cross-encoder, which takes neither")
        for name in ("max_length", "max_batch_tokens", "num_threads", "max_queue_size"):
            if getattr(self, name) < 0:
                raise LauncherError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_documents < 1:
            raise LauncherError(f"max_documents must be at least 1, got {self.max_documents}")
        if self.max_chunks_per_doc < 1:
            raise LauncherError(f"max_chunks_per_doc must be at least 1, got {self.max_chunks_per_doc}")
        if self.long_documents not in LONG_DOCUMENT_MODES:
            raise LauncherError(f"long_documents must be one of {', '.join(LONG_DOCUMENT_MODES)}, "
                                f"got {self.long_documents!r}")
        if self.instances < 1:
            raise LauncherError(f"instances must be at least 1, got {self.instances}")
        self._check_engine()
        self._check_compiled_encoder()
        if self.queue_delay_us is not None and self.queue_delay_us < 0:
            raise LauncherError(f"queue_delay_us must be >= 0, got {self.queue_delay_us}")
        self.placement()


def apply_settings(configs: dict[str, ModelConfig], settings: RepositorySettings) -> dict[str, ModelConfig]:
    """Sets `settings` on parsed configs (in place; returned for convenience). Raises LauncherError,
    naming the model and the key, for anything the configs do not have."""
    settings.check()
    for model, params in settings.parameters().items():
        if model not in configs:
            raise LauncherError(f"the model repository has no model {model!r} (it has {', '.join(sorted(configs))})")
        config = configs[model]
        for key, value in params.items():
            if key not in config.parameters:
                raise LauncherError(f"{model}/{CONFIG} has no parameter {key!r} "
                                    f"(it has {', '.join(sorted(config.parameters))})")
            config.parameters[key].string_value = value

    kind, gpus = settings.placement()
    scorer = configs[SCORER]
    group = ModelInstanceGroup(count=settings.instances, gpus=gpus)
    if kind is not None:
        group.kind = kind
    del scorer.instance_group[:]
    scorer.instance_group.append(group)

    if settings.queue_delay_us is not None:
        _dynamic_batching(scorer, SCORER).max_queue_delay_microseconds = settings.queue_delay_us
    if settings.max_queue_size:
        for model in (TOKENIZER, SCORER):
            _dynamic_batching(configs[model], model).default_queue_policy.max_queue_size = settings.max_queue_size
    return configs


def _dynamic_batching(config: ModelConfig, model: str):
    if not config.HasField("dynamic_batching"):
        raise LauncherError(f"{model}/{CONFIG} has no dynamic_batching to set")
    return config.dynamic_batching


def render_model_repository(settings: RepositorySettings, target: Path, source: Traversable | Path | None = None) -> Path:
    """A copy of the model repository at `target` (replaced if it exists) with `settings` filled in.

    Every config is parsed, set and checked before anything is written; each rendered
    config.pbtxt is written as text format. A model without a version directory (the ensemble,
    whose `1/` is empty and may be missing from a wheel) gets an empty `1/`.
    """
    source = packaged_model_repository() if source is None else source
    configs = apply_settings(read_repository(source), settings)
    target = Path(target)
    if target.exists():
        shutil.rmtree(target)
    copy_tree(source, target)
    link_local_models(configs, target)
    if settings.prompt_template:
        (target / TOKENIZER / TEMPLATE_COPY).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(settings.prompt_template).expanduser(), target / TOKENIZER / TEMPLATE_COPY)
    for name, config in configs.items():
        write_config(config, target / name, f"Rendered by triton-rerank from {source}/{name}/{CONFIG} "
                                            "(the commented source).")
        if not any(entry.is_dir() and entry.name.isdigit() for entry in (target / name).iterdir()):
            (target / name / "1").mkdir()
    return target


def link_local_models(configs: dict[str, ModelConfig], target: Path) -> None:
    """Points each step whose model_path is a local directory at a link inside the repository.

    A Hub id stays as it is (it names no host path). The steps resolve a relative model_path
    against their own model directory (serving/model_files.py).
    """
    for name, config in configs.items():
        if "model_path" not in config.parameters:
            continue
        local = Path(config.parameters["model_path"].string_value).expanduser()
        if not local.is_dir():
            continue
        link = target / name / MODEL_LINK
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(local.resolve(), target_is_directory=True)
        config.parameters["model_path"].string_value = MODEL_LINK


def copy_tree(source: Traversable | Path, target: Path, skip: Iterable[str] = ("__pycache__",)) -> Path:
    """Copies a directory given as a path or an importlib.resources Traversable (files' bytes only)."""
    skip = frozenset(skip)
    target.mkdir(parents=True)
    for entry in source.iterdir():
        if entry.name in skip:
            continue
        if entry.is_dir():
            copy_tree(entry, target / entry.name, skip)
        else:
            (target / entry.name).write_bytes(entry.read_bytes())
    return target


def add_long_document_options(parser, long_documents: str = "truncate", max_chunks_per_doc: str | int = 64) -> None:
    """--long-documents and --max-chunks-per-doc, the server's defaults for requests that do not say."""
    parser.add_argument("--long-documents", choices=LONG_DOCUMENT_MODES, default=long_documents,
                        help="a document longer than the model's window: truncate it, chunk it (score overlapping "
                             "windows, keep the best) or refuse the request (error); requests may choose their own")
    parser.add_argument("--max-chunks-per-doc", type=int, default=max_chunks_per_doc,
                        help="windows per chunked document unless a request says otherwise; a request may score "
                             "at most max-documents x this many windows")


def add_decoder_options(parser, reranker_kind: str = "auto", chat_template: str | None = None,
                        default_instruction: str | None = None, prefix_sharing: bool = True) -> None:
    """--reranker-kind, --chat-template, --default-instruction and --no-prefix-sharing (decoder rerankers
    such as Qwen3-Reranker)."""
    parser.add_argument("--reranker-kind", choices=["auto", *RERANKER_KINDS], default=reranker_kind,
                        help="how the model reranks: a cross-encoder (BERT/XLM-R classifier) or a decoder reranker "
                             "(Qwen3ForCausalLM, scored by logit(yes) - logit(no)); auto reads config.json")
    parser.add_argument("--chat-template", default=chat_template or None, metavar="FILE",
                        help="decoder rerankers: a Jinja prompt template (as SGLang's qwen3_reranker.jinja) "
                             "instead of the model's own Qwen3-Reranker prompt")
    parser.add_argument("--default-instruction", default=default_instruction or None, metavar="TEXT",
                        help="decoder rerankers: the instruction of requests that send none; default the model's "
                             "('Given a web search query, retrieve relevant passages that answer the query')")
    parser.add_argument("--no-prefix-sharing", dest="prefix_sharing", action="store_false", default=prefix_sharing,
                        help="decoder rerankers: run every document's whole prompt, instead of computing a "
                             "request's shared head (system prompt, instruction, query) once; scores are the same, "
                             "for comparison and debugging (prefix sharing on: %(default)s)")
