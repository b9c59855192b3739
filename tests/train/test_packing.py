"""First-fit packing into fixed-token microbatches, checked by hand and by a forward pass."""

import numpy as np
import pytest

import magistral_jax as mj
from magistral_jax.train.packing import Item, first_fit, pack


def test_first_fit_decreasing_hand_worked():
    # Sorted: 7 (0), 5 (2), 4 (3), 3 (1), 2 (4); rows of 8: [7], [5, 3], [4, 2].
    assert first_fit([7, 3, 5, 4, 2], 8) == [[0], [2, 1], [3, 4]]
    with pytest.raises(ValueError, match="needs 9 slots, more than a row of 8"):
        first_fit([9], 8)


def test_pack_lays_out_tokens_targets_and_per_token_fields():
    items = [
        Item(tokens=[1, 5, 6, 7, 8], loss_start=3, weight=0.5, advantage=2.0, old_logprobs=[-1.0, -2.0]),
        Item(tokens=[1, 9, 10], loss_start=1, weight=0.25, advantage=-1.0, old_logprobs=[-3.0, -4.0]),
    ]
    packing = pack(items, row_len=8, rows=1)
    assert len(packing.microbatches) == 1 and packing.rows_used == 1 and packing.padding_saved == 0.5
    mb = packing.microbatches[0]
    assert mb.tokens[0].tolist() == [1, 5, 6, 7, 1, 9, 0, 0]
    assert mb.targets[0].tolist() == [5, 6, 7, 8, 9, 10, 0, 0]
    assert mb.segment_ids[0].tolist() == [1, 1, 1, 1, 2, 2, 0, 0]
    assert mb.positions[0].tolist() == [0, 1, 2, 3, 0, 1, 0, 0]
    # Item 0 trains on tokens 7 and 8 (targets at slots 2, 3); item 1 on 9 and 10.
    assert mb.weights[0].tolist() == [0, 0, 0.5, 0.5, 0.25, 0.25, 0, 0]
    assert mb.advantages[0].tolist() == [0, 0, 2, 2, -1, -1, 0, 0]
    assert mb.old_logprobs[0].tolist() == [0, 0, -1, -2, -3, -4, 0, 0]


def test_pack_checks_its_input():
    with pytest.raises(ValueError, match="loss_start 0 must lie in"):
        pack([Item(tokens=[1, 2], loss_start=0)], 8, 1)
    with pytest.raises(ValueError, match="1 old_logprobs for 2 trained tokens"):
        pack([Item(tokens=[1, 2, 3], loss_start=1, old_logprobs=[0.0])], 8, 1)
    with pytest.raises(ValueError, match="no sequences"):
        pack([], 8, 1)


def test_packed_rows_give_each_sequence_its_own_logits():
    """The oracle: each sequence run alone through the model."""
    model = mj.init_model(mj.get_preset("tiny"), 0)
    rng = np.random.default_rng(0)
    seqs = [rng.integers(3, 256, n).tolist() for n in (9, 4, 6, 3)]
    packing = pack([Item(tokens=s, loss_start=1) for s in seqs], row_len=12, rows=2)
    for mb in packing.microbatches:
        logits = np.asarray(model.logits(mb.tokens, segment_ids=mb.segment_ids, positions=mb.positions))
        for r in range(mb.tokens.shape[0]):
            for seg in set(mb.segment_ids[r].tolist()) - {0}:
                cols = np.flatnonzero(mb.segment_ids[r] == seg)
                alone = np.asarray(model.logits(mb.tokens[r : r + 1, cols]))[0]
                np.testing.assert_allclose(logits[r, cols], alone, atol=1e-5)
