"""The training variants' configs: found in ``configs/`` without a list in Python, each stating what the demo and the
tests expect of its run, and sharing the base's callback list. Nothing here trains."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from experiments.cli import CONFIG_DIR, cli_main, run_name
from experiments.configs import load, merge_callbacks, read_variant, variants
from experiments.demo import CONFIGS, EXPERIMENTS, quiet, train
from gradmon.diagnosis import CAUSES

pytestmark = pytest.mark.filterwarnings("ignore::gradmon.GradientHealthWarning",
                                        "ignore:.*LightningCLI's args parameter.*")


def gradmon_callbacks(cli) -> list[str]:
    return [type(c).__name__ for c in cli.trainer.callbacks if type(c).__module__.startswith("gradmon")]


def test_every_config_is_run_by_the_demo():
    assert sorted(CONFIGS) == sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if p.stem != "base")


def test_the_demo_runs_the_variants_in_the_docs_order_named_as_their_runs():
    assert EXPERIMENTS == ("sigmoid", "matrix_product", "vanishing", "init", "exploding", "gradcheck")
    assert CONFIGS == (
        "vanishing_sigmoid", "vanishing_tanh", "vanishing_relu",
        "init_normal_0.01", "init_normal_1", "init_xavier", "init_kaiming", "init_default",
        "exploding_relu", "gradcheck_buggy", "gradcheck_fixed",
    )
    assert run_name("init_normal_0.01") == ("init", "normal_0.01")


def test_every_variant_states_the_diagnosis_its_run_gets():
    for variant in variants():
        assert variant.diagnosis is not None, f"{variant.path}: add demo: {{diagnosis: [...]}} ([] for a healthy run)"
        assert variant.diagnosis <= set(CAUSES), variant.path


def test_variant_configs_state_only_what_differs_from_the_base():
    # The shared settings live in configs/base.yaml, loaded first by the CLI: no variant repeats the model's width,
    # nor the callback list (a mapping changes the base's entry by entry).
    for path in CONFIG_DIR.glob("*.yaml"):
        if path.stem != "base":
            assert "width: 64" not in path.read_text(), path
            assert "- class_path:" not in path.read_text(), path
    cli = cli_main(["--config", str(CONFIG_DIR / "vanishing_tanh.yaml")], run=False)
    assert (cli.model.hparams.depth, cli.model.hparams.width, cli.model.hparams.activation) == (16, 64, "tanh")
    assert gradmon_callbacks(cli) == ["WeightInit", "GradNormMonitor", "GradHealthMonitor", "ActivationMonitor"]


def test_a_variants_callbacks_change_the_bases_entry_by_entry():
    cli = cli_main(["--config", str(CONFIG_DIR / "exploding_relu.yaml")], run=False)
    assert gradmon_callbacks(cli) == ["WeightInit", "GradNormMonitor", "GradHealthMonitor", "ActivationMonitor"]
    weight_init = cli.config.trainer.callbacks[0].init_args
    assert (weight_init.scheme, weight_init.seed) == ("normal(std=1)", 0)  # the seed from the base
    health = cli.config.trainer.callbacks[2].init_args
    assert (health.rules.exploding_threshold, health.on_exploding, health.on_nonfinite) == (1e4, "stop", "stop")
    cli = cli_main(["--config", str(CONFIG_DIR / "gradcheck_buggy.yaml")], run=False)
    assert gradmon_callbacks(cli) == ["GradNormMonitor", "ActivationMonitor", "GradCheck"]
    assert cli.config.trainer.callbacks[2].init_args.num_samples == 8


def test_merging_callbacks_updates_removes_and_adds_by_class_path():
    base = [{"class_path": "a.A", "init_args": {"x": 1, "y": 2}}, {"class_path": "b.B"}, {"class_path": "c.C"}]
    merged = merge_callbacks(base, {"a.A": {"y": 3}, "b.B": None, "d.D": {"z": 4}, "c.C": {}})
    assert merged == [{"class_path": "a.A", "init_args": {"x": 1, "y": 3}}, {"class_path": "c.C"},
                      {"class_path": "d.D", "init_args": {"z": 4}}]
    assert base[0]["init_args"] == {"x": 1, "y": 2}  # the base is left as it was
    with pytest.raises(ValueError, match="null removes one of the base's callbacks"):
        merge_callbacks(base, {"a.Typo": None})
    with pytest.raises(ValueError, match="as a mapping"):
        merge_callbacks(base, {"a.A": [1]})
    # A list keeps LightningCLI's meaning (a run's saved config.yaml): it replaces the base's list as a whole.
    assert load("trainer:\n  callbacks:\n  - class_path: b.B\n") == {"trainer": {"callbacks": [{"class_path": "b.B"}]}}


NEW_VARIANT = """\
# A new variant: tanh under N(0, 0.01), added as this one file.
demo:
  diagnosis: [init_too_small]
