"""Task heads: the sparse masked-LM head gives HF's loss and gradients; collators pad per batch."""

from __future__ import annotations

import numpy as np
import torch
import transformers

from launcher.models.sparse_mlm import BertForMaskedLM
from launcher.tasks.base import pad_batch as _pad
from tests.conftest import TINY


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


def test_document_mask_keeps_attention_inside_each_packed_document(tmp_path) -> None:
    """A block holding two documents gives each the logits it has alone; the second's first token is no target."""
    from launcher.data.tokenizer import train_tokenizer
    from launcher.jobspec.load import load_spec
    from launcher.tasks import build_task
    from tests.conftest import ROOT, assert_ok, run_cli

    job = str(ROOT / "jobs" / "pretrain-gpt-clm.yaml")
    stage = load_spec(job, ["stages.0.data.document_mask=true", "stages.0.model.hidden_size=32"]).stages[0]
    tok = train_tokenizer(["a few words of text to learn from"] * 50, "llama", 300, False, tmp_path / "tok")
    task = build_task(stage, tok)
    sep = tok.eos_token_id
    first, second = tok("one document here")["input_ids"], tok("and then another one")["input_ids"]
    block = np.array([*first, sep, *second], dtype=np.int64)
    short = np.array([*second, sep], dtype=np.int64)  # a shorter block: padded
    batch = task.collate([{"input_ids": block}, {"input_ids": short}], torch.Generator())
    n = len(first) + 1
    assert batch["position_ids"][0].tolist() == [*range(n), *range(len(second))]
    assert batch["labels"][0, n].item() == -100 and batch["labels"][0, n + 1].item() == block[n + 1]
    assert task.num_tokens(batch) == len(block) + len(short)
    torch.manual_seed(0)
    model = task.build_model(None).eval()
    with torch.no_grad():
        packed = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        alone = model(torch.tensor([[*second]])).logits
        whole = model(torch.from_numpy(block)[None]).logits
    assert torch.allclose(packed[0, n:], alone[0], atol=1e-5), "the second document sees only itself"
    assert not torch.allclose(whole[0, n:], alone[0], atol=1e-3), "without the mask it would see the first"
    small = ["stages.0.max_steps=2", "stages.0.data.max_train_samples=200", "stages.0.data.max_eval_samples=20",
             "stages.0.model.hidden_size=32", "stages.0.data.seq_len=32",
             "stages.0.tokenizer.vocab_size=400"]  # fmt: skip
    result = run_cli(
        "run", job, "--local", f"output_dir={tmp_path / 'run'}", "stages.0.data.document_mask=true", *small
    )
    assert_ok(result)


def test_classification_metrics_equal_scikit_learns() -> None:
    """Accuracy, macro-F1, per-label precision / recall / F1 and the confusion matrix from sums added over two
    batches (as over ranks) equal scikit-learn's on the concatenated predictions; a label never predicted scores 0."""
    from types import SimpleNamespace

    import torch
    from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

    from launcher.jobspec.load import load_spec
    from launcher.tasks import build_task

    spec = load_spec(TINY, ["stages.1.data.labels=[neg,neu,pos]"])
    task = build_task(spec.stages[1], SimpleNamespace(pad_token_id=0))
    truth = [[0, 1, 2, 2, 1, 0, 2], [2, 2, 0, 1, 1]]
    guess = [[0, 2, 2, 2, 1, 0, 0], [2, 0, 0, 0, 2]]
    sums = task.empty_sums()
    for true, predicted in zip(truth, guess, strict=True):
        logits = torch.nn.functional.one_hot(torch.tensor(predicted), 3).float()
        outputs = SimpleNamespace(logits=logits, loss=torch.tensor(0.5))
        sums = sums + task.eval_sums(outputs, {"labels": torch.tensor(true)})
    metrics = task.eval_metrics(sums)
    y_true, y_pred = [y for batch in truth for y in batch], [y for batch in guess for y in batch]
    precision, recall, f1, _ = precision_recall_fscore_support(y_true, y_pred, labels=[0, 1, 2], zero_division=0)
    assert metrics["accuracy"] == sum(a == b for a, b in zip(y_true, y_pred, strict=True)) / len(y_true)
    assert abs(metrics["macro_f1"] - f1_score(y_true, y_pred, average="macro", zero_division=0)) < 1e-12
    for i, name in enumerate(["neg", "neu", "pos"]):
        assert abs(metrics[f"precision/{name}"] - precision[i]) < 1e-12
        assert abs(metrics[f"recall/{name}"] - recall[i]) < 1e-12
        assert abs(metrics[f"f1/{name}"] - f1[i]) < 1e-12
    matrix = confusion_matrix(y_true, y_pred, labels=[0, 1, 2])
    assert [[metrics[f"confusion/{a}/{b}"] for b in ("neg", "neu", "pos")] for a in ("neg", "neu", "pos")] == (
        matrix.tolist()
    )
    table = task.metrics_table(metrics)
    assert table is not None and "macro-F1" in table and table.count("\n") == 4
