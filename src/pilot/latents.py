"""The latent-state cache: the plan-conditioned trajectories stage 1 imitates.

One frozen student forward pass per example with the kept plan in context, teacher-forced on
the gold answer, records the hidden states at the alignment layers at the answer positions.
A second, plan-free pass records what the hyper-network reads (the query's token states at
``read_layer``) and the plan-free states at the injection layer (for the CAA steering vector).
With ``latents.frozen_prefix`` the same plan-free pass also records the *frozen prefix*
(:mod:`pilot.guidance.prefix`): what guidance cannot change, so each stage-1 step runs only the
blocks above the lowest guided layer, over the answer positions.

On disk: ``shard-00000.safetensors`` ... plus ``manifest.json``. Every shard carries in its
safetensors header the cache fingerprint (student weights, tokenizer, examples, settings) and
a sha256 of its tensors, so a truncated, corrupted or stale shard is detected on its own. The
manifest carries a sha256 of its own fields, and each shard's header its index, which must be its
place in the manifest: an edited manifest or a shard file copied over another is refused on load.

Building is a stream of chunks (:func:`cache_chunks`): one :class:`LatentShard` per shard
still to compute, then the :class:`CacheManifest`. The ``latents`` node yields them and the
catalog's dataset writes each as it comes (Kedro's chunked-output pattern), so memory holds one
shard at a time; shards already on disk with the right fingerprint are skipped, so an
interrupted build computes only the missing ones next time. :func:`write_cache` runs the same
stream without Kedro.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from safetensors.torch import save_file
from tqdm.auto import tqdm

from pilot import distributed
from pilot.config import GuidanceParams, LatentsParams
from pilot.guidance.prefix import FrozenPrefix, check_prefix_support, frozen_prefix, prefix_rows, stack_prefix
from pilot.interventions import capture_layers
from pilot.models import CausalLM, lm_fingerprint
from pilot.prompts import prompt_format
from pilot.runtime import share_cores
from pilot.sequences import IGNORE_INDEX, encode_pairs, lengths_to_mask
from pilot.tasks import reply_targets

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"


class StaleCacheError(RuntimeError):
    pass


class CorruptCacheError(RuntimeError):
    pass


@dataclass(frozen=True)
class CacheSettings:
    read_layer: int
    inject_layer: int
    align_layers: tuple[int, ...]
    shard_size: int = 256
    batch_size: int = 64
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    prefix_site: int | None = None          # the lowest guided layer whose frozen prefix is cached (None: none)

    def fingerprint_dict(self) -> dict:
        # batch_size changes nothing stored, so it is not part of the fingerprint.
        settings = asdict(self)
        settings.pop("batch_size")
        settings["align_layers"] = list(self.align_layers)
        return settings


def examples_fingerprint(ids: Sequence[str], questions: Sequence[str], plans: Sequence[str],
                         answers: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for row in zip(ids, questions, plans, answers):
        digest.update("\x1f".join(row).encode())
        digest.update(b"\x1e")
    return digest.hexdigest()[:16]


def cache_fingerprint(model_fingerprint: str, data_fingerprint: str, settings: CacheSettings) -> str:
    payload = json.dumps({"model": model_fingerprint, "data": data_fingerprint,
                          "settings": settings.fingerprint_dict()}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _pad_stack(rows: list[torch.Tensor], length: int) -> torch.Tensor:
    out = rows[0].new_zeros((len(rows), length, *rows[0].shape[1:]))
    for i, row in enumerate(rows):
        out[i, : row.shape[0]] = row
    return out


@dataclass
class LatentCacheBuild:
    """What the cache must hold for one student, set of kept plans and guidance site, and how to
    compute any of its rows (frozen forward passes)."""

    student: CausalLM
    ids: list[str]
    questions: list[str]
    plans: list[str]
    answers: list[str]
    settings: CacheSettings
    fingerprint: str

    @property
    def num_examples(self) -> int:
        return len(self.ids)

    @property
    def num_shards(self) -> int:
        return max(1, -(-self.num_examples // self.settings.shard_size))

    def shard_range(self, shard: int) -> range:
        size = self.settings.shard_size
        return range(shard * size, min(self.num_examples, (shard + 1) * size))

    def compute_shard(self, shard: int, progress: tqdm | None = None) -> dict[str, torch.Tensor]:
        return self.compute_rows(list(self.shard_range(shard)), progress)

    @torch.no_grad()
    def compute_rows(self, rows: list[int], progress: tqdm | None = None) -> dict[str, torch.Tensor]:
        """The cached tensors for these example rows, from frozen forward passes of the student."""
        s = self.settings
        model, tokenizer = self.student.model, self.student.tokenizer
        dtype = getattr(torch, s.dtype)
        query, targets, free_inject, plan_inject, free_rms, answer_lengths, prefixes = [], [], [], [], [], [], []
        with_prefix = s.prefix_site is not None
        if with_prefix:
            check_prefix_support(model)
        for start in range(0, len(rows), s.batch_size):
            share_cores()
            chunk = rows[start:start + s.batch_size]
            fmt = prompt_format(tokenizer)
            answers = [fmt.answer_target(self.answers[i]) for i in chunk]
            free = encode_pairs(tokenizer, [fmt.answer_prompt(self.questions[i]) for i in chunk], answers)
            planned = encode_pairs(tokenizer, [fmt.answer_prompt(self.questions[i], self.plans[i]) for i in chunk],
                                   answers)
            device = self.student.device  # only the captured states are read: one logits row each
            free_layers = [s.read_layer, s.inject_layer, *([s.prefix_site] if with_prefix else [])]
            with capture_layers(model, free_layers) as free_states:
                out = model(input_ids=free.input_ids.to(device), attention_mask=free.attention_mask.to(device),
                            logits_to_keep=1, use_cache=with_prefix)
            if with_prefix:  # what guidance cannot change, from the same plan-free pass
                prefixes.extend(prefix_rows(free, out.past_key_values, free_states[s.prefix_site], s.prefix_site))
            with capture_layers(model, [s.inject_layer, *s.align_layers]) as plan_states:
                model(input_ids=planned.input_ids.to(device), attention_mask=planned.attention_mask.to(device),
                      logits_to_keep=1)
            free_answer, plan_answer = free.answer_position_mask(), planned.answer_position_mask()
            query_mask = free.query_mask()
            for j in range(len(chunk)):
                query.append(free_states[s.read_layer][j][query_mask[j]].cpu())
                aligned = torch.stack([plan_states[layer][j][plan_answer[j]] for layer in s.align_layers])
                targets.append(aligned.transpose(0, 1).cpu())  # (Ta, n_layers, d)
                free_at_inject = free_states[s.inject_layer][j][free_answer[j]]
                free_inject.append(free_at_inject.mean(0).cpu())
                free_rms.append(free_at_inject.pow(2).mean(-1).sqrt().mean().cpu())
                plan_inject.append(plan_states[s.inject_layer][j][plan_answer[j]].mean(0).cpu())
                answer_lengths.append(int(free_answer[j].sum()))
            if progress is not None:
                progress.update(len(chunk))
        query_lengths = [q.shape[0] for q in query]
        prefix = {}
        if with_prefix:
            prefix = {name: t.to(dtype) if t.is_floating_point() else t for name, t in stack_prefix(prefixes).items()}
        return {**prefix,
            "row_index": torch.tensor(rows, dtype=torch.int64),
            "query_states": _pad_stack(query, max(query_lengths)).to(dtype),
            "query_lengths": torch.tensor(query_lengths, dtype=torch.int64),
            "target_states": _pad_stack(targets, max(answer_lengths)).to(dtype),
            "answer_lengths": torch.tensor(answer_lengths, dtype=torch.int64),
            "inject_free_mean": torch.stack(free_inject).to(dtype),
            "inject_plan_mean": torch.stack(plan_inject).to(dtype),
            "inject_free_rms": torch.stack(free_rms).float(),
        }


def _shard_path(directory: Path, shard: int) -> Path:
    return directory / f"shard-{shard:05d}.safetensors"


def _read_verified(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A shard's tensors and header metadata, its checksum verified."""
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as error:  # truncated headers/data raise safetensors' own errors
        raise CorruptCacheError(
            f"Latent shard '{path}' is unreadable ({error}); rebuild it with `kedro run --pipelines latents`."
        ) from error
    if metadata.get("sha256") != _tensor_digest(tensors):
        raise CorruptCacheError(
            f"Latent shard '{path}' failed its checksum; rebuild it with `kedro run --pipelines latents`."
        )
    return tensors, metadata


