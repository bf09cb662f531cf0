"""The reference of preference tuning: the model the run starts from, and its log-probs (per sequence or per token).

`cached` (the default): the reference's log-probs of every row are computed once, in one pass before training, in
fp32, and stored beside the prepared data in a folder `<cache>/data/<prepared folder>.reference-<hash16>`
(`reference.safetensors` and `key.json`). A task asks for one of two kinds (`reference_kind`): "sequences", each
row's two sequences summed ([rows, 2] per split: paired feedback, KTO), or "tokens", the log-prob of every response
token (PPO's ratio is per token), stored flat per split with the rows' offsets (`<split>` [tokens] and
`<split>.offsets` [rows + 1]). The key covers the kind, the prepared data (its folder's name, which hashes the source,
the tokenizer, the template and the truncation, and the splits' fingerprints and row counts), a hash of the reference
weights' contents (not their path) and the precision.
The folder is written under a temporary name and renamed when complete, so a pass killed midway is never trusted; a
later run with the same key reuses it. A folder whose `key.json` does not match its name's key, or whose rows do not
match the data, is refused. The reference model is freed before training starts.

`live`: the reference's log-probs are computed at every step. With LoRA adapters and nothing else trained, the
reference is the policy itself with its adapters switched off (no second copy); otherwise a frozen copy of the
starting model.

Either way the starting model's held-out figures (reward accuracy, greedy exact match) are measured here, for the
report's "before".
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch

from rafale.config import RunFile, cache_root
from rafale.errors import RafaleError

if TYPE_CHECKING:
    from rafale.data.cache import PreparedData
    from rafale.tasks.preference import PairedPreference

REFERENCE_VERSION = 1
TENSORS, KEY = "reference.safetensors", "key.json"
# The suffix of a split's row offsets into its flat per-token log-probs.
OFFSETS = ".offsets"


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of the model's tensors: names, dtypes, shapes and bytes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def reference_key(prepared: PreparedData, model: torch.nn.Module, precision: str,
                  kind: str = "sequences") -> dict[str, Any]:
    return {"version": REFERENCE_VERSION, "kind": kind, "data": prepared.path.name,
            "fingerprints": {split: rows._fingerprint for split, rows in prepared.splits.items()},
            "rows": {split: len(rows) for split, rows in prepared.splits.items()},
            "weights": weights_digest(model), "precision": precision}


def reference_folder(prepared: PreparedData, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_root() / "data" / f"{prepared.path.name}.reference-{digest}"


@torch.no_grad()
def compute_log_probs(task: PairedPreference, model: torch.nn.Module, prepared: PreparedData,
                      batch_size: int) -> dict[str, torch.Tensor]:
    """The task's kind of reference log-probs under `model`, in row order: per split, [rows, 2] fp32 sums of each
    row's two sequences ("sequences"), or every response token's log-prob, flat, with `<split>.offsets`
    ("tokens")."""
    from torch.utils.data import DataLoader

    device = next(model.parameters()).device
    collator = task.collator(prepared, task.settings, 0)
    results = {}
    for split, rows in prepared.splits.items():
        dataset = rows.with_format("torch", columns=list(task.row_columns()))
        parts, counts = [], []
        for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collator):
            batch = {name: value.to(device) for name, value in batch.items()}
            values = task.reference_pass(model, batch).float()
            if task.reference_kind == "tokens":
                mask = task.response_mask(batch)
                values, row_counts = values[mask], mask.sum(-1)
                counts.append(row_counts.cpu())
            parts.append(values.cpu())
        results[split] = torch.cat(parts)
        if task.reference_kind == "tokens":
            results[f"{split}{OFFSETS}"] = torch.cat([torch.zeros(1, dtype=torch.long),
                                                      torch.cat(counts).long().cumsum(0)])
    return results


def check_tensors(tensors: dict[str, torch.Tensor], key: dict[str, Any], folder: Path) -> None:
    """The stored tensors must be of the key's kind and hold every row of the data."""
    for split, count in key["rows"].items():
        found = tensors.get(split)
        if key["kind"] == "sequences":
            rows = None if found is None or found.shape[1:] != (2,) else found.shape[0]
        else:
            offsets = tensors.get(f"{split}{OFFSETS}")
            whole = (found is not None and offsets is not None and found.dim() == 1 and offsets.dim() == 1
                     and int(offsets[-1]) == len(found))
            rows = len(offsets) - 1 if whole else None
        if rows != count:
            raise RafaleError(f"{folder}: this reference cache holds {rows} {split} rows of {key['kind']} log-probs, "
                              f"the data {count}: computed for other data; delete the folder")


