"""Caches and artefacts with an index or a manifest cannot be misread: the manifest carries its own
checksum, each part is checked against its place, and any change is one clear error naming the
file and the command that rebuilds it."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from pilot.artifacts import ArtifactChecksumError, atomic_folder, verify_file, verify_folder, write_file
from pilot.checkpoint import CheckpointManager, CorruptCheckpointError
from pilot.config import GuidanceParams, LatentsParams
from pilot.latents import MANIFEST_CHECKSUM, CorruptCacheError, LatentCache, plan_cache_build, write_cache

SITE = GuidanceParams(read_layer=-1, inject_layer=0, align_layers=[0, 1])
REBUILD = "`kedro run --pipelines latents`"


@pytest.fixture()
def cache(tiny_lm, task_table, tmp_path):
    """A complete latent cache of 5 shards, and its build."""
    plans = task_table[["id", "task", "split"]].assign(plan=task_table["oracle_plan"], kept=True)
    build = plan_cache_build(plans, task_table, tiny_lm, SITE, LatentsParams(shard_size=40, batch_size=16))
    write_cache(build, tmp_path / "cache")
    return tmp_path / "cache", build


def _flip_one_bit(path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1 and sum(a != b for a, b in zip(old.encode(), new.encode())) == 1
    path.write_text(text.replace(old, new))


def test_the_manifest_carries_its_own_checksum(cache):
    directory, build = cache
    manifest = json.loads((directory / "manifest.json").read_text())
    assert len(manifest[MANIFEST_CHECKSUM]) == 64
    assert LatentCache(directory).load()["row_index"].tolist() == list(range(build.num_examples))


def test_a_one_bit_change_in_the_manifest_is_an_error_naming_it_and_the_rebuild(cache):
    directory, build = cache
    manifest = directory / "manifest.json"
    _flip_one_bit(manifest, '"shard-00001.safetensors"', '"shard-00000.safetensors"')  # '1' -> '0' is one bit
    with pytest.raises(CorruptCacheError) as error:
        LatentCache(directory).load()
    assert str(error.value) == (f"Latent cache manifest '{manifest}' does not match its checksum (changed since it was "
                                f"written); rebuild it with {REBUILD} (it reuses the shards that are intact).")
    # The rebuild it names recomputes nothing and restores a cache that loads in order.
    assert write_cache(build, directory)["computed_shards"] == 0
    assert LatentCache(directory).load()["row_index"].tolist() == list(range(build.num_examples))


def test_a_manifest_without_its_checksum_is_refused(cache):
    directory, _ = cache
    manifest = json.loads((directory / "manifest.json").read_text())
    del manifest[MANIFEST_CHECKSUM]
    (directory / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptCacheError, match=r"manifest.json' has no checksum .* `kedro run --pipelines latents`"):
        LatentCache(directory)


def test_an_unreadable_manifest_is_refused_and_the_rebuild_repairs_it(cache):
    directory, build = cache
    (directory / "manifest.json").write_text('{"fingerprint": ')
    with pytest.raises(CorruptCacheError, match=r"manifest.json' is unreadable"):
        LatentCache(directory)
    assert write_cache(build, directory)["computed_shards"] == 0
    LatentCache(directory).load()


def test_a_shard_file_copied_over_another_is_refused_on_load_and_recomputed_by_the_rebuild(cache):
    directory, build = cache
    before = LatentCache(directory).load()
    shutil.copy(directory / "shard-00000.safetensors", directory / "shard-00001.safetensors")
    with pytest.raises(CorruptCacheError) as error:
        LatentCache(directory).load()
    assert str(error.value) == (
        f"Latent shard '{directory / 'shard-00001.safetensors'}' is shard 0 of its cache, not shard 1 (its place in "
        f"manifest.json): a shard file was moved or copied over another; rebuild with {REBUILD}.")
    manifest = write_cache(build, directory)
    assert (manifest["computed_shards"], manifest["reused_shards"]) == (1, build.num_shards - 1)
    after = LatentCache(directory).load()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_two_shard_files_swapped_are_refused(cache):
    directory, _ = cache
    first, second = directory / "shard-00002.safetensors", directory / "shard-00003.safetensors"
    first.rename(directory / "swap")
    second.rename(first)
    (directory / "swap").rename(second)
    with pytest.raises(CorruptCacheError, match=r"shard-00002.safetensors' is shard 3 of its cache, not shard 2"):
        LatentCache(directory).load()


# ------------------------------------------------------------------------ checkpoints
def _saved_checkpoint(tmp_path):
    module = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(module.parameters(), lr=0.1)
    module(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    manager = CheckpointManager(tmp_path / "ckpt", every=2, fingerprint="aaaa")
    for step in (2, 4):
        manager.save(step, {"m": module}, optimizer, [{"step": step, "loss": 1.0 / step}])
    return manager, module, optimizer


def test_a_one_bit_change_in_a_checkpoints_state_is_an_error_naming_the_file(tmp_path):
    manager, module, optimizer = _saved_checkpoint(tmp_path)
    state = manager.latest() / "state.json"
    _flip_one_bit(state, '{"step": 4, "optimizer"', '{"step": 5, "optimizer"')   # '4' -> '5' is one bit
    with pytest.raises(CorruptCheckpointError, match=rf"Checkpoint file '{state}' does not match its checksum"):
        manager.restore({"m": module}, optimizer)


def test_a_checkpoint_copied_over_another_step_is_refused(tmp_path):
    manager, module, optimizer = _saved_checkpoint(tmp_path)
    older, newest = manager.list()
    shutil.rmtree(newest)
    shutil.copytree(older, newest)  # step 2's files where step 4 should be
    with pytest.raises(CorruptCheckpointError, match=r"step-00000004' holds step 2, not the step its folder names"):
        manager.restore({"m": module}, optimizer)


def test_checkpoints_without_a_state_checksum_still_resume(tmp_path):
    manager, module, optimizer = _saved_checkpoint(tmp_path)
    state_path = manager.latest() / "state.json"
    state = json.loads(state_path.read_text())
    del state["state_sha256"]  # as earlier versions wrote it
    state_path.write_text(json.dumps(state))
    assert manager.restore({"m": module}, optimizer).step == 4


# ------------------------------------------------------------------------ folder and file artefacts
def test_an_edited_checksum_listing_is_refused_even_when_it_names_another_file(tmp_path):
    with atomic_folder(tmp_path / "adapter") as folder:
        for name in ("model-00000.safetensors", "model-00001.safetensors"):
            save_file({"w": torch.ones(2)}, folder / name)  # two parts with the same bytes
    verify_folder(tmp_path / "adapter")
    listing = tmp_path / "adapter" / "checksums.json"
    # One bit in a name: both entries now name model-00000, every digest still matches its file, and
    # without the listing's own checksum model-00001 would no longer be checked at all.
    _flip_one_bit(listing, '"model-00001.safetensors"', '"model-00000.safetensors"')
    with pytest.raises(ArtifactChecksumError) as error:
        verify_folder(tmp_path / "adapter", "kedro run --pipelines baselines")
    assert str(error.value) == (f"'{listing}' does not match its own checksum (changed since it was written); "
                                "rebuild it with `kedro run --pipelines baselines`.")


def test_a_checksum_file_copied_from_another_file_is_refused(tmp_path):
    for name in ("a.safetensors", "b.safetensors"):
        write_file(tmp_path / name, lambda scratch: save_file({"w": torch.ones(2)}, scratch))  # the same bytes
    shutil.copy(tmp_path / "a.safetensors.sha256", tmp_path / "b.safetensors.sha256")
    verify_file(tmp_path / "a.safetensors")
    with pytest.raises(ArtifactChecksumError, match=r"is the checksum of 'a.safetensors', not of 'b.safetensors'"):
        verify_file(tmp_path / "b.safetensors", "kedro run --pipelines baselines")


def test_a_corrupt_cache_found_while_kedro_loads_a_dataset_is_still_one_sentence():
    """Kedro wraps an error raised while loading a dataset in its DatasetError; `kedro run` prints the
    user error behind it, not the wrapper and its traceback."""
    from kedro.io import DatasetError

    from pilot.framework.errors import user_error

    corrupt = CorruptCacheError("Latent cache manifest 'm.json' does not match its checksum; rebuild it.")
    try:
        try:
            raise corrupt
        except CorruptCacheError as error:
            raise DatasetError("Failed while loading data from dataset LatentCacheDataset(...).") from error
    except DatasetError as wrapped:
        assert user_error(wrapped) is corrupt
    assert user_error(RuntimeError("a bug")) is None
