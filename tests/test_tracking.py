"""Experiment tracking for real: one training run (2 DeepSpeed ranks) logs to TensorBoard, W&B
(offline), MLflow (local file store) and Trackio (local sqlite) at once; the tests read each back
and find the training losses of logs/train_metrics.jsonl, the resolved recipe as hyper-parameters
and the evaluation metrics of every checkpoint in the same tracker run. Secrets in the environment
appear in no file of the run dir."""

from __future__ import annotations

import json
import sqlite3
import struct

import pytest
from conftest import run_launch, train_tiny

from launcher.rundir.runs import RunDir

pytestmark = [pytest.mark.xdist_group("tracking"), pytest.mark.e2e]

SECRETS = {
    "WANDB_API_KEY": "wandb-secret-0123456789abcdef0123456789abcdef01234567",
    "HF_TOKEN": "hf_secretTOKENvalue0123456789",
    "MLFLOW_TRACKING_TOKEN": "mlflow-secret-token-98765",
}


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, tiny_assets):
    folder = tmp_path_factory.mktemp("tracking")
    with pytest.MonkeyPatch.context() as env:
        for key, value in SECRETS.items():
            env.setenv(key, value)
        env.setenv("WANDB_MODE", "offline")  # no network here; a cluster without internet does the same
        for key in ("MLFLOW_TRACKING_URI", "WANDB_DIR", "TRACKIO_DIR"):
            env.delenv(key, raising=False)
        trackers = 'train.report_to=["tensorboard", "wandb", "mlflow", "trackio"]'
        sets = [trackers, "eval.checkpoints=all", "eval.max_examples=8"]
        _, _, result, _ = train_tiny(tiny_assets, folder, *sets, extra="[merge]\nenabled = false")
        status = run_launch("status", folder / "run")
    run = RunDir(folder / "run")
    losses = {row["step"]: row["loss"] for row in run.metrics.rows()}
    evaluated = json.loads((run.eval / "metrics.json").read_text())["systems"]
    return run, losses, evaluated, result.stdout + status.stdout


