"""Today's cache keys, pinned: a change to where the key fields are computed (a restructuring)
must leave the key of an unchanged config as it was, or every user's cache is invalidated.

The keys are walked from the stage declarations with stand-in inputs (a fixed source digest,
fixed model digests and split digests) and a fixed package version, so they depend only on the
config and on how each stage turns it into key fields. A change that is meant to alter a key
(a new field, a new schema) updates the pin here, on purpose and in the same commit.
"""

from __future__ import annotations

from typing import Any

import pytest

import stages.core.shards as shards
from pipeline.cache.entries import cache_key
from pipeline.config import load_config
from pipeline.graph import Context, all_stages
from stages.core.storage import Storage

SPLITS = ("labeled", "unlabeled", "val")


def _stand_in(name: str, key: str) -> dict[str, Any]:
    """The record of an output, as a committed entry gives it, with made-up digests (a model's
    follows its stage's key: other training, other weights)."""
    if name in ("teacher", "detector") or name.startswith("student"):
        return {"kind": "model", "sha256": f"weights-of-{name}-{key[:8]}"}
    digests = {split: f"{split}-digest" for split in SPLITS} if name == "images" else {}
    return {"kind": "dataset", "key": key, "digests": digests}


def walk_keys(name: str, overrides: list[str], root: str) -> dict[str, str]:
    """Every enabled stage's cache key for config ``name``, upstream keys fed forward."""
    config = load_config(name, overrides)
    ctx = Context(config, Storage(root), "pin", [], source_digest="source-digest")
    keys = {}
    for stage in all_stages(config):
        if not stage.enabled(config):
            continue
        key = cache_key(stage.name, stage.schema, stage.fields(ctx))
        keys[stage.name] = ctx.keys[stage.name] = key
        ctx.outputs.update({out: _stand_in(out, key) for out in stage.writes})
    return keys


@pytest.fixture(autouse=True)
def fixed_version(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shards, "package_version", lambda: "pinned")


def test_smoke_keys_are_todays(tmp_path) -> None:
    assert walk_keys("smoke", [], str(tmp_path)) == PINNED["smoke"]


def test_two_rounds_of_wpl_keys_are_todays(tmp_path) -> None:
    overrides = ["rounds=2", "pseudolabel.policy=wpl"]
    assert walk_keys("smoke", overrides, str(tmp_path)) == PINNED["smoke-wpl-2-rounds"]


def test_quickstart_keys_are_todays(tmp_path) -> None:
    assert walk_keys("quickstart", [], str(tmp_path)) == PINNED["quickstart"]


def test_a_changed_field_changes_its_stage_and_those_below_only(tmp_path) -> None:
    """The pin is of something: the student's learning rate moves the student's and evaluate's
    keys and no other."""
    base = walk_keys("smoke", [], str(tmp_path))
    changed = walk_keys("smoke", ["student.lr=0.123"], str(tmp_path))
    moved = {stage for stage in base if base[stage] != changed[stage]}
    assert moved == {"train_student", "evaluate"}


def test_a_student_without_the_unlabeled_loss_is_keyed_by_what_it_reads(tmp_path) -> None:
    """alpha 0 (a sweep's supervised row): the policy, the pseudo-labels and the strong views'
    settings leave the student's key, which stays apart from every alpha > 0 student's; the
    labeled side (learning rate) still moves it."""
    root = str(tmp_path)
    supervised = walk_keys("smoke", ["student.alpha=0"], root)
    other_policy = walk_keys(
        "smoke",
        ["student.alpha=0", "pseudolabel.policy=csl", "student.cutmix=1", "student.strong.blur=0"],
        root,
    )
    assert other_policy["pseudolabel"] != supervised["pseudolabel"]
    assert other_policy["train_student"] == supervised["train_student"]
    assert other_policy["evaluate"] != supervised["evaluate"]  # it scores the other labels
    with_loss = walk_keys("smoke", ["student.alpha=0.5"], root)["train_student"]
    other_lr = walk_keys("smoke", ["student.alpha=0", "student.lr=0.123"], root)["train_student"]
    assert (
        len({supervised["train_student"], with_loss, other_lr, PINNED["smoke"]["train_student"]})
        == 4
    )
    assert walk_keys("smoke", [], root) == PINNED["smoke"]  # alpha 1 keys as they were


