"""Task heads: the sparse masked-LM head gives HF's loss and gradients; collators pad per batch."""

from __future__ import annotations

import numpy as np
import torch
import transformers

from launcher.tasks import _pad
from launcher.tasks.sparse_mlm import BertForMaskedLM


def test_sparse_mlm_matches_stock_bert() -> None:
    config = transformers.BertConfig(
        vocab_size=300,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    sparse = BertForMaskedLM(config)
    stock = transformers.BertForMaskedLM(config)
    stock.load_state_dict(sparse.state_dict())
    ids = torch.randint(5, 300, (4, 16))
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    labels = torch.full_like(ids, -100)
    labels[:, ::5] = ids[:, ::5]
    ours, theirs = sparse(ids, mask, labels=labels), stock(input_ids=ids, attention_mask=mask, labels=labels)
    assert torch.allclose(ours.loss, theirs.loss, atol=1e-6)
    assert ours.logits.shape == (int((labels != -100).sum()), 300)
    ours.loss.backward()
    theirs.loss.backward()
    for (name, a), b in zip(sparse.named_parameters(), stock.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name
    # without labels it is the stock model: full logits
    assert torch.equal(sparse(ids, mask).logits, stock(input_ids=ids, attention_mask=mask).logits)


def test_dynamic_padding_pads_to_the_longest_in_batch() -> None:
    ids, mask = _pad([np.array([5, 6, 7]), np.array([8])], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]
