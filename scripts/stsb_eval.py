"""STS-B Spearman (x100) of a backend: cosine of sentence1/sentence2 vs the gold score.

    python scripts/stsb_eval.py --data ../shared/eval/stsb/stsb_dev.tsv --backend torch-int8
    python scripts/stsb_eval.py --data ../shared/eval/stsb/stsb_dev.tsv --reference

Uses PooledEncoder directly (no service); --reference uses sentence-transformers instead. The
data is a TSV ``score<TAB>sentence1<TAB>sentence2`` with a header line and no quoting. Not a
test: the data set is not part of the project.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

import numpy as np

BATCH = 64


def read_pairs(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    with open(path, encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    gold = np.array([float(row["score"]) for row in rows])
    return [row["sentence1"] for row in rows], [row["sentence2"] for row in rows], gold


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho: Pearson correlation of average ranks (ties share their mean rank)."""
    try:
        from scipy.stats import spearmanr
    except ImportError:
        return float(np.corrcoef(_ranks(a), _ranks(b))[0, 1])
    return float(spearmanr(a, b).statistic)


def _ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks; tied values share the mean of their ranks."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return ((ends - counts + 1 + ends) / 2)[inverse]


def embed_with_encoder(encoder, texts: list[str], batch: int = BATCH) -> np.ndarray:
    """Batches of similar length, as the worker builds them, in input order."""
    ids = [item.ids for item in encoder.tokenize(texts)]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out = np.zeros((len(ids), encoder.spec.dimension), dtype=np.float32)
    for start in range(0, len(order), batch):
        rows = order[start : start + batch]
        out[rows] = encoder.embed([ids[i] for i in rows])
    return out


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="stsb_dev.tsv or stsb_test.tsv")
    parser.add_argument("--model", help="model spec [the bundled all-MiniLM-L6-v2]")
    parser.add_argument(
        "--backend",
        default="torch",
        choices=("torch", "torch-int8", "onnx", "onnx-int8"),
        help="PooledEncoder backend [%(default)s]",
    )
    parser.add_argument(
        "--reference", action="store_true", help="sentence-transformers instead of PooledEncoder"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    first, second, gold = read_pairs(args.data)
    started = time.perf_counter()
    if args.reference:
        from embedq.workers.backends import resolve_model_source
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(resolve_model_source(args.model)[1]), device="cpu")
        loaded = time.perf_counter()

        def embed(texts: list[str]) -> np.ndarray:
            return model.encode(texts, batch_size=BATCH, show_progress_bar=False)

        label = "sentence-transformers"
    else:
        from embedq.workers.backends import PooledEncoder

        encoder = PooledEncoder.load(args.model, backend=args.backend)
        loaded = time.perf_counter()

        def embed(texts: list[str]) -> np.ndarray:
            return embed_with_encoder(encoder, texts)

        label = f"embedq {args.backend}"
    scores = cosine(embed(first), embed(second))
    seconds = time.perf_counter() - loaded
    rho = 100 * spearman(scores, gold)
    print(
        f"{label}: Spearman x100 = {rho:.2f} on {len(gold)} pairs of {args.data.name} "
        f"(load {loaded - started:.1f} s, encode {seconds:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
