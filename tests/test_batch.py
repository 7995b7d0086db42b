"""Batch inference: real Ray Data on the session's head, the smoke pipeline's registered model from the real MLflow
registry, CSV / Parquet / JSON Lines files with good and bad rows, checked against the serving path's predictions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ray_app.batch import run_batch
from ray_app.batch_inputs import check_rows, find_inputs
from ray_app.errors import AppError
from ray_app.registry import load_classifier
from tests.conftest import ROOT
from tests.test_cli import assert_clean_error, ray_app

GOOD_ROWS = 24
TOO_LONG = "x" * 2001


@pytest.fixture(scope="module")
def good() -> pd.DataFrame:
    """Real rows of the bundled data (multi-line descriptions, quotes and commas included)."""
    frame = pd.read_csv(ROOT / "data" / "projects" / "dataset.csv", dtype=str, keep_default_na=False)
    return frame[["id", "title", "description"]].head(GOOD_ROWS).reset_index(drop=True)


@pytest.fixture(scope="module")
def model(smoke_run):
    """The smoke pipeline's version, and its classifier loaded the way a Serve replica loads it."""
    cfg, results = smoke_run
    name, version = cfg.registry.model_name, results["model"]["version"]
    clf = load_classifier(f"models:/{name}/{version}")
    return cfg, name, version, clf


def _batch(model, *args, **kwargs):
    cfg = model[0]
    return run_batch(cfg, *args, tracking_uri=cfg.mlflow.tracking_uri, **kwargs)


def assert_serving_predictions(model, good: pd.DataFrame, out_dir: str) -> pd.DataFrame:
    """Same ids, same labels and (within float noise from other padding) the same probabilities as serving's
    `predict_frame` on the same rows with the same version."""
    cfg, name, version, clf = model
    got = pd.read_parquet(out_dir).set_index("id").loc[good["id"]]
    want = clf.predict_frame(good.set_index("id"), cfg.data.text_columns, batch_size=cfg.batch.batch_size)
    probs = [f"prob_{label}" for label in clf.labels]
    assert list(got.columns[: 1 + len(probs)]) == ["label", *probs]
    np.testing.assert_allclose(got[probs].to_numpy(), want[probs].to_numpy(), atol=1e-5)
    top2 = np.sort(want[probs].to_numpy(), axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 1e-4  # a near tie may flip under float noise; those are not compared
    assert clear.mean() > 0.8
    assert (got["label"][clear] == want["label"][clear]).all()
    assert (got["model_name"] == name).all() and (got["model_version"] == version).all()
    return got


def _csv_with_bad_rows(good: pd.DataFrame, path: Path) -> Path:
    good.to_csv(path, index=False)
    with path.open("a") as fh:
        fh.write(",Missing id,A project without an id.\n")
        fh.write("b-empty,,\n")
        fh.write(f'b-long,"{TOO_LONG}",long\n')
        fh.write("b-fields,A row,with,too,many,fields\n")
    return path


@pytest.mark.slow
def test_csv_predictions_match_serving_and_bad_rows_go_to_errors(model, good, tmp_path) -> None:
    src = _csv_with_bad_rows(good, tmp_path / "in.csv")
    result = _batch(model, "@champion", str(src), str(tmp_path / "out"))
    assert (result.rows_read, result.rows_predicted, result.rows_error) == (GOOD_ROWS + 4, GOOD_ROWS, 4)
    assert result.model["version"] == model[2] and result.format == "csv"
    assert_serving_predictions(model, good, result.predictions)
    errors = pd.read_parquet(result.errors_file)
    assert sorted(errors["reason"]) == ["empty_text", "malformed_csv", "missing_id", "text_too_long"]
    by_reason = errors.set_index("reason")
    assert by_reason.loc["empty_text", "id"] == "b-empty" and by_reason.loc["text_too_long", "id"] == "b-long"
    assert "too,many" in by_reason.loc["malformed_csv", "text"]
    assert by_reason.loc["text_too_long", "source_file"] == str(src)
    assert result.errors_by_reason == {"empty_text": 1, "malformed_csv": 1, "missing_id": 1, "text_too_long": 1}
    with pytest.raises(AppError, match="already holds results"):
        _batch(model, f"{model[1]}/{model[2]}", str(src), str(tmp_path / "out"))


@pytest.mark.slow
def test_parquet_glob_and_json_lines_in_one_pass(model, good, tmp_path) -> None:
    """Two Parquet files by a glob (the second with integer ids), and JSON Lines with broken and mistyped lines."""
    half = GOOD_ROWS // 2
    pq.write_table(pa.Table.from_pandas(good.head(half), preserve_index=False), tmp_path / "a.parquet")
    second = good.tail(GOOD_ROWS - half).assign(id=lambda f: f["id"].astype(int))
    second = pd.concat([second, pd.DataFrame({"id": [99999], "title": [None], "description": [None]})])
    pq.write_table(pa.Table.from_pandas(second, preserve_index=False), tmp_path / "b.parquet")
    result = _batch(model, model[2], str(tmp_path / "*.parquet"), str(tmp_path / "out-pq"))
    assert (result.rows_read, result.rows_predicted, result.errors_by_reason) == (
        GOOD_ROWS + 1,
        GOOD_ROWS,
        {"empty_text": 1},
    )
    assert len(result.files) == 2 and result.format == "parquet"
    assert_serving_predictions(model, good, result.predictions)

    lines = [json.dumps(r) for r in good.to_dict("records")]
    lines += ['{"id": "j-num", "title": 123, "description": "x"}', "{not json", '{"title": "no id"}']
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    cfg = model[0].model_copy(update={"batch": model[0].batch.model_copy(update={"errors_format": "jsonl"})})
    result = run_batch(cfg, model[2], str(tmp_path / "in.jsonl"), str(tmp_path / "out-jl"), cfg.mlflow.tracking_uri)
    assert (result.rows_read, result.rows_predicted) == (GOOD_ROWS + 3, GOOD_ROWS)
    assert_serving_predictions(model, good, result.predictions)
    errors = pd.read_json(result.errors_file, lines=True, dtype=False)
    assert sorted(errors["reason"]) == ["malformed_json", "missing_id", "non_string"]
    assert errors.set_index("reason").loc["non_string", "id"] == "j-num"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model_id", "needle"),
    [("999", "is not in the registry"), ("@no-such-alias", "is not in the registry"), ("a b", "is not NAME/VERSION")],
)
def test_unknown_or_malformed_model_id_is_one_clear_error(model, good, tmp_path, model_id, needle) -> None:
    good.to_csv(tmp_path / "in.csv", index=False)
    with pytest.raises(AppError, match=needle):
        _batch(model, model_id, str(tmp_path / "in.csv"), str(tmp_path / "out"))


