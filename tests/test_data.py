"""Data: row checks by reason, label mapping, stable stratified splits, and the Ray Data read path."""

from pathlib import Path

import pandas as pd
import pytest

from ray_app.config import DataConfig
from ray_app.data import assign_splits, mark_duplicates, mark_leakage, prepare
from ray_app.errors import AppError
from ray_app.rows import map_label, validate_batch

HERE = Path(__file__).resolve().parent
BUNDLED = HERE.parent / "data" / "projects" / "dataset.csv"


def cfg(**kw) -> DataConfig:
    return DataConfig(path=str(BUNDLED), **kw)


def test_label_mapping_aliases_and_unknown() -> None:
    c = cfg(label_aliases={"cv": "computer-vision"})
    assert map_label(" Computer-Vision ", c) == "computer-vision"
    assert map_label("cv", c) == "computer-vision"
    assert map_label("quantum", c) == "other"
    assert map_label("quantum", cfg(unknown_label=None)) is None
    assert map_label("", c) is None and map_label(None, c) is None


def test_row_checks_name_each_reason() -> None:
    batch = pd.DataFrame(
        {
            "id": ["1", None, "3", "4", "5", "6"],
            "title": ["ok", "no id", "", "long", "x", "\u200b"],
            "description": ["fine", "d", None, "y" * 50, "d", "\u200b"],
            "tag": ["mlops", "mlops", "mlops", "mlops", None, "mlops"],
        }
    )
    out = validate_batch(batch, cfg(max_text_chars=20))
    assert list(out["reason"]) == ["", "missing_id", "empty_text", "text_too_long", "missing_label", "empty_text"]
    assert out.loc[0, "text"] == "ok. fine"


def test_duplicates_and_conflicts() -> None:
    frame = pd.DataFrame(
        {
            "id": ["1", "2", "3", "4", "1"],
            "text": ["Same text", "same  TEXT", "clash", "clash", "other"],
            "label": ["mlops", "mlops", "mlops", "other", "mlops"],
            "reason": ["", "", "", "", ""],
        }
    )
    out = mark_duplicates(frame, cfg())
    assert list(out["reason"]) == ["", "duplicate", "conflicting_labels", "conflicting_labels", "duplicate_id"]


def test_split_is_stratified_and_stable() -> None:
    frame = pd.read_csv(BUNDLED, dtype=str).rename(columns={"tag": "label"})
    c = cfg()
    split = assign_splits(frame, c)
    again = assign_splits(frame.sample(frac=1.0, random_state=3), c).loc[frame.index]
    assert (split == again).all(), "row order must not change the split"
    for label, group in frame.groupby("label"):
        share = split[group.index].value_counts(normalize=True)
        assert abs(share["test"] - 0.15) < 0.02 and abs(share["val"] - 0.15) < 0.02, label
    moved = assign_splits(frame, cfg(split={"salt": "other"}))
    assert (moved != split).any()


def test_leakage_across_splits_is_found() -> None:
    frame = pd.DataFrame({"title": ["A title", "a  TITLE", "unique"], "label": ["mlops"] * 3})
    split = pd.Series(["train", "test", "val"])
    assert list(mark_leakage(frame, split, "title")) == ["", "leakage", ""]