def cached_log_probs(task: PairedPreference, prepared: PreparedData, model: torch.nn.Module, precision: str,
                     batch_size: int, say: Callable[[str], None]) -> dict[str, torch.Tensor]:
    """The reference log-probs from the cache, or computed once and cached (atomically)."""
    from safetensors.torch import load_file, save_file

    key = reference_key(prepared, model, precision, task.reference_kind)
    folder = reference_folder(prepared, key)
    if (folder / KEY).is_file():
        stored = json.loads((folder / KEY).read_text())
        if stored != key:
            differing = sorted(name for name in key if stored.get(name) != key[name])
            raise RafaleError(f"{folder}: this reference cache was computed for other data or weights ("
                              f"{', '.join(differing) or 'its key'} differ); delete the folder to compute it again")
        tensors = load_file(str(folder / TENSORS))
        check_tensors(tensors, key, folder)
        say(f"reference: log-probs reused from {folder}")
        return tensors
    started = _now()
    log_probs = compute_log_probs(task, model, prepared, batch_size)
    seconds = _now() - started
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Whatever an earlier pass left unfinished (no key.json: not trusted) goes.
    for stale in [folder, *folder.parent.glob(f".{folder.name}.partial-*")]:
        shutil.rmtree(stale, ignore_errors=True)
    partial = folder.with_name(f".{folder.name}.partial-{os.getpid()}")
    partial.mkdir()
    save_file({split: values.contiguous() for split, values in log_probs.items()}, str(partial / TENSORS))
    # Written last: its presence marks the folder complete.
    (partial / KEY).write_text(json.dumps(key, indent=2) + "\n")
    try:
        os.rename(partial, folder)
    except OSError:  # another process finished the same folder first: its values are the same
        shutil.rmtree(partial, ignore_errors=True)
    rows = sum(key["rows"].values())
    say(f"reference: {task.reference_kind} log-probs of {rows:,} rows computed in {seconds:.1f} s, cached in "
        f"{folder}")
    return log_probs


def _now() -> float:
    import time

    return time.perf_counter()


def with_reference_column(prepared: PreparedData, log_probs: dict[str, torch.Tensor]) -> None:
    """The reference log-probs as a column of the rows: each row's two sums, or its response tokens' log-probs."""
    import datasets

    from rafale.tasks.preference import REFERENCE_LOGPS

    feature = datasets.Sequence(datasets.Value("float32"))
    for split, rows in prepared.splits.items():
        if REFERENCE_LOGPS in rows.column_names:
            rows = rows.remove_columns(REFERENCE_LOGPS)
        offsets = log_probs.get(f"{split}{OFFSETS}")
        if offsets is None:
            column = log_probs[split].tolist()
        else:
            flat_values, bounds = log_probs[split].tolist(), offsets.tolist()
            column = [flat_values[start:end] for start, end in zip(bounds, bounds[1:])]
        prepared.splits[split] = rows.add_column(REFERENCE_LOGPS, column, feature=feature)


