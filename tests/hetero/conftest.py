import pytest
import torch


@pytest.fixture(autouse=True)
def one_intra_op_thread():
    """These tests train tiny models (at most 64-128-10): one intra-op thread is as fast as
    many on a quiet machine and 10-20x faster on a loaded one, where torch's worker threads
    spin waiting for cores.  The previous setting is restored after each test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
