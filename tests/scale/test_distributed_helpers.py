"""Single-process behaviour of the multi-host helpers in stages/common.py and
train/preemption.py (the multi-process
paths are exercised by test_multiprocess_ppo.py)."""

import os
import signal

import ml_collections
import pytest

from instructjax.stages import common, settings
from instructjax.train import preemption as preemption_lib


def _dist(**kw):
    config = ml_collections.ConfigDict({"distributed": dict(
        dict(enabled=False, coordinator_address="", num_processes=1, process_id=0), **kw)})
    return settings.distributed_from(config)


def test_disabled_distributed_is_a_no_op():
    assert common.initialize_distributed(_dist()) is False


def test_process_id_out_of_range_is_a_clear_error():
    with pytest.raises(common.StageError, match="process_id=2"):
        common.initialize_distributed(_dist(enabled=True, coordinator_address="127.0.0.1:1",
                                            num_processes=2, process_id=2))


def test_sigterm_inside_the_context_stops_and_the_handler_is_restored():
    before = signal.getsignal(signal.SIGTERM)
    with preemption_lib.Preemption() as preemption:
        assert not preemption.should_stop(1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert preemption.should_stop(2)
    assert signal.getsignal(signal.SIGTERM) == before


def test_main_process_first_runs_once_on_one_process():
    calls = []
    assert common.main_process_first(lambda: calls.append(1) or "x", "test") == "x"
    assert calls == [1]
