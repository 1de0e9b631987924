"""The model repository: the packaged source and the one renderer, read back as ModelConfig messages."""

import importlib.resources
import json
import shutil
import zipfile
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc.model_config_pb2 import ModelConfig, ModelInstanceGroup

from triton_rerank.launcher.errors import LauncherError
from triton_rerank.launcher.repository import (
    TEMPLATE_COPY,
    RepositorySettings,
    copy_tree,
    packaged_model_repository,
    read_config,
    read_repository,
    render_model_repository,
)

MODELS = ["cross_encoder", "reranker", "tokenizer"]


def parse(path: Path) -> ModelConfig:
    """What tritonserver reads: the file parsed as a Triton ModelConfig, independently of the launcher."""
    return text_format.Parse(path.read_text(), ModelConfig())


def params(config: ModelConfig) -> dict[str, str]:
    return {key: value.string_value for key, value in config.parameters.items()}


def test_packaged_repository_is_the_package_data():
    source = packaged_model_repository()
    assert source == importlib.resources.files("triton_rerank") / "model_repository"
    assert sorted(read_repository()) == MODELS
    assert read_repository()["reranker"].platform == "ensemble"
    # The source keeps its comments: only rendered copies are rewritten.
    assert (source / "cross_encoder" / "config.pbtxt").read_text().startswith("#")


def test_rendered_configs_parse_back_with_the_values_set(tmp_path):
    settings = RepositorySettings(model_path='/models/a "b"', device="cuda", dtype="float16", engine="hf",
                                  attention_backend="sdpa", max_length=512, max_batch_tokens=4096, instances=2,
                                  gpus=(0, 3), num_threads=3, max_queue_size=7, queue_delay_us=250,
                                  max_documents=10, long_documents="chunk", max_chunks_per_doc=5,
                                  extra={"tokenizer": {"max_text_bytes": "2048"}})
    out = render_model_repository(settings, tmp_path / "repo")
    assert sorted(p.name for p in out.iterdir()) == MODELS
    cross, tokenizer = parse(out / "cross_encoder" / "config.pbtxt"), parse(out / "tokenizer" / "config.pbtxt")
    assert params(cross) == {"model_path": '/models/a "b"', "engine": "hf", "attention_backend": "sdpa",
                             "dtype": "float16", "quantize": "none", "compile": "false", "device": "auto", "max_batch_tokens": "4096", "num_threads": "3",
                             "max_documents": "10", "max_chunks_per_doc": "5", "max_length": "512",
                             "reranker_kind": "auto",  # no local config.json to read: each step reads it
                             "prefix_sharing": "true", "min_shared_prefix": "0"}
    assert params(tokenizer).items() >= {"model_path": '/models/a "b"', "max_length": "512", "max_documents": "10",
                                         "max_text_bytes": "2048", "long_documents": "chunk",
                                         "max_chunks_per_doc": "5"}.items()
    (group,) = cross.instance_group
    assert (group.count, group.kind, list(group.gpus)) == (2, ModelInstanceGroup.KIND_GPU, [0, 3])
    assert cross.dynamic_batching.max_queue_delay_microseconds == 250
    assert cross.dynamic_batching.default_queue_policy.max_queue_size == 7
    assert tokenizer.dynamic_batching.default_queue_policy.max_queue_size == 7
    assert tokenizer.dynamic_batching.max_queue_delay_microseconds == 0  # the tokenizer step needs no delay

    # Everything not set is as in the source, field for field.
    source = read_repository()
    expected = source["cross_encoder"]
    for key, value in params(cross).items():
        expected.parameters[key].string_value = value
    expected.instance_group[0].CopyFrom(group)
    expected.dynamic_batching.max_queue_delay_microseconds = 250
    expected.dynamic_batching.default_queue_policy.max_queue_size = 7
    assert cross == expected
    assert parse(out / "reranker" / "config.pbtxt") == source["reranker"]
    # The model code is copied as it is.
    for model in ("cross_encoder", "tokenizer"):
        assert (out / model / "1" / "model.py").read_bytes() == (
            packaged_model_repository() / model / "1" / "model.py").read_bytes()


def test_render_replaces_the_target_and_leaves_the_source(tmp_path):
    target = tmp_path / "repo"
    (target / "stale").mkdir(parents=True)
    render_model_repository(RepositorySettings(model_path="m"), target)
    assert not (target / "stale").exists()
    assert params(read_config(packaged_model_repository() / "cross_encoder"))["model_path"] == "BAAI/bge-reranker-v2-m3"