def test_bad_inputs_are_named_before_any_work(tmp_path) -> None:
    with pytest.raises(AppError, match=r"matches no file"):
        find_inputs(str(tmp_path / "*.csv"))
    with pytest.raises(AppError, match=r"does not exist"):
        find_inputs(str(tmp_path / "nope.csv"))
    (tmp_path / "a.csv").write_text("id,title,description\n1,t,d\n")
    (tmp_path / "b.parquet").write_bytes(b"not parquet")
    with pytest.raises(AppError, match=r"several formats \(csv, parquet\)"):
        find_inputs(str(tmp_path / "*"))
    (tmp_path / "c.txt").write_text("x")
    with pytest.raises(AppError, match=r"c.txt .* extension '.txt'"):
        find_inputs(str(tmp_path / "c.txt"))
    from ray_app.batch_inputs import check_columns

    with pytest.raises(AppError, match=r"b.parquet cannot be read as Parquet"):
        check_columns([str(tmp_path / "b.parquet")], "parquet", ["id", "title"])
    (tmp_path / "d.csv").write_text("ident,title,description\n1,t,d\n")
    with pytest.raises(AppError, match=r"d.csv lacks column\(s\) \['id'\]"):
        check_columns([str(tmp_path / "d.csv")], "csv", ["id", "title", "description"])


def test_row_rules_match_serving() -> None:
    """Serving's rules per row: an id, string texts, not all empty, no field over the limit; an empty title beside a
    description is fine (serving accepts it too)."""
    batch = pd.DataFrame(
        {
            "id": ["1", None, "3", "4", "5", 6.0, "7"],
            "title": ["a", "b", None, "x" * 21, 5, "t", ""],
            "description": ["d", "d", None, "", "", None, "only a description"],
        }
    )
    out = check_rows(batch, "id", ["title", "description"], max_chars=20)
    assert list(out["reason"]) == ["", "missing_id", "empty_text", "text_too_long", "non_string", "", ""]
    assert list(out["id"]) == ["1", None, "3", "4", "5", "6", "7"]
    assert out.loc[6, "text"] == "only a description" and out.loc[0, "text"] == "a. d"


@pytest.mark.slow
def test_cli_batch_writes_results_and_fails_cleanly(model, good, tmp_path) -> None:
    cfg, name, version, _ = model
    src = _csv_with_bad_rows(good, tmp_path / "in.csv")
    sets = [f"mlflow.tracking_uri={cfg.mlflow.tracking_uri}", f"ray.address={cfg.ray.address}"]
    sets += [f"registry.model_name={name}", "batch.errors_format=jsonl"]
    flags = [a for s in sets for a in ("--set", s)]
    out = tmp_path / "out"
    proc = ray_app("batch", "--model", "@champion", "--input", str(src), "--output", str(out), *flags,
                   "--results-dir", str(tmp_path))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{GOOD_ROWS + 4} rows read, {GOOD_ROWS} predicted, 4 errors" in proc.stdout
    result = json.loads(next(tmp_path.glob("batch-*.json")).read_text())
    assert (result["rows_predicted"], result["rows_error"], result["model"]["version"]) == (GOOD_ROWS, 4, version)
    assert len(pd.read_parquet(out / "predictions")) == GOOD_ROWS
    assert len(pd.read_json(out / "errors.jsonl", lines=True)) == 4
    proc = ray_app("batch", "--model", "@champion", "--input", str(tmp_path / "none-*.csv"), "--output", str(out),
                   *flags)  # fmt: skip
    assert_clean_error(proc, "none-*.csv matches no file")
