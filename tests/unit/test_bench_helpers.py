"""The benchmarks' own judgement: exact search is compared by scores, and progress bars stay out of logs.

benchmarks/bank_growth.py stops `make bench` when the flat index disagrees with brute force; it once stopped on a
near-tie (two keys whose scores were equal to the last bits came back in the other order). These tests pin the
rule: a returned id is right when its exact score reaches the true k-th score within float tolerance, a real
miss still counts as one, and a bar is drawn only on a terminal.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

import bank_growth  # noqa: E402
from common import progress  # noqa: E402


def _keys(layers: int, n: int, dim: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((layers, n, dim)).astype(np.float32)  # [L, N, d]


def test_a_tie_broken_the_other_way_is_not_a_miss():
    kept = _keys(1, 6, 16)
    kept[0, 5] = kept[0, 2]  # entry 5 scores exactly as entry 2 for every query
    q = np.random.default_rng(1).standard_normal((1, 16)).astype(np.float32)  # [L, d]
    scores = kept[0] @ q[0]
    order = np.argsort(-scores, kind="stable")
    k = int(np.where(order == 2)[0][0]) + 1  # entry 2 is the k-th best: its twin ties with it
    exact = order[:k][None]  # [L, k], entry 2 last
    assert 5 not in exact[0]
    kth = scores[order[k - 1]][None]
    keys = bank_growth.Keys(data=None, kept=kept)
    swapped = exact.copy()
    swapped[0, -1] = 5  # what an exact index may return: the twin instead of entry 2
    assert bank_growth.recall(swapped, exact, kth, q, keys) == 1.0
    assert bank_growth.recall(exact, exact, kth, q, keys) == 1.0


def test_a_real_miss_and_a_repeated_id_still_count():
    kept = _keys(2, 40, 16, seed=2)
    q = np.random.default_rng(3).standard_normal((2, 16)).astype(np.float32)
    k = 4
    exact = np.stack([np.argsort(-(kept[layer] @ q[layer]))[:k] for layer in range(2)])  # [L, k]
    kth = np.array([(kept[layer] @ q[layer])[exact[layer, -1]] for layer in range(2)])
    keys = bank_growth.Keys(data=None, kept=kept)
    worst = np.stack([np.argsort(kept[layer] @ q[layer])[:k] for layer in range(2)])  # the k lowest scores
    missed = exact.copy()
    missed[0, -1] = worst[0, 0]  # one wrong id of 8
    assert bank_growth.recall(missed, exact, kth, q, keys) == 1 - 1 / 8
    repeated = exact.copy()
    repeated[1] = exact[1, 0]  # the best id k times is one right id, not k
    assert bank_growth.recall(repeated, exact, kth, q, keys) == (1 + 1 / k) / 2
    empty = np.full_like(exact, -1)
    assert bank_growth.recall(empty, exact, kth, q, keys) == 0.0


def test_keys_regenerated_from_blocks_match_the_truth_pass():
    data = bank_growth.Data(layers=2, dim=8, seed=5, clusters=4)
    kept = np.ascontiguousarray(data.block(0).transpose(1, 0, 2))  # [L, BATCH, d]
    from_kept = bank_growth.Keys(data, kept)
    regenerated = bank_growth.Keys(data, None)
    for entry in (0, 7, bank_growth.BATCH - 1):
        for layer in range(2):
            assert np.array_equal(from_kept.key(entry, layer), regenerated.key(entry, layer))


def test_progress_bars_stay_out_of_files_and_pipes():
    log = io.StringIO()  # not a terminal, like a redirected stderr
    assert list(progress(range(50), desc="x", file=log, mininterval=0)) == list(range(50))
    with progress(total=10, desc="y", file=log, mininterval=0) as bar:
        bar.update(10)
    assert log.getvalue() == ""

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Terminal()
    list(progress(range(5), desc="z", file=tty, mininterval=0))
    assert "z" in tty.getvalue()
