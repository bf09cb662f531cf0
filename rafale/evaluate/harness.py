"""rafale's models as an lm-evaluation-harness model (`pip install "rafale[eval]"`): `--model rafale`.

lm-eval 0.4.13 finds models only in its own registry (no entry points), so `rafale lm-eval ...` runs its command
line with this module imported (every option of `lm_eval` works the same); `rafale eval MODEL --tasks ...` runs
it through `simple_evaluate`; and in Python, `RafaleLM(pretrained=FOLDER)` (or `RafaleLM.from_model(model,
tokenizer)` for a model already loaded) goes to `lm_eval.simple_evaluate(model=...)`.

Tokenization is lm-eval's own (TemplateLM): it moves a context's trailing spaces into the continuation, encodes
context + continuation together and splits at the context's length, and scores an empty context after the prefix
token. Text is encoded as training encoded it (no special tokens). The prefix token is `rafale eval`'s: the
folder's BOS (a rafale export names its end-of-text token, the token before every document in training), else
the end-of-text token; `add_bos_token=True` puts it before every context too. `loglikelihood_rolling` scores
documents in lm-eval's disjoint windows with `rafale eval`'s code; `generate_until` decodes with the KV cache.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import lm_eval.models  # noqa: F401  (fills the registry with lm-eval's own models before rafale's joins it)
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
from tqdm import tqdm

from rafale.errors import RafaleError
from rafale.evaluate.perplexity import checked_window, document_log_likelihoods, prefix_id, target_log_probs
from rafale.models.generate import find_eos, generate, load_folder

DEFAULT_BATCH_SIZE = 16
DEFAULT_MAX_GEN_TOKS = 256


def _batch_size(value) -> int:
    """lm-eval's --batch_size: a number, or "auto"/"auto:N", for which rafale takes its default."""
    if value is None or str(value).startswith("auto"):
        return DEFAULT_BATCH_SIZE
    size = int(value)
    if size < 1:
        raise RafaleError(f"batch_size: must be at least 1; got {value}")
    return size


def _flag(value) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes")


