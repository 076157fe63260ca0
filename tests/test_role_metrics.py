"""teacher and trainer export their sd_* series on the metrics port the deploy files name."""

from __future__ import annotations

import httpx

from stream_distill.app import role_hooks
from stream_distill.bus.broker import free_port
from stream_distill.metrics.hooks import Hooks
from stream_distill.metrics.prometheus import PrometheusHooks


def test_no_port_means_no_op_hooks() -> None:
    hooks = role_hooks(None)
    assert type(hooks) is Hooks


def test_metrics_port_serves_role_series() -> None:
    port = free_port()
    hooks = role_hooks(port)
    assert isinstance(hooks, PrometheusHooks)
    hooks.on_train_step({"total": 0.5, "kd": 0.3, "ce": 0.2}, 32, 0.1)
    hooks.on_dead_letter("sd.requests", "poison")
    body = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    assert "sd_trainer_steps_total 1.0" in body
    assert 'sd_dead_letters_total{reason="poison",topic="sd.requests"} 1.0' in body
