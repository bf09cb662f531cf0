"""The run file: valid files load with defaults and resolved paths; every mistake is one line naming file and key."""

import re
from pathlib import Path

import pytest

from rafale.config import ConfigError, load_run_file

VALID = """\
run:
  name: "tiny"
  max_lr: 6e-04
  eval_interval: 50
model:
  config: "pythia-tiny"
data:
  pipeline: "tinystories_neox"
  config:
    name: "stories"
    dataset_path: "corpus.txt"
    pad_token_id: -100
"""


# The data section, whose pipeline the cases below change along with a key of that pipeline's settings.
MLM_BLOCK = VALID[VALID.index('  pipeline: "tinystories_neox"'):].rstrip("\n")


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "corpus.txt").write_text("Once upon a time.\n")
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as raised:
        load_run_file(write(tmp_path, text))
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(str(tmp_path / "run.yaml"))
    return message


def test_valid_file_loads_with_defaults_and_resolved_paths(tmp_path):
    config = load_run_file(write(tmp_path, VALID))
    assert config.run.max_lr == pytest.approx(6e-4)  # YAML reads 6e-04 as a string; pydantic makes it a number
    assert config.run.eval_interval == "50ba"
    assert config.run.schedule == "cosine-warmup"
    assert config.data.pipeline == "causal_lm"  # the original's pipeline name is an alias
    assert config.data.config.pad_token_id is None  # the original's -100 means "the tokenizer's pad token"
    assert Path(config.data.config.dataset_path) == (tmp_path / "corpus.txt").resolve()
    assert config.model.overrides() == {}


def test_each_run_file_has_a_task_of_its_own(tmp_path):
    """A task keeps its run's state (settings, the starting model's figures): two runs in one process share none."""
    first, second = (load_run_file(write(tmp_path, VALID)) for _ in range(2))
    assert first.task is first.task and first.task is not second.task
    first.task.settings = first.data.config
    assert not hasattr(second.task, "settings")


def test_paths_resolve_relative_to_the_run_file_not_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir("/")
    config = load_run_file(write(tmp_path, VALID))
    assert Path(config.data.config.dataset_path).parent == tmp_path.resolve()


@pytest.mark.parametrize(
    "old, new, expected",
    [
        ('  max_lr: 6e-04', '  max_lr: -1', "run.max_lr: must be > 0"),
        ('  config: "pythia-tiny"', '  config: "pythia-tiny"\n  n_layers: 0', "model.n_layers: must be > 0"),
        ('  max_lr: 6e-04', '  max_lr: 6e-04\n  max_lrr: 1', "run.max_lrr: unknown key; did you mean 'max_lr'?"),
        ('  max_lr: 6e-04', '  max_lr: "fast"', "run.max_lr: Input should be a valid number"),
        ('  max_lr: 6e-04', '  schedule: "cosine"', "run.schedule: unknown schedule 'cosine'; valid: cosine-warmup"),
        ('  max_lr: 6e-04', '  optimizer: "SGD"', "run.optimizer: unknown optimizer 'sgd'; valid: adamw"),
        ('  eval_interval: 50', '  eval_interval: "soon"', "run.eval_interval: expected a positive time"),
        ('  eval_interval: 50', '  seed: 1\n  seed: 2', "line 5, column 3: key 'seed' appears twice"),
        ('pipeline: "tinystories_neox"', 'pipeline: "mlmm"', "data.pipeline: unknown pipeline 'mlmm'; valid: "),
        ('  config: "pythia-tiny"', '  config: "bert-tiny"\n  type: "encoder"', "model.type: 'encoder', but "
         "data.pipeline 'causal_lm' trains a decoder; leave model.type out"),
        ('  config: "pythia-tiny"', '  config: "pythia-tiny"\n  mode: "mlm"',
         "model.mode: 'mlm', but data.pipeline 'causal_lm' takes no model.mode"),
        ('pipeline: "tinystories_neox"', 'pipeline: "mlm"\n  config: {name: x, dataset_path: corpus.txt}\nmodel2:',
         "model2: unknown key"),
        ('  config: "pythia-tiny"', '  config: "bert-tiny"\n  type: "encoder"\n  mode: "nsp"',
         "model.mode: Input should be"),
        ('  config: "pythia-tiny"', '  config: "pythia-tiny"\n  n_classes: 1', "model.n_classes: must be >= 2"),
        ('  config: "pythia-tiny"', '  config: "pythia-tiny"\n  type: "seq2seq"', "model.type: Input should be"),
        (MLM_BLOCK, MLM_BLOCK.replace('tinystories_neox', 'mlm') + '\n    mlm_probability: 1.5',
         "data.config.mlm_probability: must be < 1"),
        (MLM_BLOCK, MLM_BLOCK.replace('tinystories_neox', 'mlm') + '\n    mlm_truncate: "split"',
         "data.config.mlm_truncate: Input should be 'chunk'"),
        ('    pad_token_id: -100', '    mlm_truncate: "chunk"', "data.config.mlm_truncate: unknown key"),
        (MLM_BLOCK, MLM_BLOCK.replace('tinystories_neox', 'classification') + '\n    label_col: "y"',
         "data.config.label_col: unknown key; did you mean 'label_column'?"),
        ('"corpus.txt"', '"missing.txt"', "data.config.dataset_path: no such file or folder:"),
        ('  config: "pythia-tiny"', '  config: "pythia-tiny"\n  use_pretrained: true', "pretrained_path is not set"),
    ],
)
def test_mistakes_name_the_key(tmp_path, old, new, expected):
    assert old in VALID
    assert expected in error_of(tmp_path, VALID.replace(old, new))


