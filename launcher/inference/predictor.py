"""The model side of `launcher predict`: an export over a DataFrame of text (or of image paths).

One object per process (`--local`) or per Ray Data actor (`map_batches(TextClassifier, ...)`): it loads
the export once and adds to each batch of rows the predicted label, its probability and every label's.
Rows are run in order of their tokenized length, in sub-batches of `batch_size`, so little of each
forward pass is padding; the results go back to the rows' own order. `TokenTagger` does the same for a
token-classification export (word tags, entity spans); `ImageClassifier` for an image-classification
export, whose rows name image files: it reads them `batch_size` at a time, as transformers'
`pipeline("image-classification")` does (EXIF orientation applied, converted to RGB, the export's image
processor), and gives the text classifier's columns.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

LABEL_COLUMN = "predicted_label"
SCORE_COLUMN = "predicted_score"
SCORE_PREFIX = "score_"  # one column per label: score_<label name>


class MissingText(ValueError):
    """A row of the input has no text in the text field (`row`: its 0-based position in the batch); `what`:
    what the field holds (`text`, or `image path` for an image classifier)."""

    def __init__(self, row: int, field: str, what: str = "text") -> None:
        super().__init__(f"no {what} in field {field!r}")
        self.row, self.field, self.what = row, field, what


class BadImage(ValueError):
    """A row names an image file that is missing or unreadable (`row`: its 0-based position in the batch,
    `value`: the path as the row gives it, `problem`: what is wrong, naming the file as resolved). The message
    carries both (`bad image "<value as JSON>": <problem>`), so a Ray actor's error can be read back."""

    def __init__(self, row: int, value: str, problem: str) -> None:
        super().__init__(f"bad image {json.dumps(value)}: {problem}")
        self.row, self.value, self.problem = row, value, problem


BAD_IMAGE = re.compile(r'bad image ("(?:[^"\\]|\\.)*"): ([^\n]*)')  # BadImage's message, inside Ray's error


def bad_image_in(message: str) -> tuple[str, str] | None:
    """(value, problem) of the BadImage whose message is in `message` (a Ray error's text), if any."""
    found = BAD_IMAGE.search(message)
    return (json.loads(found.group(1)), found.group(2).strip()) if found else None


def _load(auto_class: Any, model_dir: str) -> tuple[Any, torch.device]:
    """The export's model in eval mode, on the GPU Ray gave this actor (`cluster.use_gpu`) or this process has, else
    the CPU; transformers' own lines stay off the console (it is for the command's own lines)."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return auto_class.from_pretrained(model_dir, local_files_only=True).eval().to(device), device


def _with_scores(frame: Any, probabilities: np.ndarray, labels: list[str]) -> Any:
    """`frame` with the predicted label, its probability and a `score_<label>` column per label added."""
    out = frame.copy()
    best = probabilities.argmax(axis=1)
    out[LABEL_COLUMN] = [labels[i] for i in best]
    out[SCORE_COLUMN] = probabilities[np.arange(len(best)), best]
    for i, label in enumerate(labels):
        out[SCORE_PREFIX + label] = probabilities[:, i]
    return out


class _Predictor:
    """Which exports a predictor takes (those whose architecture name ends with `head`), and a batch's inputs."""

    head = ""  # the end of the export's architecture name (`BertForSequenceClassification`)

    @classmethod
    def architecture_ok(cls, model_dir: Path) -> bool:
        architectures = json.loads((model_dir / "config.json").read_text()).get("architectures") or []
        return any(name.endswith(cls.head) for name in architectures)

    @staticmethod
    def values(frame: Any, field: str, what: str) -> list[str]:
        """The batch's `field` (texts, image paths); `MissingText` names the first row without one."""
        if field not in frame.columns:
            raise MissingText(0, field, what)
        values = frame[field].tolist()
        for i, value in enumerate(values):
            if not isinstance(value, str) or not value:
                raise MissingText(i, field, what)
        return values