@pytest.fixture(scope="module")
def bad_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The deliberately bad rows, plus 120 real rows so every split has members."""
    real = "\n".join(BUNDLED.read_text().splitlines()[1:121])
    path = tmp_path_factory.mktemp("bad") / "mixed.csv"
    path.write_text((HERE / "data" / "bad_rows.csv").read_text() + real.replace("\r", "") + "\n")
    return path


def test_prepare_counts_every_bad_row_by_reason(ray_cluster, bad_file: Path) -> None:
    splits = prepare(
        DataConfig(
            path=str(bad_file), unknown_label=None, label_aliases={"cv": "computer-vision"}, max_bad_fraction=0.5
        )
    )
    r = splits.report
    assert r.bad_rows == {
        "conflicting_labels": 2,
        "duplicate": 1,
        "duplicate_id": 1,
        "empty_text": 1,
        "malformed_csv": 1,
        "missing_id": 1,
        "missing_label": 1,
        "text_too_long": 1,
        "unknown_label": 1,
    }
    assert r.rows_read == r.rows_valid + sum(r.bad_rows.values()) + r.bad_rows.get("leakage", 0) * 0
    assert {e["reason"] for e in r.bad_examples} == set(r.bad_rows)
    everything = pd.concat([splits.train, splits.val, splits.test])
    assert everything.loc[everything["id"] == "90013", "label"].item() == "computer-vision"
    assert sum(r.split_sizes.values()) == r.rows_valid


def test_too_many_bad_rows_fails_with_the_counts(ray_cluster, bad_file: Path) -> None:
    with pytest.raises(AppError, match=r"bad .*data.max_bad_fraction=0.01"):
        prepare(DataConfig(path=str(bad_file), unknown_label=None, max_bad_fraction=0.01))


def test_missing_file_and_missing_column(ray_cluster, tmp_path: Path) -> None:
    with pytest.raises(AppError, match="does not exist"):
        prepare(DataConfig(path=str(tmp_path / "nope.csv")))
    no_tag = tmp_path / "no_tag.csv"
    no_tag.write_text("id,title,description\n1,a,b\n")
    with pytest.raises(AppError, match=r"lacks required column\(s\) \['tag'\]"):
        prepare(DataConfig(path=str(no_tag)))


def test_bundled_data_set_prepares(ray_cluster) -> None:
    splits = prepare(cfg())
    r = splits.report
    assert r.rows_read == 764 and r.rows_valid >= 750
    assert r.split_sizes["test"] > 100 and set(splits.test["label"]) == set(cfg().labels)
    ids = [set(s["id"]) for s in (splits.train, splits.val, splits.test)]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert prepare(cfg()).report.digest == r.digest


def test_class_weights_are_balanced_and_a_missing_class_weighs_one():
    from ray_app.train import class_weights

    train = ["a"] * 6 + ["b"] * 3 + ["c"] * 1
    assert class_weights(["a", "b", "c"], train) == pytest.approx([10 / 18, 10 / 9, 10 / 3])
    assert class_weights(["a", "b", "z"], ["a", "a", "b", "b"]) == pytest.approx([1.0, 1.0, 1.0])


def test_text_problem_judges_each_field() -> None:
    from ray_app.text import text_problem

    assert text_problem({"title": "ok", "description": None}, 5) is None
    assert text_problem({"title": "ok", "description": "toolong"}, 5) == ("text_too_long", "description")
    assert text_problem({"title": "\u200b", "description": " \n"}, 5) == ("empty_text", None)


def test_report_pages_declare_utf8_and_say_what_they_show() -> None:
    from ray_app.data import DataReport, report_page
    from ray_app.html_report import page

    table = pd.DataFrame({"text": ["PyTorch – An Example <b>"], "label": ["mlops"]})
    html = page("Worst errors", "The rows the model got wrong.", {"": table})
    assert html.startswith("<!DOCTYPE html>") and '<meta charset="utf-8">' in html
    assert "<title>Worst errors</title>" in html and "PyTorch – An Example &lt;b&gt;" in html
    report = DataReport(
        path="data.csv", rows_read=10, rows_valid=8, bad_rows={"empty_text": 2}, bad_fraction=0.2,
        split_sizes={"train": 6, "val": 1, "test": 1}, class_counts={"train": {"mlops": 6}, "val": {"mlops": 1}},
        digest="abc", bad_examples=[{"reason": "empty_text", "id": "3"}],
    )  # fmt: skip
    text = report_page(report)
    assert "<title>Data report</title>" in text and "empty_text" in text and "Classes per split" in text
