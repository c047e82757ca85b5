"""Pooling with padding masks, left and right padded."""

import pytest
import torch

from finetune.model.pooling import pool

TOKENS = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]],
                       [[5.0, 6.0], [100.0, 100.0], [100.0, 100.0]]])  # (B=2, T=3, D=2), 100 = padding
RIGHT_MASK = torch.tensor([[1, 1, 0], [1, 0, 0]])


def test_mean_ignores_padding():
    out = pool(TOKENS, RIGHT_MASK, "mean", normalize=False)
    torch.testing.assert_close(out, torch.tensor([[2.0, 3.0], [5.0, 6.0]]))


def test_cls_takes_first_token():
    out = pool(TOKENS, RIGHT_MASK, "cls", normalize=False)
    torch.testing.assert_close(out, torch.tensor([[1.0, 2.0], [5.0, 6.0]]))


def test_lasttoken_right_padding():
    out = pool(TOKENS, RIGHT_MASK, "lasttoken", normalize=False)
    torch.testing.assert_close(out, torch.tensor([[3.0, 4.0], [5.0, 6.0]]))


def test_lasttoken_left_padding():
    tokens = torch.tensor([[[100.0, 100.0], [1.0, 2.0], [3.0, 4.0]],
                           [[100.0, 100.0], [100.0, 100.0], [5.0, 6.0]]])
    mask = torch.tensor([[0, 1, 1], [0, 0, 1]])
    torch.testing.assert_close(pool(tokens, mask, "lasttoken", normalize=False), torch.tensor([[3.0, 4.0], [5.0, 6.0]]))
    torch.testing.assert_close(pool(tokens, mask, "mean", normalize=False), torch.tensor([[2.0, 3.0], [5.0, 6.0]]))


def test_normalize_gives_unit_vectors():
    out = pool(TOKENS, RIGHT_MASK, "mean", normalize=True)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(out[0], torch.tensor([2.0, 3.0]) / torch.tensor([2.0, 3.0]).norm())


def test_unknown_mode():
    with pytest.raises(ValueError, match="Unknown pooling mode 'max'"):
        pool(TOKENS, RIGHT_MASK, "max", normalize=False)
