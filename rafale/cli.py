"""The command line: `rafale -c run.yaml` trains; `DATA=1` stops after the datapipe; `DEBUG=1` overfits one batch.

Heavy libraries (torch, Composer, datasets) are imported inside the commands, after the run file is validated:
`rafale --help` stays instant and a typo in a run file costs a fraction of a second.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from rafale.errors import Interrupted, RafaleError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=False,
    pretty_exceptions_enable=False,
    help="rafale: train small transformer language models from one YAML run file.\n\n"
    "`rafale -c RUN.yaml` prepares the data (cached) and trains. Set DATA=1 to stop after the data pipeline, "
    "DEBUG=1 to overfit a single batch and check that the model learns.",
)

RunFileOption = typer.Option(None, "--config", "-c", help="The YAML run file.", show_default=False)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


@app.callback(invoke_without_command=True)
def main(ctx: typer.Context, config: Optional[Path] = RunFileOption) -> None:
    if ctx.invoked_subcommand is not None:
        if config is not None:
            raise typer.BadParameter("give -c after the command, e.g. `rafale train -c run.yaml`")
        return
    if config is None:
        typer.echo(ctx.get_help())
        raise typer.Exit(2)
    if _env_flag("DATA"):
        data(config)
    elif _env_flag("DEBUG"):
        debug(config)
    else:
        train(config)


@app.command()
def train(config: Path = typer.Option(..., "--config", "-c", help="The YAML run file.")) -> None:
    """Prepare the data (or reuse its cache), train, export the model and print samples."""
    from rafale.config import load_run_file

    run_file = load_run_file(config)
    from rafale.train import train_run

    train_run(run_file)


@app.command()
def data(config: Path = typer.Option(..., "--config", "-c", help="The YAML run file.")) -> None:
    """Run only the data pipeline and print a summary (same as DATA=1)."""
    from rafale.config import load_run_file

    run_file = load_run_file(config)
    from rafale.data import format_summary, prepare_data

    typer.echo(format_summary(prepare_data(run_file)))


@app.command()
def debug(config: Path = typer.Option(..., "--config", "-c", help="The YAML run file.")) -> None:
    """Overfit one batch (same batch for eval) and say whether the loss fell to 10% of its start (same as DEBUG=1)."""
    from rafale.config import load_run_file

    run_file = load_run_file(config)
    from rafale.train import debug_run

    if not debug_run(run_file):
        raise typer.Exit(1)


@app.command()
def generate(
    path: Path = typer.Argument(..., help="A Hugging Face-format folder with tokenizer.json, or a run's folder."),
    prompt: List[str] = typer.Option(..., "--prompt", "-p", help="A prompt; repeat for a batch."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", min=1),
    temperature: float = typer.Option(0.0, min=0.0, help="0 is greedy decoding."),
    top_k: Optional[int] = typer.Option(None, "--top-k", min=1),
    top_p: Optional[float] = typer.Option(None, "--top-p", max=1.0),
    seed: Optional[int] = typer.Option(None, help="Seed for sampling."),
    chat: bool = typer.Option(False, "--chat", help="Each prompt is a user's message, rendered with the model's "
                              "chat template (a fine-tuned export's tokenizer_config.json); prints the answers."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per prompt and line."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Decode with the weights in float32, bfloat16 or "
                                        "float16 (16-bit halves the bytes a step reads); default float32."),
) -> None:
    """Generate text from a trained model, with the KV cache."""
    import json

    from rafale.models.generate import generate_from_folder

    results = generate_from_folder(
        path, prompt, chat=chat, dtype=dtype, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
        top_p=top_p, seed=seed
    )
    for result in results:
        if as_json:
            typer.echo(json.dumps(result, ensure_ascii=False))
        elif chat:
            typer.echo(f"> {result['prompt']}\n{result['text']}\n")
        else:
            typer.echo(f"{result['prompt']}{result['text']}\n")


@app.command()
def sample(
    path: Path = typer.Argument(..., help="A Hugging Face-format folder with tokenizer.json, or a run's folder."),
    prompts: Path = typer.Argument(..., help="A text file (one prompt a line) or .jsonl/.json records: {prompt}, "
                                   "chat {messages}, or SFT's instruction records."),
    out: Path = typer.Argument(..., help="The .jsonl to write {prompt, output} lines to; lines already there are "
                               "kept and their samples skipped."),
    num_samples: int = typer.Option(1, "--num-samples", "-k", min=1, help="Samples per prompt (each line then "
                                    "has a sample_index); needs --temperature > 0."),
    batch_size: int = typer.Option(8, "--batch-size", "-b", min=1),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", "-n", min=1),
    temperature: float = typer.Option(0.0, min=0.0, help="0 is greedy decoding."),
    top_k: Optional[int] = typer.Option(None, "--top-k", min=1),
    top_p: Optional[float] = typer.Option(None, "--top-p", max=1.0),
    seed: int = typer.Option(0, help="The same seed, prompts and batch size give the same file."),
    raw: bool = typer.Option(False, "--raw", help="Continue string prompts as plain text even when the model has a "
                             "chat template."),
) -> None:
    """Generate completions for a file of prompts (chat-templated for SFT models) into a jsonl of {prompt, output}:
    batched, seeded, resumable."""
    from rafale.sample import sample_file

    written = sample_file(path, prompts, out, num_samples, batch_size, max_new_tokens, temperature, top_k, top_p,
                          seed, raw)
    typer.echo(f"{out}: wrote {written} samples" if written else f"{out}: already complete, nothing to do")


@app.command("eval")
def evaluate(
    path: Path = typer.Argument(..., help="A Hugging Face-format Pythia/Llama folder with tokenizer.json, or a run's "
                                "folder."),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="Perplexity of documents: a .txt file (documents "
                                       "separated by blank lines), a .jsonl/.json/.parquet file, a folder of such "
                                       "files, a save_to_disk folder, a hub name or synthetic:stories."),
    tasks: Optional[str] = typer.Option(None, "--tasks", "-t", help="lm-evaluation-harness tasks instead, "
                                        "comma-separated (rafale_story_next_word is bundled); needs "
                                        "`pip install \"rafale[eval]\"`."),
    include_path: Optional[Path] = typer.Option(None, "--include-path", help="A folder of your own task YAMLs."),
    limit: Optional[float] = typer.Option(None, "--limit", help="Items per task (below 1: a fraction of them)."),
    num_fewshot: Optional[int] = typer.Option(None, "--num-fewshot", min=0, help="Examples before each item."),
    column: str = typer.Option("text", "--column", help="The column that holds the documents."),
    split: Optional[str] = typer.Option(None, "--split", help="The split to score; default: test, else "
                                        "validation, else train."),
    window: Optional[int] = typer.Option(None, "--window", min=1, help="Inputs per window; default: the model's "
                                         "max_position_embeddings."),
    stride: Optional[int] = typer.Option(None, "--stride", min=1, help="Advance of the windows; below --window they "
                                         "overlap and each scores only its new tokens. Default: the window "
                                         "(disjoint, as lm-evaluation-harness)."),
    prefix: Optional[str] = typer.Option(None, "--prefix", help="The token before each document (context only); "
                                         "default: the folder's BOS, else its end-of-text token; 'none' for none."),
    batch_size: int = typer.Option(8, "--batch-size", "-b", min=1, help="Windows (or requests) per forward pass."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object with the settings, counts and figures (with "
                                 "--tasks: the harness's results)."),
) -> None:
    """Perplexity of documents (--data): token, word and byte perplexity and bits per byte (lm-evaluation-harness's
    definitions), over rolling windows in which every token is predicted once. Or lm-evaluation-harness tasks
    (--tasks) through rafale's model."""
    import json

    if (data is None) == (tasks is None):
        raise RafaleError("eval: give --data (perplexity of documents) or --tasks (lm-evaluation-harness), one of them")
    if tasks is not None:
        from rafale.evaluate import require_lm_eval

        require_lm_eval()
        from rafale.evaluate.harness import evaluate_tasks, results_table

        results = evaluate_tasks(path, [task for task in tasks.split(",") if task], include_path, limit, num_fewshot,
                                 batch_size, prefix)
        typer.echo(json.dumps(results, default=str) if as_json else results_table(results))
        return

    from rafale.evaluate.perplexity import evaluate_folder, progress_line

    result, used_split = evaluate_folder(path, data, column, split, prefix, window, stride, batch_size,
                                         progress_line())
    if as_json:
        typer.echo(json.dumps({"model": str(path), "data": data, "split": used_split, **result.as_dict()}))
    else:
        typer.echo("\n".join([f"{path} on {data} (split {used_split})", *result.lines()]))


