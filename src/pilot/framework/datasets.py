"""Catalog dataset types for the project's own artefacts, all in safe formats.

Models and tokenizers are ``save_pretrained`` folders, tensors are safetensors, tables are
parquet, configs are JSON. Nothing is pickled.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd
from kedro.io import AbstractDataset, DatasetError

from pilot import distributed, tracking
from pilot.artifacts import CHECKSUMS, atomic_folder
from pilot.guidance import HyperNetwork
from pilot.latents import CacheManifest, LatentCache, LatentShard, save_chunk, shard_fingerprints
from pilot.methods.registry import trained_baselines
from pilot.methods.trained import TrainedBaseline
from pilot.models import CausalLM, PretrainedModelRef, load_causal_lm

logger = logging.getLogger(__name__)


class _FolderDataset(AbstractDataset):
    def __init__(self, path: str, producer: str | None = None, metadata: dict[str, Any] | None = None) -> None:
        self._path = Path(path)
        self._rebuild = f"kedro run --pipelines {producer}" if producer else "rerun the pipeline that writes it"
        self.metadata = metadata

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path)}


class CausalLMDataset(_FolderDataset):
    """A Hugging Face causal LM folder (model + tokenizer), loaded with ``from_pretrained``.

    ``pretrained: true`` marks a model this project must never overwrite (a local Hugging Face
    model configured in place of the embedded default): saving anything but the ``base``
    pipeline's :class:`PretrainedModelRef` to it is an error.
    """

    def __init__(self, path: str, pretrained: bool = False, device: str = "cpu", dtype: str = "float32",
                 metadata: dict[str, Any] | None = None) -> None:
        super().__init__(path, metadata=metadata)
        self._pretrained, self._device, self._dtype = pretrained, device, dtype

    def _load(self) -> CausalLM:
        # The embedded models carry the checksums CausalLM.save wrote; a pretrained model is read as it is.
        return load_causal_lm(self._path, device=self._device, dtype=self._dtype, verify=not self._pretrained)

    def _save(self, data: CausalLM | PretrainedModelRef) -> None:
        if isinstance(data, PretrainedModelRef):
            if not (self._path / "config.json").is_file():
                raise DatasetError(f"The {data.role} is configured as pretrained, but '{self._path}' holds no "
                                   "Hugging Face model (no config.json); fix models.{role}.path in globals.yml.")
            logger.info("The %s is the pretrained model at %s: kept as it is.", data.role, self._path)
            return
        if self._pretrained:
            raise DatasetError(f"Refusing to overwrite the pretrained model at '{self._path}'.")
        data.save(self._path)

    def _exists(self) -> bool:
        return (self._path / "config.json").is_file()

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path), "pretrained": self._pretrained, "device": self._device}


class HyperNetworkDataset(_FolderDataset):
    """``hypernet.safetensors`` + ``hypernet_config.json``; once saved, also logged as artifacts of
    the active MLflow run, under the folder's name (``hypernet_stage1/``), for download elsewhere."""

    def _load(self) -> HyperNetwork:
        return HyperNetwork.load(self._path, rebuild=self._rebuild)

    def _save(self, data: HyperNetwork) -> None:
        data.save(self._path)
        tracking.log_folder(self._path)

    def _exists(self) -> bool:
        return (self._path / "hypernet.safetensors").is_file()


class LatentCacheDataset(_FolderDataset):
    """Sharded safetensors with a manifest, saved chunk by chunk as the ``latents`` node yields them:
    each :class:`~pilot.latents.LatentShard` is written atomically, the closing
    :class:`~pilot.latents.CacheManifest` completes the cache.

    Under the data-parallel launcher (:mod:`pilot.framework.launch`) every rank keeps this dataset
    (``main_rank_writes``; other outputs stay in memory off rank 0): the node sends every rank's shards
    to rank 0, only rank 0 writes, and the others read the folder once the node's closing barrier says
    the manifest is there (:func:`pilot.latents.cache_chunks`)."""

    main_rank_writes = True

    def _load(self) -> LatentCache:
        return LatentCache(self._path)

    def _save(self, data: LatentShard | CacheManifest) -> None:
        if distributed.is_main_process():
            save_chunk(self._path, data)

    def _exists(self) -> bool:
        return (self._path / "manifest.json").is_file()


