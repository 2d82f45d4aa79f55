"""Tokenizer + Hugging Face encoder: text -> token ids -> token embeddings.

Matches the sentence-transformers 6.2 ``Transformer`` module: the same tokenizer files,
``max_seq_length``/``do_lower_case`` from sentence_bert_config.json, right-side truncation
("longest_first") to max_seq_length including special tokens, padding on the tokenizer's side.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerBase

from .ascii_tokens import AsciiShortcut
from .lean_bert import LeanBert, pays_off
from .packing import PackedBatch, pack
from .source import UnsupportedModelError

logger = logging.getLogger(__name__)

SBERT_CONFIG = "sentence_bert_config.json"
# Loader arguments a config file must not steer: we are offline and never run remote code.
_HUB_KEYS = {"trust_remote_code", "token", "revision", "cache_dir", "local_files_only", "subfolder"}
# Self-check probes: long enough to be truncated by any max_seq_length up to this size.
_PROBE_TEXT = "Hello, World! Ünïcödé 東京 🙂 [SEP] x"
_PROBE_LIMIT = 8192
# Packed batches (packing.py) must give the padded batch's vectors within this, or are not used.
_PACKING_TOLERANCE = 1e-5
_PACKING_PROBE_WORDS = 128
_LEAN_PROBES = ("a", "a short probe", "Hello, World! A longer probe sentence, with a comma.")


@dataclass(frozen=True)
class TokenizedText:
    """What the encoder will see for one text."""

    ids: list[int]  # truncated to max_seq_length, special tokens included
    full_length: int  # tokens incl. special tokens before truncation

    @property
    def truncated(self) -> bool:
        return self.full_length > len(self.ids)


@dataclass(frozen=True)
class TextSettings:
    """The sentence_bert_config.json values that change token ids."""

    max_seq_length: int
    do_lower_case: bool


class Transformer:
    """The first module of the pipeline. Build with Transformer.load."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, model: torch.nn.Module, settings: TextSettings
    ) -> None:
        self.tokenizer = tokenizer
        self.model = model
        self.settings = settings
        self.device = next(model.parameters()).device
        self._n_special = tokenizer.num_special_tokens_to_add(pair=False)
        self._budget = max(0, settings.max_seq_length - self._n_special)  # content tokens kept
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._left_pad = tokenizer.padding_side == "left"
        self._fast = _plain_copy(tokenizer)
        # Same ids without character offsets (tokenizers >= 0.21): 20 % less tokenizer time,
        # measured; tokenizing is a worker's serial stage when the model is fast.
        if self._fast is not None:
            self._encode_batch = getattr(self._fast, "encode_batch_fast", self._fast.encode_batch)
        # ASCII texts skip the Rust normalizer and post-processor, and BERT-style models the
        # per-word model too, where that is checked to give the same ids (ascii_tokens.py:
        # a fifth of the tokenizer's time, measured).
        self._ascii = AsciiShortcut.build(self._fast) if self._fast is not None else None
        forward_params = inspect.signature(model.forward).parameters
        self._token_types = (
            "token_type_ids" in tokenizer.model_input_names and "token_type_ids" in forward_params
        )
        # Decided at load by check_packing and check_lean (proofs on probe texts, not
        # assumptions). The lean forward, where on, runs the batches it pays off for.
        self._packing = False
        self._lean: LeanBert | None = None

    @classmethod
    def load(cls, folder: Path, device: torch.device, half: bool) -> Transformer:
        """Tokenizer and weights from ``folder`` (local files only), on ``device``."""
        config = _read_json(folder / SBERT_CONFIG)
        tokenizer_kwargs = _loader_kwargs(config, "processor_kwargs", "tokenizer_args")
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, **tokenizer_kwargs)
        # fp32 weights even for fp16 checkpoints: CPU half is slow; CUDA halves below on request.
        model = AutoModel.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
        if getattr(model.config, "is_encoder_decoder", False):
            raise UnsupportedModelError(f"{folder}: encoder-decoder models are not supported")
        model = model.to(device).eval()
        if half:
            model = model.half()
        settings = TextSettings(
            max_seq_length=_max_seq_length(config, tokenizer_kwargs, tokenizer, model.config),
            do_lower_case=bool(config.get("do_lower_case", False)),
        )
        tokenizer.model_max_length = settings.max_seq_length
        if settings.do_lower_case:
            _add_lowercasing(tokenizer)
        transformer = cls(tokenizer, model, settings)
        transformer._check_against_tokenizer()
        return transformer

    @property
    def input_names(self) -> list[str]:
        """The keyword inputs forward() passes to the model, in order."""
        names = ["input_ids", "attention_mask"]
        return [*names, "token_type_ids"] if self._token_types else names

    @property
    def hidden_size(self) -> int:
        config = self.model.config
        return int(getattr(config, "hidden_size", None) or config.d_model)

    def tokenize(self, texts: Sequence[str]) -> list[TokenizedText]:
        """Ids as the tokenizer's own truncating call gives them, and the full length.

        Fast tokenizers: one Rust call with special tokens for all texts; only the texts
        over max_seq_length take the split path below (profiled: the per-text Python
        post-processing was half of a worker's time when the model costs nothing)."""
        texts = list(texts)
        if not texts:
            return []
        if self._fast is None:
            return self._tokenize_split(texts)
        limit = self.settings.max_seq_length
        result: list[TokenizedText | None] = []
        long_rows = []
        for row, ids in enumerate(self._untruncated_ids(texts)):
            if len(ids) <= limit:
                result.append(TokenizedText(ids=ids, full_length=len(ids)))
            else:
                result.append(None)
                long_rows.append(row)
        if long_rows:
            split = self._tokenize_split([texts[row] for row in long_rows])
            for row, tokens in zip(long_rows, split, strict=True):
                result[row] = tokens
        return result  # type: ignore[return-value] - every None was replaced

    def _untruncated_ids(self, texts: list[str]) -> list[list[int]]:
        """Every text's ids with special tokens, not truncated (fast tokenizers only)."""
        if self._ascii is not None:
            return self._ascii.ids(texts, self._pipeline_ids)
        return self._pipeline_ids(texts)

    def _pipeline_ids(self, texts: list[str]) -> list[list[int]]:
        return [encoding.ids for encoding in self._encode_batch(texts, add_special_tokens=True)]

    def _tokenize_split(self, texts: list[str]) -> list[TokenizedText]:
        """One batched tokenizer call without truncation (so full_length is known), then
        truncation and special tokens applied per text exactly as the tokenizer would."""
        encoded = self.tokenizer(
            texts,
            add_special_tokens=False,
            truncation=False,
            padding=False,
            verbose=False,
            return_attention_mask=False,
            return_token_type_ids=False,
        )
        if self.tokenizer.is_fast:
            return [self._finish_fast(encoding) for encoding in encoded.encodings]
        return [self._finish_slow(ids) for ids in encoded["input_ids"]]

    def _finish_fast(self, encoding: Any) -> TokenizedText:
        """Rust path: truncate the content encoding, then let the post-processor add specials."""
        full_length = len(encoding.ids) + self._n_special
        if len(encoding.ids) > self._budget:
            encoding.truncate(self._budget, 0, self.tokenizer.truncation_side)
        ids = self.tokenizer.backend_tokenizer.post_process(encoding, None, True).ids
        return TokenizedText(ids=list(ids), full_length=full_length)

    def _finish_slow(self, content: list[int]) -> TokenizedText:
        """Python-tokenizer path, same result through build_inputs_with_special_tokens."""
        full_length = len(content) + self._n_special
        if len(content) > self._budget:
            drop = len(content) - self._budget
            keep_left = self.tokenizer.truncation_side == "right"
            content = content[: self._budget] if keep_left else content[drop:]
        ids = self.tokenizer.build_inputs_with_special_tokens(content)
        return TokenizedText(ids=list(ids), full_length=full_length)

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        return list(self.tokenizer.convert_ids_to_tokens([int(i) for i in ids]))

    def forward(self, batch: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
        """Runs the encoder on ``batch``: (token embeddings, attention mask) on self.device, one
        padded row per text. Lean (lean_bert.py: real tokens only) or packed (packing.py) when
        the model passed that check at load and it pays off for this batch (lean: pays_off;
        packed: when it saves rows). The caller holds torch.inference_mode()."""
        if self._lean is not None and all(batch) and pays_off([len(ids) for ids in batch]):
            try:
                return self._lean.forward(batch)
            except Exception:  # noqa: BLE001 - the Hugging Face forward is always there
                # Raises, and the lean forward stays on, when the batch itself is bad.
                result = self._forward_hugging_face(batch)
                logger.exception("a lean pass failed where Hugging Face's did not: lean off")
                self._lean = None
                return result
        return self._forward_hugging_face(batch)

    def _forward_hugging_face(self, batch: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
        packed = pack(batch, self._pad_id, self.settings.max_seq_length) if self._packing else None
        if packed is not None:
            try:
                return self._forward_packed(packed)
            except Exception:  # noqa: BLE001 - the padded path is always there
                logger.exception("a packed batch failed; packing off, batches run padded")
                self._packing = False
        return self._forward_padded(batch)

    def _forward_padded(self, batch: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
        input_ids, mask = self._pad(batch)
        return self._run(input_ids, mask), mask

    def _forward_packed(self, packed: PackedBatch) -> tuple[Tensor, Tensor]:
        def on_device(array: np.ndarray) -> Tensor:
            return torch.from_numpy(array).to(self.device)

        input_ids = on_device(packed.input_ids)
        hidden = self._run(
            input_ids,
            on_device(packed.attention),
            position_ids=on_device(packed.position_ids),
        )
        rows, cols = on_device(packed.gather_rows), on_device(packed.gather_cols)
        return hidden[rows, cols], on_device(packed.mask)

    def _run(self, input_ids: Tensor, attention_mask: Tensor, **extra: Tensor) -> Tensor:
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, **extra}
        if self._token_types:
            inputs["token_type_ids"] = torch.zeros_like(input_ids)
        output = self.model(**inputs)
        hidden = getattr(output, "last_hidden_state", None)
        return output[0] if hidden is None else hidden

    def check_packing(self, pooled: Callable[[Tensor, Tensor], Tensor]) -> None:
        """Use packed batches only where they are proven equal here: on the CPU (where padding
        is paid in full; a GPU runs small batches at almost the cost of none), for a model
        that takes position ids and runs SDPA attention (which reads a boolean mask), right-
        padded, and whose vectors for probe texts of several lengths match the padded
        batch's within _PACKING_TOLERANCE. `pooled(hidden, mask)`: the pooling module."""
        forward = getattr(self.model, "forward", None)  # ONNX runtimes have none
        forward_params = inspect.signature(forward).parameters if forward else {}
        config = getattr(self.model, "config", None)
        implementation = getattr(config, "_attn_implementation", None)
        if (
            self.device.type != "cpu"
            or "position_ids" not in forward_params
            or implementation != "sdpa"
            or self._left_pad
        ):
            return
        # Short texts, and a long one (truncated to max_seq_length, at most _PACKING_PROBE_WORDS
        # words: a long-context model's full width would cost gigabytes here), so that wide
        # rows are proven too. Rows are never wider than max_seq_length (see pack()).
        short = ["a", "a short probe", "Hello, World! A longer probe sentence, with a comma."]
        words = min(self.settings.max_seq_length, _PACKING_PROBE_WORDS)
        longest = " ".join(["probe"] * words)
        batch = [item.ids for item in self.tokenize([*short, *short[:2], longest, *short])]
        packed_batch = pack(batch, self._pad_id, self.settings.max_seq_length)
        if packed_batch is None:
            return
        packed = functools.partial(self._forward_packed, packed_batch)
        self._packing = self._matches_padded("packed batches", batch, packed, pooled)

    def check_lean(self, pooled: Callable[[Tensor, Tensor], Tensor]) -> None:
        """Use the lean forward (lean_bert.py) only where it is proven equal here: on the CPU
        (where it was measured), for a model LeanBert recognises, whose vectors for probe
        texts of several lengths, more than one attention group of them, match the padded
        batch's within _PACKING_TOLERANCE."""
        lean = LeanBert.build(self.model) if self.device.type == "cpu" else None
        if lean is None:
            return
        texts = [*_LEAN_PROBES, " ".join(["probe"] * min(self.settings.max_seq_length, 64))]
        texts = [f"{text} {i}" for i in range(5) for text in texts]  # > ATTENTION_GROUP texts
        batch = [item.ids for item in self.tokenize(texts)]
        forward = functools.partial(lean.forward, batch)
        if self._matches_padded("lean forward", batch, forward, pooled):
            self._lean = lean

    def _matches_padded(
        self,
        what: str,
        batch: list[list[int]],
        forward: Callable[[], tuple[Tensor, Tensor]],
        pooled: Callable[[Tensor, Tensor], Tensor],
    ) -> bool:
        """Whether `forward()` gives the padded batch's vectors for `batch` within
        _PACKING_TOLERANCE (logged either way; a model that refuses it: False)."""
        with torch.inference_mode():
            padded = pooled(*self._forward_padded(batch))
            try:
                candidate = pooled(*forward())
            except Exception as exc:  # noqa: BLE001 - a model that refuses keeps the padded path
                logger.info("%s off: the model refused the probes (%s)", what, exc)
                return False
        error = float((padded - candidate).abs().max())
        proven = error <= _PACKING_TOLERANCE
        logger.info("%s %s (probe max |diff| %.1e)", what, "on" if proven else "off", error)
        return proven

    def _pad(self, batch: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
        width = max(1, max(len(ids) for ids in batch))
        input_ids = np.full((len(batch), width), self._pad_id, dtype=np.int64)
        mask = np.zeros((len(batch), width), dtype=np.int64)
        for row, ids in enumerate(batch):
            cols = slice(width - len(ids), width) if self._left_pad else slice(0, len(ids))
            input_ids[row, cols] = ids
            mask[row, cols] = 1
        return (
            torch.from_numpy(input_ids).to(self.device),
            torch.from_numpy(mask).to(self.device),
        )

    def _check_against_tokenizer(self) -> None:
        """Refuse a tokenizer for which our split path differs from its own truncating call:
        served ids must be exactly the reference's."""
        probes = [_PROBE_TEXT]
        if self.settings.max_seq_length <= _PROBE_LIMIT:
            probes.append(_PROBE_TEXT * (self.settings.max_seq_length // 4 + 2))
        ours = [item.ids for item in self.tokenize(probes)]
        limit = self.settings.max_seq_length
        reference = self.tokenizer(
            probes, truncation="longest_first", max_length=limit, verbose=False
        )["input_ids"]
        if ours != [list(ids) for ids in reference]:
            raise UnsupportedModelError(
                f"tokenizer {type(self.tokenizer).__name__}: split tokenization differs from "
                "the tokenizer's own truncation"
            )


def _plain_copy(tokenizer: PreTrainedTokenizerBase) -> Any:
    """A copy of a fast tokenizer's Rust tokenizer with no truncation or padding set
    (the Hugging Face wrapper sets those per call on its own), or None if not fast."""
    if not getattr(tokenizer, "is_fast", False):
        return None
    from tokenizers import Tokenizer

    copy = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    copy.no_truncation()
    copy.no_padding()
    return copy


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _loader_kwargs(config: dict[str, Any], *keys: str) -> dict[str, Any]:
    """Extra loader arguments a sentence_bert_config.json carries (new or legacy key)."""
    for key in keys:
        if isinstance(config.get(key), dict):
            return {k: v for k, v in config[key].items() if k not in _HUB_KEYS}
    return {}


def _max_seq_length(
    config: dict[str, Any], tokenizer_kwargs: dict[str, Any], tokenizer: Any, model_config: Any
) -> int:
    """sentence-transformers' precedence: tokenizer kwargs' model_max_length, then the config's
    max_seq_length, else the tokenizer limit capped at max_position_embeddings."""
    if "model_max_length" in tokenizer_kwargs:
        return int(tokenizer.model_max_length)
    if config.get("max_seq_length") is not None:
        return int(config["max_seq_length"])
    limit = int(tokenizer.model_max_length)
    positions = getattr(model_config, "max_position_embeddings", None)
    if positions is not None and positions != -1:  # -1: no limit (xlnet)
        limit = min(limit, int(positions))
    return limit


def _add_lowercasing(tokenizer: Any) -> None:
    """do_lower_case the way sentence-transformers 6.2 does it: a Lowercase normalizer put first
    in the fast tokenizer (not str.lower() in Python, which differs for some characters)."""
    from tokenizers.normalizers import Lowercase
    from tokenizers.normalizers import Sequence as NormalizerSequence

    if not tokenizer.is_fast:
        try:
            tokenizer.do_lower_case = True
        except AttributeError:
            tokenizer.basic_tokenizer.do_lower_case = True
        return
    backend = tokenizer.backend_tokenizer
    current = backend.normalizer
    parts = list(current) if isinstance(current, NormalizerSequence) else [current]
    if any(isinstance(part, Lowercase) for part in parts):
        return
    backend.normalizer = NormalizerSequence([Lowercase(), *(p for p in parts if p is not None)])
