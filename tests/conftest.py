import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tests use tiny networks, which run fastest on one thread; OpenMP spinning on a loaded 2-core machine makes
    two threads several times slower. Subprocess tests pass OMP_NUM_THREADS=1 for the same kernels."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
