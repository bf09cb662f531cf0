"""Transforms: the run file's `transforms` rules rewrite the built model before training (LoRA adapters,
simulated number formats), without a branch in the model code.

Rules are tried in order on every linear layer's name, and the first whose `modules` matches wins: a full-match
regular expression, or a short name (SHORT_NAMES). A rule with no `kind` leaves its modules as they are (to exempt
some from a later, broader rule). The heads (the LM head, an encoder's MLM head, pooler and classifier) are left out
unless a rule names them. A transformed module keeps the base layer's parameters under their names, so loading,
checkpoints, resumption and export work as before. A rule that matches no module, an unknown kind or a setting the
kind does not have is a one-line error naming the rule.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any, Callable, Optional

from pydantic import ValidationError
from torch import nn

from rafale.errors import RafaleError
from rafale.models.blocks import Attention
from rafale.transforms.lora import LoRALinear
from rafale.transforms.quantize import QuantizedAttention, QuantizedLinear

# Each kind: a module class with `Settings` (pydantic), `targets` (the module classes it replaces),
# `from_linear(name, module, settings, model_config)`, `freezes_base` (whether the rest of the model stops training)
# and `merged()` (the plain module an export holds).
KINDS: dict[str, type[nn.Module]] = {"lora": LoRALinear, "quantize": QuantizedLinear,
                                     "quantize_attention": QuantizedAttention}
# Kinds whose effect a plain layer holds whole once merged; the others' rules travel with the export.
MERGED_WHOLE = ("lora",)
RULES_FILE = "transforms.json"
# The blocks' linear layers, by what they do; rafale's module names are the same in every family.
SHORT_NAMES = {
    "attention": r"blocks\.\d+\.attn\.(qkv|proj)",
    "mlp": r"blocks\.\d+\.mlp\.(gate|up|down)",
    "all-linear": r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(gate|up|down))",
    # The attention modules themselves, whose QK^T and AV products quantize_attention rounds.
    "attention-products": r"blocks\.\d+\.attn",
}
HEADS = ("lm_head", "mlm.dense", "mlm.decoder", "pooler", "classifier")
SHOWN = 4


def _pattern(rule: dict[str, Any]) -> str:
    return SHORT_NAMES.get(rule["modules"], rule["modules"])


def _matches(rule: dict[str, Any], name: str, module: nn.Module) -> bool:
    if name in HEADS and name not in rule["modules"]:  # a head only where the rule names it
        return False
    kind = rule.get("kind")
    targets = KINDS[kind].targets if kind in KINDS else (nn.Linear, Attention)
    return isinstance(module, targets) and re.fullmatch(_pattern(rule), name) is not None


def _label(index: int, rule: dict[str, Any]) -> str:
    return f"transforms[{index}] ({rule.get('kind') or 'unchanged'} on {rule['modules']!r})"


def _settings(index: int, rule: dict[str, Any]):
    kind = rule.get("kind")
    if kind not in KINDS:
        raise RafaleError(f"transforms[{index}].kind: unknown kind {kind!r}; valid: {', '.join(KINDS)}")
    values = {key: value for key, value in rule.items() if key not in ("modules", "kind")}
    try:
        return KINDS[kind].Settings.model_validate(values)
    except ValidationError as error:
        first = error.errors()[0]
        key = ".".join(str(part) for part in first["loc"])
        if first["type"] == "extra_forbidden":
            valid = ", ".join(KINDS[kind].Settings.model_fields)
            raise RafaleError(f"transforms[{index}].{key}: {kind} has no setting {key!r}; valid: {valid}") from None
        raise RafaleError(f"transforms[{index}].{key}: {first['msg']}") from None


def plan(model: nn.Module, rules: list[dict[str, Any]]) -> list[tuple[int, list[str]]]:
    """For each rule, the modules it takes (checked: every rule takes at least one; settings are valid)."""
    modules = {name: module for name, module in model.named_modules() if isinstance(module, (nn.Linear, Attention))}
    names = [name for name, module in modules.items() if isinstance(module, nn.Linear)]
    for index, rule in enumerate(rules):
        try:
            re.compile(_pattern(rule))
        except re.error as error:
            raise RafaleError(f"transforms[{index}].modules: not a regular expression ({error})") from None
        if rule.get("kind") is not None:
            _settings(index, rule)
    taken: dict[int, list[str]] = {index: [] for index in range(len(rules))}
    for name, module in modules.items():
        index = next((i for i, rule in enumerate(rules) if _matches(rule, name, module)), None)
        if index is not None:
            taken[index].append(name)
    for index, rule in enumerate(rules):
        if not taken[index]:
            earlier = any(_matches(rule, name, module) for name, module in modules.items())
            why = "every module it matches is taken by an earlier rule" if earlier else "it matches no module"
            raise RafaleError(f"{_label(index, rule)}: {why}; the linear layers are {_few(names, 6)}")
    return [(index, taken[index]) for index in range(len(rules))]


def apply(model: nn.Module, rules: list[dict[str, Any]], keep_trainable: tuple[str, ...] = (),
          say: Optional[Callable[[str], None]] = None) -> nn.Module:
    """Rewrite `model` in place by the rules and print what was replaced. Where a kind freezes the base (LoRA),
    only the new modules' own parameters, the modules its `train` setting names, and the parameters named in
    `keep_trainable` (a head the pretrained folder did not have) still train."""
    say = say or print
    if not rules:
        return model
    frozen_base, train_too = False, []
    lines = []
    for index, names in plan(model, rules):
        rule = rules[index]
        lines.append(f"  {_label(index, rule)}: {len(names)} modules: {_few(names, SHOWN)}")
        if rule.get("kind") is None:
            continue
        kind, settings = KINDS[rule["kind"]], _settings(index, rule)
        frozen_base |= kind.freezes_base
        train_too += getattr(settings, "train", [])
        for name in names:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            base = getattr(parent, child)
            # In the mode the model is in (a fresh module would be training, its dropout on).
            setattr(parent, child, kind.from_linear(name, base, settings, model.config).train(base.training))
    if frozen_base:
        new = {id(parameter) for module in model.modules() if isinstance(module, tuple(KINDS.values()))
               for name, parameter in module.named_parameters(recurse=False) if name.startswith("lora_")}
        for name, parameter in model.named_parameters():
            module_name = name.rpartition(".")[0]
            parameter.requires_grad = (id(parameter) in new or name in keep_trainable
                                       or any(re.fullmatch(pattern, module_name) for pattern in train_too))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    say("transforms:\n" + "\n".join(lines) + f"\n  parameters: {trainable:,} trainable, {total - trainable:,} frozen "
        f"({100 * trainable / total:.2f}% trainable)")
    return model


def frozen_parameters(model: nn.Module) -> list[str]:
    """The names of the parameters that do not train (left out of the optimizer and of checkpoints)."""
    return [name for name, parameter in model.named_parameters() if not parameter.requires_grad]


def merged(model: nn.Module) -> nn.Module:
    """A copy of the model with every transformed layer made plain (an adapter folded into its base layer, a
    rounded weight stored rounded): a model to export. The model itself when nothing in it is transformed."""
    kinds = tuple(KINDS.values())
    if not any(isinstance(module, kinds) for module in model.modules()):
        return model
    copied = copy.deepcopy(model)
    for name, module in list(copied.named_modules()):
        if isinstance(module, kinds):
            parent_name, _, child = name.rpartition(".")
            setattr(copied.get_submodule(parent_name) if parent_name else copied, child, module.merged())
    return copied


def save_rules(rules: list[dict[str, Any]], folder: Path, model: nn.Module) -> Optional[Path]:
    """What an exported (merged) model still needs to compute as it trained, beside it: the rules that merging does
    not hold (all but LoRA's), and the state they track (the optical format's ranges). None when there are none."""
    needed = [rule for rule in rules if rule.get("kind") is not None and rule["kind"] not in MERGED_WHOLE]
    if not needed:
        return None
    state = {name: buffer.tolist() for name, buffer in model.named_buffers() if ".rounders." in name}
    path = folder / RULES_FILE
    path.write_text(json.dumps({"rules": needed, "state": state}, indent=2) + "\n")
    return path


def apply_saved(model: nn.Module, folder: Path) -> nn.Module:
    """The rules (and their state) exported beside a model folder, applied to the model loaded from it."""
    import torch

    path = Path(folder) / RULES_FILE
    if not path.is_file():
        return model
    saved = json.loads(path.read_text())
    apply(model, saved["rules"], say=lambda _: None)
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        for name, value in saved.get("state", {}).items():
            buffers[name].copy_(torch.tensor(value, dtype=buffers[name].dtype))
    return model


def adapters(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALinear)}


def save_peft_adapter(model: nn.Module, folder: Path, base_model: str = "") -> tuple[Optional[Path], str]:
    """The adapters alone as a PEFT folder (adapter_config.json, adapter_model.safetensors with PEFT's names and
    the Hugging Face family's row layout), which peft loads onto the base model: (the folder, "") or, where the
    adapters alone cannot stand for the trained model, (None, why)."""
    from safetensors.torch import save_file

    from rafale.models.decoder import DecoderConfig
    from rafale.models.weights import _export_family

    found = adapters(model)
    if not found:
        return None, "no adapter"
    if not isinstance(model.config, DecoderConfig):
        return None, "PEFT adapters are written for decoders"
    others = [name for name, p in model.named_parameters() if p.requires_grad and ".lora_" not in name]
    if others:
        return None, f"other parameters trained too ({_few(others, 2)}), which the adapter would not hold"
    settings = {(m.settings.r, m.settings.alpha, m.settings.rslora, m.settings.dropout) for m in found.values()}
    if len(settings) > 1:
        return None, "the adapters differ in rank, alpha, dropout or scaling, which one PEFT config cannot say"
    (r, alpha, rslora, dropout), = settings
    family, _ = _export_family(model.config)
    names = family.weight_names(model.config)
    tensors, targets = {}, set()
    for name, module in found.items():
        theirs = names[f"{name}.weight"]
        parts = theirs if isinstance(theirs, dict) else {theirs: module.out_features}
        B = family.to_hf(f"{name}.weight", module.full_B().detach(), model.config)
        start = 0
        for hf_name, rows in parts.items():
            part = B[start:start + rows]
            start += rows
            if not part.any() and module.rows is not None:
                continue  # a part of a fused projection without an adapter (k in q, v)
            path = hf_name.removesuffix(".weight")
            tensors[f"base_model.model.{path}.lora_A.weight"] = module.lora_A.detach().contiguous().clone()
            tensors[f"base_model.model.{path}.lora_B.weight"] = part.contiguous().clone()
            targets.add(path.rpartition(".")[2])
    folder.mkdir(parents=True, exist_ok=True)
    save_file({key: value.float() for key, value in tensors.items()}, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "lora_dropout": dropout,
              "target_modules": sorted(targets), "bias": "none", "use_rslora": rslora, "fan_in_fan_out": False,
              "base_model_name_or_path": base_model, "inference_mode": True, "modules_to_save": None}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder, ""


def _few(names: list[str], shown: int) -> str:
    if len(names) <= shown:
        return ", ".join(names)
    return ", ".join(names[: shown - 1]) + f", ... {names[-1]}"


__all__ = ["KINDS", "SHORT_NAMES", "LoRALinear", "QuantizedAttention", "QuantizedLinear", "apply",
           "frozen_parameters", "apply_saved", "merged", "plan", "save_peft_adapter", "save_rules"]