@pytest.mark.parametrize(("device", "gpus", "kind", "expected_gpus", "device_parameter"), [
    ("auto", (), ModelInstanceGroup.KIND_AUTO, [], "auto"),
    ("cpu", (), ModelInstanceGroup.KIND_CPU, [], "cpu"),
    # GPU instances keep the encoder's device "auto": each runs on the GPU Triton placed it on.
    ("cuda", (), ModelInstanceGroup.KIND_GPU, [], "auto"),
    ("cuda", (1, 0), ModelInstanceGroup.KIND_GPU, [1, 0], "auto"),
    ("cuda:2", (), ModelInstanceGroup.KIND_GPU, [2], "auto"),
])
def test_instance_placement(tmp_path, device, gpus, kind, expected_gpus, device_parameter):
    out = render_model_repository(RepositorySettings(model_path="m", device=device, gpus=gpus, instances=3),
                                  tmp_path / "r")
    config = parse(out / "cross_encoder" / "config.pbtxt")
    assert [(g.count, g.kind, list(g.gpus)) for g in config.instance_group] == [(3, kind, expected_gpus)]
    assert params(config)["device"] == device_parameter
    # The tokenizer's own placement (CPU, as in its source) is not the encoder's.
    (tokenizer,) = parse(out / "tokenizer" / "config.pbtxt").instance_group
    assert tokenizer == read_repository()["tokenizer"].instance_group[0]
    assert tokenizer.kind == ModelInstanceGroup.KIND_CPU


def test_queue_settings_default_to_the_source(tmp_path):
    out = render_model_repository(RepositorySettings(model_path="m"), tmp_path / "r")
    source = read_repository()
    for model in ("tokenizer", "cross_encoder"):
        assert parse(out / model / "config.pbtxt").dynamic_batching == source[model].dynamic_batching


def test_unknown_parameter_is_refused_naming_it(tmp_path):
    target = tmp_path / "r"
    with pytest.raises(LauncherError, match="cross_encoder/config.pbtxt has no parameter 'nope'"):
        render_model_repository(RepositorySettings(model_path="m", extra={"cross_encoder": {"nope": "x"}}), target)
    with pytest.raises(LauncherError, match="no model 'decoder'"):
        render_model_repository(RepositorySettings(model_path="m", extra={"decoder": {"model_path": "x"}}), target)
    assert not target.exists()  # checked before anything is written