def test_tensorboard_event_files_hold_the_losses_the_recipe_and_every_checkpoints_eval(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, losses, evaluated, _ = tracked
    events = EventAccumulator(str(run.root / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    logged = {e.step: e.value for e in events.Scalars("train/loss")}
    assert sorted(logged) == sorted(losses) == list(range(1, 13))
    assert all(logged[step] == pytest.approx(losses[step], rel=1e-5) for step in losses)
    recipe_text = events.Tensors("recipe/text_summary")[0].tensor_proto.string_val[0].decode()
    assert recipe_text == "```toml\n" + run.recipe.read_text() + "\n```"  # the resolved recipe, as the run dir holds it
    hparams = events.PluginTagToContent("hparams")
    assert b"recipe.train.learning_rate" in b"".join(hparams.values())
    for step, system in ((5, "checkpoint-5"), (10, "checkpoint-10"), (12, "checkpoint-12")):
        point = {e.step: e.value for e in events.Scalars("eval/loss")}[step]
        assert point == pytest.approx(evaluated[system]["loss"], rel=1e-5)
    assert events.Scalars("eval_base/loss")[0].value == pytest.approx(evaluated["base"]["loss"], rel=1e-5)


def wandb_records(path):
    """The records of an offline W&B run file (what `wandb sync` uploads): a LevelDB-style log of
    32 KiB blocks, each record a (crc, length, type) header and a piece of a protobuf Record."""
    from wandb.proto import wandb_internal_pb2

    raw, position, pieces = path.read_bytes(), 7, b""  # 7 bytes of file header (":W&B", magic, version)
    assert raw[:4] == b":W&B"
    while position + 7 <= len(raw):
        room = 32768 - position % 32768
        if room < 7:  # a block's tail too short for a header is padding
            position += room
            continue
        _, length, kind = struct.unpack("<IHB", raw[position : position + 7])
        if length == 0 and kind == 0:
            position += room
            continue
        pieces += raw[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or a record's last piece
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            pieces = b""
            yield record


def test_wandb_offline_run_holds_losses_recipe_and_eval_under_one_id(tracked):
    run, losses, evaluated, _ = tracked
    files = sorted((run.root / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2  # training, then the evaluation resuming the same run
    assert len({f.name for f in files}) == 1  # one run id
    history, config = [], {}
    for path in files:
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                history.append(
                    {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                )
            elif kind == "config":
                config |= {item.key: item.value_json for item in record.config.update}
            elif kind == "run":
                config |= {item.key: item.value_json for item in record.run.config.update}
    trained = {row["train/global_step"]: row["train/loss"] for row in history if "train/loss" in row}
    assert trained.keys() == losses.keys() and all(trained[s] == pytest.approx(losses[s], rel=1e-5) for s in losses)
    assert json.loads(config["recipe"])["train"]["learning_rate"] == 0.003
    checkpoints = {row["eval/step"]: row["eval/loss"] for row in history if "eval/loss" in row}
    assert checkpoints[10] == pytest.approx(evaluated["checkpoint-10"]["loss"], rel=1e-5)


def test_mlflow_run_holds_losses_recipe_params_and_eval(tracked, monkeypatch):
    from mlflow.tracking import MlflowClient

    run, losses, evaluated, _ = tracked
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the store the run wrote (MLflow 3 asks to allow it)
    client = MlflowClient(tracking_uri=(run.root / "mlruns").as_uri())
    run_id = json.loads((run.root / "tracking.json").read_text())["mlflow_run_id"]
    logged = {m.step: m.value for m in client.get_metric_history(run_id, "loss")}
    assert logged.keys() == losses.keys() and all(logged[s] == pytest.approx(losses[s], rel=1e-5) for s in losses)
    assert client.get_run(run_id).data.params["recipe.train.learning_rate"] == "0.003"
    checkpoints = {m.step: m.value for m in client.get_metric_history(run_id, "eval/loss")}
    assert checkpoints[5] == pytest.approx(evaluated["checkpoint-5"]["loss"], rel=1e-5)
    experiments = client.search_experiments()
    assert [len(client.search_runs([e.experiment_id])) for e in experiments if e.name == "tiny"] == [1]


def test_trackio_database_holds_losses_and_eval(tracked):
    run, losses, evaluated, _ = tracked
    with sqlite3.connect(run.root / "trackio" / "tiny.db") as db:
        rows = [(step, json.loads(metrics)) for step, metrics in db.execute("select step, metrics from metrics")]
        [config] = [json.loads(text) for (text,) in db.execute("select config from configs")]
    assert config["recipe"]["train"]["learning_rate"] == 0.003  # still there after the evaluation resumed the run
    trained = {m["train/global_step"]: m["train/loss"] for _, m in rows if "train/loss" in m}  # trackio counts its own steps
    assert trained.keys() == losses.keys() and all(trained[s] == pytest.approx(losses[s], rel=1e-5) for s in losses)
    assert {step: m["eval/loss"] for step, m in rows if "eval/loss" in m}[12] == pytest.approx(
        evaluated["checkpoint-12"]["loss"], rel=1e-5
    )


def test_no_secret_reaches_a_file_of_the_run_dir(tracked):
    run, *_ = tracked
    files = [p for p in run.root.rglob("*") if p.is_file()]
    assert len(files) > 50  # logs, event files, offline runs, stores, pickles, rendered files
    for path in files:
        content = path.read_bytes()
        for key, secret in SECRETS.items():
            assert secret.encode() not in content, f"{key} in {path}"


def test_status_and_the_summary_say_how_to_open_each_dashboard(tracked):
    run, _, _, printed = tracked
    assert f"tensorboard --logdir {run.root / 'tensorboard'}" in printed
    assert f"wandb sync {run.root / 'wandb'}/offline-run-*" in printed
    assert f"mlflow ui --backend-store-uri {run.root / 'mlruns'}" in printed
    assert f"TRACKIO_DIR={run.root / 'trackio'} trackio show --project tiny" in printed
    assert printed.count("dashboard: ") == 4  # launch status, one line per tracker
