"""Hugging Face checkpoints: reading their files, mapping them strictly onto a model, owned weights.

- ``read_state_dict(dir)``: every tensor of ``model.safetensors`` (or its sharded index), else of
  ``pytorch_model.bin`` (or its index).
- ``select_tensors(hf, table, ...)``: our parameter name -> tensor through a name table; several
  HF names are concatenated along dim 0 (fused projections). Missing and unexpected tensors are
  refused by name.
- ``assign_weights(model, state, ...)``: shape checks against a model built on the meta device,
  then every tensor copied into memory the model owns.

Why owned copies: a tensor read from a checkpoint can be a view into the file's buffer, starting
wherever the file's layout put it (after a JSON header of any length in safetensors, at a storage
offset in a pickle), e.g. 48 or 52 bytes past a 64-byte boundary. CPU matmul libraries pick their
kernels by operand alignment on some CPUs: on an AMD EPYC (Zen 4) the same weights read from two
differently laid-out files gave logits that differed in the last bits. Copied into torch's
allocator (64-byte aligned, contiguous), a model computes the same whatever file it came from, and
serving never faults in pages of a mapped file.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn


def _load_safetensors(file: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    return load_file(file, device="cpu")


def _load_bin(file: Path) -> dict[str, Tensor]:
    return torch.load(file, map_location="cpu", weights_only=True)


_FORMATS = (("model.safetensors", "model.safetensors.index.json", _load_safetensors),
            ("pytorch_model.bin", "pytorch_model.bin.index.json", _load_bin))


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """All tensors of a checkpoint directory: (sharded) safetensors, else (sharded) pytorch_model.bin."""
    path = Path(path)
    for single, index, load in _FORMATS:
        if (path / single).is_file():
            return load(path / single)
        if (path / index).is_file():
            with open(path / index, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            state: dict[str, Tensor] = {}
            for shard in shards:
                part = load(path / shard)
                if dup := state.keys() & part.keys():
                    raise ValueError(f"tensor {sorted(dup)[0]!r} appears in more than one shard of {path}")
                state.update(part)
            return state
    raise FileNotFoundError(
        f"no weights in {path}: expected model.safetensors, model.safetensors.index.json or pytorch_model.bin"
    )


def _listing(names: list[str]) -> str:
    return ", ".join(names[:8]) + (f" (and {len(names) - 8} more)" if len(names) > 8 else "")


def select_tensors(hf: Mapping[str, Tensor], table: Mapping[str, tuple[str, ...]], *, model_name: str,
                   ignored: Callable[[str], bool] = lambda name: False) -> dict[str, Tensor]:
    """Our name -> tensor for every entry of ``table`` (ours -> HF names, concatenated along dim 0).

    Strict: a tensor the table needs and the checkpoint lacks, or a checkpoint tensor the table
    does not use and ``ignored`` does not excuse, is a ValueError naming it.
    """
    wanted = {name for names in table.values() for name in names}
    if missing := sorted(wanted - hf.keys()):
        raise ValueError(f"checkpoint is missing {len(missing)} tensor(s) the {model_name} needs: {_listing(missing)}")
    if unexpected := sorted(k for k in hf.keys() - wanted if not ignored(k)):
        raise ValueError(f"checkpoint has {len(unexpected)} unexpected tensor(s): {_listing(unexpected)}")
    return {ours: hf[theirs[0]] if len(theirs) == 1 else torch.cat([hf[t] for t in theirs])
            for ours, theirs in table.items()}


def assign_weights(model: nn.Module, state: Mapping[str, Tensor], *, dtype: torch.dtype,
                   device: torch.device, source_names: Mapping[str, tuple[str, ...]]) -> nn.Module:
    """Loads ``state`` into ``model`` (built on the meta device) as owned, aligned copies in dtype on device.

    Every parameter and buffer must be given, with the shape the model expects; ``source_names``
    (ours -> checkpoint names) makes a shape error name the checkpoint tensor.
    """
    expected = model.state_dict()
    owned = {}
    for name, t in state.items():
        if name not in expected:
            raise ValueError(f"the model has no parameter {name}")
        if t.shape != expected[name].shape:
            raise ValueError(f"tensor for {name} ({', '.join(source_names.get(name, (name,)))}) has shape "
                             f"{tuple(t.shape)}, config implies {tuple(expected[name].shape)}")
        # Never a view of the checkpoint's buffer, even when dtype and device already match (see above).
        owned[name] = torch.empty(t.shape, dtype=dtype, device=device).copy_(t)
    model.load_state_dict(owned, strict=True, assign=True)
    return model