@pytest.mark.parametrize(("settings", "message"), [
    ({"device": "gpu"}, "device must be auto, cpu, cuda or cuda:N"),
    ({"device": "cuda:x"}, "device must be"),
    ({"device": "cpu", "gpus": (0,)}, "need device cuda"),
    ({"device": "cuda", "gpus": (1, 1)}, "distinct"),
    ({"device": "cuda:1", "gpus": (0,)}, "disagree"),
    ({"instances": 0}, "instances must be at least 1"),
    ({"queue_delay_us": -1}, "queue_delay_us must be >= 0"),
    ({"max_batch_tokens": -5}, "max_batch_tokens must be >= 0"),
    ({"max_documents": 0}, "max_documents must be at least 1"),
    ({"max_chunks_per_doc": 0}, "max_chunks_per_doc must be at least 1"),
    ({"long_documents": "split"}, "long_documents must be one of truncate, chunk, error, got 'split'"),
    ({"quantize": "int4"}, "quantize must be one of none, int8, got 'int4'"),
    ({"quantize": "int8", "device": "cuda"}, "quantize int8 is for CPUs: set device cpu"),
    ({"quantize": "int8", "device": "cpu", "engine": "hf"}, "for the packed and openvino engines of cross-encoders, "
                                                            "not the hf"),
    ({"compile": True, "engine": "hf"}, "compile is for the packed engine of cross-encoders, not the hf"),
    ({"engine": "onnx"}, "engine must be one of auto, packed, hf, openvino, got 'onnx'"),
    ({"engine": "openvino", "device": "cuda"}, "engine openvino runs on the CPU: set device cpu"),
    ({"engine": "openvino", "dtype": "float16"}, "engine openvino runs in float32 or bfloat16"),
    ({"engine": "openvino", "reranker_kind": "decoder"}, "engine openvino is for cross-encoders"),
    ({"engine": "openvino", "compile": True, "device": "cpu"}, "compile is for the packed engine of cross-encoders, "
                                                               "not the openvino"),
    ({"engine": "openvino", "quantize": "int8", "reranker_kind": "decoder"}, "engine openvino is for cross-encoders"),
])
def test_bad_settings_are_refused(tmp_path, settings, message):
    with pytest.raises(LauncherError, match=message):
        render_model_repository(RepositorySettings(model_path="m", **settings), tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_settings_need_what_the_source_has(tmp_path):
    source = copy_tree(packaged_model_repository(), tmp_path / "source")
    config = read_config(source / "tokenizer")
    config.ClearField("dynamic_batching")
    (source / "tokenizer" / "config.pbtxt").write_text(text_format.MessageToString(config))
    render_model_repository(RepositorySettings(model_path="m"), tmp_path / "ok", source=source)
    with pytest.raises(LauncherError, match="tokenizer/config.pbtxt has no dynamic_batching"):
        render_model_repository(RepositorySettings(model_path="m", max_queue_size=3), tmp_path / "r", source=source)
    (source / "reranker" / "config.pbtxt").write_text("name: 'reranker'\nnot_a_field: 1\n")
    with pytest.raises(LauncherError, match="not a Triton model configuration"):
        render_model_repository(RepositorySettings(model_path="m"), tmp_path / "r", source=source)


def test_the_ensemble_gets_its_version_directory(tmp_path):
    """A wheel may leave out the ensemble's empty `1/`: the renderer creates it."""
    source = copy_tree(packaged_model_repository(), tmp_path / "source")
    shutil.rmtree(source / "reranker" / "1")
    out = render_model_repository(RepositorySettings(model_path="m"), tmp_path / "r", source=source)
    assert (out / "reranker" / "1").is_dir()
    assert (out / "cross_encoder" / "1" / "model.py").is_file()


def test_renders_from_a_resource_that_is_not_a_directory(tmp_path):
    """The source is read through importlib.resources' Traversable API only (a zipped package works)."""
    archive = tmp_path / "package.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in Path(str(packaged_model_repository())).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts:
                zf.write(path, "triton_rerank/model_repository/" + path.relative_to(str(packaged_model_repository())).as_posix())
    source = zipfile.Path(archive, "triton_rerank/model_repository/")
    out = render_model_repository(RepositorySettings(model_path="zipped", device="cpu"), tmp_path / "r", source=source)
    assert params(parse(out / "tokenizer" / "config.pbtxt"))["model_path"] == "zipped"
    reference = render_model_repository(RepositorySettings(model_path="zipped", device="cpu"), tmp_path / "ref")
    for model in MODELS:
        assert parse(out / model / "config.pbtxt") == parse(reference / model / "config.pbtxt")
    assert (out / "tokenizer" / "1" / "model.py").read_bytes() == (reference / "tokenizer" / "1" / "model.py").read_bytes()


def test_a_local_model_is_linked_so_configs_name_no_host_path(tmp_path):
    model_dir = tmp_path / "secret-host-dir" / "model"
    model_dir.mkdir(parents=True)
    (model_dir / "config.json").write_text(json.dumps({"model_type": "bert"}))
    out = render_model_repository(RepositorySettings(model_path=str(model_dir)), tmp_path / "repo")
    for step in ("tokenizer", "cross_encoder"):
        config_text = (out / step / "config.pbtxt").read_text()
        assert "secret-host-dir" not in config_text
        value = params(parse(out / step / "config.pbtxt"))["model_path"]
        assert not Path(value).is_absolute()
        assert (out / step / value).resolve() == model_dir.resolve()
    # A Hub id is no host path: it stays as it is.
    hub = render_model_repository(RepositorySettings(model_path="BAAI/bge-reranker-v2-m3"), tmp_path / "hub")
    assert params(parse(hub / "cross_encoder" / "config.pbtxt"))["model_path"] == "BAAI/bge-reranker-v2-m3"


def test_the_scoring_step_gets_the_tokenizers_request_limits(tmp_path):
    out = render_model_repository(RepositorySettings(model_path="m", max_documents=7, max_length=64), tmp_path / "r")
    cross, tokenizer = (params(parse(out / step / "config.pbtxt")) for step in ("cross_encoder", "tokenizer"))
    assert cross["max_documents"] == tokenizer["max_documents"] == "7"
    assert cross["max_length"] == tokenizer["max_length"] == "64"
    # And the packaged defaults agree too.
    source = read_repository()
    assert (source["cross_encoder"].parameters["max_documents"].string_value
            == source["tokenizer"].parameters["max_documents"].string_value)


def _model_dir(path, config: dict):
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_reranker_kind_is_detected_and_told_to_every_step(tmp_path):
    qwen = _model_dir(tmp_path / "qwen", {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"]})
    template = tmp_path / "prompt.jinja"
    template.write_text("{{ query }} {{ document }}")
    settings = RepositorySettings(model_path=str(qwen), prompt_template=str(template),
                                  default_instruction="Find the answer")
    out = render_model_repository(settings, tmp_path / "repo")
    configs = {name: parse(out / name / "config.pbtxt") for name in MODELS}
    assert {name: params(c)["reranker_kind"] for name, c in configs.items()} == {
        "cross_encoder": "decoder", "reranker": "decoder", "tokenizer": "decoder"}
    tokenizer = params(configs["tokenizer"])
    assert tokenizer["default_instruction"] == "Find the answer"
    # The template is copied into the repository, so that the config names no host path.
    assert tokenizer["prompt_template"] == TEMPLATE_COPY
    assert (out / "tokenizer" / TEMPLATE_COPY).read_text() == template.read_text()

    assert params(configs["cross_encoder"])["prefix_sharing"] == "true"
    settings.prefix_sharing = False  # serve --no-prefix-sharing
    out = render_model_repository(settings, tmp_path / "repo-no-sharing")
    assert params(parse(out / "cross_encoder" / "config.pbtxt"))["prefix_sharing"] == "false"

    bert = _model_dir(tmp_path / "bert", {"model_type": "bert"})
    out = render_model_repository(RepositorySettings(model_path=str(bert)), tmp_path / "repo2")
    assert params(parse(out / "reranker" / "config.pbtxt"))["reranker_kind"] == "cross-encoder"
    assert params(parse(out / "tokenizer" / "config.pbtxt"))["prompt_template"] == ""


@pytest.mark.parametrize(("config", "settings", "message"), [
    ({"model_type": "bert"}, {"default_instruction": "x"}, "cross-encoder, which takes neither"),
    ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, {}, "--reranker-kind"),
    ({"model_type": "qwen3"}, {"prompt_template": "/no/such/file.jinja"}, "is not a file"),
    ({"model_type": "qwen3"}, {"reranker_kind": "lm"}, "reranker_kind must be"),
    ({"model_type": "bert"}, {"reranker_kind": "decoder"}, "not a decoder"),
])
def test_reranker_kind_mistakes_are_refused_before_anything_is_written(tmp_path, config, settings, message):
    model = _model_dir(tmp_path / "model", config)
    with pytest.raises(LauncherError, match=message):
        render_model_repository(RepositorySettings(model_path=str(model), **settings), tmp_path / "repo")
    assert not (tmp_path / "repo").exists()


def test_int8_is_refused_before_anything_starts_on_a_cpu_without_int8_instructions(tmp_path, monkeypatch):
    monkeypatch.setattr("triton_rerank.models.dtypes.cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})
    with pytest.raises(LauncherError, match="needs a CPU with int8 dot-product instructions"):
        render_model_repository(RepositorySettings(model_path="m", device="cpu", quantize="int8"), tmp_path / "r")
    assert not (tmp_path / "r").exists()
    monkeypatch.setattr("triton_rerank.models.dtypes.cpu_flags", lambda: {"avx512_vnni"})
    out = render_model_repository(RepositorySettings(model_path="m", device="cpu", quantize="int8"), tmp_path / "r")
    assert params(parse(out / "cross_encoder" / "config.pbtxt"))["quantize"] == "int8"


def test_compiling_needs_a_cxx_compiler_and_is_told_to_the_scoring_step(tmp_path, monkeypatch):
    out = render_model_repository(RepositorySettings(model_path="m", device="cpu", compile=True), tmp_path / "r")
    assert params(parse(out / "cross_encoder" / "config.pbtxt"))["compile"] == "true"
    monkeypatch.setattr("shutil.which", lambda name: None)
    for settings in ({"compile": True}, {"quantize": "int8"}):
        with pytest.raises(LauncherError, match="needs a C\\+\\+ compiler on this host: install g\\+\\+"):
            render_model_repository(RepositorySettings(model_path="m", device="cpu", **settings), tmp_path / "s")
    assert not (tmp_path / "s").exists()
    # OpenVINO quantizes its own graph: no torch.compile, no compiler needed.
    monkeypatch.setattr("triton_rerank.models.dtypes.cpu_flags", lambda: {"avx512_vnni"})
    out = render_model_repository(RepositorySettings(model_path="m", device="cpu", engine="openvino", quantize="int8"),
                                  tmp_path / "s")
    assert params(parse(out / "cross_encoder" / "config.pbtxt"))["quantize"] == "int8"


def test_engine_openvino_without_its_package_says_how_to_install_it(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))
    with pytest.raises(LauncherError, match=r"needs the openvino package: pip install 'triton-rerank\[openvino\]'"):
        render_model_repository(RepositorySettings(model_path="m", engine="openvino"), tmp_path / "r")
