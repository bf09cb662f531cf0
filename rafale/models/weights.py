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
from rafale.models import bert, llama, pythia
from rafale.models.bert import Encoder, EncoderConfig
from rafale.models.decoder import Decoder, DecoderConfig, ScoredDecoder, ValuedDecoder

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# A ScoredDecoder's head, as transformers' *ForSequenceClassification decoders name it.
SCORE = "score.weight"
# A ValuedDecoder's value head: training state only, never saved.
VALUE = "value.weight"
CAUSAL_LM, SEQUENCE_CLASSIFICATION = "ForCausalLM", "ForSequenceClassification"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"

# DecoderConfig.family / EncoderConfig.family -> its module. A new family is one file and one line here
# (BERT and RoBERTa share bert.py).
FAMILIES: dict[str, ModuleType] = {"pythia": pythia, "llama": llama, "bert": bert, "roberta": bert}


def build(config: DecoderConfig | EncoderConfig) -> Decoder | Encoder:
    """A randomly initialised model of the config's kind: a decoder (with a score head where it has num_scores), or
    an encoder (bert.py)."""
    if isinstance(config, EncoderConfig):
        return Encoder(config)
    if config.num_scores:
        return ScoredDecoder(config, config.num_scores)
    return ValuedDecoder(config) if config.value_head else Decoder(config)


def weight_names(config: DecoderConfig | EncoderConfig, family: ModuleType | None = None) -> dict:
    """Every rafale tensor name -> its Hugging Face name(s): the family's map (the config's own family unless
    another is given), with a scored decoder's `score` head in place of its LM head."""
    names = (family or _family(config)).weight_names(config)
    if isinstance(config, DecoderConfig) and config.num_scores:
        names = {ours: theirs for ours, theirs in names.items() if ours != "lm_head.weight"}
        names[SCORE] = SCORE
    return names


def _family(config: DecoderConfig | EncoderConfig) -> ModuleType:
    if config.family not in FAMILIES:
        raise RafaleError(f"model.family: {config.family!r} is not one of {', '.join(FAMILIES)}")
    return FAMILIES[config.family]


def _parts(theirs: str | dict[str, int]) -> dict[str, int | None]:
    """A weight map entry as {checkpoint name: rows}: a dict stacks several checkpoint tensors by rows into one
    rafale tensor (Llama's q_proj, k_proj, v_proj into the fused QKV); a plain name (rows None) is the whole tensor."""
    return theirs if isinstance(theirs, dict) else {theirs: None}


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


def config_from_folder(folder: str | Path) -> DecoderConfig | EncoderConfig:
    """The config of a Hugging Face folder, through the family that reads its model_type."""
    hf = read_hf_config(folder)
    path = Path(folder) / CONFIG_FILE
    # A module reads one model_type, or several (MODEL_TYPES: bert.py reads bert and roberta).
    by_type = {kind: m for m in FAMILIES.values() for kind in getattr(m, "MODEL_TYPES", None) or (m.MODEL_TYPE,)}
    model_type = hf.get("model_type")
    if model_type not in by_type:
        raise RafaleError(f"{path}: model_type {model_type!r} is not supported; valid: {', '.join(by_type)}")
    try:
        config = by_type[model_type].config_from_hf(hf)
    except RafaleError as e:
        raise RafaleError(f"{path}: {e}") from None
    if isinstance(config, DecoderConfig) and any(name.endswith(SEQUENCE_CLASSIFICATION)
                                                 for name in hf.get("architectures") or []):
        config.num_scores = len(hf.get("id2label") or {0: ""})
    return config


def load_pretrained(folder: str | Path) -> Decoder | Encoder:
    """The model a Hugging Face folder's config.json describes, with its weights, in eval mode.

    An encoder's head is the one its `architectures` names (MLM, sequence classification, or none: the bare
    encoder, as sentence-embedding models ship it), and the folder must hold that head's tensors.
    """
    model = build(config_from_folder(folder))
    load_weights(model, folder, new_head=False)
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