def _padded(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask of `rows`, right-padded to the longest, on `device`."""
    ids = torch.full((len(rows), max(len(row) for row in rows)), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for j, row in enumerate(rows):
        ids[j, : len(row)] = torch.tensor(row)
        mask[j, : len(row)] = 1
    return ids.to(device), mask.to(device)


class TextClassifier(_Predictor):
    """Callable on a pandas DataFrame; returns it with the prediction columns added."""

    head = "ForSequenceClassification"

    def __init__(self, model_dir: str, text_field: str, batch_size: int = 64, max_length: int | None = None) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.model, self.device = _load(AutoModelForSequenceClassification, model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        config = self.model.config
        self.labels = [str(config.id2label[i]) for i in range(config.num_labels)]
        self.text_field, self.batch_size = text_field, batch_size
        # As `pipeline(..., truncation=True)`: the tokenizer's own limit, unless the stage's seq_len is known.
        limit = min(self.tokenizer.model_max_length, getattr(config, "max_position_embeddings", None) or 1 << 30)
        self.max_length = min(max_length or limit, limit)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def __call__(self, frame: Any) -> Any:
        return _with_scores(frame, self.predict(self.values(frame, self.text_field, "text")), self.labels)

    def predict(self, texts: list[str]) -> np.ndarray:
        """Class probabilities, one row per text, computed in length-sorted sub-batches."""
        encoded = self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
        order = np.argsort([len(ids) for ids in encoded], kind="stable")
        result = np.zeros((len(texts), len(self.labels)), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                rows = order[start : start + self.batch_size]
                ids, mask = _padded([encoded[i] for i in rows], self.tokenizer.pad_token_id, self.device)
                logits = self.model(input_ids=ids, attention_mask=mask).logits
                result[rows] = logits.float().softmax(-1).cpu().numpy()
        return result


ENTITIES_COLUMN = "predicted_entities"  # JSON: the entity spans, as transformers' token-classification pipeline
TAGS_COLUMN = "predicted_tags"  # JSON: [word, tag] per word of the text
AGGREGATIONS = ("first", "max", "average", "simple")


class TokenTagger(_Predictor):
    """A token-classification export over a DataFrame of text: per row its words' tags and its entity spans.

    The forward passes run in length-sorted sub-batches as `TextClassifier`'s do; turning each text's token scores
    into words and entities is transformers' own (`TokenClassificationPipeline.gather_pre_entities`,
    `aggregate_words`, `group_entities`), so `predicted_entities` is what
    `pipeline("token-classification", aggregation_strategy=...)` answers for the same text and truncation."""

    head = "ForTokenClassification"

    def __init__(
        self,
        model_dir: str,
        text_field: str,
        batch_size: int = 64,
        max_length: int | None = None,
        aggregation: str = "first",
    ) -> None:
        from transformers import AutoModelForTokenClassification, AutoTokenizer, pipeline

        self.model, self.device = _load(AutoModelForTokenClassification, model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self.pipeline = pipeline("token-classification", model=self.model, tokenizer=self.tokenizer, device=self.device)
        from transformers.pipelines.token_classification import AggregationStrategy

        self.strategy = AggregationStrategy(aggregation)
        config = self.model.config
        limit = getattr(config, "max_position_embeddings", None) or 1 << 30
        self.max_length = min(max_length or limit, limit)
        self.text_field, self.batch_size = text_field, batch_size
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def __call__(self, frame: Any) -> Any:
        words, entities = self.predict(self.values(frame, self.text_field, "text"))
        out = frame.copy()
        out[TAGS_COLUMN] = [json.dumps(row) for row in words]
        out[ENTITIES_COLUMN] = [json.dumps(row) for row in entities]
        return out

    def predict(self, texts: list[str]) -> tuple[list[list[list[str]]], list[list[dict[str, Any]]]]:
        """Per text: [word, tag] for each word, and the entity spans (label, score, word, start, end)."""
        encoded = self.tokenizer(
            texts, truncation=True, max_length=self.max_length, return_special_tokens_mask=True,
            return_offsets_mapping=True,
        )  # fmt: skip
        order = np.argsort([len(ids) for ids in encoded["input_ids"]], kind="stable")
        scores: list[np.ndarray] = [np.zeros(0)] * len(texts)
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                rows = order[start : start + self.batch_size]
                ids, mask = _padded([encoded["input_ids"][i] for i in rows], self.tokenizer.pad_token_id, self.device)
                logits = self.model(input_ids=ids, attention_mask=mask).logits
                probabilities = logits.float().softmax(-1).cpu().numpy()
                for j, i in enumerate(rows):
                    scores[i] = probabilities[j, : len(encoded["input_ids"][i])]
        all_words, all_entities = [], []
        from transformers.pipelines.token_classification import AggregationStrategy

        for i, text in enumerate(texts):
            pre = self.pipeline.gather_pre_entities(
                text, np.asarray(encoded["input_ids"][i]), scores[i], encoded["offset_mapping"][i],
                np.asarray(encoded["special_tokens_mask"][i]), self.strategy,
            )  # fmt: skip
            if self.strategy == AggregationStrategy.SIMPLE:
                words = self.pipeline.aggregate(pre, AggregationStrategy.NONE)
            else:
                words = self.pipeline.aggregate_words(pre, self.strategy)
            grouped = self.pipeline.group_entities(words)
            all_words.append([[text[w["start"] : w["end"]], str(w["entity"])] for w in words])
            all_entities.append([
                {"entity_group": str(e["entity_group"]), "score": float(e["score"]), "word": str(e["word"]),
                 "start": int(e["start"]), "end": int(e["end"])}
                for e in grouped if e["entity_group"] != "O"
            ])  # fmt: skip
        return all_words, all_entities


class ImageClassifier(_Predictor):
    """An image-classification export (ViT, ResNet, ...) over a DataFrame whose `image_field` column names image
    files; returns it with `TextClassifier`'s columns added. A relative path is taken from `base_dir` (the
    table's folder). Images are read and run `batch_size` at a time, so a batch's memory is its images'."""

    head = "ForImageClassification"

    def __init__(self, model_dir: str, image_field: str = "image", batch_size: int = 64, base_dir: str = ".") -> None:
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        self.model, self.device = _load(AutoModelForImageClassification, model_dir)
        self.processor = AutoImageProcessor.from_pretrained(model_dir, local_files_only=True)
        config = self.model.config
        self.labels = [str(config.id2label[i]) for i in range(config.num_labels)]
        self.image_field, self.batch_size, self.base_dir = image_field, batch_size, Path(base_dir)

    def __call__(self, frame: Any) -> Any:
        return _with_scores(frame, self.predict(self.values(frame, self.image_field, "image path")), self.labels)

    def predict(self, values: list[str]) -> np.ndarray:
        """Class probabilities, one row per image path, in sub-batches of `batch_size` images."""
        result = np.zeros((len(values), len(self.labels)), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(values), self.batch_size):
                chunk = values[start : start + self.batch_size]
                images = [self.load(start + j, value) for j, value in enumerate(chunk)]
                inputs = self.processor(images=images, return_tensors="pt").to(self.device, self.model.dtype)
                logits = self.model(**inputs).logits.float()
                result[start : start + len(images)] = logits.softmax(-1).cpu().numpy()
        return result

    def load(self, row: int, value: str) -> Any:
        """The image `value` names, as the pipeline reads it (transformers' `load_image`); `BadImage` if it is
        missing or unreadable."""
        from transformers.image_utils import load_image

        path = Path(value) if Path(value).is_absolute() else self.base_dir / value
        if not path.is_file():
            raise BadImage(row, value, f"no such image file: {path}")
        try:
            return load_image(str(path))
        except Exception as exc:  # PIL's errors (unidentified, truncated, ...) are the file's
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise BadImage(row, value, f"not a readable image: {path} ({reason})") from None
