"""Rendering the model repository and the server's environment."""

import sys

import pytest

from triton_rerank.launcher.server import (
    DEFAULT_MODEL_REPOSITORY,
    LauncherError,
    RepositorySettings,
    TritonInstall,
    render_model_repository,
    server_environment,
    set_parameter,
)


def test_render_fills_parameters_and_instance_kind(tmp_path):
    settings = RepositorySettings(model_path='/models/a "b"', device="cpu", dtype="float16", instances=2,
                                  max_batch_tokens=4096)
    out = render_model_repository(settings, tmp_path / "repo")
    cross = (out / "cross_encoder" / "config.pbtxt").read_text()
    assert 'key: "model_path", value: { string_value: "/models/a \\"b\\"" }' in cross
    assert 'key: "dtype", value: { string_value: "float16" }' in cross
    assert 'key: "max_batch_tokens", value: { string_value: "4096" }' in cross
    assert "instance_group [ { count: 2, kind: KIND_CPU } ]" in cross
    assert 'string_value: "/models/a' in (out / "tokenizer" / "config.pbtxt").read_text()
    # The source repository is untouched and every model made it over.
    assert 'string_value: "BAAI/bge-reranker-v2-m3"' in (DEFAULT_MODEL_REPOSITORY / "cross_encoder" / "config.pbtxt").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["cross_encoder", "reranker", "tokenizer"]


def test_auto_device_leaves_instance_kind_to_triton(tmp_path):
    out = render_model_repository(RepositorySettings(model_path="m"), tmp_path / "repo")
    assert "instance_group [ { count: 1 } ]" in (out / "cross_encoder" / "config.pbtxt").read_text()


def test_unknown_parameter_is_an_error():
    with pytest.raises(LauncherError, match="no parameter 'nope'"):
        set_parameter('{ key: "model_path", value: { string_value: "" } }', "nope", "x")


def test_environment_puts_this_python_first():
    env = server_environment(TritonInstall.find())
    assert env["PATH"].split(":")[0] == str(__import__("pathlib").Path(sys.executable).parent)
    assert str(TritonInstall.find().libs) in env["LD_LIBRARY_PATH"]
    assert TritonInstall.find().server.is_file() and TritonInstall.find().stub.is_file()


def test_gpu_instances_follow_their_placement(tmp_path):
    out = render_model_repository(RepositorySettings(model_path="m", device="cuda", instances=2), tmp_path / "r")
    config = (out / "cross_encoder" / "config.pbtxt").read_text()
    assert "instance_group [ { count: 2, kind: KIND_GPU } ]" in config
    assert 'key: "device", value: { string_value: "auto" }' in config


def test_queue_size_is_set_on_both_steps(tmp_path):
    out = render_model_repository(RepositorySettings(model_path="m", max_queue_size=7), tmp_path / "r")
    for model in ("tokenizer", "cross_encoder"):
        assert "max_queue_size: 7" in (out / model / "config.pbtxt").read_text()