# Computed at 8a4709e (stop 40), before the restructuring of issue 25; evaluate's at stop 44, when
# its schema became metrics/2 (per-class and weighted pseudo-label quality: older entries lack them).
PINNED: dict[str, dict[str, str]] = {
    "smoke": {
        "ingest": "1ea1661f267661b1243174fb3bb2142e8dad837551bdf646b66f9825fd4d1804",
        "train_teacher": "9739f6c65c531322ca2beac11dad8737bec6a3043b864f62069838b4170288e8",
        "train_detector": "f14373d1415b331e909b0348c0a9573b162fadced8183b4f9c51d3ed88cb27dd",
        "detect": "2d0d34d65693860a409450dbbc4f442313dcd6654d24760f6f76be6d352539a0",
        "teach": "d4dabcce215cec5d357ad4e56a2e0b5f256558e84a371d01aae928066e933df6",
        "pseudolabel": "0d16335a7c46cdc08232a946c6d3bd3a89b154d24dae7163e21361ed57356cd0",
        "train_student": "1e6fceffb300a4f64b3bcfdd3ccc129acf3d063acecab03e1a3b7d526db54378",
        "evaluate": "233d45be4b5e77c4b5d84b7ba9c422e8bb2d7d13edb49674719f7127ff2d20cf",
    },
    "smoke-wpl-2-rounds": {
        "ingest": "1ea1661f267661b1243174fb3bb2142e8dad837551bdf646b66f9825fd4d1804",
        "train_teacher": "9739f6c65c531322ca2beac11dad8737bec6a3043b864f62069838b4170288e8",
        "train_detector": "f14373d1415b331e909b0348c0a9573b162fadced8183b4f9c51d3ed88cb27dd",
        "detect": "2d0d34d65693860a409450dbbc4f442313dcd6654d24760f6f76be6d352539a0",
        "teach": "581218edd5a1f8daecc982dffc8c14d01a58af9b8f4672685fdb3696d4bbde82",
        "pseudolabel": "32473c1a33f8bf83a89d255938cbb33b26e20e181baf45a4c69f8b0dd284995b",
        "train_student": "7d924cbd1fb5a40be6b28c27bc4ef54ed8485b396b1af43ea3350f4927d02841",
        "teach_r2": "10eea859fd5eb1b6ef7629f622d450aa9442375c3ab1f5112218e2399a61c5fc",
        "pseudolabel_r2": "7a362911cf72ae89127aeff316ce58f288432f0493ca530edf504cb193cd4439",
        "train_student_r2": "d8b41f0a179d1f499df716e12a47fd04bc83ef8cfc6cede8ee439e284589fa3c",
        "evaluate": "44211c43d1784a4f8c8f1ccb2d55a2870c483bd7a746bed2524c93108f16fe61",
    },
    "quickstart": {
        "ingest": "a7bbac44ed893f73493e13e11ae01db6ceb50875c5f4edcccab1ec8ae67dd3e7",
        "train_teacher": "40b62e1479ec47068da9a227a6bf4b42eb091942ac9c7d0488792fdddc8658e2",
        "train_detector": "0a3b2bb0d452b6c050f4786d1c4bdad2789ec7efe816951a692f4723ceb35d85",
        "detect": "5d1a14c6b58ce8c8b91a4179451f8e17943655ff1e3839962f8d982822342e48",
        "teach": "4305b22bed362b79b6794d03078617f28db1ccaf2a26b3c832396c4eecd7265e",
        "pseudolabel": "549a7f6bebf0f955bbd3ca5a9da03940018844474ab0fb595babda02088a75b8",
        "train_student": "088401e2307dcaa87a54122117e56f82aae4b5e0f4ea751bd09d7fa0c9ece159",
        "evaluate": "5bed9a81007f14b08754541981329db70cd656811b2977e2396199a224361e02",
    },
}
