"""Singular-value spectra and modality-gap summaries: known-answer cases."""
from __future__ import annotations

import matplotlib
import numpy as np
import pytest
import torch

matplotlib.use("Agg")

from tbps_lib.analysis.modality_gap import (LOG_FLOOR, area_between, centroid_distance, gap_table, log_gap,
                                            log_spectrum, modality_spectra, numerical_rank, plot_spectra,
                                            singular_values)


def signed_axes(shares: list[float], dim: int, n: int = 1200) -> torch.Tensor:
    """Unit vectors +-e_k, axis k used by a share ``shares[k]`` of the rows, signs balanced: the mean is 0
    and the covariance is exactly diag(shares), so the singular values are ``shares`` (sorted)."""
    rows = []
    for k, share in enumerate(shares):
        count = round(share * n)
        assert count % 2 == 0
        e = torch.zeros(dim, dtype=torch.float64)
        e[k] = 1.0
        rows += [e, -e] * (count // 2)
    assert len(rows) == n
    return torch.stack(rows)


def test_singular_values_known_covariance():
    x = signed_axes([0.5, 0.3, 0.2], dim=5)
    values = singular_values(x)
    assert values.dtype == np.float64 and values.shape == (5,)
    np.testing.assert_allclose(values, [0.5, 0.3, 0.2, 0.0, 0.0], atol=1e-14)
    assert numerical_rank(values) == 3


def test_normalisation_removes_row_scale():
    x = signed_axes([0.5, 0.5], dim=3)
    scaled = x * torch.linspace(0.1, 10.0, x.shape[0], dtype=torch.float64)[:, None]
    np.testing.assert_allclose(singular_values(scaled), singular_values(x), atol=1e-14)
    assert not np.allclose(singular_values(scaled, normalize=False), singular_values(x))


def test_known_rank_is_recovered():
    gen = torch.Generator().manual_seed(0)
    basis_i = torch.linalg.qr(torch.randn(64, 64, generator=gen))[0]
    image = torch.randn(3000, 7, generator=gen) @ basis_i[:, :7].T  # rank 7 in a 64-d space
    text = torch.randn(3000, 20, generator=gen) @ basis_i[:, 10:30].T  # rank 20
    s = modality_spectra(image.float(), text.float())
    summary = s.summary()
    assert (summary["rank_image"], summary["rank_text"]) == (7, 20)
    assert s.image[7] < 1e-10 * s.image[0]


def test_known_offset_is_recovered():
    """Unit rows sqrt(1 - h^2) u +- h e with u balanced around 0 and orthogonal to e: the image centroid is
    +h e, the text centroid -h e, so the centroid distance is 2h; the spectra are identical (no area)."""
    gen = torch.Generator().manual_seed(1)
    u = torch.nn.functional.normalize(torch.randn(500, 31, generator=gen, dtype=torch.float64), dim=1)
    u = torch.cat([u, -u])  # mean exactly 0
    for h in (0.0, 0.2, 0.6):
        rows = torch.cat([np.sqrt(1 - h * h) * u, torch.zeros(len(u), 1, dtype=torch.float64)], dim=1)
        e = torch.zeros(32, dtype=torch.float64)
        e[-1] = h
        image, text = rows + e, rows - e
        assert centroid_distance(image, text) == pytest.approx(2 * h, abs=1e-12)
        summary = modality_spectra(image, text).summary()
        assert summary["area_between"] == pytest.approx(0.0, abs=1e-9)


def test_log_gap_and_area_known_answer():
    image = signed_axes([0.25, 0.25, 0.25, 0.25], dim=4)
    text = signed_axes([0.5, 0.3, 0.1, 0.1], dim=4, n=1200)
    si, st = singular_values(image), singular_values(text)
    expected = np.log10([0.5, 0.3, 0.1, 0.1]) - np.log10(0.25)
    np.testing.assert_allclose(log_gap(si, st), expected, atol=1e-12)
    assert area_between(si, st) == pytest.approx(np.abs(expected).mean(), abs=1e-12)
    assert area_between(si, si) == 0.0


def test_floor_and_errors():
    assert log_spectrum(np.array([1.0, 0.0]))[1] == np.log10(LOG_FLOOR)
    with pytest.raises(ValueError, match="same length|differ in length"):
        log_gap(np.ones(3), np.ones(4))
    with pytest.raises(ValueError, match="all zeros"):
        singular_values(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="n >= 2"):
        singular_values(torch.ones(1, 4))


def test_gap_table_and_plot():
    gen = torch.Generator().manual_seed(2)
    a = modality_spectra(torch.randn(200, 16, generator=gen), torch.randn(200, 16, generator=gen) + 0.5)
    b = modality_spectra(torch.randn(200, 16, generator=gen), torch.randn(200, 16, generator=gen))
    table = gap_table({"baseline": a, "other": b})
    assert list(table.index) == ["baseline", "other"]
    assert table.loc["baseline", "centroid_distance"] > table.loc["other", "centroid_distance"]
    fig = plot_spectra({"baseline": a, "other": b}, title="t")
    assert len(fig.axes) == 2 and len(fig.axes[0].lines) == 4
