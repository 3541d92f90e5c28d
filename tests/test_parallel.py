"""qgraph.parallel: results in item order wherever they run; bad settings and a missing Ray are
one actionable error."""

from __future__ import annotations

import os
import sys

import pytest

from qgraph.errors import ConfigError
from qgraph.parallel import Evaluator


def _prepare(shared):
    return {"offset": shared["offset"], "pid": os.getpid()}


def _task(state, item):
    return item * item + state["offset"], state["pid"]


def test_local_workers_return_results_in_item_order_from_several_processes():
    items = list(range(12))
    inline = Evaluator(1).map(_prepare, _task, {"offset": 3}, items)
    spread = Evaluator(2).map(_prepare, _task, {"offset": 3}, items)
    assert [r for r, _ in inline] == [r for r, _ in spread] == [i * i + 3 for i in items]
    assert {pid for _, pid in inline} == {os.getpid()}
    assert os.getpid() not in {pid for _, pid in spread}


@pytest.mark.parametrize("workers", [-1, True, 1.5, "2"])
def test_bad_worker_counts_are_refused(workers):
    with pytest.raises(ConfigError, match="--workers"):
        Evaluator(workers)


def test_a_missing_ray_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)      # import ray -> ImportError
    with pytest.raises(ConfigError, match=r"qgraph\[ray\]"):
        Evaluator(2, ray="auto").map(_prepare, _task, {"offset": 0}, [1, 2])