@register_model("rafale")
class RafaleLM(TemplateLM):
    """An lm-evaluation-harness LM over a rafale decoder (Pythia or Llama family) and its tokenizer.json.

    model_args: `pretrained` (an exported or Hugging Face-format folder, or a run folder), `prefix` (the prefix
    token's text, "none" for none; default as `rafale eval`), `add_bos_token` (the prefix before every context),
    `max_length` (default: the model's positions), `max_gen_toks` (default 256); lm-eval's `batch_size` and
    `device`.
    """

    def __init__(self, pretrained: str | None = None, batch_size=None, max_batch_size=None, device: str | None = None,
                 prefix: str | None = None, add_bos_token=False, max_length=None,
                 max_gen_toks=DEFAULT_MAX_GEN_TOKS, model=None, tokenizer=None, prefix_token_id: int | None = None):
        # max_batch_size: lm-eval passes it to every model; rafale's batches are always batch_size.
        super().__init__()
        if model is None:
            if pretrained is None:
                raise RafaleError("--model_args: name the model's folder, e.g. pretrained=runs/NAME/model")
            folder, model, tokenizer = load_folder(pretrained)
            prefix_token_id, _ = prefix_id(folder, tokenizer, prefix)
        # lm_eval's command line asks for "cuda" by default; like its HF backend, rafale then uses the CPU.
        if device is not None and not (str(device).startswith("cuda") and not torch.cuda.is_available()):
            model = model.to(device)
        self.model = model.eval()
        self.rafale_tokenizer = tokenizer
        self._max_length = checked_window(model, int(max_length) if max_length is not None else None)
        self._prefix = prefix_token_id
        self.add_bos_token = _flag(add_bos_token)
        if self.add_bos_token and prefix_token_id is None:
            raise RafaleError("add_bos_token: the model has no prefix token (prefix=none)")
        self.batch_size = _batch_size(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        self._eot = find_eos(tokenizer)

    @classmethod
    def from_model(cls, model, tokenizer, prefix_token_id: int | None = None, **options) -> "RafaleLM":
        """A model already loaded (rafale's Decoder) and its `tokenizers.Tokenizer`; the prefix token defaults to
        the end-of-text token."""
        prefix = prefix_token_id if prefix_token_id is not None else find_eos(tokenizer)
        return cls(model=model, tokenizer=tokenizer, prefix_token_id=prefix, **options)

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def eot_token_id(self) -> int:
        return self._eot if self._eot is not None else self._prefix

    @property
    def prefix_token_id(self) -> int:
        return self._prefix if self._prefix is not None else self.eot_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """As training encoded text; with add_bos_token, after the prefix token (only where lm-eval does not
        already put it: an empty context's continuation is encoded with add_special_tokens=False)."""
        ids = self.rafale_tokenizer.encode(string, add_special_tokens=False).ids
        if self.add_bos_token and add_special_tokens is not False:
            ids = [self._prefix, *ids]
        return ids

    def tok_decode(self, ids: list[int]) -> str:
        return self.rafale_tokenizer.decode(ids)

    def get_model_info(self) -> dict:
        weight = self.model.lm_head.weight
        return {"model_num_parameters": self.model.num_parameters(), "model_dtype": str(weight.dtype)}

    @torch.inference_mode()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of log p(continuation), whether greedy decoding gives it) per ((context, continuation), context
        ids, continuation ids): context + continuation cut to the last max_length + 1 ids, as HFLM cuts them; longest
        first in batches of right-padded rows, only the continuation's positions through the LM head."""
        rows = []
        for index, (_, context, continuation) in enumerate(requests):
            ids = (context + continuation)[-(self.max_length + 1):]
            rows.append((index, ids, min(len(continuation), len(ids) - 1)))
        rows.sort(key=lambda row: len(row[1]), reverse=True)
        results: list[tuple[float, bool]] = [(0.0, True)] * len(requests)
        for first in tqdm(range(0, len(rows), self.batch_size), disable=disable_tqdm, desc="rafale loglikelihood"):
            batch = rows[first:first + self.batch_size]
            width = len(batch[0][1]) - 1
            inputs = torch.zeros(len(batch), width, dtype=torch.long)
            scored = torch.zeros(len(batch), width, dtype=torch.bool)
            targets = []
            for row, (_, ids, count) in enumerate(batch):
                inputs[row, :len(ids) - 1] = torch.tensor(ids[:-1])
                scored[row, len(ids) - 1 - count:len(ids) - 1] = True
                targets.extend(ids[len(ids) - count:])
            hidden = self.model.hidden_states(inputs.to(self.device))[scored.to(self.device)]
            targets = torch.tensor(targets, device=self.device)
            greedy = torch.empty(len(targets), dtype=torch.bool, device=self.device)
            log_probs = target_log_probs(hidden, self.model.lm_head, targets, greedy).double().cpu()
            greedy = greedy.cpu()
            offset = 0
            for index, _, count in batch:
                results[index] = (float(log_probs[offset:offset + count].sum()),
                                  bool(greedy[offset:offset + count].all()))
                offset += count
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each document's log-likelihood in disjoint windows of max_length (each token predicted once, the first
        after the prefix token; with prefix=none the first token is context only, as in `rafale eval`): lm-eval's
        windows, scored by `rafale eval`'s code."""
        start = [self._prefix] if self._prefix is not None else []
        documents = [start + self.rafale_tokenizer.encode(string, add_special_tokens=False).ids
                     for (string,) in (request.args for request in requests)]
        sums, _ = document_log_likelihoods(self.model, documents, self.max_length, self.max_length, self.batch_size)
        return sums

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with do_sample and temperature/top_k/top_p) continuations with the KV cache, in
        batches of left-padded contexts that share their generation settings, cut before the first stop string
        (`until`, and the end-of-text token, where decoding of a row stops)."""
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(index)
        outputs = [""] * len(requests)
        eot_text = self.tok_decode([self.eot_token_id]) if self._eot is not None else None
        progress = tqdm(total=len(requests), disable=disable_tqdm, desc="rafale generate_until")
        for indices in groups.values():
            settings = normalize_gen_kwargs(requests[indices[0]].args[1], self.max_gen_toks)
            until = [stop for stop in handle_stop_sequences(settings.pop("until", None), eot_text) if stop]
            max_new = int(settings.pop("max_gen_toks"))
            if max_new >= self.max_length:
                raise RafaleError(f"max_gen_toks: {max_new} leaves no room for a context in the model's "
                                  f"{self.max_length} positions")
            temperature = float(settings.get("temperature", 0.0)) if settings.get("do_sample") else 0.0
            contexts = {index: self._context_ids(requests[index].args[0], self.max_length - max_new)
                        for index in indices}
            indices = sorted(indices, key=lambda index: len(contexts[index]), reverse=True)
            for first in range(0, len(indices), self.batch_size):
                batch = indices[first:first + self.batch_size]
                width = len(contexts[batch[0]])
                pad = self.eot_token_id
                input_ids = torch.tensor([[pad] * (width - len(contexts[i])) + contexts[i] for i in batch])
                mask = torch.tensor([[0] * (width - len(contexts[i])) + [1] * len(contexts[i]) for i in batch])
                new = generate(self.model, input_ids.to(self.device), mask.to(self.device), max_new, temperature,
                               settings.get("top_k"), settings.get("top_p"), self._eot, pad)
                for index, ids in zip(batch, new.tolist()):
                    if self._eot is not None and self._eot in ids:
                        ids = ids[:ids.index(self._eot)]
                    text = self.tok_decode(ids)
                    for stop in until:
                        text = text.split(stop)[0]
                    outputs[index] = text
                progress.update(len(batch))
        progress.close()
        return outputs

    def _context_ids(self, context: str, room: int) -> list[int]:
        """The context's ids, cut on the left to `room`; an empty context is the prefix token."""
        ids = self.tok_encode(context) if context else [self.prefix_token_id]
        return ids[-room:]


