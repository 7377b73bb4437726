"""How an inference stage's actor pool is sized from the cluster (``actors`` / ``gpus_per_actor``
at ``auto``, the default) and from explicit settings."""

from __future__ import annotations

import pytest
import ray.data

from stages.core.inference import PoolSize, pool_size, resolve_gpus
from stages.core.run_config import InferenceConfig
from stages.teach.config import TeachConfig


def test_auto_with_gpus_grows_from_one_to_what_the_cluster_holds() -> None:
    cfg = resolve_gpus(InferenceConfig(), use_gpu=True)
    assert cfg.gpus_per_actor == 1.0
    assert pool_size(cfg, {"CPU": 64.0, "GPU": 4.0}) == PoolSize(1.0, 1, 4, None)
    # an autoscaling cluster with no GPU node yet: one actor to start, more as nodes join
    assert pool_size(cfg, {"CPU": 8.0}) == PoolSize(1.0, 1, 1, None)
    half = InferenceConfig(gpus_per_actor=0.5)
    assert pool_size(half, {"CPU": 16.0, "GPU": 3.0}) == PoolSize(0.5, 1, 6, None)
    strategy = pool_size(cfg, {"GPU": 4.0}).strategy()
    assert (strategy.min_size, strategy.max_size, strategy.initial_size) == (1, float("inf"), 4)


def test_auto_on_cpus_is_one_actor_per_eight_cpus() -> None:
    cfg = resolve_gpus(InferenceConfig(), use_gpu=False)
    assert cfg.gpus_per_actor == 0.0
    assert pool_size(cfg, {"CPU": 2.0}) == PoolSize(0.0, 1, 1, 1)
    assert pool_size(cfg, {"CPU": 16.0, "GPU": 2.0}) == PoolSize(0.0, 2, 2, 2)
    assert pool_size(cfg, {"CPU": 31.0}) == PoolSize(0.0, 3, 3, 3)
    strategy = pool_size(cfg, {"CPU": 31.0}).strategy()
    assert isinstance(strategy, ray.data.ActorPoolStrategy)
    assert (strategy.min_size, strategy.max_size) == (3, 3)


def test_unresolved_gpus_follow_the_cluster_and_explicit_settings_win() -> None:
    # a caller without a pipeline config (no runtime.use_gpu): GPUs where the cluster has them
    assert pool_size(InferenceConfig(), {"CPU": 8.0, "GPU": 2.0}).gpus == 1.0
    assert pool_size(InferenceConfig(), {"CPU": 8.0}).gpus == 0.0
    fixed = TeachConfig(actors=3, gpus_per_actor=0.25)
    assert resolve_gpus(fixed, use_gpu=False) is fixed  # explicit: kept as set
    assert pool_size(fixed, {"CPU": 2.0}) == PoolSize(0.25, 3, 3, 3)


def test_bad_settings_name_what_is_valid() -> None:
    with pytest.raises(ValueError, match="actors"):
        InferenceConfig.model_validate({"actors": 0})
    with pytest.raises(ValueError, match="'auto'"):
        InferenceConfig.model_validate({"gpus_per_actor": "all"})
