"""`RayShared`: a worker process deserialises a shared value once and keeps the last few."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.ray


def test_a_process_fetches_a_shared_value_once_and_keeps_the_last_four(ray_session: None) -> None:
    from pipeline.stages import ray_adapter
    from pipeline.stages.ray_adapter import RayShared

    values = [RayShared.put(torch.full((3,), float(i))) for i in range(5)]
    first = values[0].get()
    assert torch.equal(first, torch.zeros(3)) and values[0].get() is first  # fetched once, then kept
    for v in values[1:]:
        v.get()
    assert values[0].ref.hex() not in ray_adapter._FETCHED  # the least recently used went
    assert [k for k in ray_adapter._FETCHED] == [v.ref.hex() for v in values[1:]]
    assert values[0].get() is not first and torch.equal(values[0].get(), first)  # fetched again