def read_shard(path: Path, expected_fingerprint: str | None = None,
               expected_index: int | None = None) -> dict[str, torch.Tensor]:
    """Load and verify one shard: readable, checksum intact, and (if given) the right fingerprint
    and the right place in the cache (the index in its header), so a shard file moved or copied
    over another is refused."""
    tensors, metadata = _read_verified(path)
    if expected_fingerprint is not None and metadata.get("fingerprint") != expected_fingerprint:
        raise StaleCacheError(
            f"Latent shard '{path}' was built for other inputs (fingerprint {metadata.get('fingerprint')} "
            f"!= {expected_fingerprint}); rebuild with `kedro run --pipelines latents`."
        )
    if expected_index is not None and metadata.get("shard") != str(expected_index):
        raise CorruptCacheError(
            f"Latent shard '{path}' is shard {metadata.get('shard')} of its cache, not shard {expected_index} (its "
            f"place in {MANIFEST}): a shard file was moved or copied over another; rebuild with "
            "`kedro run --pipelines latents`."
        )
    return tensors


def _header_fingerprint(path: Path) -> str | None:
    try:
        with safe_open(path, framework="pt") as handle:
            return (handle.metadata() or {}).get("fingerprint")
    except Exception:
        return None


def shard_fingerprints(directory: str | Path) -> dict[int, str | None]:
    """What a cache folder holds: each shard's fingerprint, ``None`` for a corrupt one (checksums read)
    or one whose header names another index (a file moved or copied over another)."""
    found = {}
    for path in sorted(Path(directory).glob("shard-*.safetensors")):
        index = int(path.stem.split("-")[1])
        try:
            metadata = _read_verified(path)[1]
        except CorruptCacheError as error:
            logger.warning("%s Recomputing it.", error)
            found[index] = None
            continue
        if metadata.get("shard") != str(index):  # a shard file moved or copied over another
            logger.warning("Latent shard '%s' is shard %s of its cache, not shard %d; recomputing it.", path,
                           metadata.get("shard"), index)
            found[index] = None
        else:
            found[index] = metadata.get("fingerprint")
    return found