@app.command()
def plot(
    runs: List[str] = typer.Argument(..., help="Runs to overlay: run names (under the cache's checkpoints folder), "
                                     "run folders or metrics.jsonl files."),
    out: Path = typer.Option(Path("runs.png"), "--out", "-o", help="The PNG to write."),
    metric: List[str] = typer.Option([], "--metric", "-m", help="A panel: 'loss' (train and eval loss) or a "
                                     "column of metrics.jsonl (lr, eval/perplexity, tokens_per_sec, ...); repeat "
                                     "for more. Default: loss and lr."),
    x: str = typer.Option("batch", "--x", help="The horizontal axis: batch, tokens or seconds."),
) -> None:
    """Overlay the curves of runs (their metrics.jsonl) in one picture, to compare experiments."""
    from rafale.plot import plot_command

    typer.echo(f"curves of {len(runs)} run{'s' if len(runs) > 1 else ''} drawn to "
               f"{plot_command(runs, out, metric, x)}")


@app.command("lm-eval", context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
             add_help_option=False)
def lm_eval_command(ctx: typer.Context) -> None:
    """lm-evaluation-harness's own command line (`lm_eval ...`, every option) with rafale's model registered:
    `rafale lm-eval --model rafale --model_args pretrained=FOLDER --tasks TASK`."""
    from rafale.evaluate import require_lm_eval

    require_lm_eval()
    from lm_eval.__main__ import cli_evaluate

    import rafale.evaluate.harness  # noqa: F401  (registers --model rafale)

    sys.argv = ["lm_eval", *ctx.args]
    cli_evaluate()