trainer:
  logger:
    init_args: {name: extra, version: tanh_normal_0.01}
  callbacks:
    gradmon.WeightInit: {scheme: "normal(std=0.01)"}
model:
  init_args: {activation: tanh}
"""


@pytest.fixture
def config_dir(tmp_path) -> Path:
    """A copy of ``configs/`` with a new variant, ``extra_tanh.yaml``, added."""
    shutil.copytree(CONFIG_DIR, tmp_path / "configs")
    (tmp_path / "configs" / "extra_tanh.yaml").write_text(NEW_VARIANT)
    return tmp_path / "configs"


def test_a_new_yaml_file_is_a_new_variant_with_its_expectation(config_dir):
    found = variants(config_dir)
    assert [v.name for v in found] == [*CONFIGS, "extra_tanh"]  # no demo.order: after the ordered ones
    new = found[-1]
    assert (new.experiment, new.version, new.order) == ("extra", "tanh_normal_0.01", None)
    assert new.diagnosis == {"init_too_small"}
    assert read_variant(config_dir / "vanishing_relu.yaml").diagnosis == {"gain_mismatch"}
    # LightningCLI never sees the demo key, and the variant's callbacks change the base's WeightInit only.
    cli = cli_main(["--config", str(config_dir / "extra_tanh.yaml")], run=False)
    assert "demo" not in cli.config
    assert cli.model.hparams.activation == "tanh"
    assert gradmon_callbacks(cli) == ["WeightInit", "GradNormMonitor", "GradHealthMonitor", "ActivationMonitor"]
    assert cli.config.trainer.callbacks[0].init_args.scheme == "normal(std=0.01)"
    # The demo runs it as it runs the others, and its run finds what the file says.
    with quiet():
        line = train(new.path, config_dir / "runs", "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
                     "--trainer.limit_val_batches=1")
    assert line.split()[:3] == ["extra/tanh_normal_0.01", "2", "steps"]
    assert "diagnosis: init scale too small (step 0)" in line
    # An order puts it among the others.
    (config_dir / "extra_tanh.yaml").write_text(NEW_VARIANT.replace("demo:\n", "demo:\n  order: 3.25\n"))
    names = [v.name for v in variants(config_dir)]
    assert names.index("extra_tanh") == names.index("vanishing_relu") - 1


@pytest.mark.parametrize(
    ("demo", "message"),
    [
        ("{diagnosis: [init_too_smal]}", "list of causes"),
        ("{diagnosis: init_too_small}", "list of causes"),
        ("{order: first}", "must be a number"),
        ("{expect: []}", "keys among"),
    ],
)
def test_a_misspelt_demo_mapping_is_an_error(config_dir, demo, message):
    (config_dir / "extra_tanh.yaml").write_text(NEW_VARIANT.replace("demo:\n  diagnosis: [init_too_small]",
                                                                    f"demo: {demo}"))
    with pytest.raises(ValueError, match=message):
        variants(config_dir)
