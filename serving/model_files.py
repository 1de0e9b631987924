"""Finding a model's files: a local directory, or a Hugging Face Hub id downloaded to the cache."""

from __future__ import annotations

from pathlib import Path

# What the tokenizer and encoder steps read; weights in either format.
MODEL_FILES = ["config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "*.safetensors", "model.safetensors.index.json"]


class ModelNotFoundError(RuntimeError):
    pass


def resolve_model_path(path_or_id: str, *, progress: bool = True, base: Path | None = None) -> Path:
    """A local directory holding config.json, or the local snapshot of a Hub repo id.

    A relative path that names a directory under `base` is taken from there: rendered model
    repositories link the model's files into each step's directory (`1/hf_model`) so that its
    config, which any client may read, names no host path.

    The download shows huggingface_hub's progress bars and fetches only what serving needs
    (safetensors weights, config, tokenizer).
    """
    local = Path(path_or_id).expanduser()
    if base is not None and not local.is_absolute() and (Path(base) / local).is_dir():
        local = Path(base) / local
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelNotFoundError(
                f"{local} has no config.json: point --model-path at a Hugging Face model directory "
                "(config.json, tokenizer.json and model.safetensors or pytorch_model.bin)"
            )
        return local.resolve()
    if local.exists() or path_or_id.startswith((".", "/", "~")) or path_or_id.count("/") > 1:
        raise ModelNotFoundError(f"model path {path_or_id!r} is not a directory")

    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    (enable_progress_bars if progress else disable_progress_bars)()
    try:
        snapshot = snapshot_download(path_or_id, allow_patterns=MODEL_FILES)
    except Exception as error:  # the hub client raises many kinds; all mean the same to the user
        raise ModelNotFoundError(
            f"could not find or download {path_or_id!r} ({type(error).__name__}: {error}). "
            "Pass a local model directory with --model-path, check the repo id, or set HF_TOKEN for a "
            "gated model; offline, set HF_HUB_OFFLINE=1 and make sure the model is in the Hugging Face cache."
        ) from error
    snapshot = Path(snapshot)
    if not any(snapshot.glob("*.safetensors")):
        # Older repos have only pytorch_model.bin.
        snapshot = Path(snapshot_download(path_or_id, allow_patterns=MODEL_FILES + ["pytorch_model.bin"]))
    return snapshot
