"""``pseudoflow config show`` and ``pseudoflow cache ls | verify | gc``."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    pass

from pipeline.cli.base import load_or_exit, main, root_option, set_option


@main.group("config")
def config_group() -> None:
    """Configs: a resolved config, and the reference of every key."""


@config_group.command("show")
@click.option(
    "--config",
    "name",
    default=None,
    help="built-in config name or YAML path [default: every key at its default]",
)
@set_option
@click.option(
    "--defaults",
    is_flag=True,
    help="print the reference instead: every key with its type, default and description "
    "(Markdown, as docs/config.md)",
)
def config_show(name: str | None, overrides: tuple[str, ...], defaults: bool) -> None:
    """Print the config a run would use (YAML: the named config with its --set overrides,
    validated; credentials masked), or with --defaults the reference of every key."""
    from pipeline.config import ConfigError, apply_overrides, reference_markdown, to_yaml, validate

    if defaults:
        click.echo(reference_markdown(), nl=False)
        return
    try:
        if name is None:
            config = validate(apply_overrides({}, list(overrides)))
        else:
            config = load_or_exit(name, overrides)
    except ConfigError as exc:
        click.echo(str(exc), err=True)
        sys.exit(2)
    click.echo(to_yaml(config), nl=False)


@main.group()
def cache() -> None:
    """The pseudo-label and model cache under a storage root."""


@cache.command("ls")
@root_option
def cache_ls(root: str) -> None:
    """List committed entries with size, age and rows (a damaged one: DAMAGED and why)."""
    from pipeline.cache.entries import entry_bytes, iter_entries
    from pipeline.cache.gc import human_age, human_bytes
    from pipeline.runner import resolve_root
    from stages.core.storage import Storage

    storage = Storage(resolve_root(root))
    entries = list(iter_entries(storage))
    sizes = [0 if e.damage else entry_bytes(storage, e.record) for e in entries]
    click.echo(f"{'stage':15} {'key':12} {'size':>10} {'age':>7}  outputs")
    for e, size_bytes in zip(entries, sizes, strict=True):
        outputs = f"DAMAGED: {e.damage}" if e.damage else ""
        outputs = outputs or ", ".join(
            f"{n} ({o['rows']} rows)" if o["kind"] == "dataset" else n
            for n, o in e.record["outputs"].items()
        )
        size, age = human_bytes(size_bytes), human_age(e.age_s)
        click.echo(f"{e.stage:15} {e.key[:12]:12} {size:>10} {age:>7}  {outputs}")
    total = human_bytes(sum(sizes))
    damaged = sum(e.damage is not None for e in entries)
    click.echo(f"{len(entries)} entries, {total}" + (f", {damaged} damaged" if damaged else ""))


@cache.command("verify")
@root_option
@click.option(
    "--repair",
    is_flag=True,
    help="uncommit what is damaged (entries' records, pool shards) so the next run recomputes it",
)
def cache_verify(root: str, repair: bool) -> None:
    """Check every entry and pool shard against its data; exit 1 if any is damaged (0 once
    ``--repair`` uncommitted them all)."""
    from pipeline.cache.entries import iter_entries
    from pipeline.cache.verify import repair as uncommit
    from pipeline.cache.verify import verify_entry, verify_pools
    from pipeline.runner import resolve_root
    from stages.core.storage import Storage

    storage = Storage(resolve_root(root))
    entries = list(iter_entries(storage))
    damaged = {}
    for entry in entries:
        problems = verify_entry(storage, entry)
        if problems:
            damaged[entry.stage, entry.key] = problems
        for problem in problems:
            click.echo(f"DAMAGED {entry.stage} {entry.key[:12]}: {problem}")
    shards = verify_pools(storage)
    for shard in shards:
        click.echo(f"DAMAGED {shard.stage} shard {shard.manifest}: {shard.problem}")
    click.echo(
        f"{len(entries)} entries checked, {len(damaged)} damaged; {len(shards)} damaged shards"
    )
    if repair:
        for item in uncommit(storage, damaged, shards):
            click.echo(f"removed {item.path} ({item.why})")
        if damaged or shards:
            click.echo("repaired: the next run recomputes what was removed")
    elif damaged or shards:
        sys.exit(1)


@cache.command("gc")
@root_option
@click.option(
    "--tracking-uri",
    default=None,
    help="read only this store [default: the store each pipeline run under the root recorded; "
    "for runs that recorded none, MLFLOW_TRACKING_URI, else sqlite:///<root>/mlflow.db]",
)
@click.option(
    "--min-age",
    default=24.0,
    show_default=True,
    help="hours: nothing written more recently goes (entries, leftovers)",
)
@click.option("--delete", is_flag=True, help="delete (default: only list what would go)")
@click.option(
    "--allow-empty-tracking",
    is_flag=True,
    help="collect even if a store the root's runs logged to holds no pseudoflow runs",
)
def cache_gc(
    root: str, tracking_uri: str | None, min_age: float, delete: bool, allow_empty_tracking: bool
) -> None:
    """Collect entries no MLflow run references and stale leftovers (dry run by default)."""
    from pipeline.cache.gc import TrackingError, collect_garbage, gc_references, human_bytes
    from pipeline.runner import resolve_root
    from stages.core.storage import Storage

    storage = Storage(resolve_root(root))
    try:
        referenced = gc_references(storage, tracking_uri, allow_empty=allow_empty_tracking)
    except TrackingError as exc:
        click.echo(f"error: {exc}; nothing collected", err=True)
        sys.exit(2)
    garbage = collect_garbage(storage, referenced, min_age_s=min_age * 3600, delete=delete)
    for item in garbage:
        click.echo(f"{'deleted' if delete else 'would delete'} {item.path} ({item.why})")
    verb = "freed" if delete else "would free (dry run; --delete to collect)"
    click.echo(f"{len(garbage)} items, {verb} {human_bytes(sum(g.bytes for g in garbage))}")
