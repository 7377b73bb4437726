"""``pseudoflow bench policies | step | detectors | throughput | quality``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    pass

from pipeline.cli.base import (
    main,
    parallel_option,
    root_option,
    run_and_show_sweep,
    seeds_option,
    set_option,
    sweep_config,
)


@main.group()
def bench() -> None:
    """Benchmarks: ratios measured side by side in one run."""


@bench.command("policies")
@click.option("--size", default=64, show_default=True, help="image side in pixels")
@click.option("--classes", default=5, show_default=True, help="number of classes")
@click.option("--images", default=20, show_default=True, help="images timed per policy")
@click.option("--json", "json_path", default=None, help="also write the rows as JSON here")
def bench_policies(size: int, classes: int, images: int, json_path: str | None) -> None:
    """Per-image cost of each pseudo-label policy's math and of its stored-row path."""
    import json

    from pipeline.bench.costs import format_costs, policy_costs, rows_as_dicts

    costs = policy_costs(size=size, num_classes=classes, images=images)
    click.echo(format_costs(costs, size=size, num_classes=classes))
    if json_path:
        with open(json_path, "w") as handle:
            json.dump(rows_as_dicts(costs), handle, indent=2)


@bench.command("step")
@click.option("--arch", default="lraspp_mobilenet_v3_large", show_default=True)
@click.option("--size", type=click.IntRange(16), default=64, show_default=True, help="image side")
@click.option(
    "--batch", type=click.IntRange(1), default=16, show_default=True, help="images a step"
)
@click.option("--classes", type=click.IntRange(2), default=6, show_default=True, help="classes")
@click.option("--steps", type=click.IntRange(2), default=20, show_default=True)
@click.option("--json", "json_path", default=None, help="also write the result as JSON here")
def bench_step(
    arch: str, size: int, batch: int, classes: int, steps: int, json_path: str | None
) -> None:
    """A training step of the network as torchvision builds it and as pseudoflow trains it."""
    import json
    from dataclasses import asdict

    from pipeline.bench.costs import format_step, step_cost
    from stages.core.models import check_arch

    try:
        check_arch(arch)
    except ValueError as exc:  # the message lists the valid ones
        raise click.BadParameter(str(exc), param_hint="--arch") from exc
    cost = step_cost(arch=arch, size=size, batch=batch, num_classes=classes, steps=steps)
    click.echo(format_step(cost, arch=arch, size=size, batch=batch))
    if json_path:
        with open(json_path, "w") as handle:
            json.dump(asdict(cost), handle, indent=2)


@bench.command("detectors")
@click.option("--quick", is_flag=True, help="tiny images, 2 images a call, 3 calls: checks it runs")
@click.option(
    "--backend",
    "backends",
    type=click.Choice(["torchvision", "detectron2"]),
    multiple=True,
    help="backends to time (repeatable; default both; torchvision is always the baseline)",
)
@click.option(
    "--detectron2-arch",
    "d2_archs",
    multiple=True,
    help="detectron2 model-zoo configs to time (repeatable; default: the backend's default)",
)
@click.option("--torchvision-arch", default=None, help="default: the backend's default")
@click.option("--size", type=click.IntRange(16), default=None, help="image side [64; quick 32]")
@click.option(
    "--min-size",
    type=click.IntRange(32),
    default=None,
    help="the detectors' internal size (detector.min_size) [128; quick 64]",
)
@click.option("--batch", type=click.IntRange(1), default=None, help="images a call [16; quick 2]")
@click.option("--reps", type=click.IntRange(1), default=None, help="timed calls [5; quick 3]")
@click.option(
    "--classes",
    type=click.IntRange(2, 19),
    default=4,
    show_default=True,
    help="classes, background included (every RoI scores each 1/C, above the 0.05 cut)",
)
@click.option("--json", "json_path", default=None, help="also write the rows as JSON here")
def bench_detectors(
    quick: bool,
    backends: tuple[str, ...],
    d2_archs: tuple[str, ...],
    torchvision_arch: str | None,
    size: int | None,
    min_size: int | None,
    batch: int | None,
    reps: int | None,
    classes: int,
    json_path: str | None,
) -> None:
    """Per-image cost of the detect stage's predictor with each detector backend, on the same
    synthetic images, timed alternately; ratios to torchvision's. detectron2 is skipped, with
    the reason, where it cannot be imported."""
    import json
    from dataclasses import asdict

    import torch

    from pipeline.bench.costs import detector_costs, format_detector_costs
    from stages.core.detectors import (
        DEFAULT_ARCHITECTURES,
        BackendUnavailable,
        check_arch,
        detector_backend,
    )

    wanted = set(backends or ("torchvision", "detectron2"))
    models = [("torchvision", torchvision_arch or DEFAULT_ARCHITECTURES["torchvision"])]
    skipped = []
    if "detectron2" in wanted:
        try:
            detector_backend("detectron2")
        except BackendUnavailable as exc:
            skipped.append(f"detectron2: not timed: {exc}")
        else:
            models += [("detectron2", a) for a in d2_archs or [DEFAULT_ARCHITECTURES["detectron2"]]]
    elif d2_archs:
        raise click.UsageError("--detectron2-arch without the detectron2 backend")
    for backend, arch in models:
        try:
            check_arch(backend, arch)
        except ValueError as exc:  # the message lists the valid ones
            raise click.BadParameter(str(exc), param_hint=f"--{backend}-arch") from exc
    size = size or (32 if quick else 64)
    min_size = min_size or (64 if quick else 128)
    batch = batch or (2 if quick else 16)
    reps = reps or (3 if quick else 5)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    costs = detector_costs(
        models,
        size=size,
        batch=batch,
        min_size=min_size,
        num_classes=classes,
        reps=reps,
        device=device,
    )
    click.echo(
        format_detector_costs(
            costs,
            size=size,
            batch=batch,
            min_size=min_size,
            reps=reps,
            device=device,
            skipped=skipped,
        )
    )
    if json_path:
        with open(json_path, "w") as handle:
            json.dump([asdict(c) for c in costs], handle, indent=2)


