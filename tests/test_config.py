"""Config: every shipped file loads, overrides are validated like files, mistakes name the key."""

from pathlib import Path

import pytest

from ray_app.config import AppConfig
from ray_app.config_loader import load_config, parse_override
from ray_app.errors import AppError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_file_loads(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, AppConfig)
    assert set(cfg.data.labels) >= {"natural-language-processing", "computer-vision", "mlops", "other"}


def test_smoke_shrinks_default_without_changing_the_pipeline() -> None:
    default, smoke = (load_config(p) for p in (CONFIGS[0].parent / "default.yaml", CONFIGS[0].parent / "smoke.yaml"))
    assert smoke.data.max_rows and smoke.train.epochs <= 2 < default.train.epochs
    assert smoke.data.labels == default.data.labels and smoke.data.path == default.data.path


def test_override_parses_yaml_values() -> None:
    assert parse_override("train.lr=3e-4") == (["train", "lr"], 3e-4)
    assert parse_override("data.max_rows=null") == (["data", "max_rows"], None)
    assert parse_override("data.labels=[a, b]") == (["data", "labels"], ["a", "b"])
    cfg = load_config(None, ["train.lr=3e-4", "train.epochs=1", "ray.address=127.0.0.1:1"])
    assert (cfg.train.lr, cfg.train.epochs, cfg.ray.address) == (3e-4, 1, "127.0.0.1:1")


def test_unknown_key_names_the_key_and_the_allowed_ones() -> None:
    with pytest.raises(AppError) as err:
        load_config(None, ["train.learning_rate=1e-4"])
    msg = str(err.value)
    assert "train.learning_rate" in msg and "unknown key" in msg and "lr" in msg and "epochs" in msg


def test_unknown_section_in_a_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  epochs: 3\n")
    with pytest.raises(AppError, match=r"trainer: unknown key; allowed keys here: batch, canary, data, evaluate"):
        load_config(bad)


def test_bad_value_names_key_and_value() -> None:
    with pytest.raises(AppError, match=r"train.epochs: .*greater than or equal to 1.*got 0"):
        load_config(None, ["train.epochs=0"])
    with pytest.raises(AppError, match=r"registry.metric: .*'f1_weighted', 'f1_macro' or 'accuracy'"):
        load_config(None, ["registry.metric=auc"])


def test_placement_strategy_is_one_of_rays() -> None:
    assert load_config(None, ["train.placement_strategy=STRICT_SPREAD"]).train.placement_strategy == "STRICT_SPREAD"
    assert AppConfig().train.placement_strategy == "PACK" and AppConfig().train.shared_filesystem is False
    with pytest.raises(
        AppError, match=r"train.placement_strategy: .*'PACK', 'SPREAD', 'STRICT_PACK' or 'STRICT_SPREAD'"
    ):
        load_config(None, ["train.placement_strategy=spread"])


def test_label_set_consistency_is_checked() -> None:
    with pytest.raises(AppError, match="unknown_label"):
        load_config(None, ["data.unknown_label=misc"])
    with pytest.raises(AppError, match="label_aliases"):
        load_config(None, ["data.label_aliases={cv: vision}"])


def test_missing_or_malformed_file(tmp_path: Path) -> None:
    with pytest.raises(AppError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [1, 2\n")
    with pytest.raises(AppError, match="not valid YAML"):
        load_config(broken)
    with pytest.raises(AppError, match="KEY=VALUE"):
        load_config(None, ["train.lr"])


def test_fingerprint_ignores_where_things_run() -> None:
    a = load_config(None, ["mlflow.tracking_uri=http://a", "ray.address=x:1"])
    b = load_config(None, ["mlflow.tracking_uri=http://b"])
    c = load_config(None, ["train.lr=2e-4"])
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    assert "train.lr" in a.flat()


def test_a_removed_key_fails_naming_what_replaces_it() -> None:
    with pytest.raises(AppError, match=r"train: fail_after_epoch is no longer a setting: the failure drill is a test"):
        load_config(None, ["train.fail_after_epoch=1"])


def test_flags_arrive_typed_and_replace_copies_without_reparsing() -> None:
    cfg = load_config(None, ["tune.num_samples=2"], {"tune": {"resume": True}, "monitor": {"last_n": 10}})
    assert (cfg.tune.num_samples, cfg.tune.resume, cfg.monitor.last_n) == (2, True, 10)
    changed = cfg.replace(train={"lr": 3e-4}, tune={"num_samples": 1})
    assert (changed.train.lr, changed.tune.num_samples, changed.tune.resume) == (3e-4, 1, True)
    assert (cfg.train.lr, cfg.tune.num_samples) == (1e-4, 2)  # the original is untouched
    with pytest.raises(AppError, match=r"tune\.resume"):
        load_config(None, updates={"tune": {"resume": "perhaps"}})


def test_label_selector_reaches_ray_trains_shape() -> None:
    selector = load_config(None, ['train.label_selector={"ray.io/node-id": "abc"}']).train.label_selector
    assert selector == {"ray.io/node-id": "abc"} and AppConfig().train.label_selector is None
