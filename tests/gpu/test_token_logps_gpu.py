"""The chunked per-token log-probabilities (kernels/loss.py) on CUDA in bf16 at a 7B step's size (8,136 positions,
4,096 wide, 32,000 words, several chunks) against log_softmax over full logits. Needs a GPU: never runs in CI."""

from __future__ import annotations

import pytest
import torch

from lowtune.kernels.loss import IGNORE_INDEX, linear_token_logps

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("autocast", [False, True])
def test_chunked_token_logps_match_full_logits_in_bf16(autocast):
    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(1, 8136, 4096, device="cuda", generator=gen, dtype=torch.bfloat16).requires_grad_()
    weight = torch.randn(32000, 4096, device="cuda", generator=gen, dtype=torch.bfloat16) * 0.02
    labels = torch.randint(0, 32000, (1, 8136), device="cuda", generator=gen)
    labels[:, :1000] = IGNORE_INDEX
    labels[:, 4000:5000] = IGNORE_INDEX
    upstream = torch.randn(1, 8136, device="cuda", generator=gen)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        mine = linear_token_logps(hidden, weight, labels)
    (mine * upstream).sum().backward()
    grad_mine, hidden.grad = hidden.grad, None
    logps = (hidden.float() @ weight.float().t()).log_softmax(-1)
    ref = logps.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1).masked_fill(labels == IGNORE_INDEX, 0)
    (ref * upstream).sum().backward()
    assert torch.isfinite(grad_mine).all()
    assert (grad_mine[:, :1000] == 0).all()
    torch.testing.assert_close(mine, ref, atol=0.05, rtol=0.01)
    torch.testing.assert_close(grad_mine.float(), hidden.grad.float(), atol=2e-3, rtol=0.05)
