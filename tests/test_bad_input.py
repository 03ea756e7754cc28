"""Bad input, from every door (recipe values, CLI arguments, run dirs, manifests, data files), is
one line naming the file and key or line, with exit code 2: never a traceback, never coerced.
The table is the count that matters: tracebacks, goal 0."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import tiny_recipe_text, write_recipe

from launcher.cli import main
from launcher.errors import UserError

HOSTILE = "a\\'\"'\"'b'\"'\"' --comment=X #"

# --set KEY=VALUE (VALUE in TOML) on a dry run -> the words the one line must hold
RECIPE_VALUES = {
    'peft.alpha="16"': "peft.alpha: input should be a valid number",
    'train.learning_rate="3e-3"': "train.learning_rate: input should be a valid number",
    'model.trust_remote_code="yes"': "model.trust_remote_code: input should be a valid boolean",
    "eval.max_examples=true": "eval.max_examples: input should be a valid integer",
    "train.epochs=inf": "train.epochs: input should be a finite number",
    "train.learning_rate=nan": "train.learning_rate: input should be a finite number",
    "train.seed=-1": "train.seed: input should be greater than or equal to 0",
    "train.seed=99999999999": "train.seed: input should be less than or equal to 4294967295",
    'model.name_or_path=""': "model.name_or_path: string should have at least 1 character",
    "peft.target_modules=[]": "peft.target_modules: needs at least one non-empty module name",
    f"slurm.partition={json.dumps(HOSTILE)}": "slurm.partition: ",
    'slurm.account="lab --comment=X"': "slurm.account: ",
    'slurm.qos="normal#x"': "slurm.qos: ",
    'slurm.constraint="a100 --x"': "slurm.constraint: ",
    'slurm.environment={X="hf_abcdefghijklmnopqrstuvwx"}': "slurm.environment: X: its value looks like a token",
}


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, tiny_assets):
    return write_recipe(tmp_path_factory.mktemp("bad-input"), tiny_recipe_text(tiny_assets))


def one_line(capsys, code: int, *needles: str) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert "Traceback" not in captured.out + captured.err
    assert code == 2, captured.out + captured.err
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert all(n in lines[0] for n in needles), lines[0]
    return lines[0]


@pytest.mark.parametrize("value", sorted(RECIPE_VALUES))
def test_a_bad_recipe_value_is_refused_with_its_key_not_coerced(value, recipe, tmp_path, capsys):
    one_line(capsys, main([str(recipe), "--dry-run", "--run-dir", str(tmp_path / "run"), "--set", value]), RECIPE_VALUES[value])
    assert not (tmp_path / "run" / "recipe.toml").exists()


def test_an_sbatch_line_never_gets_a_second_option(recipe, tmp_path, capsys):
    """A name SLURM accepts renders; the hostile one never reaches sbatch.sh (see test_slurm for
    sbatch's own parse of the rendered directives)."""
    code = main([str(recipe), "--dry-run", "--executor", "slurm", "--run-dir", str(tmp_path / "ok"), "--partition", "gpu,debug"])
    assert code == 0, capsys.readouterr()
    script = (tmp_path / "ok" / "sbatch.sh").read_text()
    assert "#SBATCH --partition=gpu,debug" in script
    code = main([str(recipe), "--dry-run", "--executor", "slurm", "--run-dir", str(tmp_path / "bad"), "--partition", HOSTILE])
    one_line(capsys, code, "slurm.partition", "#SBATCH")


def test_bad_files_run_dirs_and_manifests_are_one_line(recipe, tmp_path, capsys, monkeypatch):
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes(recipe.read_bytes().replace(b'name = "tiny"', b'name = "t\xe9"'))
    one_line(capsys, main([str(latin1), "--dry-run"]), str(latin1), "not UTF-8")

    one_line(capsys, main([str(recipe), "--dry-run", "--run-dir", str(tmp_path / "a\nb")]), "control character")
    (tmp_path / "file").write_text("")
    one_line(capsys, main([str(recipe), "--dry-run", "--run-dir", str(tmp_path / "file")]), "is a file, not a folder")
    one_line(capsys, main([str(recipe), "--dry-run", "--run-dir", str(tmp_path / ("x" * 300))]), "cannot create the run dir")
    one_line(capsys, main([str(recipe), "--dry-run", "--executor", "slurm", "--run-dir", str(tmp_path / "a b")]), "#SBATCH lines")

    with monkeypatch.context() as without_slurm:  # a laptop: the script renders as the login node would, nothing submits
        without_slurm.setenv("PATH", str(tmp_path / "empty"))
        assert main([str(recipe), "--dry-run", "--executor", "slurm", "--run-dir", str(tmp_path / "no-srun")]) == 0
        assert "srun --unbuffered" in (tmp_path / "no-srun" / "sbatch.sh").read_text()
        capsys.readouterr()
        code = main([str(recipe), "--executor", "slurm", "--run-dir", str(tmp_path / "no-srun")])
        one_line(capsys, code, "needs a SLURM cluster")

    run = tmp_path / "runs" / "tiny"
    assert main([str(recipe), "--dry-run", "--run-dir", str(run)]) == 0
    broken = tmp_path / "runs" / "broken"
    shutil.copytree(run, broken)
    (broken / "recipe.toml").write_text((run / "recipe.toml").read_text()[:-40] + "[[[")
    one_line(capsys, main(["merge", str(broken)]), f"{broken / 'recipe.toml'}: TOML syntax error")
    (broken / "manifest.json").write_text((run / "manifest.json").read_text()[:50])
    for command in ("status", "cancel"):
        one_line(capsys, main([command, str(broken)]), f"{broken / 'manifest.json'}: not valid JSON")

    monkeypatch.chdir(tmp_path)  # `launch status` lists runs/*: the broken one is one line, the others are shown
    capsys.readouterr()
    code = main(["status"])
    captured = capsys.readouterr()
    assert code == 2 and "runs/tiny: rendered" in captured.out and "Traceback" not in captured.out + captured.err
    assert captured.err.strip().splitlines() == [next(line for line in captured.err.splitlines() if "runs/broken" in line)]


BAD_DATA = {
    "latin1.jsonl": (b'{"instruction": "caf\xe9", "output": "x"}\n', "not UTF-8"),
    "latin1.json": (b'[{"instruction": "caf\xe9", "output": "x"}]', "not UTF-8"),
    "extra-fields.csv": (b"instruction,output\na,b\nc,d,e\n", "cannot be read as csv"),
    "empty.csv": (b"", "cannot be read as csv"),
    "corrupt.parquet": (b"PAR1 this is not parquet", "cannot be read as parquet"),
}


@pytest.mark.parametrize("name", sorted(BAD_DATA))
def test_a_data_file_that_cannot_be_read_is_one_line(name, tmp_path, tiny_assets, capsys):
    content, message = BAD_DATA[name]
    (tmp_path / name).write_bytes(content)
    recipe = write_recipe(tmp_path, tiny_recipe_text(tiny_assets).replace(str(tiny_assets["train_file"]), str(tmp_path / name)))
    one_line(capsys, main(["check", str(recipe)]), str(tmp_path / name), message)


def test_rows_are_read_strictly(tmp_path, tiny_assets):
    """A number where text belongs is a bad row (not its repr, trained on); a BOM is read, so the
    first row is not lost."""
    from launcher.config.recipe import load_recipe
    from launcher.data.examples import load_examples

    rows = [{"instruction": f"is {n} even?", "output": "yes" if n % 2 == 0 else "no"} for n in range(4)]
    data = tmp_path / "rows.jsonl"
    data.write_bytes(
        b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in rows).encode() + b'{"instruction": "7?", "output": 7}\n'
    )
    text = tiny_recipe_text(tiny_assets).replace(str(tiny_assets["train_file"]), str(data))
    recipe = load_recipe(write_recipe(tmp_path, text), ['data.on_bad_rows="skip"'])
    examples, skipped = load_examples(str(data), recipe.data, None)
    assert [e.response for e in examples] == ["yes", "no", "yes", "no"] and skipped == 1
    strict = load_recipe(write_recipe(tmp_path, text))
    with pytest.raises(UserError, match=rf"{data}:5: column 'output' holds int 7, not text"):
        load_examples(str(data), strict.data, None)
