"""The config reference is generated from the pydantic models, so it cannot drift: docs/config.md
is exactly what ``pseudoflow config show --defaults`` prints, and lists every key a config has."""

from __future__ import annotations

from pathlib import Path

import yaml
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.config import PipelineConfig, flatten, reference, reference_markdown

DOC = Path(__file__).parents[2] / "docs" / "config.md"


def test_docs_config_md_is_the_generated_reference() -> None:
    assert DOC.read_text() == reference_markdown(), (
        "docs/config.md is stale: pseudoflow config show --defaults > docs/config.md"
    )


def test_the_reference_lists_every_key_with_its_default() -> None:
    rows = {row.key: row for row in reference()}
    assert set(flatten(PipelineConfig())) <= set(rows)
    assert rows["student.alpha"].default == "1.0"
    assert rows["student.alpha"].type == "float (>= 0)"
    assert rows["data.source"].type == "'generated' \\| 'folder' \\| 'voc' \\| 'cityscapes'"
    assert rows["teacher.init"].type == "str \\| None"
    assert rows["teacher.resources"].default == "{}"
    assert "aux head dropped" in rows["student.init"].description


def test_config_show_prints_the_resolved_config_and_the_reference() -> None:
    runner = CliRunner()
    shown = runner.invoke(main, ["config", "show", "--config", "smoke", "--set", "student.steps=7"])
    assert shown.exit_code == 0, shown.output
    config = yaml.safe_load(shown.output)
    assert (config["name"], config["student"]["steps"], config["data"]["num_classes"]) == (
        "smoke",
        7,
        4,
    )
    defaults = runner.invoke(main, ["config", "show"])
    assert yaml.safe_load(defaults.output) == PipelineConfig().model_dump(mode="json")
    reference_text = runner.invoke(main, ["config", "show", "--defaults"])
    assert reference_text.output == DOC.read_text()
    bad = runner.invoke(main, ["config", "show", "--set", "student.nope=1"])
    assert bad.exit_code == 2
    assert "student.nope: unknown key" in bad.output
