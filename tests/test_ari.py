"""ARI and FG-ARI of slot weights against instance masks (OSRT's reference definition)."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from srt.metrics import adjusted_rand_index, segmentation_scores


def one_hot(labels, k):
    """[b, p] int labels -> [b, p, k] one-hot; label -1 -> a row of zeros (an ignored point)."""
    labels = torch.as_tensor(labels)
    return F.one_hot(labels.clamp(min=0), k).float() * (labels >= 0).unsqueeze(-1)


def pair_counting_ari(true, pred):
    """ARI from its definition over unordered point pairs (Hubert & Arabie), points with true -1 dropped."""
    pts = [(t, q) for t, q in zip(true, pred) if t >= 0]
    same_t = [a[0] == b[0] for a, b in itertools.combinations(pts, 2)]
    same_p = [a[1] == b[1] for a, b in itertools.combinations(pts, 2)]
    both = sum(x and y for x, y in zip(same_t, same_p))
    expected = sum(same_t) * sum(same_p) / len(same_t)
    maximum = (sum(same_t) + sum(same_p)) / 2
    return (both - expected) / (maximum - expected)


def test_hand_computed_case():
    # true {0,1,2} {3,4,5}, predicted {0,1} {2,3} {4,5}: pairs within true 6, within predicted 3,
    # within both 2, of 15; expected 6 * 3 / 15 = 1.2, max 4.5: ARI = 0.8 / 3.3 = 8 / 33.
    true = one_hot([[0, 0, 0, 1, 1, 1]], 2)
    pred = one_hot([[0, 0, 1, 1, 2, 2]], 3)
    assert adjusted_rand_index(true, pred).item() == pytest.approx(8 / 33, abs=1e-12)


def test_perfect_permuted_and_constant_predictions():
    labels = torch.tensor([[0, 1, 2, 2, 1, 0, 3, 3, 1], [2, 2, 0, 0, 1, 1, 1, 3, 3]])
    true = one_hot(labels, 4)
    assert torch.allclose(adjusted_rand_index(true, true), torch.ones(2, dtype=torch.float64))
    permuted = one_hot(torch.tensor([4, 0, 2, 1])[labels], 5)  # slot ids renamed, one slot unused
    assert torch.allclose(adjusted_rand_index(true, permuted), torch.ones(2, dtype=torch.float64))
    constant = torch.zeros(2, 9, 6)
    constant[..., 3] = 1
    assert torch.allclose(adjusted_rand_index(true, constant), torch.zeros(2, dtype=torch.float64))
    uniform = torch.full((2, 9, 6), 1 / 6)  # ties: every point takes slot 0, a constant prediction
    assert torch.allclose(adjusted_rand_index(true, uniform), torch.zeros(2, dtype=torch.float64))


def test_soft_weights_score_by_their_argmax():
    labels = torch.tensor([[0, 0, 1, 1, 2, 2, 2]])
    weights = one_hot(labels, 3) * 0.5 + 0.15  # argmax = label, not one-hot
    assert adjusted_rand_index(one_hot(labels, 3), weights).item() == pytest.approx(1.0)


def test_matches_pair_counting_definition():
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        true = torch.randint(-1, 4, (1, 40), generator=g)  # -1: ignored points
        pred = torch.randint(0, 5, (1, 40), generator=g)
        got = adjusted_rand_index(one_hot(true, 4), one_hot(pred, 5)).item()
        assert got == pytest.approx(pair_counting_ari(true[0].tolist(), pred[0].tolist()), abs=1e-12)


def test_foreground_ari_ignores_background_and_ari_counts_it():
    # Segment 0 is the background. The foreground is the hand-computed case; the background points
    # are predicted as foreground slots, which FG-ARI must ignore and ARI must not.
    labels = torch.tensor([[1, 1, 1, 2, 2, 2, 0, 0, 0, 0]])
    pred = one_hot(torch.tensor([[0, 0, 1, 1, 2, 2, 0, 1, 2, 2]]), 4)
    scores = segmentation_scores(one_hot(labels, 3), pred)
    assert scores['fg_ari'].item() == pytest.approx(8 / 33, abs=1e-12)
    assert scores['ari'].item() == pytest.approx(pair_counting_ari(
        labels[0].tolist(), pred[0].argmax(-1).tolist()), abs=1e-12)
    assert scores['ari'].item() < scores['fg_ari'].item()


def test_single_segment_scores_one():
    # One foreground object (and background): the formula is 0/0 there; the reference scores 1.
    true = one_hot([[0, 1, 1, 1, 0, 0]], 2)
    pred = one_hot([[2, 3, 3, 3, 1, 0]], 4)
    assert segmentation_scores(true, pred)['fg_ari'].item() == 1.0
    all_background = one_hot([[0, 0, 0, 0, 0]], 3)
    assert segmentation_scores(all_background, one_hot([[0, 1, 2, 0, 1]], 3))['fg_ari'].item() == 1.0


def test_rejects_mismatched_or_too_few_points():
    with pytest.raises(ValueError, match='differ'):
        adjusted_rand_index(torch.zeros(1, 5, 2), torch.zeros(1, 6, 2))
    with pytest.raises(ValueError, match='more points'):
        adjusted_rand_index(torch.zeros(1, 3, 4), torch.zeros(1, 3, 4))