BUNDLED_TASKS = Path(__file__).parent / "tasks"


def task_manager(tasks: list[str], include_path: str | Path | None = None):
    """lm-eval's TaskManager over rafale's bundled tasks and `include_path`; lm-eval's own (thousands of YAMLs,
    most of a minute to index) only when a task is not found there."""
    from lm_eval.tasks import TaskManager

    paths = [str(BUNDLED_TASKS)] + ([str(include_path)] if include_path is not None else [])
    if include_path is not None and not Path(include_path).is_dir():
        raise RafaleError(f"--include-path: {include_path} is not a folder")
    manager = TaskManager(include_path=paths, include_defaults=False)
    if all(manager.match_tasks([task]) for task in tasks):
        return manager
    manager = TaskManager(include_path=paths)
    unknown = [task for task in tasks if not manager.match_tasks([task])]
    if unknown:
        where = f"lm-eval's, rafale's or under {include_path}" if include_path else "lm-eval's or rafale's"
        raise RafaleError(f"--tasks: no task {', '.join(unknown)} among {where} (give --include-path for your own)")
    return manager


def evaluate_tasks(path: str | Path, tasks: list[str], include_path: str | Path | None = None,
                   limit: float | None = None, num_fewshot: int | None = None, batch_size: int | None = None,
                   prefix: str | None = None, seed: int = 0) -> dict:
    """lm-eval's results dict for `tasks` on the model of a folder (`rafale eval MODEL --tasks`)."""
    from lm_eval import simple_evaluate

    if not tasks:
        raise RafaleError("--tasks: name at least one task")
    manager = task_manager(tasks, include_path)
    model = RafaleLM(pretrained=str(path), batch_size=batch_size, prefix=prefix)
    # The harness prints some progress with print(): to stderr, so that stdout stays the table or the JSON.
    with contextlib.redirect_stdout(sys.stderr):
        return simple_evaluate(model=model, tasks=tasks, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                               log_samples=False, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                               fewshot_random_seed=seed)


def results_table(results: dict) -> str:
    """The harness's own table of a results dict (and of its groups, where it has any)."""
    from lm_eval.utils import make_table

    tables = [make_table(results)]
    if results.get("groups"):
        tables.append(make_table(results, "groups"))
    return "\n".join(tables)
