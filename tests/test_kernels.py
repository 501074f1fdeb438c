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


def _reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale=None, **causal):
    """Stand-in for PyTorch's CUDA-only varlen kernel: half precision in, causal attention per sample."""
    assert q.dtype in (torch.float16, torch.bfloat16) and k.shape == q.shape
    out = torch.empty_like(q)
    bounds = cu_q.tolist()
    for start, end in zip(bounds, bounds[1:]):
        seg = [t[start:end].transpose(0, 1).float() for t in (q, k, v)]  # [heads, len, dim]
        out[start:end] = torch.nn.functional.scaled_dot_product_attention(*seg, is_causal=True,
                                                                          scale=scale).transpose(0, 1).to(q.dtype)
    return out


def test_flat_attention_casts_fp32_and_expands_grouped_heads(monkeypatch):
    import torch.nn.attention.varlen as varlen

    from lowtune.kernels.attention import flat_attention

    monkeypatch.setattr(varlen, "varlen_attn", _reference_varlen)
    gen = torch.Generator().manual_seed(0)
    query = torch.randn(1, 4, 10, 8, generator=gen)  # one flattened row holding samples of 6 and 4 tokens
    key, value = torch.randn(1, 2, 10, 8, generator=gen), torch.randn(1, 2, 10, 8, generator=gen)
    cu, longest = cu_seq_lens([[6, 4]], 10, torch.device("cpu"))
    out = flat_attention(query, key, value, cu, longest, None)
    assert out.dtype == torch.float32 and out.shape == (1, 10, 4, 8)
    for start, end in [(0, 6), (6, 10)]:
        expected = torch.nn.functional.scaled_dot_product_attention(
            query[:, :, start:end], key[:, :, start:end].repeat_interleave(2, dim=1),
            value[:, :, start:end].repeat_interleave(2, dim=1), is_causal=True).transpose(1, 2)
        torch.testing.assert_close(out[:, start:end], expected, atol=3e-2, rtol=3e-2)