class LatentShardsDataset(_FolderDataset):
    """What a latent-cache folder already holds: ``{shard index: fingerprint}`` (``None`` for a
    corrupt shard), read-only. Lets the ``latents`` node skip shards that are already built."""

    def _load(self) -> dict[int, str | None]:
        return shard_fingerprints(self._path) if self._path.is_dir() else {}

    def _save(self, data) -> None:
        raise DatasetError("latent_cache_shards is read-only: the latents node writes `latent_cache`.")

    def _exists(self) -> bool:
        return True


class TrainedBaselineDataset(_FolderDataset):
    """A trained baseline's artefact (LoRA's adapter, ReFT's interventions, soft tokens, one of your own),
    saved and loaded by its method class (:class:`~pilot.methods.trained.TrainedBaseline`): a folder of
    safetensors and JSON with checksums, nothing pickled. ``baseline`` names the registered method."""

    def __init__(self, baseline: str, path: str, producer: str | None = None,
                 metadata: dict[str, Any] | None = None) -> None:
        super().__init__(path, producer, metadata)
        self._baseline = baseline

    def _method(self) -> type[TrainedBaseline]:
        trained = {method.name: method for method in trained_baselines()}
        if self._baseline not in trained:
            raise DatasetError(f"'{self._path}' belongs to trained baseline '{self._baseline}', which is not registered "
                               f"(trained baselines: {', '.join(trained)}); add it to pilot.methods.registry.COMPARED.")
        return trained[self._baseline]

    def _load(self) -> Any:
        return self._method().load_artefact(self._path, self._rebuild)

    def _save(self, data: Any) -> None:
        self._method().save_artefact(data, self._path)

    def _exists(self) -> bool:
        return (self._path / CHECKSUMS).is_file()   # written last: the folder is whole

    def _describe(self) -> dict[str, Any]:
        return {"baseline": self._baseline, "path": str(self._path)}


class MlflowHistoryDataset(AbstractDataset):
    """A per-step history table: saved as parquet first, then logged as MLflow metric histories.

    Every numeric column becomes a metric named ``<prefix><column>`` with the ``step`` column as
    its step, logged in batches. Without an active MLflow run only the parquet file is written.
    """

    def __init__(self, filepath: str, prefix: str = "", metadata: dict[str, Any] | None = None) -> None:
        self._filepath = Path(filepath)
        self._prefix = prefix
        self.metadata = metadata

    def _load(self) -> pd.DataFrame:
        return pd.read_parquet(self._filepath)

    def _save(self, data: pd.DataFrame) -> None:
        self._filepath.parent.mkdir(parents=True, exist_ok=True)
        data.to_parquet(self._filepath, index=False)
        tracking.log_history(data, prefix=self._prefix)

    def _exists(self) -> bool:
        return self._filepath.is_file()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath), "prefix": self._prefix}


class OptionalJSONDataset(AbstractDataset):
    """A small JSON document that may not exist yet: loads as ``{}`` until something saves it.

    Used for ``tuned_loss_weights``, which stage 1 reads only when told to
    (``stage1.use_tuned_weights``) and which exists only after the ``tune`` pipeline ran.
    """

    def __init__(self, filepath: str, metadata: dict[str, Any] | None = None) -> None:
        self._filepath = Path(filepath)
        self.metadata = metadata

    def _load(self) -> dict:
        return json.loads(self._filepath.read_text()) if self._filepath.is_file() else {}

    def _save(self, data: dict) -> None:
        self._filepath.parent.mkdir(parents=True, exist_ok=True)
        self._filepath.write_text(json.dumps(data, indent=2, sort_keys=True))

    def _exists(self) -> bool:
        return True

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath)}


class TokenizerDataset(_FolderDataset):
    """A transformers tokenizer folder (``save_pretrained``)."""

    NOT_TRAINED = "not_trained.json"  # written instead when every model is pretrained

    def _load(self):
        from transformers import AutoTokenizer

        if (self._path / self.NOT_TRAINED).is_file():
            return None
        return AutoTokenizer.from_pretrained(self._path, local_files_only=True)

    def _save(self, data) -> None:
        if isinstance(data, PretrainedModelRef):
            with atomic_folder(self._path) as folder:
                (folder / self.NOT_TRAINED).write_text(json.dumps({"reason": "every model is pretrained"}))
            return
        (self._path / self.NOT_TRAINED).unlink(missing_ok=True)
        data.save_pretrained(self._path)

    def _exists(self) -> bool:
        return (self._path / "tokenizer_config.json").is_file() or (self._path / self.NOT_TRAINED).is_file()