def load_weights(model: Decoder | Encoder, folder: str | Path, new_head: bool = True) -> list[str]:
    """Copy a Hugging Face folder's weights into an already-built model; every tensor must be there, in shape.

    An encoder may take its body from a checkpoint of another task (to fine-tune a classifier from an MLM or
    bare checkpoint): with `new_head`, a checkpoint holding none of the model's head tensors leaves the head as
    initialised. Returns the rafale tensors left so (empty when the checkpoint had everything).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise RafaleError(f"{folder}: no such model folder")
    config = model.config
    family = _family(config)
    state = model.state_dict()
    with ExitStack() as stack:
        located = _open_safetensors(folder, stack)
        if isinstance(config, EncoderConfig):
            weight_names, fresh = bert.checkpoint_names(config, located, new_head)
        else:
            weight_names, fresh = scored_names(config, located, new_head)
        names = {ours: _parts(theirs) for ours, theirs in weight_names.items()}
        expected = dict.fromkeys(theirs for parts in names.values() for theirs in parts)
        missing = [theirs for theirs in expected if theirs not in located]
        # A scored decoder starts from a language model's folder: its LM head is not needed.
        unneeded = {family.weight_names(config).get("lm_head.weight")} if isinstance(model, ScoredDecoder) else set()
        unexpected = [name for name in located
                      if name not in expected and name not in unneeded and not family.IGNORED_HF.search(name)]
        problems = [f"missing tensors: {_few(missing)}"] if missing else []
        problems += [f"unexpected tensors: {_few(unexpected)}"] if unexpected else []
        if problems:
            raise RafaleError(f"{folder}: {'; '.join(problems)}")
        # Check every shape before copying anything, so a mismatch never leaves a half-loaded model.
        for ours, parts in names.items():
            for theirs, rows in parts.items():
                path, handle = located[theirs]
                shape = list(handle.get_slice(theirs).get_shape())
                wanted = list(state[ours].shape) if rows is None else [rows, *state[ours].shape[1:]]
                if shape != wanted:
                    raise RafaleError(f"{path}: {theirs} has shape {shape}, the model expects {wanted}")
        with torch.no_grad():
            for ours, parts in names.items():
                pieces = [located[theirs][1].get_tensor(theirs) for theirs in parts]
                tensor = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
                state[ours].copy_(family.from_hf(ours, tensor, config))
    return fresh


def scored_names(config: DecoderConfig, located: dict, new_head: bool) -> tuple[dict, list[str]]:
    """A decoder's weight names in a folder, and the tensors left as initialised: with `new_head`, the score head
    of a scored decoder whose folder is a language model's (a reward model's start); always a value head, which no
    folder holds."""
    names = weight_names(config)
    if config.value_head:
        return names, [VALUE]
    if new_head and config.num_scores and SCORE not in located:
        return {ours: theirs for ours, theirs in names.items() if ours != SCORE}, [SCORE]
    return names, []


def _write_tokenizer(tokenizer, path: Path) -> None:
    """A `tokenizers.Tokenizer`, or the path of a tokenizer.json to copy."""
    if isinstance(tokenizer, (str, Path)):
        if not Path(tokenizer).is_file():
            raise RafaleError(f"{tokenizer}: no such tokenizer file")
        shutil.copyfile(tokenizer, path)
    else:
        tokenizer.save(str(path))


def _export_family(config: DecoderConfig | EncoderConfig) -> tuple[ModuleType, dict]:
    """The family a model is saved as, with its config.json: its own family, or else the first that can express
    every setting (a Pythia switched to RMSNorm, SwiGLU, full rotary and sequential residuals is a Llama).

    A family's config_to_hf raises a RafaleError naming the first setting it cannot express; when every family
    refuses, the one-line error names each refusal.
    """
    own = _family(config)
    # An encoder's class follows from its family and head (bert.py); only decoders have another family to try.
    others = [] if isinstance(config, EncoderConfig) else [m for m in FAMILIES.values() if m is not bert]
    refusals = []
    for family in dict.fromkeys([own, *others]):
        try:
            return family, family.config_to_hf(config)
        except RafaleError as e:
            refusals.append(str(e))
    raise RafaleError(f"{'; '.join(refusals)}: no Hugging Face class has this combination of settings")


def save_pretrained(model: Decoder | Encoder, folder: str | Path, tokenizer=None, tokenizer_config: dict | None = None,
                    config_extras: dict | None = None) -> Path:
    """Write config.json, model.safetensors (and tokenizer.json) so that transformers can load the model.

    `tokenizer_config` is written as tokenizer_config.json, its `*_token` entries also as special_tokens_map.json;
    `config_extras` (a decoder's bos, eos and pad token ids) are added to config.json.

    Written into a temporary folder beside the target and renamed when complete: an existing model folder is
    replaced only once the new one is whole. A non-empty folder that is not a model folder is never replaced.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise RafaleError(f"{folder}: exists and is not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / CONFIG_FILE).is_file():
        raise RafaleError(f"{folder}: exists and is not a model folder (no {CONFIG_FILE}); refusing to replace it")
    config = model.config
    family, hf_config = _export_family(config)
    if isinstance(config, DecoderConfig) and config.num_scores:
        hf_config["architectures"] = [name.replace(CAUSAL_LM, SEQUENCE_CLASSIFICATION)
                                      for name in hf_config["architectures"]]
        hf_config["id2label"] = {str(i): f"LABEL_{i}" for i in range(config.num_scores)}
        hf_config["label2id"] = {f"LABEL_{i}": i for i in range(config.num_scores)}
    hf_config["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    hf_config.update(config_extras or {})
    state = model.state_dict()
    tensors = {}
    for ours, theirs in weight_names(config, family).items():
        parts = _parts(theirs)
        tensor = family.to_hf(ours, state[ours], config).detach().cpu()
        pieces = tensor.split(list(parts.values())) if len(parts) > 1 else [tensor]
        tensors.update({name: piece.contiguous() for name, piece in zip(parts, pieces)})

    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.with_name(f".{folder.name}.partial-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        (staging / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
        save_file(tensors, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        if tokenizer is not None:
            _write_tokenizer(tokenizer, staging / TOKENIZER_FILE)
        if tokenizer_config is not None:
            special = {key: value for key, value in tokenizer_config.items() if key.endswith("_token")}
            (staging / TOKENIZER_CONFIG_FILE).write_text(json.dumps(tokenizer_config, indent=2) + "\n")
            (staging / SPECIAL_TOKENS_FILE).write_text(json.dumps(special, indent=2) + "\n")
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