@dataclass
class LatentShard:
    """One computed shard of the cache: a chunk of the ``latents`` node's output."""

    index: int
    fingerprint: str
    tensors: dict[str, torch.Tensor]


@dataclass
class CacheManifest:
    """The last chunk of a build: what the complete cache holds and how it was built."""

    fingerprint: str
    num_examples: int
    ids: list[str]
    settings: dict
    num_shards: int
    computed_shards: int
    reused_shards: int
    build_seconds: float
    examples_per_second: float | None


def cache_chunks(build: LatentCacheBuild, on_disk: dict[int, str | None],
                 on_stale: Literal["rebuild", "error"] = "rebuild") -> Iterator[LatentShard | CacheManifest]:
    """Compute the shards of ``build`` not already ``on_disk`` with its fingerprint, one at a time,
    then the manifest.

    Shards on disk built for other inputs are recomputed (``on_stale="rebuild"``) or stop the
    build (``"error"``); corrupt ones are always recomputed.

    With data-parallel processes (:mod:`pilot.distributed`) rank 0's ``on_disk`` decides what is
    missing, the shards to compute are dealt round-robin (the i-th missing shard to rank ``i mod N``)
    and each computed shard is sent to rank 0, which yields every shard, one process's tensors; the
    other ranks yield only the manifest (for the catalog's ``latent_cache`` only rank 0 writes). The
    stream ends with a barrier once the manifest is saved (the consumer saves a chunk before asking for
    the next), so no rank reads the cache before it is complete.
    """
    ranks = distributed.world()
    on_disk = distributed.broadcast_object_from_main(on_disk)
    stale = sorted(i for i, fingerprint in on_disk.items() if fingerprint not in (build.fingerprint, None))
    if stale:
        if on_stale == "error":
            raise StaleCacheError(
                f"The latent cache holds {len(stale)} shards built for other inputs; rerun with "
                "`--params latents.on_stale=rebuild` or delete the folder."
            )
        if ranks.is_main:
            logger.warning("The latent cache is stale (%d shards built for other inputs); rebuilding it.", len(stale))
    todo = [shard for shard in range(build.num_shards) if on_disk.get(shard) != build.fingerprint]
    examples_todo = sum(len(build.shard_range(s)) for s in todo)
    mine = todo[ranks.rank::ranks.size]
    started = time.perf_counter()
    with tqdm(total=sum(len(build.shard_range(s)) for s in mine), desc="latent cache", unit="ex",
              dynamic_ncols=True) as bar:
        for first in range(0, len(todo), ranks.size):   # one round: one shard per rank
            turn = first + ranks.rank
            shard = LatentShard(todo[turn], build.fingerprint, build.compute_shard(todo[turn], progress=bar)) \
                if turn < len(todo) else None
            if not ranks.parallel:
                yield shard
                continue
            received = distributed.gather_to_main(_shard_bytes(shard) if shard is not None else None)
            for payload in received or []:   # rank 0 only
                if payload is not None:
                    yield _shard_from_bytes(payload)
    seconds = time.perf_counter() - started
    yield CacheManifest(
        fingerprint=build.fingerprint, num_examples=build.num_examples, ids=build.ids,
        settings=build.settings.fingerprint_dict(), num_shards=build.num_shards, computed_shards=len(todo),
        reused_shards=build.num_shards - len(todo), build_seconds=round(seconds, 3),
        examples_per_second=round(examples_todo / seconds, 2) if examples_todo and seconds > 0 else None,
    )
    distributed.barrier()   # rank 0's manifest is on disk: every rank may read the cache