@app.command()
def label(
    reward_model: Path = typer.Argument(..., help="A reward model (data.pipeline: reward): its exported folder or its "
                                        "run's folder."),
    samples: Path = typer.Argument(..., help="JSON lines {prompt, output} (several outputs of a prompt: several "
                                   "lines), as `rafale sample` writes them."),
    out: Path = typer.Argument(..., help="The feedback file (JSON lines) to write."),
    feedback: str = typer.Option("pairwise", "--feedback", help="pairwise: {prompt, chosen, rejected}, each "
                                 "prompt's best output against its worst; binary: {prompt, completion, label}, "
                                 "label true above the threshold."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="binary: the score above which an output "
                                              "is desirable; default: the median score."),
    batch_size: int = typer.Option(32, "--batch-size", "-b", min=1, help="Outputs per forward pass."),
) -> None:
    """Score sampled outputs with a reward model and write feedback that preference tuning reads."""
    from rafale.evaluate.label import label_samples

    typer.echo("\n".join(label_samples(reward_model, samples, out, feedback, threshold, batch_size).lines))


def run() -> None:
    """Console entry point: user mistakes become one line on stderr and exit code 2, never a traceback.

    Exit codes (errors.py): 2 a user mistake, 1 a DEBUG=1 run whose model did not learn, 3 a non-finite loss,
    130 / 143 training stopped by Ctrl-C / SIGTERM after saving a checkpoint.
    """
    try:
        app()
    except RafaleError as error:
        typer.echo(str(error) if isinstance(error, Interrupted) else f"error: {error}", err=True)
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
