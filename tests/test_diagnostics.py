"""rl/diagnostics.py: gradient signal-to-noise, every value derived by hand."""

from __future__ import annotations

import math

import pytest
import torch

from rl.diagnostics import gradient_agreement


def test_two_gradients_sharing_a_component() -> None:
    # g1 = (2, 1), g2 = (2, -1): mean (2, 0), ‖mean‖² = 4; noise = (1 + 1) / (2 - 1) = 2;
    # signal = 4 - 2/2 = 3; SNR = 1.5; cos = (4 - 1) / (sqrt5·sqrt5) = 0.6; norms sqrt(5)
    r = gradient_agreement([torch.tensor([2.0, 1.0]), torch.tensor([2.0, -1.0])])
    assert r.snr == pytest.approx(1.5)
    assert r.mean_cosine == pytest.approx(0.6)
    assert r.mean_norm == pytest.approx(math.sqrt(5))


def test_orthogonal_gradients_have_no_signal() -> None:
    # e1, e2, e3: mean (1,1,1)/3 with ‖mean‖² = 1/3; each ‖e_i - mean‖² = (2/3)² + 2·(1/3)² = 2/3,
    # noise = 3·(2/3) / 2 = 1; signal = 1/3 - 1/3 = 0; every pairwise cosine 0
    r = gradient_agreement(list(torch.eye(3)))
    assert r.snr == pytest.approx(0.0, abs=1e-12)
    assert r.mean_cosine == pytest.approx(0.0)


def test_identical_gradients_are_all_signal() -> None:
    g = torch.tensor([1.0, -3.0, 0.5])
    r = gradient_agreement([g, g.clone(), g.clone()])
    assert r.snr == math.inf and r.mean_cosine == pytest.approx(1.0)


def test_needs_two_gradients() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        gradient_agreement([torch.ones(3)])
