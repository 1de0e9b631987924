"""Checkpoint loading: strict name mapping, and weights the model owns whatever the file's layout."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from triton_rerank.bench.random_model import make_test_model
from triton_rerank.models.checkpoint import assign_weights, read_state_dict, select_tensors
from triton_rerank.models.cross_encoder import (
    EncoderConfig,
    PackedCrossEncoder,
    convert_hf_state_dict,
    hf_name_map,
)

ALIGNMENT = 64  # bytes; torch's CPU allocator aligns every allocation to this


def test_views_at_odd_offsets_become_owned_aligned_copies():
    buffer = torch.randn(1000)
    # 13 floats = 52 bytes past the buffer's start: what a safetensors header of that length gives.
    weight, bias = buffer[13:13 + 12].view(4, 3), buffer[500:504]
    assert weight.data_ptr() % ALIGNMENT != 0
    with torch.device("meta"):
        model = nn.Linear(3, 4)
    assign_weights(model, {"weight": weight, "bias": bias}, dtype=torch.float32, device=torch.device("cpu"),
                   source_names={})
    for p in model.parameters():
        assert p.data_ptr() % ALIGNMENT == 0 and p.is_contiguous()
        assert p.untyped_storage().data_ptr() != buffer.untyped_storage().data_ptr()
    buffer.zero_()  # the checkpoint's buffer going away or changing must not touch the model
    assert model.weight.abs().sum() > 0


def test_loaded_parameters_never_alias_the_file(tmp_path):
    # Whatever offsets the file gives its tensors, the model's own are aligned, contiguous copies.
    d = make_test_model(tmp_path / "m", "xlm-roberta")
    state = load_file(d / "model.safetensors")
    state["roberta.embeddings.position_ids"] = torch.arange(3)[None]  # shifts every offset after the header
    save_file(state, d / "model.safetensors")
    cfg = EncoderConfig.from_json(d / "config.json")
    hf = read_state_dict(d)  # kept alive, so its buffers' addresses cannot be reused by the copies
    with torch.device("meta"):
        model = PackedCrossEncoder(cfg)
    assign_weights(model, convert_hf_state_dict(cfg, hf), dtype=torch.float32, device=torch.device("cpu"),
                   source_names=hf_name_map(cfg))
    file_storages = {t.untyped_storage().data_ptr() for t in hf.values()}
    for name, p in model.state_dict().items():
        assert p.data_ptr() % ALIGNMENT == 0 and p.is_contiguous(), name
        assert p.untyped_storage().data_ptr() not in file_storages, name


def test_select_tensors_names_what_is_missing_and_unexpected():
    hf = {"a.weight": torch.zeros(2), "b.weight": torch.zeros(2), "junk": torch.zeros(1)}
    table = {"x": ("a.weight", "b.weight"), "y": ("c.weight",)}
    with pytest.raises(ValueError, match=r"missing 1 tensor\(s\) the toy needs: c\.weight"):
        select_tensors(hf, table, model_name="toy")
    hf["c.weight"] = torch.ones(3)
    with pytest.raises(ValueError, match="unexpected tensor.*junk"):
        select_tensors(hf, table, model_name="toy")
    got = select_tensors(hf, table, model_name="toy", ignored=lambda name: name == "junk")
    assert got["x"].shape == (4,) and torch.equal(got["y"], torch.ones(3))  # several names: concatenated


def test_shape_errors_name_the_checkpoint_tensor():
    with torch.device("meta"):
        model = nn.Linear(3, 4)
    with pytest.raises(ValueError, match=r"weight \(dense\.w\) has shape \(3, 3\)"):
        assign_weights(model, {"weight": torch.zeros(3, 3), "bias": torch.zeros(4)}, dtype=torch.float32,
                       device=torch.device("cpu"), source_names={"weight": ("dense.w",)})
