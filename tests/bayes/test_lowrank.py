"""Rank-one and low-rank eigen-updates against `torch.linalg.eigh` of the dense updated matrix (float64).

Tolerances are relative to the largest entry of the updated matrix: eigenvalues and the reconstruction
`U diag(λ) Uᵀ` to 1e-12, orthogonality `UᵀU = I` to 1e-12, and a smooth matrix function (the inverse square
root that posterior draws use) to 1e-10, which also pins the spectral projectors of repeated eigenvalues.
"""

from __future__ import annotations

import pytest
import torch

from pipeline.bayes.lowrank import eigh_low_rank_update, eigh_rank_one_update

F64 = torch.float64


def _orthogonal(n: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=F64))
    return q


def _with_spectrum(values: torch.Tensor, seed: int) -> torch.Tensor:
    q = _orthogonal(values.shape[0], seed)
    return (q * values) @ q.T


def _inv_sqrt(values: torch.Tensor, vectors: torch.Tensor, shift: float) -> torch.Tensor:
    return (vectors * (values + shift).rsqrt()) @ vectors.T


def _check_against_eigh(
    values: torch.Tensor, vectors: torch.Tensor, dense: torch.Tensor, *, rtol: float = 1e-12
) -> None:
    scale = float(dense.abs().max())
    n = dense.shape[0]
    ref_values, ref_vectors = torch.linalg.eigh(dense)
    assert bool((values[1:] >= values[:-1]).all()), "eigenvalues must come out ascending"
    torch.testing.assert_close(values, ref_values, rtol=0, atol=rtol * scale)
    torch.testing.assert_close((vectors * values) @ vectors.T, dense, rtol=0, atol=rtol * scale)
    torch.testing.assert_close(vectors.T @ vectors, torch.eye(n, dtype=F64), rtol=0, atol=1e-12)
    # (M + s I)^{-1/2}: a function of the matrix, so it also compares the projectors of repeated eigenvalues
    shift = 1e-3 * scale
    expected = _inv_sqrt(ref_values, ref_vectors, shift)
    torch.testing.assert_close(
        _inv_sqrt(values, vectors, shift), expected, rtol=0, atol=1e-10 * float(expected.abs().max())
    )


def _spectra(n: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "distinct": torch.rand(n, generator=g, dtype=F64) * 10,
        "repeated": torch.cat(
            [torch.full((n // 3,), 2.0), torch.full((n // 3,), 5.0), torch.arange(n - 2 * (n // 3))]
        ).to(F64),
        "near_repeated": 3.0 + 1e-14 * torch.arange(n, dtype=F64),
        "zero_and_tiny": torch.cat(
            [torch.zeros(n // 2), 1e-300 * torch.ones(n // 4), torch.rand(n - n // 2 - n // 4, generator=g)]
        ).to(F64),
        "all_zero": torch.zeros(n, dtype=F64),
        "wide_range": torch.logspace(-12, 6, n, dtype=F64),
    }


@pytest.mark.parametrize("spectrum", list(_spectra(8)))
@pytest.mark.parametrize("n", [1, 2, 9, 150])
def test_rank_one_update_matches_eigh(spectrum: str, n: int) -> None:
    values = _spectra(n)[spectrum]
    dense = _with_spectrum(values, seed=n)
    values, vectors = torch.linalg.eigh(dense)
    g = torch.Generator().manual_seed(1)
    for v in (
        torch.randn(n, generator=g, dtype=F64),
        torch.randn(n, generator=g, dtype=F64) * 1e4,  # the update dominates
        torch.randn(n, generator=g, dtype=F64) * 1e-9,  # almost nothing: mostly deflated
        vectors[:, : max(1, n // 3)] @ torch.randn(max(1, n // 3), generator=g, dtype=F64),  # in a subspace
    ):
        new_values, new_vectors = eigh_rank_one_update(values, vectors, v, rho=0.7)
        _check_against_eigh(new_values, new_vectors, dense + 0.7 * torch.outer(v, v))


def test_rank_one_update_handles_unsorted_input_zero_and_exact_eigenvector_updates() -> None:
    dense = _with_spectrum(torch.linspace(0, 4, 12, dtype=F64), seed=3)
    values, vectors = torch.linalg.eigh(dense)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    v = torch.randn(12, generator=torch.Generator().manual_seed(2), dtype=F64)
    new_values, new_vectors = eigh_rank_one_update(values[perm], vectors[:, perm], v)
    _check_against_eigh(new_values, new_vectors, dense + torch.outer(v, v))
    # v along one eigenvector: only that eigenvalue moves, by ‖v‖²
    new_values, new_vectors = eigh_rank_one_update(values, vectors, 3.0 * vectors[:, 5])
    _check_against_eigh(new_values, new_vectors, dense + 9.0 * torch.outer(vectors[:, 5], vectors[:, 5]))
    # nothing to add: the decomposition comes back unchanged
    same_values, same_vectors = eigh_rank_one_update(values, vectors, torch.zeros(12, dtype=F64))
    torch.testing.assert_close(same_values, values, rtol=0, atol=0)
    torch.testing.assert_close(same_vectors, vectors, rtol=0, atol=0)
    same_values, _ = eigh_rank_one_update(values, vectors, v, rho=0.0)
    torch.testing.assert_close(same_values, values, rtol=0, atol=0)


def test_rank_one_update_rejects_bad_input() -> None:
    values, vectors = torch.ones(3, dtype=F64), torch.eye(3, dtype=F64)
    with pytest.raises(ValueError, match="rho must be finite and >= 0"):
        eigh_rank_one_update(values, vectors, torch.ones(3, dtype=F64), rho=-1.0)
    with pytest.raises(ValueError, match=r"expected values \[n\], vectors \[n, n\] and v \[n\]"):
        eigh_rank_one_update(values, vectors, torch.ones(4, dtype=F64))
    with pytest.raises(ValueError, match=r"factor must be \[n, r\] with n = 3"):
        eigh_low_rank_update(values, vectors, torch.ones(4, 2, dtype=F64))


@pytest.mark.parametrize("spectrum", ["distinct", "repeated", "all_zero"])
def test_low_rank_update_matches_eigh_including_dependent_columns(spectrum: str) -> None:
    n, g = 40, torch.Generator().manual_seed(4)
    dense = _with_spectrum(_spectra(n)[spectrum], seed=5)
    values, vectors = torch.linalg.eigh(dense)
    factor = torch.randn(n, 6, generator=g, dtype=F64)
    factor[:, 5] = factor[:, :5] @ torch.randn(5, generator=g, dtype=F64)  # rank 5, like a GGN root
    new_values, new_vectors = eigh_low_rank_update(values, vectors, factor)
    _check_against_eigh(new_values, new_vectors, dense + factor @ factor.T)


def test_many_successive_updates_stay_accurate() -> None:
    """A greedy batch of 100 picks applies 100 rank-one updates to one decomposition: errors must not grow."""
    n, g = 60, torch.Generator().manual_seed(6)
    acts = torch.randn(200, n, generator=g, dtype=F64)
    dense = acts.T @ acts
    values, vectors = torch.linalg.eigh(dense)
    for _ in range(100):
        v = torch.randn(n, generator=g, dtype=F64)
        values, vectors = eigh_rank_one_update(values, vectors, v)
        dense = dense + torch.outer(v, v)
    _check_against_eigh(values, vectors, dense)
