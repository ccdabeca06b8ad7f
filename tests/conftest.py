"""Shared fixtures: tiny random models and small data files built inside the tests (offline, seconds)."""

from __future__ import annotations

import csv
import json
import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

POSITIVE = ["great", "wonderful", "excellent", "lovely", "superb", "fun", "brilliant", "charming"]
NEGATIVE = ["awful", "terrible", "boring", "dull", "horrible", "bad", "weak", "messy"]
NEUTRAL = ["okay", "average", "plain", "fine", "mixed", "ordinary", "standard", "typical"]
FILLER = ["the", "movie", "film", "was", "really", "quite", "plot", "acting", "and", "a", "story", "very", "it"]
WORDS = POSITIVE + NEGATIVE + NEUTRAL + FILLER


def make_tokenizer(folder: Path) -> None:
    """A WordPiece BERT-style tokenizer over a small vocabulary, saved as a fast tokenizer."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {token: i for i, token in enumerate(specials + WORDS + list("abcdefghijklmnopqrstuvwxyz"))}
    tokenizer = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    fast.save_pretrained(str(folder))


def make_tiny_bert(folder: Path, seed: int = 0) -> Path:
    """A 2-layer, hidden-32 random BERT with its tokenizer: a stand-in for any local encoder folder."""
    import torch
    from transformers import BertConfig, BertModel

    folder.mkdir(parents=True, exist_ok=True)
    make_tokenizer(folder)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(WORDS) + 31, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=37, max_position_embeddings=128, pad_token_id=0)
    BertModel(config).save_pretrained(str(folder), safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


def review_rows(n: int = 90, seed: int = 0) -> list[dict[str, str]]:
    """Synthetic 3-class reviews whose label is carried by one sentiment word (learnable in a few steps)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label, words = [("negative", NEGATIVE), ("neutral", NEUTRAL), ("positive", POSITIVE)][i % 3]
        text = " ".join(rng.sample(FILLER, 4) + [rng.choice(words)] + rng.sample(FILLER, 2))
        rows.append({"text": f"{text} {i}", "label": label})
    return rows


@pytest.fixture
def reviews_csv(tmp_path: Path) -> Path:
    path = tmp_path / "reviews.csv"
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(review_rows())
    return path


def write_rows(path: Path, rows: list[dict], delimiter: str = ",") -> Path:
    """A CSV/TSV file with a header from the rows' keys."""
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_json(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path