@contextmanager
def adapters_off(model: torch.nn.Module) -> Iterator[None]:
    """The model as its base: every LoRA update scaled by zero, then restored."""
    from rafale.transforms import adapters

    found = list(adapters(model).values())
    scales = [module.scale for module in found]
    for module in found:
        module.scale = 0.0
    try:
        yield
    finally:
        for module, scale in zip(found, scales):
            module.scale = scale


def only_adapters_train(model: torch.nn.Module) -> bool:
    """Whether the adapters are all that changes the log-probs (a value head, which trains too, gives none)."""
    from rafale.models.weights import VALUE
    from rafale.transforms import adapters

    trainable = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    return bool(adapters(model)) and all(".lora_" in name or name == VALUE for name in trainable)


def attach_reference(task: PairedPreference, config: RunFile, prepared: PreparedData,
                     starting_model: Callable[[], torch.nn.Module], say: Callable[[str], None]) -> None:
    """Give the task its reference (cached log-probs in the rows, or a live reference) and measure the starting
    model's held-out figures."""
    from composer.core.precision import Precision, get_precision_context

    from rafale.train import _device_and_precision

    settings = config.data.config
    task.live_reference, task.before = None, {}
    if not task.uses_reference(settings) and settings.eval_examples == 0:
        return
    # The precision the policy trains in: a reference computed in another would make step 0's rewards non-zero.
    _, precision = _device_and_precision(config)
    model = starting_model()
    model.eval()
    model.requires_grad_(False)
    with get_precision_context(Precision(precision)):
        if task.uses_reference(settings):
            if settings.reference == "cached":
                with_reference_column(prepared, cached_log_probs(task, prepared, model, precision,
                                                                 settings.eval_batch_size, say))
            else:
                task.live_reference = live_reference(task, model, say)
        task.before = starting_figures(task, model, prepared, config)
    if task.live_reference is None or only_adapters_train(model):
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def live_reference(task: PairedPreference, model: torch.nn.Module,
                   say: Callable[[str], None]) -> Callable[[torch.nn.Module, dict], torch.Tensor]:
    """The reference log-probs of a batch, computed when the batch comes: the policy with its adapters off where
    only adapters train, else the frozen starting model."""
    if only_adapters_train(model):
        say("reference: live, the policy with its LoRA adapters off")

        def base_log_probs(policy: torch.nn.Module, batch: dict) -> torch.Tensor:
            with torch.no_grad(), adapters_off(policy):
                return task.reference_pass(policy, batch)

        return base_log_probs
    say("reference: live, a frozen copy of the starting model")

    def copy_log_probs(policy: torch.nn.Module, batch: dict) -> torch.Tensor:
        device = batch["input_ids"].device
        if next(model.parameters()).device != device:
            model.to(device)
        with torch.no_grad():
            return task.reference_pass(model, batch)

    return copy_log_probs


@torch.no_grad()
def starting_figures(task: PairedPreference, model: torch.nn.Module, prepared: PreparedData,
                     config: RunFile) -> dict[str, float]:
    """The task's eval metrics on the held-out split and the greedy exact match, of the starting model."""
    from torch.utils.data import DataLoader

    from rafale.tasks.sft import HELD_OUT_SPLITS

    split = next((name for name in HELD_OUT_SPLITS if name in prepared.splits), None)
    if split is None:
        return {}
    rows = prepared.splits[split]
    numeric = [name for name in rows.column_names if name not in ("prompt", "reference")]
    loader = DataLoader(rows.with_format("torch", columns=numeric), batch_size=config.data.config.eval_batch_size,
                        collate_fn=task.collator(prepared, config.data.config, 0))
    metrics = task.metrics(model)
    for batch in loader:
        outputs = task.eval_outputs(model, batch)
        for metric in metrics.values():
            task.update_metric(batch, outputs, metric)
    figures = {name: float(metric.compute()) for name, metric in metrics.items()}
    exact = task.held_out_figures(model, prepared, config)
    if exact:
        figures["exact match"] = exact["exact match"]
    return figures