@bench.command("throughput")
@click.option("--quick", is_flag=True, help="64² images, 2 a batch, 2 repetitions, no Ray")
@click.option(
    "--device",
    type=click.Choice(["cpu", "cuda"]),
    default=None,
    help="default: cuda where available, else cpu",
)
@click.option("--json", "json_path", default=None, help="also write the results as JSON here")
@click.option("--arch", default="lraspp_mobilenet_v3_large", show_default=True)
@click.option("--size", type=click.IntRange(32), default=None, help="image side [512; quick 64]")
@click.option("--classes", type=click.IntRange(2, 255), default=21, show_default=True)
@click.option("--batch", type=click.IntRange(1), default=None, help="images a batch [8; quick 2]")
@click.option("--reps", type=click.IntRange(1), default=None, help="timed calls [5; quick 2]")
@click.option(
    "--tracking-uri",
    envvar="MLFLOW_TRACKING_URI",
    default=None,
    help="log to MLflow here (default: MLFLOW_TRACKING_URI; neither: not logged)",
)
def bench_throughput(
    quick: bool,
    device: str | None,
    json_path: str | None,
    arch: str,
    size: int | None,
    classes: int,
    batch: int | None,
    reps: int | None,
    tracking_uri: str | None,
) -> None:
    """The teach and detect predictors, the pseudolabel stage and the student step against the
    bare network on the same device: ratios, per-image costs and stored bytes, each against
    its goal."""
    import json

    import torch

    from pipeline.bench.throughput import log_results
    from pipeline.bench.throughput import measure_throughput as measure
    from pipeline.bench.timing import as_json, format_table, make_plan
    from stages.core.models import check_arch

    try:
        check_arch(arch)
    except ValueError as exc:  # the message lists the valid ones
        raise click.BadParameter(str(exc), param_hint="--arch") from exc
    if device == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter("CUDA is not available on this machine", param_hint="--device")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    plan = make_plan(
        quick=quick, device=device, arch=arch, size=size, classes=classes, batch=batch, reps=reps
    )
    results = measure(plan)
    table = format_table(results, plan)
    click.echo(table)
    if json_path:
        with open(json_path, "w") as handle:
            json.dump(as_json(results), handle, indent=2)
    if tracking_uri:
        run_id = log_results(tracking_uri, plan, results, table)
        click.echo(f"MLflow run {run_id} in {tracking_uri} (experiment pseudoflow-bench)")


@bench.command("quality")
@click.option(
    "--config",
    "config",
    default="bench",
    show_default=True,
    help="the base config (built-in name or YAML path; layers: a,b): the named `quality` sweep "
    "is layered over it, so it runs unchanged on a VOC, Cityscapes or folder source",
)
@click.option("--quick", is_flag=True, help="a few steps of everything, 2 seeds: every row runs")
@root_option
@set_option
@seeds_option
@parallel_option
@click.option("--json", "json_path", default=None, help="also write the table as JSON here")
def bench_quality(
    config: str,
    quick: bool,
    root: str,
    overrides: tuple[str, ...],
    seeds: int | None,
    parallel: int | None,
    json_path: str | None,
) -> None:
    """Do the pseudo-labels pay? The `quality` sweep: every policy, one and two rounds, over
    seeds, with the supervised, full and oracle reference rows (`pseudoflow sweep --config
    bench,quality`): val mIoU mean ± std, gap-closing g, pseudo-label coverage and precision."""
    layers = f"{config},quality" + (",quality-quick" if quick else "")
    run_and_show_sweep(sweep_config(layers, overrides, (), seeds, True, parallel), root, json_path)