def test_missing_section(tmp_path):
    text = VALID[: VALID.index("model:")] + VALID[VALID.index("data:") :]
    assert error_of(tmp_path, text).endswith("model: required key is missing")


def test_not_yaml_gives_the_line(tmp_path):
    message = error_of(tmp_path, "run:\n  name: [unclosed\nmodel: {}\n")
    assert "not valid YAML: line" in message


def test_not_a_mapping(tmp_path):
    assert "expected a mapping" in error_of(tmp_path, "- a\n- b\n")


def test_missing_run_file(tmp_path):
    with pytest.raises(ConfigError, match="run file not found"):
        load_run_file(tmp_path / "nope.yaml")


def test_bundled_run_files_load():
    root = Path(__file__).parent
    for name in ("pythia_tinystories.yaml", "pythia_tinystories_hub.yaml", "bert_tiny_mlm.yaml",
                 "bert_tiny_classify.yaml", "bert_tiny_imdb.yaml", "pythia_sft.yaml"):
        config = load_run_file(root / name)
        assert config.run.name


def test_encoder_modes_follow_the_pipeline(tmp_path):
    encoder = VALID.replace('  config: "pythia-tiny"', '  config: "bert-tiny"\n  type: "encoder"')
    config = load_run_file(write(tmp_path, encoder.replace('"tinystories_neox"', '"mlm"')))
    assert config.task.encoder_mode == "mlm" and config.data.config.mlm_probability == 0.15
    # The original's IMDB pipeline name is an alias of classification.
    config = load_run_file(write(tmp_path, encoder.replace('"tinystories_neox"', '"imdb_bert"')))
    assert config.data.pipeline == "classification" and config.task.encoder_mode == "cls"
    assert config.model.n_classes == 2
    assert config.model.overrides() == {} and config.data.config.label_column == "label"


def test_mode_must_be_the_tasks(tmp_path):
    encoder = VALID.replace('  config: "pythia-tiny"', '  config: "bert-tiny"\n  mode: "cls"')
    message = error_of(tmp_path, encoder.replace('"tinystories_neox"', '"mlm"'))
    assert "model.mode: 'cls', but data.pipeline 'mlm' needs model.mode 'mlm'" in message


@pytest.mark.parametrize(
    "preset, pipeline, expected",
    [
        ("pythia-9000b", "tinystories_neox", "model.config: unknown preset 'pythia-9000b'; valid: "),
        ("pythia-tiny", "mlm", "model.config: 'pythia-tiny' is a decoder preset, but data.pipeline 'mlm' trains an "
         "encoder; valid: bert-"),
        ("bert-tiny", "tinystories_neox", "'bert-tiny' is an encoder preset, but data.pipeline 'causal_lm' trains a "
         "decoder; valid: pythia"),
    ],
)
def test_the_model_section_is_checked_before_any_data_is_prepared(tmp_path, preset, pipeline, expected):
    from rafale.errors import RafaleError
    from rafale.train import check_model

    text = VALID.replace('"pythia-tiny"', f'"{preset}"').replace('"tinystories_neox"', f'"{pipeline}"')
    config = load_run_file(write(tmp_path, text))
    with pytest.raises(RafaleError, match=re.escape(expected)):
        check_model(config)


def test_a_folder_without_data_files_is_an_error_when_the_run_file_is_read(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.md").write_text("no data here")
    message = error_of(tmp_path, VALID.replace('"corpus.txt"', '"empty"'))
    assert message.endswith(f"data.config.dataset_path: no data files (.jsonl, .json, .parquet, .txt) in "
                            f"{tmp_path / 'empty'}")


@pytest.mark.parametrize("key, module", [("use_tensorboard", "tensorboard"), ("use_wandb", "wandb"),
                                         ("use_mlflow", "mlflow")])
def test_an_optional_logger_that_is_not_installed_is_one_line_naming_the_extra(tmp_path, monkeypatch, key, module):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *rest: None if name == module else real_find_spec(name, *rest))
    message = error_of(tmp_path, VALID + f"logging:\n  {key}: true\n")
    assert message.endswith(f"logging.{key}: needs {module}, which is not installed; pip install \"rafale[{module}]\"")
