"""Fused/chunked linear cross-entropy and the packed-attention helpers, against plain PyTorch on CPU."""

import pytest
import torch

from lowtune.kernels import causal_lm_loss_sum
from lowtune.kernels.attention import cu_seq_lens
from lowtune.kernels.loss import IGNORE_INDEX, linear_cross_entropy_sum


@pytest.mark.parametrize("frozen_head", [True, False])
def test_chunked_linear_cross_entropy_matches_full_logits(frozen_head):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(301, 24, generator=gen, requires_grad=True)
    weight = torch.randn(97, 24, generator=gen, requires_grad=not frozen_head)
    labels = torch.randint(0, 97, (301,), generator=gen)
    labels[::5] = IGNORE_INDEX
    labels[:70] = IGNORE_INDEX  # a whole chunk with nothing to predict
    fused = linear_cross_entropy_sum(hidden, weight, labels, chunk=64)
    fused.backward(torch.tensor(0.5))
    grads = (hidden.grad.clone(), None if frozen_head else weight.grad.clone())
    hidden.grad = None
    weight.grad = None
    plain = torch.nn.functional.cross_entropy(hidden @ weight.t(), labels, ignore_index=IGNORE_INDEX,
                                              reduction="sum")
    (plain * 0.5).backward()
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grads[0], hidden.grad, rtol=1e-5, atol=1e-6)
    if not frozen_head:
        torch.testing.assert_close(grads[1], weight.grad, rtol=1e-5, atol=1e-5)


def test_causal_lm_loss_sum_equals_transformers_loss(micro_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(micro_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    ids = torch.randint(0, 300, (2, 17), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :5] = IGNORE_INDEX
    batch = {"input_ids": ids, "labels": labels, "position_ids": torch.arange(17).expand(2, 17)}
    ours = causal_lm_loss_sum(model, batch)
    reference = model(input_ids=ids, labels=labels).loss * int((labels[:, 1:] != IGNORE_INDEX).sum())
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_cu_seq_lens_cover_each_row_and_its_padding():
    cu, longest = cu_seq_lens([[3, 4], [8]], 8, torch.device("cpu"))
    assert cu.tolist() == [0, 3, 7, 8, 16]
    assert longest == 8


def test_compiled_layers_serve_training_steps_only(micro_dir):
    """Training forwards go through dynamo; generation and no-grad passes stay eager (no recompiles)."""
    import torch._dynamo
    from transformers import AutoModelForCausalLM

    from lowtune.kernels import compile_layers

    torch._dynamo.reset()
    model = AutoModelForCausalLM.from_pretrained(micro_dir, dtype=torch.float32)
    assert compile_layers(model, backend="eager") == model.config.num_hidden_layers
    counters = torch._dynamo.utils.counters["frames"]
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        model.generate(ids, max_new_tokens=3, do_sample=False)
    assert counters["total"] == 0
    model.train()
    logits = model(input_ids=ids).logits
    logits.sum().backward()
    assert counters["total"] > 0
    torch.testing.assert_close(logits.detach(), reference, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
