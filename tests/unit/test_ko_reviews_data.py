"""The shipped Korean review set: size, balance, domains, and no near-duplicates."""

from __future__ import annotations

import csv
import re
from collections import Counter
from importlib import resources

import pytest

PATH = resources.files("peftlab") / "resources" / "data" / "ko_reviews.csv"
DOMAINS = {"IT기기", "배송", "식당", "영화", "화장품", "숙박", "앱", "고객센터", "도서", "패션"}


@pytest.fixture(scope="module")
def rows() -> list[dict[str, str]]:
    with PATH.open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def test_size_balance_and_domains(rows: list[dict[str, str]]) -> None:
    assert len(rows) >= 1500
    labels = Counter(r["label"] for r in rows)
    assert set(labels) == {"부정", "중립", "긍정"} and min(labels.values()) >= 450
    assert {r["domain"] for r in rows} == DOMAINS
    assert len({r["id"] for r in rows}) == len(rows)


def test_texts_are_korean_and_varied(rows: list[dict[str, str]]) -> None:
    hangul = re.compile(r"[\uac00-\ud7a3]")
    assert all(hangul.search(r["text"]) for r in rows)
    lengths = sorted(len(r["text"]) for r in rows)
    assert lengths[0] <= 10 and lengths[-1] >= 50  # very short and long reviews both present
    openings = Counter(r["text"][:6] for r in rows)
    assert openings.most_common(1)[0][1] <= 5  # no template-like repeated openings


def test_no_exact_or_near_duplicates(rows: list[dict[str, str]]) -> None:
    texts = [re.sub(r"\s+", "", r["text"]) for r in rows]
    assert len(set(texts)) == len(texts)
    grams = [{t[i:i + 3] for i in range(len(t) - 2)} or {t} for t in texts]
    worst = (0.0, "", "")
    for i in range(len(grams)):
        for j in range(i + 1, len(grams)):
            shared = len(grams[i] & grams[j])
            if shared:
                score = shared / len(grams[i] | grams[j])
                if score > worst[0]:
                    worst = (score, rows[i]["text"], rows[j]["text"])
    assert worst[0] <= 0.5, worst
