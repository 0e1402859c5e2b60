"""Tokenizers: trained on the stage's corpus with `tokenizers`, or loaded from a local directory.

bert gets an (optionally lowercased) WordPiece vocabulary; gpt2 and llama a byte-level BPE.
Saved with `save_pretrained`, so `AutoTokenizer.from_pretrained` reloads it and exports carry it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path

from launcher.errors import UserError

BERT_SPECIALS = {
    "pad_token": "[PAD]",
    "unk_token": "[UNK]",
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "mask_token": "[MASK]",
}
END_OF_TEXT = "<|endoftext|>"
BPE_SPECIALS = {"bos_token": END_OF_TEXT, "eos_token": END_OF_TEXT, "unk_token": END_OF_TEXT, "pad_token": "<pad>"}


def train_tokenizer(texts: Iterable[str], family: str, vocab_size: int, lowercase: bool, out_dir: Path):  # noqa: ANN201
    """Train a vocabulary on `texts` (streamed: never held at once) and save it under `out_dir`;
    returns the HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    def batches() -> Iterator[list[str]]:
        stream = iter(texts)
        while batch := list(islice(stream, 1000)):
            yield batch

    if family == "bert":
        specials = list(dict.fromkeys(BERT_SPECIALS.values()))
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase, strip_accents=lowercase)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
        tok.train_from_iterator(batches(), trainer=trainer)
        cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
        )
        wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, **BERT_SPECIALS)
    else:
        specials = list(dict.fromkeys(BPE_SPECIALS.values()))
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(batches(), trainer=trainer)
        wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, **BPE_SPECIALS)
    out_dir.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(str(out_dir))
    return wrapped


def load_tokenizer(path: str | Path, field: str = "tokenizer.source"):  # noqa: ANN201
    """Load a saved tokenizer from a local directory (never from a hub)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise UserError(f"{field}: cannot load a tokenizer from {path}: {' '.join(str(exc).split())[:200]}") from None
    if tok.pad_token is None:
        # GPT-2 style vocabularies ship without padding; batches need one.
        tok.pad_token = tok.eos_token
    return tok


def separator_id(tok) -> int:  # noqa: ANN001
    """Token placed between packed documents: [SEP] for BERT vocabularies, end-of-text otherwise."""
    token_id = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
    assert token_id is not None, "tokenizer has neither a separator nor an end-of-text token"
    return token_id
