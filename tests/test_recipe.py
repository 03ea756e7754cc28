"""Bad recipes get one clear line per problem, exit code 2, and no traceback."""

from __future__ import annotations

import pytest
from conftest import run_launch, tiny_recipe_text, write_recipe

from launcher.cli import main
from launcher.config.recipe import TrainSection, load_recipe
from launcher.errors import UserError


def errors_of(path, overrides=()) -> list[str]:
    with pytest.raises(UserError) as caught:
        load_recipe(path, list(overrides))
    return caught.value.lines


def test_toml_syntax_error_names_file_line_and_column(tmp_path):
    path = write_recipe(tmp_path, 'name = "x"\n[model]\nname_or_path = "a\n')
    [line] = errors_of(path)
    assert str(path) in line and "TOML syntax error" in line and "line 3, column" in line


def test_wrong_type_names_the_key_path(tmp_path, tiny_assets):
    path = write_recipe(tmp_path, tiny_recipe_text(tiny_assets) + '[peft]\nr = "eight"\n')
    assert errors_of(path) == ['peft.r: must be a positive integer, got "eight"']


def test_unknown_key_suggests_the_closest_valid_name(tmp_path, tiny_assets):
    text = tiny_recipe_text(tiny_assets).replace("learning_rate = 3e-3", "learning_rat = 3e-3")
    assert errors_of(write_recipe(tmp_path, text)) == ["train.learning_rat: unknown key; did you mean train.learning_rate?"]


def test_every_problem_is_reported_at_once(tmp_path, tiny_assets):
    text = tiny_recipe_text(tiny_assets).replace("max_length = 64", 'max_length = -1\ntemplate = "chatmI"')
    lines = errors_of(write_recipe(tmp_path, text))
    assert len(lines) == 2
    assert lines[0].startswith(
        "data.template: input should be 'plain', 'chatml', 'transnormer', 'chatglm', 'chatglm3' or 'tokenizer', got \"chatmI\""
    )
    assert lines[1] == "data.max_length: input should be greater than 0, got -1"


def test_missing_files_are_named(tmp_path, tiny_assets):
    text = tiny_recipe_text(tiny_assets).replace(str(tiny_assets["train_file"]), "./no/such.jsonl")
    [line] = errors_of(write_recipe(tmp_path, text))
    assert line.startswith(f"data.train_file: {tmp_path}/no/such.jsonl does not exist")


def test_relative_paths_are_read_from_the_recipe_folder(tmp_path, tiny_assets):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "t.jsonl").write_text(tiny_assets["train_file"].read_text())
    text = tiny_recipe_text(tiny_assets).replace(str(tiny_assets["train_file"]), "data/t.jsonl")
    recipe = load_recipe(write_recipe(tmp_path, text))
    assert recipe.data.train_file == str(tmp_path / "data" / "t.jsonl")


def test_set_overrides_are_typed_and_checked(tmp_path, tiny_assets):
    path = write_recipe(tmp_path, tiny_recipe_text(tiny_assets))
    recipe = load_recipe(path, ["train.learning_rate=2e-4", "peft.target_modules=['q_proj','v_proj']", "data.template=chatml"])
    assert recipe.train.learning_rate == 2e-4
    assert recipe.peft.target_modules == ["q_proj", "v_proj"]
    assert recipe.data.template == "chatml"
    assert errors_of(path, ["train.lerning_rate=1"]) == [
        "--set train.lerning_rate: unknown key; did you mean train.learning_rate?"
    ]
    assert errors_of(path, ["peft.r=eight"]) == ['peft.r: must be a positive integer, got "eight"']
    assert errors_of(path, ["train.epochs"])[0].startswith("--set train.epochs: expected KEY=VALUE")


def test_control_characters_are_rejected(tmp_path, tiny_assets):
    text = tiny_recipe_text(tiny_assets) + '[slurm]\npartition = "gpu\\n#SBATCH --x"\n'
    assert errors_of(write_recipe(tmp_path, text)) == ["slurm.partition: contains a newline or control character; remove it"]


