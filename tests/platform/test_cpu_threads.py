"""cpu_threads=auto: the cores the load average leaves free (dit.platform.cpu_threads)."""

import pytest
import torch
import train
from conftest import quick_cfg

from dit.errors import UsageError
from dit.platform.cpu_threads import choose_cpu_threads


@pytest.fixture
def no_omp(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)


@pytest.mark.parametrize(
    "cores, load, processes, threads",
    [(2, 0.1, 1, 2), (2, 0.6, 1, 1), (2, 2.1, 1, 1), (2, 7.0, 1, 1), (16, 3.2, 1, 13), (16, 0.0, 4, 4), (2, 0.0, 2, 1)],
)
def test_auto_takes_the_free_cores_shared_by_the_processes(no_omp, cores, load, processes, threads):
    assert choose_cpu_threads("auto", processes, cores=cores, load=load)[0] == threads


def test_a_number_is_taken_and_omp_num_threads_is_left_alone(monkeypatch):
    assert choose_cpu_threads(3, cores=2, load=0.0)[0] == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads, why = choose_cpu_threads("auto", cores=2, load=0.0)
    assert threads is None and "OMP_NUM_THREADS=1" in why


@pytest.mark.parametrize("bad", [0, -1, "all", True, 1.5])
def test_a_wrong_value_is_one_line(bad):
    with pytest.raises(UsageError, match="cpu_threads must be auto or an integer of at least 1"):
        choose_cpu_threads(bad)


def test_a_cpu_run_sets_the_thread_count_and_says_why(tmp_path, digits_dir, capsys, no_omp):
    before = torch.get_num_threads()
    try:
        train.set_cpu_threads(quick_cfg(tmp_path, digits_dir, "cpu_threads=1"))
        assert torch.get_num_threads() == 1
        assert "CPU threads: 1 (cpu_threads=1)" in capsys.readouterr().out
    finally:
        torch.set_num_threads(before)


def test_the_choice_is_made_once_per_process(tmp_path, digits_dir, monkeypatch):
    """A multirun's later jobs would otherwise read their predecessors' load as other work."""
    calls = []
    monkeypatch.setattr(train, "CPU_THREADS", {})
    monkeypatch.setattr(train, "choose_cpu_threads", lambda *key: calls.append(key) or (None, "chosen"))
    cfg = quick_cfg(tmp_path, digits_dir)
    train.set_cpu_threads(cfg)
    train.set_cpu_threads(cfg)
    assert calls == [("auto", 1)]
