"""bench/invariance_probe.py on the CPU: it runs the engine's ops row by row and all rows at once from the same
cache, and names the first op whose rows differ (the GPU run is the measurement)."""
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import invariance_probe  # noqa: E402

from models import tiny_model  # noqa: E402


@torch.inference_mode()
def test_probe_compares_rows_from_the_same_cache():
    model = copy.deepcopy(tiny_model("llama", layers=3))
    seq = torch.randint(0, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    out = invariance_probe.probe(model, seq, widths=[1, 3], starts=[5, 11])
    assert [(t, n) for t, n, _ in out] == [(5, 1), (5, 3), (11, 1), (11, 3)]
    for t, n, diff in out:
        if n == 1:
            assert diff is None   # one row each way: the same computation
        elif diff is not None:    # fp32 on the CPU: F.linear over 3 rows may round unlike 1 row
            (layer, op), rows = diff
            assert 0 <= layer <= 3 and rows and max(rows) < n


def test_first_difference_names_the_earliest_op():
    a = {(0, "qkv"): torch.zeros(2, 3), (0, "o"): torch.zeros(2, 3), (1, "qkv"): torch.zeros(2, 3)}
    b = {k: v.clone() for k, v in a.items()}
    assert invariance_probe.first_difference(a, b) is None
    b[(1, "qkv")][1, 0] = 1.0
    b[(0, "o")][0, 2] = 1.0
    assert invariance_probe.first_difference(a, b) == ((0, "o"), [0])