def test_cli_prints_one_line_per_problem_and_exits_2(tmp_path, tiny_assets, capsys):
    path = write_recipe(tmp_path, tiny_recipe_text(tiny_assets) + "[peft]\nr = 0\nalpah = 3\n")
    assert main(["check", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "error: peft.r: must be a positive integer, got 0",
        "error: peft.alpah: unknown key; did you mean peft.alpha?",
    ]


def test_console_script_gives_no_traceback(tmp_path):
    result = run_launch("check", tmp_path / "missing.toml")
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {tmp_path / 'missing.toml'}: recipe file not found"
    assert "Traceback" not in result.stderr


def test_help_of_every_command_explains_it():
    for command in ([], ["run"], ["check"], ["merge"], ["eval"], ["status"]):
        result = run_launch(*command, "--help")
        assert result.returncode == 0 and "usage: launch" in result.stdout
    assert "--set KEY=VALUE" in run_launch("run", "--help").stdout


def test_secrets_are_kept_out_of_recipes(tmp_path, tiny_assets):
    path = write_recipe(tmp_path, tiny_recipe_text(tiny_assets) + '[slurm]\nenvironment = { HF_TOKEN = "hf_abc" }\n')
    [line] = errors_of(path)
    assert line.startswith("slurm.environment: HF_TOKEN looks like a secret") and "export HF_TOKEN in your shell" in line
    assert "hf_abc" not in line


def test_profile_keys_override_the_recipe_and_flags_override_both(tmp_path, tiny_assets):
    path = write_recipe(tmp_path, tiny_recipe_text(tiny_assets) + '[slurm]\nprofile = "dev"\npartition = "mine"\ntime = "5"\n')
    assert load_recipe(path).slurm.partition == "dev"  # slurm/profiles/dev.toml
    flagged = load_recipe(path, ["slurm.partition=gpu", "slurm.time=00:05:00"])
    assert (flagged.slurm.partition, flagged.slurm.time) == ("gpu", "00:05:00")
    assert errors_of(path, ["slurm.profile=nope"])[0].startswith("slurm.profile: no profile 'nope'")


def test_report_to_takes_one_tracker_or_a_list_and_none_only_alone(tmp_path, tiny_assets):
    path = write_recipe(tmp_path, tiny_recipe_text(tiny_assets))
    assert TrainSection().report_to == ["tensorboard"]  # the default: event files in the run dir
    assert load_recipe(path, ["train.report_to=wandb"]).train.report_to == ["wandb"]
    [line] = errors_of(path, ['train.report_to=["none", "wandb"]'])
    assert line.startswith("train.report_to:") and "'none' cannot be listed with trackers" in line
    [line] = errors_of(path, ['train.report_to=["neptune"]'])
    assert line.startswith("train.report_to") and "neptune" in line


def test_a_tracker_that_could_not_log_is_refused_before_anything_starts(tmp_path, tiny_assets, monkeypatch):
    """W&B with no key, no `wandb login` and not offline would stop training at its first step; a
    tracker whose library is missing too."""
    from launcher.tracking import trackers as tracking

    for key in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with a W&B login
    path = write_recipe(tmp_path, tiny_recipe_text(tiny_assets))
    wandb = load_recipe(path, ['train.report_to=["tensorboard", "wandb"]'])
    [error], where = tracking.tracking_problems(wandb)
    assert error.startswith("train.report_to: wandb has no API key here") and "WANDB_MODE=offline" in error
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert tracking.tracking_problems(wandb) == ([], "tracking: tensorboard (RUN/tensorboard/), wandb (offline)")
    monkeypatch.setitem(tracking.PACKAGES, "trackio", "trackio_is_not_installed_here")
    [error], _ = tracking.tracking_problems(load_recipe(path, ["train.report_to=trackio"]))
    assert error.startswith("train.report_to: trackio is not installed in this environment; pip install")
    assert tracking.tracking_problems(load_recipe(path, ["train.report_to=none"])) == ([], "tracking: none (train.report_to)")
