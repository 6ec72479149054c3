"""What the student (or teacher) looks like before it is loaded: depth and width from its folder's
config.json, from ``base`` or from its source's header, and its architecture on the meta device (no
weights), for the checks that must run before the first node."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from pilot.config import BaseParams, validate
from pilot.framework.outputs import dataset_config
from pilot.models import build_causal_lm, resolve_source, source_num_layers


def config_json(catalog, dataset_name: str, filename: str) -> dict | None:
    """A JSON file inside a folder dataset, read without loading the dataset (None if absent)."""
    try:
        path = Path(dataset_config(catalog, dataset_name)["path"]) / filename
    except Exception:  # no such entry in this catalog, or not a folder dataset
        return None
    return json.loads(path.read_text()) if path.is_file() else None


LAYER_KEYS, WIDTH_KEYS = ("num_hidden_layers", "n_layer", "num_layers"), ("hidden_size", "n_embd", "d_model")


def source_hidden_size(source: str) -> int | None:
    """The hidden size of a model source, from its config.json or its GGUF header (no weights loaded)."""
    path = resolve_source(source)
    if path.is_dir():
        config = json.loads((path / "config.json").read_text())
        return next((int(config[key]) for key in WIDTH_KEYS if key in config), None)
    from gguf import GGUFReader

    reader = GGUFReader(path)
    architecture = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    field = reader.fields.get(f"{architecture}.embedding_length")
    return int(field.parts[-1][0]) if field is not None else None


def student_shape(catalog, params: dict[str, Any], role: str = "student") -> tuple[int, int | None] | None:
    """The (decoder-layer count, hidden size) of the student (or ``role``): from its config.json if it
    exists, else from ``base`` (the configured size, or the source model's header); None when neither says."""
    config = config_json(catalog, f"{role}_model", "config.json")
    if config is not None:
        layers = next((int(config[key]) for key in LAYER_KEYS if key in config), None)
        if layers is not None:
            return layers, next((int(config[key]) for key in WIDTH_KEYS if key in config), None)
    if "base" in params:
        student = getattr(validate(BaseParams, params["base"], "base"), role)
        if student.source:
            return source_num_layers(student.source), source_hidden_size(student.source)
        return student.num_layers, student.hidden_size
    return None


class _VocabularyOfSize(list):
    """Stands in for a tokenizer where only the model's shape matters (:func:`student_on_meta`)."""

    pad_token_id = eos_token_id = 0


def student_on_meta(catalog, params: dict[str, Any]) -> torch.nn.Module | None:
    """The student's architecture without weights (on the meta device: no memory, no compute), from its
    folder's config.json or, for one trained here, from ``base``; None for a source not imported yet."""
    config = config_json(catalog, "student_model", "config.json")
    with torch.device("meta"):
        if config is not None:
            from transformers import AutoConfig, AutoModelForCausalLM

            folder = Path(dataset_config(catalog, "student_model")["path"])
            return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
        student = validate(BaseParams, params["base"], "base").student if "base" in params else None
        if student is None or not student.trained_here:
            return None
        vocabulary = _VocabularyOfSize(range(validate(BaseParams, params["base"], "base").tokenizer.vocab_size))
        return build_causal_lm(vocabulary, family=student.family, hidden_size=student.hidden_size,
                               num_layers=student.num_layers, num_heads=student.num_heads,
                               intermediate_size=student.intermediate_size, max_positions=student.max_positions).model
