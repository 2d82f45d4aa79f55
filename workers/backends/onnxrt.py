"""The ``onnx`` and ``onnx-int8`` backends: the encoder's forward on ONNX Runtime (CPU).

The Hugging Face encoder is exported once per model fingerprint with torch's TorchScript-based
exporter (works offline, needs only the ``onnx`` package; the dynamo exporter would also need
``onnxscript``) and cached under ``<cache>/onnx/<fingerprint>/model.onnx``, where ``<cache>`` is
``$EMBEDQ_CACHE_DIR``, else ``$XDG_CACHE_HOME/embedq``, else ``~/.cache/embedq``. A fresh export
is checked against the torch forward before it is used. ``onnx-int8`` then applies ONNX Runtime's
dynamic quantization (int8 weights per channel) to the weight MatMuls, all but the first FFN
down-projection, as torch-int8 does (see quantized.py).

Only the Transformer forward runs here: tokenisation, pooling and normalisation are unchanged.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from embedq.settings import SETTINGS

from .quantized import first_down_projection

logger = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
OPSET = 17  # LayerNormalization is a single op from 17 on
# A fresh export must reproduce the torch token embeddings this closely on a padded probe batch.
EXPORT_TOLERANCE = 1e-3
_PREFIX = "encoder"  # attribute of _Wrapped holding the HF model: ONNX node names start with it


def cache_root() -> Path:
    explicit = SETTINGS["cache_dir"].raw()
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "embedq"


class OnnxModel:
    """Stands in for the Hugging Face module inside Transformer: same keyword inputs (torch
    tensors), returns ``(last_hidden_state,)``; ``config`` is the original model's."""

    def __init__(self, path: Path, config: Any) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # as many threads as torch
        options.inter_op_num_threads = 1
        # Idle threads sleep instead of spinning: the server and Redis share these cores
        # (2-core bench: +3-5% throughput, p99 single-text latency 13.5 -> 8.8 ms).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [item.name for item in self.session.get_inputs()]
        self.config = config
        self.path = path

    def __call__(self, **inputs: torch.Tensor) -> tuple[torch.Tensor]:
        feeds = {name: inputs[name].numpy() for name in self.input_names}
        (hidden,) = self.session.run(None, feeds)
        return (torch.from_numpy(hidden),)


def load_onnx_model(
    model: torch.nn.Module, input_names: Sequence[str], fingerprint: str, int8: bool
) -> OnnxModel:
    """The cached export for ``fingerprint`` (exported from ``model`` on first use)."""
    folder = cache_root() / "onnx" / fingerprint
    path = folder / MODEL_FILE
    if not path.is_file():
        logger.info("exporting the encoder to ONNX%s (once): %s", " int8" if int8 else "", folder)
        _build(model, list(input_names), folder, int8)
    return OnnxModel(path, model.config)


class _Wrapped(torch.nn.Module):
    """Positional inputs in, last_hidden_state out: the graph we export."""

    def __init__(self, model: torch.nn.Module, input_names: list[str]) -> None:
        super().__init__()
        self.encoder = model
        self.input_names = input_names

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        output = self.encoder(**dict(zip(self.input_names, tensors, strict=True)))
        hidden = getattr(output, "last_hidden_state", None)
        return output[0] if hidden is None else hidden


def _build(model: torch.nn.Module, input_names: list[str], folder: Path, int8: bool) -> None:
    """Export (and quantize) into a temporary folder, then rename it into place: concurrent
    workers never see a half-written file, and the first one to finish wins."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        exported = work / ("float32.onnx" if int8 else MODEL_FILE)
        _export(model, input_names, exported)
        _check_export(model, input_names, exported)
        if int8:
            _quantize(model, exported, work / MODEL_FILE)
            exported.unlink()
        try:
            work.rename(folder)
        except OSError:  # another process got there first: keep theirs
            if not (folder / MODEL_FILE).is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _batch(input_names: list[str], lengths: list[int], vocab: int) -> tuple[torch.Tensor, ...]:
    """A right-padded batch of token ids below ``vocab`` with these lengths. Ragged on purpose:
    tracing with an all-ones mask could let the model skip masking altogether."""
    width = max(lengths)
    ids = (torch.arange(len(lengths) * width).view(len(lengths), width) * 7919 + 5) % vocab
    mask = (torch.arange(width) < torch.tensor(lengths).view(-1, 1)).long()
    values = {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": 0 * ids}
    return tuple(values[name] for name in input_names)


def _export(model: torch.nn.Module, input_names: list[str], path: Path) -> None:
    axes = {name: {0: "batch", 1: "sequence"} for name in [*input_names, "token_embeddings"]}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer and legacy-exporter warnings: checked below
        torch.onnx.export(
            _Wrapped(model, input_names).eval(),
            _batch(input_names, [6, 3], _vocab(model)),
            str(path),
            dynamo=False,
            input_names=input_names,
            output_names=["token_embeddings"],
            dynamic_axes=axes,
            opset_version=OPSET,
            do_constant_folding=True,
        )


def _check_export(model: torch.nn.Module, input_names: list[str], path: Path) -> None:
    """The exported graph against the torch forward on a batch of another shape."""
    import onnxruntime as ort

    inputs = _batch(input_names, [11, 4, 7], _vocab(model))
    with torch.no_grad():
        expected = _Wrapped(model, input_names)(*inputs).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    values = dict(zip(input_names, inputs, strict=True))
    feeds = {item.name: values[item.name].numpy() for item in session.get_inputs()}
    (got,) = session.run(None, feeds)
    mask = values["attention_mask"].numpy()[..., None]
    diff = float((np.abs(got - expected) * mask).max())
    if not diff <= EXPORT_TOLERANCE:
        raise RuntimeError(
            f"ONNX export of {type(model).__name__} differs from torch by {diff:.2g} "
            f"(> {EXPORT_TOLERANCE}) on a padded batch; use --backend torch"
        )


def _vocab(model: torch.nn.Module) -> int:
    return int(getattr(model.config, "vocab_size", None) or 100)


def _quantize(model: torch.nn.Module, source: Path, target: Path) -> None:
    """ONNX Runtime dynamic int8 on the weight MatMuls (not attention's activation MatMuls)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(source), load_external_data=False).graph
    weights = {item.name for item in graph.initializer}
    keep = first_down_projection(model)
    keep_node = f"{_PREFIX}.{keep}.MatMul" if keep else None
    weight_matmuls = [
        node.name
        for node in graph.node
        if node.op_type == "MatMul" and any(name in weights for name in node.input)
    ]
    # Node "/encoder/encoder/layer.0/output/dense/MatMul" is module "encoder.layer.0.output.dense".
    nodes = [name for name in weight_matmuls if name.strip("/").replace("/", ".") != keep_node]
    if keep_node and len(nodes) == len(weight_matmuls):
        logger.warning("onnx-int8: no MatMul named %s in the export; quantizing all", keep_node)
    quiet = logging.getLogger()  # quantize_dynamic logs "consider pre-processing" on root
    level = quiet.level
    quiet.setLevel(max(level, logging.ERROR))
    try:
        quantize_dynamic(
            str(source),
            str(target),
            weight_type=QuantType.QInt8,
            per_channel=True,
            nodes_to_quantize=nodes,
        )
    finally:
        quiet.setLevel(level)
