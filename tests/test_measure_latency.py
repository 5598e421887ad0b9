"""Latency statistics and timers of avatarq.measure.latency."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

from avatarq.errors import AvatarqError
from avatarq.measure import GATE_METRICS
from avatarq.measure.latency import CudaEventTimer, LatencyStats, time_callable


def test_stats_of_a_known_list():
    s = LatencyStats.from_samples([10.0, 20.0, 30.0, 40.0, 50.0], batch=2)
    assert (s.p50_ms, s.p90_ms, s.p99_ms) == (30.0, 46.0, pytest.approx(49.6, rel=1e-12))
    assert (s.mean_ms, s.min_ms, s.max_ms, s.n, s.batch) == (30.0, 10.0, 50.0, 5, 2)
    assert s.std_ms == pytest.approx(math.sqrt(200.0), rel=1e-12)
    assert s.frames_per_second == pytest.approx(2 * 1000 / 30, rel=1e-12)


def test_percentiles_interpolate_linearly_between_order_statistics():
    s = LatencyStats.from_samples([float(v) for v in range(100, 0, -1)])  # 1..100, shuffled order
    assert s.p50_ms == 50.5
    assert s.p90_ms == pytest.approx(90.1, rel=1e-12)
    assert s.p99_ms == pytest.approx(99.01, rel=1e-12)


@pytest.mark.parametrize("bad", [[], [1.0, -0.5], [1.0, math.nan]])
def test_stats_refuse_empty_or_invalid_samples(bad):
    with pytest.raises(AvatarqError, match="latency"):
        LatencyStats.from_samples(bad)


def test_stats_refuse_a_zero_batch():
    with pytest.raises(AvatarqError, match="batch must be an integer >= 1, got 0"):
        LatencyStats.from_samples([1.0], batch=0)


def test_stats_to_dict_round_trips_through_json():
    s = LatencyStats.from_samples([1.25, 2.5, 3.0, 7.75], batch=4)
    d = json.loads(json.dumps(s.to_dict(), allow_nan=False))
    assert LatencyStats.from_dict(d) == s
    assert "samples_ms" not in s.to_dict(include_samples=False)


def test_stats_gate_values_use_gate_metric_names():
    s = LatencyStats.from_samples([2.0, 4.0])
    assert set(s.gate_values()) <= set(GATE_METRICS)
    assert s.gate_values()["fps"] == s.frames_per_second == 1000 / 3


def test_time_callable_syncs_before_every_clock_read():
    log = []
    samples = time_callable(lambda: log.append("fn"), 2, 3, sync=lambda: log.append("sync"))
    assert log == ["fn", "fn"] + ["sync", "fn", "sync"] * 3
    assert len(samples) == 3


def test_time_callable_measures_the_call_in_milliseconds():
    samples = time_callable(lambda: time.sleep(0.002), warmup=0, iters=3)
    assert all(2.0 <= ms < 200.0 for ms in samples)


def test_time_callable_refuses_zero_iterations():
    with pytest.raises(AvatarqError, match="iters must be an integer >= 1, got 0"):
        time_callable(lambda: None, warmup=0, iters=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_cuda_event_timer_refuses_without_cuda():
    with pytest.raises(AvatarqError, match="needs a CUDA device"):
        CudaEventTimer()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_event_timer_times_the_gpu_work_not_the_launch():
    a = torch.randn(4096, 4096, device="cuda")
    timer = CudaEventTimer()

    def matmuls(k: int):
        return lambda: [a @ a for _ in range(k)]

    one = sorted(timer.time(matmuls(1), warmup=3, iters=9))[4]
    eight = sorted(timer.time(matmuls(8), warmup=1, iters=9))[4]
    # An asynchronous launch would cost microseconds whatever the work; GPU time scales.
    assert one > 0.1
    assert 6.0 < eight / one < 10.0
    assert timer.device_name