def _shard_bytes(shard: LatentShard) -> tuple[int, str, bytes]:
    """A computed shard for the wire to rank 0: its tensors as safetensors bytes (no pickled tensors)."""
    return shard.index, shard.fingerprint, save_tensors(shard.tensors)


def _shard_from_bytes(payload: tuple[int, str, bytes]) -> LatentShard:
    index, fingerprint, tensors = payload
    return LatentShard(index, fingerprint, load_tensors(tensors))


def write_shard(directory: str | Path, shard: LatentShard) -> None:
    """Write one shard atomically (temp file + rename); a manifest of another build is withdrawn first."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    manifest = directory / MANIFEST
    try:
        other_build = manifest.is_file() and json.loads(manifest.read_text()).get("fingerprint") != shard.fingerprint
    except ValueError:  # an unreadable manifest describes no complete cache either
        other_build = True
    if other_build:
        manifest.unlink()  # the folder no longer holds that complete cache
    metadata = {"fingerprint": shard.fingerprint, "shard": str(shard.index), "sha256": _tensor_digest(shard.tensors)}
    final = _shard_path(directory, shard.index)
    tmp = directory / f".{final.name}.tmp-{os.getpid()}"
    save_file(shard.tensors, tmp, metadata=metadata)
    os.replace(tmp, final)


MANIFEST_CHECKSUM = "manifest_sha256"  # the manifest's own checksum, over every other field


def _manifest_digest(record: dict) -> str:
    fields = {key: value for key, value in record.items() if key != MANIFEST_CHECKSUM}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def read_manifest(path: str | Path) -> dict:
    """A cache's ``manifest.json``, its own checksum verified: any change to it (a shard's name, an
    id, a count) is an error naming the file, never a cache read in another order."""
    path = Path(path)
    rebuild = "rebuild it with `kedro run --pipelines latents` (it reuses the shards that are intact)"
    try:
        record = json.loads(path.read_text())
    except ValueError as error:
        raise CorruptCacheError(f"Latent cache manifest '{path}' is unreadable ({error}); {rebuild}.") from None
    if not isinstance(record, dict) or MANIFEST_CHECKSUM not in record:
        raise CorruptCacheError(f"Latent cache manifest '{path}' has no checksum (written by an older version or "
                                f"by hand); {rebuild}.")
    if record[MANIFEST_CHECKSUM] != _manifest_digest(record):
        raise CorruptCacheError(f"Latent cache manifest '{path}' does not match its checksum (changed since it was "
                                f"written); {rebuild}.")
    return record


def write_manifest(directory: str | Path, manifest: CacheManifest) -> dict:
    """Complete the cache: drop shards beyond the build, check every shard is there, write ``manifest.json``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for path in directory.glob("shard-*.safetensors"):
        if int(path.stem.split("-")[1]) >= manifest.num_shards:
            path.unlink()
    shards = [_shard_path(directory, s) for s in range(manifest.num_shards)]
    missing = [p.name for p in shards if _header_fingerprint(p) != manifest.fingerprint]
    if missing:
        raise CorruptCacheError(f"Latent cache '{directory}' lacks shards {missing} of this build; rerun "
                                "`kedro run --pipelines latents`.")
    record = {**asdict(manifest), "shards": [p.name for p in shards], "bytes": sum(p.stat().st_size for p in shards)}
    record.pop("num_shards")
    record[MANIFEST_CHECKSUM] = _manifest_digest(record)
    (directory / MANIFEST).write_text(json.dumps(record, indent=1))
    logger.info("Latent cache %s: %d examples in %d shards (%d computed, %d reused), %.1f MiB, %.1f ex/s",
                directory, manifest.num_examples, manifest.num_shards, manifest.computed_shards,
                manifest.reused_shards, record["bytes"] / 2**20, manifest.examples_per_second or 0.0)
    return record


def save_chunk(directory: str | Path, chunk: LatentShard | CacheManifest) -> dict | None:
    """Write one chunk of a build (what the catalog dataset does with each chunk the node yields)."""
    if isinstance(chunk, LatentShard):
        write_shard(directory, chunk)
        return None
    if isinstance(chunk, CacheManifest):
        return write_manifest(directory, chunk)
    raise TypeError(f"A latent cache chunk is a LatentShard or a CacheManifest, not {type(chunk).__name__}.")


def write_cache(build: LatentCacheBuild, directory: str | Path, on_stale: Literal["rebuild", "error"] = "rebuild") -> dict:
    """Build (or complete) the cache for ``build`` in ``directory`` outside Kedro; returns the manifest."""
    manifest = None
    writes = distributed.is_main_process()   # data-parallel processes: rank 0 writes what they all computed
    for chunk in cache_chunks(build, shard_fingerprints(directory) if writes else {}, on_stale):
        if writes:
            manifest = save_chunk(directory, chunk)
    return manifest if writes else read_manifest(Path(directory) / MANIFEST)


class LatentCache:
    """Read access to a complete cache folder (see :func:`write_cache`)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        manifest = self.directory / MANIFEST
        if not manifest.is_file():
            raise FileNotFoundError(
                f"No complete latent cache at '{self.directory}' (no {MANIFEST}); run `kedro run --pipelines latents`."
            )
        self.manifest = read_manifest(manifest)

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def ids(self) -> list[str]:
        return self.manifest["ids"]

    def check_fingerprint(self, expected: str) -> None:
        if expected != self.fingerprint:
            raise StaleCacheError(
                f"Latent cache '{self.directory}' is stale: built for fingerprint {self.fingerprint}, the "
                f"current student/plans/settings give {expected}; run `kedro run --pipelines latents`."
            )

    def shards(self) -> Iterator[dict[str, torch.Tensor]]:
        """Every shard in the manifest's order, each checked against the manifest's fingerprint and
        its place in it."""
        for index, name in enumerate(self.manifest["shards"]):
            yield read_shard(self.directory / name, self.fingerprint, expected_index=index)

    def load(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Every shard, verified, re-padded and concatenated in example order."""
        shards = list(self.shards())
        tq = max(s["query_states"].shape[1] for s in shards)
        ta = max(s["target_states"].shape[1] for s in shards)

        def pad(t: torch.Tensor, length: int, dim: int = 1, value: float = 0) -> torch.Tensor:
            shape = list(t.shape)
            shape[dim] = length
            out = t.new_full(shape, value)
            out.narrow(dim, 0, t.shape[dim]).copy_(t)
            return out

        merged = {
            "row_index": torch.cat([s["row_index"] for s in shards]),
            "query_states": torch.cat([pad(s["query_states"], tq) for s in shards]).to(dtype),
            "query_lengths": torch.cat([s["query_lengths"] for s in shards]),
            "target_states": torch.cat([pad(s["target_states"], ta) for s in shards]).to(dtype),
            "answer_lengths": torch.cat([s["answer_lengths"] for s in shards]),
            "inject_free_mean": torch.cat([s["inject_free_mean"] for s in shards]).to(dtype),
            "inject_plan_mean": torch.cat([s["inject_plan_mean"] for s in shards]).to(dtype),
            "inject_free_rms": torch.cat([s["inject_free_rms"] for s in shards]),
        }
        if "prefix_keys" in shards[0]:  # kept in the compact dtype it was stored in; a batch casts it
            tp = max(s["prefix_keys"].shape[3] for s in shards)
            merged.update({
                "prefix_keys": torch.cat([pad(s["prefix_keys"], tp, dim=3) for s in shards]),
                "prefix_values": torch.cat([pad(s["prefix_values"], tp, dim=3) for s in shards]),
                "prefix_lengths": torch.cat([s["prefix_lengths"] for s in shards]),
                "site_states": torch.cat([pad(s["site_states"], ta) for s in shards]),
                "answer_tokens": torch.cat([pad(s["answer_tokens"], ta, value=IGNORE_INDEX) for s in shards]),
            })
        return merged


