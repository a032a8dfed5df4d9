"""The NumPy RNG states a checkpoint holds (the trainer's global stream, PowerSGD's RandomState) survive a
weights_only save/load and continue the same stream."""

import io

import numpy as np
import torch

from imgtrain.train.state import mt19937_from_plain, mt19937_to_plain


def test_a_random_state_continues_after_a_weights_only_round_trip():
    rs = np.random.RandomState(7)
    rs.normal()  # leaves a cached gaussian: has_gauss=1 must survive too
    buf = io.BytesIO()
    torch.save(mt19937_to_plain(rs.get_state()), buf)
    buf.seek(0)
    plain = torch.load(buf, weights_only=True)
    expected = rs.normal(size=3), rs.randint(1 << 30)
    restored = np.random.RandomState(0)
    restored.set_state(mt19937_from_plain(plain))
    got = restored.normal(size=3), restored.randint(1 << 30)
    assert plain["has_gauss"] == 1
    assert np.array_equal(expected[0], got[0]) and expected[1] == got[1]
