"""Hugging Face-format folders in and out: config.json plus safetensors, through each family's explicit name map.

Only safetensors are read: a pickle (pytorch_model.bin) can run code when loaded. Every mistake a user can make
(a wrong folder, a truncated file, a checkpoint of another shape) is a RafaleError naming the file or tensor.
"""

from __future__ import annotations

import json
import shutil
import uuid
from contextlib import ExitStack
from pathlib import Path
from types import ModuleType

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from rafale.errors import RafaleError
from rafale.models import pythia
from rafale.models.decoder import Decoder, DecoderConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"

# DecoderConfig.family -> its module. A new family (llama.py, bert.py) is one file and one line here.
FAMILIES: dict[str, ModuleType] = {"pythia": pythia}


def _few(names: list[str], shown: int = 3) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def read_hf_config(folder: str | Path) -> dict:
    folder = Path(folder)
    if not folder.is_dir():
        raise RafaleError(f"{folder}: no such model folder")
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise RafaleError(f"{folder}: no {CONFIG_FILE} (expected a Hugging Face-format model folder)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RafaleError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise RafaleError(f"{path}: expected a JSON object")
    return config


def config_from_folder(folder: str | Path) -> DecoderConfig:
    """The DecoderConfig of a Hugging Face folder, through the family that reads its model_type."""
    hf = read_hf_config(folder)
    path = Path(folder) / CONFIG_FILE
    by_type = {module.MODEL_TYPE: module for module in FAMILIES.values()}
    model_type = hf.get("model_type")
    if model_type not in by_type:
        raise RafaleError(f"{path}: model_type {model_type!r} is not supported; valid: {', '.join(by_type)}")
    try:
        return by_type[model_type].config_from_hf(hf)
    except RafaleError as e:
        raise RafaleError(f"{path}: {e}") from None


def load_pretrained(folder: str | Path) -> Decoder:
    """A Decoder built from a Hugging Face folder's config.json, with its weights, in eval mode."""
    model = Decoder(config_from_folder(folder))
    load_weights(model, folder)
    return model.eval()


def _open_safetensors(folder: Path, stack: ExitStack) -> dict[str, tuple[Path, object]]:
    """Every tensor name in the folder's safetensors -> (file, open handle); one file or the shards of an index."""
    if (folder / INDEX_FILE).is_file():
        try:
            weight_map = json.loads((folder / INDEX_FILE).read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise RafaleError(f"{folder / INDEX_FILE}: not a valid safetensors index ({e!r})") from None
        files = sorted(set(weight_map.values()))
    elif (folder / WEIGHTS_FILE).is_file():
        files = [WEIGHTS_FILE]
    else:
        pickles = " (pytorch_model.bin is not read: pickles can run code)" if any(folder.glob("*.bin")) else ""
        raise RafaleError(f"{folder}: no {WEIGHTS_FILE} or {INDEX_FILE}{pickles}")
    located = {}
    for file in files:
        path = folder / file
        if not path.is_file():
            raise RafaleError(f"{path}: missing (listed in {INDEX_FILE})")
        try:
            handle = stack.enter_context(safe_open(str(path), framework="pt"))
        except SafetensorError as e:
            raise RafaleError(f"{path}: not a valid safetensors file ({e})") from None
        located.update({name: (path, handle) for name in handle.keys()})
    return located


def load_weights(model: Decoder, folder: str | Path) -> None:
    """Copy a Hugging Face folder's weights into an already-built model; every tensor must be there, in shape."""
    folder = Path(folder)
    if not folder.is_dir():
        raise RafaleError(f"{folder}: no such model folder")
    config = model.config
    family = FAMILIES[config.family]
    names = family.weight_names(config)
    state = model.state_dict()
    with ExitStack() as stack:
        located = _open_safetensors(folder, stack)
        expected = set(names.values())
        missing = [theirs for theirs in names.values() if theirs not in located]
        unexpected = [name for name in located if name not in expected and not family.IGNORED_HF.search(name)]
        problems = [f"missing tensors: {_few(missing)}"] if missing else []
        problems += [f"unexpected tensors: {_few(unexpected)}"] if unexpected else []
        if problems:
            raise RafaleError(f"{folder}: {'; '.join(problems)}")
        # Check every shape before copying anything, so a mismatch never leaves a half-loaded model.
        for ours, theirs in names.items():
            path, handle = located[theirs]
            shape = list(handle.get_slice(theirs).get_shape())
            if shape != list(state[ours].shape):
                raise RafaleError(f"{path}: {theirs} has shape {shape}, the model expects {list(state[ours].shape)}")
        with torch.no_grad():
            for ours, theirs in names.items():
                _, handle = located[theirs]
                state[ours].copy_(family.from_hf(ours, handle.get_tensor(theirs), config))


def _write_tokenizer(tokenizer, path: Path) -> None:
    """A `tokenizers.Tokenizer`, or the path of a tokenizer.json to copy."""
    if isinstance(tokenizer, (str, Path)):
        if not Path(tokenizer).is_file():
            raise RafaleError(f"{tokenizer}: no such tokenizer file")
        shutil.copyfile(tokenizer, path)
    else:
        tokenizer.save(str(path))


def save_pretrained(model: Decoder, folder: str | Path, tokenizer=None) -> Path:
    """Write config.json, model.safetensors (and tokenizer.json) so that transformers can load the model.

    Written into a temporary folder beside the target and renamed when complete: an existing model folder is
    replaced only once the new one is whole. A non-empty folder that is not a model folder is never replaced.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise RafaleError(f"{folder}: exists and is not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / CONFIG_FILE).is_file():
        raise RafaleError(f"{folder}: exists and is not a model folder (no {CONFIG_FILE}); refusing to replace it")
    config = model.config
    family = FAMILIES[config.family]
    hf_config = family.config_to_hf(config)
    hf_config["dtype"] = str(model.lm_head.weight.dtype).removeprefix("torch.")
    state = model.state_dict()
    tensors = {
        theirs: family.to_hf(ours, state[ours], config).detach().cpu().contiguous()
        for ours, theirs in family.weight_names(config).items()
    }

    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.with_name(f".{folder.name}.partial-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        (staging / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
        save_file(tensors, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        if tokenizer is not None:
            _write_tokenizer(tokenizer, staging / TOKENIZER_FILE)
        if folder.exists():
            old = staging.with_name(staging.name + ".old")
            folder.rename(old)
            staging.rename(folder)
            shutil.rmtree(old)
        else:
            staging.rename(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder
