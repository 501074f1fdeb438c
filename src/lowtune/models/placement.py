"""Where frozen weights live during training: the input embedding table can stay in host memory.

Layer 1. Used by the training loop when the device plan is memory-tight (checkpointing with offloaded layer
inputs): a frozen, untied input embedding is only ever looked up, so its table does not need GPU memory.
"""

from __future__ import annotations

from typing import Any

import torch

from lowtune.models.load import base_model


class HostEmbedding(torch.nn.Module):
    """A frozen input embedding whose table stays in (pinned) host memory: token rows are looked up on the CPU
    and copied to the device. Frees vocab x hidden x 2 bytes of GPU memory (250 MiB for a 7B model) for one small
    host lookup per batch. The table is a plain tensor attribute, so `.to()`, optimizers and DDP leave it alone."""

    def __init__(self, embedding: torch.nn.Embedding) -> None:
        super().__init__()
        table = embedding.weight.detach().to("cpu")
        self.weight = table.pin_memory() if torch.cuda.is_available() else table
        self.padding_idx = embedding.padding_idx
        self.output_device = embedding.weight.device
        # hooks others registered on the embedding (e.g. transformers' inputs-require-grads) keep working
        for hooks in ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                      "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs"):
            setattr(self, hooks, getattr(embedding, hooks))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = torch.nn.functional.embedding(input_ids.to(self.weight.device), self.weight, self.padding_idx)
        return rows.to(self.output_device)


def keep_input_embeddings_on_host(model: Any) -> int:
    """Move a frozen, untied input embedding off the GPU; returns the device bytes freed (0 when it does not
    apply: trainable or tied embeddings, or a model on the CPU)."""
    base = base_model(model)
    embedding, head = base.get_input_embeddings(), base.get_output_embeddings()
    if type(embedding) is not torch.nn.Embedding or embedding.weight.requires_grad \
            or embedding.weight.device.type == "cpu":
        return 0
    if head is not None and head.weight.data_ptr() == embedding.weight.data_ptr():
        return 0
    freed = embedding.weight.numel() * embedding.weight.element_size()
    base.set_input_embeddings(HostEmbedding(embedding))
    return freed