@dataclass
class LatentBatch:
    """What one stage-1 step needs for a batch of examples."""

    query_states: torch.Tensor   # (B, Tq, d) plan-free reading of the query
    query_mask: torch.Tensor     # (B, Tq)
    targets: torch.Tensor        # (B, Ta, L, d) plan-conditioned states at the answer positions
    target_mask: torch.Tensor    # (B, Ta) float
    prefix: FrozenPrefix | None = None  # what guidance cannot change, when the cache holds it

    def first(self, n: int) -> LatentBatch:
        """The first ``n`` rows (the prefix cut to their own longest prompt and answer)."""
        width = int(self.target_mask[:n].sum(1).max())
        return LatentBatch(self.query_states[:n], self.query_mask[:n], self.targets[:n, :width],
                           self.target_mask[:n, :width],
                           self.prefix.select(slice(0, n)).trimmed() if self.prefix is not None else None)


def _batch_from_tensors(tensors: dict[str, torch.Tensor], device: torch.device | str) -> LatentBatch:
    width = int(tensors["answer_lengths"].max())
    query_width = int(tensors["query_lengths"].max())
    return LatentBatch(
        query_states=tensors["query_states"][:, :query_width].to(device).float(),
        query_mask=lengths_to_mask(tensors["query_lengths"], query_width).to(device),
        targets=tensors["target_states"][:, :width].to(device).float(),
        target_mask=lengths_to_mask(tensors["answer_lengths"], width).to(device).float(),
        prefix=(frozen_prefix(tensors, tensors["answer_lengths"]).trimmed().to(device)
                if "prefix_keys" in tensors else None),
    )


