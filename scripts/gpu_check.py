"""One GPU session's checks of the worker path: exactness, quality and in-process speed.

    python scripts/gpu_check.py --data stsb_test.tsv [--device cuda:0] [--json out.json]

Not a test (CI has no GPU): the figures go into docs/benchmarks.md with the GPU named.
- exactness: the worker's PooledEncoder on the GPU against sentence-transformers on the same
  GPU and on the CPU (max |difference| per vector component), float32 and fp16;
- quality: STS-B Spearman x100 of each (cosine of the pairs vs the gold score);
- speed: texts/s of sentence-transformers' encode (batch 32, the bench's R) and of the
  worker's encoder on length-sorted batches of 256 (what the worker builds), both in-process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stsb_eval import cosine, embed_with_encoder, read_pairs, spearman  # noqa: E402


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, reps: int = 3) -> float:
    """Median seconds of reps calls, after one warm-up, synchronised with the GPU."""
    fn()
    times = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="STS-B TSV: score, s1, s2")
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from embedq.workers.backends.model import PooledEncoder, resolve_model_source
    from sentence_transformers import SentenceTransformer

    first, second, gold = read_pairs(args.data)
    texts = first + second
    _, folder = resolve_model_source(None)
    result: dict = {
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "texts": len(texts),
    }
    reference_cpu = SentenceTransformer(str(folder), device="cpu").encode(texts, batch_size=32)
    reference = SentenceTransformer(str(folder), device=args.device)
    reference_gpu = reference.encode(texts, batch_size=32)
    for label, fp16 in (("fp32", False), ("fp16", True)):
        encoder = PooledEncoder.load(None, device=args.device, fp16=fp16)
        ours = embed_with_encoder(encoder, texts, 256)
        n = len(first)
        result[label] = {
            "max_diff_vs_st_gpu": float(np.abs(ours - reference_gpu).max()),
            "max_diff_vs_st_cpu": float(np.abs(ours - reference_cpu).max()),
            "spearman_x100": 100 * spearman(cosine(ours[:n], ours[n:]), gold),
            "texts_per_s_batch256": len(texts)
            / timed(lambda e=encoder: embed_with_encoder(e, texts, 256)),
        }
        del encoder
        torch.cuda.empty_cache()
    n = len(first)
    result["st_fp32"] = {
        "spearman_x100": 100 * spearman(cosine(reference_gpu[:n], reference_gpu[n:]), gold),
        "texts_per_s_batch32": len(texts) / timed(lambda: reference.encode(texts, batch_size=32)),
        "texts_per_s_batch256": len(texts) / timed(lambda: reference.encode(texts, batch_size=256)),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