class CachedLatents:
    """Stage-1 batches read from the loaded cache (the default, fast path)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors["row_index"])

    def batch(self, index: torch.Tensor, device: torch.device | str) -> LatentBatch:
        return _batch_from_tensors({k: v[index] for k, v in self.tensors.items()}, device)


class RecomputedLatents:
    """Stage-1 batches computed with fresh frozen forward passes every step (no cache).

    The reference the cache is measured against (benchmarks) and checked against (tests).
    """

    def __init__(self, build: LatentCacheBuild) -> None:
        self.build = build

    def __len__(self) -> int:
        return self.build.num_examples

    def batch(self, index: torch.Tensor, device: torch.device | str) -> LatentBatch:
        return _batch_from_tensors(self.build.compute_rows(index.tolist()), device)


def select_examples(teacher_plans: pd.DataFrame, tasks_train: pd.DataFrame) -> pd.DataFrame:
    """The rows stage 1 learns from: the training rows' kept plans, joined to their tasks by id.

    Only the ``train`` split's plans: validation selects checkpoints and the test splits report
    results, so neither is ever learned from."""
    training = teacher_plans["split"] == "train"
    kept = teacher_plans[teacher_plans["kept"] & training][["id", "plan"]]
    examples = tasks_train.merge(kept, on="id", how="inner").sort_values("id").reset_index(drop=True)
    if examples.empty:
        chosen = teacher_plans[training]
        verified = int(chosen["verified"].sum()) if "verified" in chosen else 0
        teachers = ", ".join(sorted(set(chosen["teacher"]))) if "teacher" in chosen else "?"
        raise ValueError(
            f"No kept plans for the training rows: with plans.keep=verified a plan is kept only when the "
            f"student answers right with it in context, and it did for {verified} of "
            f"{len(chosen)} plans (teacher '{teachers}'; see "
            "data/08_reporting/plan_report.csv). Make the student able to use a plan (train the embedded "
            "student longer, or adapt a pretrained one: base.student.adapt), or keep every plan with "
            "`--params plans.keep=all` (an ablation: stage 1 then imitates unverified plans)."
        )
    return examples


def plan_cache_build(teacher_plans: pd.DataFrame, tasks_train: pd.DataFrame, student: CausalLM,
                     guidance: GuidanceParams, config: LatentsParams) -> LatentCacheBuild:
    """What the cache must hold for the current student, kept plans and guidance settings.

    Used both to build the cache and, by stage 1 and tuning, to check that the cache on disk has
    the same fingerprint -- so a stale cache is never used silently.
    """
    guidance.check_against(student.num_layers)
    examples = select_examples(teacher_plans, tasks_train)
    settings = CacheSettings(
        read_layer=guidance.read_layer % student.num_layers,
        inject_layer=guidance.inject_layer,
        align_layers=tuple(guidance.resolved_align_layers(student.num_layers)),
        shard_size=config.shard_size,
        batch_size=config.batch_size,
        dtype=config.dtype,
        prefix_site=min([guidance.inject_layer, *guidance.extra_inject_layers]) if config.frozen_prefix else None,
    )
    data = examples_fingerprint(examples["id"], examples["question"], examples["plan"], reply_targets(examples))
    return LatentCacheBuild(
        student=student, ids=examples["id"].tolist(), questions=examples["question"].tolist(),
        plans=examples["plan"].tolist(), answers=reply_targets(examples), settings=settings,
        fingerprint=cache_fingerprint(lm_fingerprint(student), data, settings),
    )
