"""ImageLoader beside DataLoader + DistributedSampler: the same indices per epoch and shard, on
both backends; set_epoch; DataLoader's keywords; two torchrun ranks covering every sample once."""
import itertools
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils.data import DistributedSampler

import fasttl.data as D
from fasttl.backbones import Preprocessing
from fasttl.data.order import epoch_order
from conftest import backends

PRE = Preprocessing(input_size=32, mean=(0.5, 0.4, 0.3), std=(0.25, 0.2, 0.3))


class Sized(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n


@pytest.mark.parametrize("length, shards, shuffle, drop_last", itertools.product(
    [1, 2, 7, 18, 101], [1, 2, 3, 8], [True, False], [True, False]))
def test_epoch_order_is_distributed_samplers(length, shards, shuffle, drop_last):
    for epoch, seed in ((0, 0), (3, 11)):
        for rank in range(shards):
            sampler = DistributedSampler(Sized(length), num_replicas=shards, rank=rank, shuffle=shuffle, seed=seed,
                                         drop_last=drop_last)
            sampler.set_epoch(epoch)
            ours = epoch_order(length, epoch=epoch, seed=seed, shuffle=shuffle, shard_id=rank, num_shards=shards,
                               drop_last=drop_last)
            assert ours.tolist() == list(sampler)


def labelled_source(small_image_folder):
    """18 images whose labels are their indices, so a batch's labels say which samples it held."""
    source = D.scan_class_folder(str(small_image_folder))
    return D.FileSource(source.files, list(range(len(source))), [str(i) for i in range(len(source))], source.root)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("shards, drop_last", [(1, False), (2, False), (4, False), (4, True)])
def test_loader_yields_each_epochs_indices_in_order(small_image_folder, backend, shards, drop_last):
    source = labelled_source(small_image_folder)
    for rank in range(shards):
        loader = D.make_loader(source, PRE, 3, train=True, seed=5, backend=backend, shard_id=rank, num_shards=shards,
                               drop_last=drop_last)
        for epoch in range(2):
            expected = loader.epoch_indices().tolist()
            got = [y.tolist() for _, y in loader]
            assert sum(got, []) == expected
            assert len(got) == len(loader) and (not drop_last or all(len(b) == 3 for b in got))
            sampler = DistributedSampler(Sized(18), shards, rank, shuffle=True, seed=5, drop_last=drop_last)
            sampler.set_epoch(epoch)
            assert expected == list(sampler)[:len(got) * 3 if drop_last else None]


@pytest.mark.parametrize("backend", backends())
def test_set_epoch_gives_that_epochs_batches_without_running_the_others(small_image_folder, backend):
    source = labelled_source(small_image_folder)
    loader = D.make_loader(source, PRE, 4, train=True, seed=3, backend=backend)
    epochs = [[(x.clone(), y.clone()) for x, y in loader] for _ in range(3)]
    assert [y.tolist() for _, y in epochs[0]] != [y.tolist() for _, y in epochs[1]]  # reshuffled
    jump = D.make_loader(source, PRE, 4, train=True, seed=3, backend=backend)
    jump.set_epoch(2)
    for (x, y), (x2, y2) in zip(epochs[2], jump):
        assert torch.equal(y, y2) and torch.equal(x, x2)  # same order and same augmentation
    assert jump.epoch == 3


def test_both_backends_give_the_same_order(small_image_folder):
    from conftest import dali_installed

    if not dali_installed():
        pytest.skip("needs NVIDIA DALI (pip install nvidia-dali-cuda120) to compare with")
    source = labelled_source(small_image_folder)
    for shuffle in (True, False):
        orders = []
        for backend in ("torch", "dali"):
            loader = D.make_loader(source, PRE, 5, backend=backend, shuffle=shuffle, seed=9, num_shards=2, shard_id=1)
            loader.set_epoch(4)
            orders.append([y.tolist() for _, y in loader])
        assert orders[0] == orders[1]


def test_dataloader_keywords_are_taken_and_bad_values_refused(small_image_folder):
    source = labelled_source(small_image_folder)
    loader = D.make_loader(source, PRE, 4, shuffle=True, drop_last=True, num_workers=0, pin_memory=False, seed=1)
    assert len(loader) == 4 and [len(y) for _, y in loader] == [4] * 4
    unshuffled = D.make_loader(source, PRE, 4, train=True, shuffle=False)
    assert sum((y.tolist() for _, y in unshuffled), []) == list(range(18))  # augmented, in order
    for kwargs, message in [(dict(shuffle="yes"), r"^shuffle: expected True or False"),
                            (dict(drop_last=1), r"^drop_last: expected True or False"),
                            (dict(num_workers=-1), r"^num_workers: expected an integer >= 0"),
                            (dict(num_workers=2, num_threads=3), r"^num_workers: 2 differs from num_threads=3"),
                            (dict(shard_id=2, num_shards=2),
                             r"^shard_id: expected an integer in \[0, num_shards=2\), got 2$"),
                            (dict(seed=1.5), r"^seed: expected an integer")]:
        with pytest.raises((TypeError, ValueError), match=message):
            D.make_loader(source, PRE, 4, **kwargs)
    with pytest.raises(ValueError, match=r"^epoch: expected an integer in \[0, 2\*\*63\), got -1$"):
        loader.set_epoch(-1)


@pytest.mark.parametrize("backend", backends())
def test_drop_last_with_fewer_samples_than_a_batch_is_an_empty_epoch(small_image_folder, backend):
    source = labelled_source(small_image_folder)
    loader = D.make_loader(source, PRE, 16, backend=backend, num_shards=2, shard_id=1, drop_last=True)
    assert len(loader) == 0 and list(loader) == [] and loader.epoch == 1


@pytest.mark.parametrize("backend", backends())
def test_a_file_deleted_mid_epoch_is_named(small_image_folder, backend):
    source = labelled_source(small_image_folder)
    loader = D.make_loader(source, PRE, 3, backend=backend, num_workers=0)
    batches = iter(loader)
    next(batches)
    os.remove(source.files[-1])
    with pytest.raises(D.DataError, match=r"5\.jpg: cannot be (read|decoded)") as info:
        list(batches)
    assert "\n" not in str(info.value)


@pytest.mark.slow
def test_two_torchrun_ranks_cover_every_sample_once_per_epoch(small_image_folder, tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(textwrap.dedent(f"""
        import json, os, sys
        import torch.distributed as dist
        import fasttl.data as D
        from fasttl.backbones import Preprocessing

        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        source = D.scan_class_folder({str(small_image_folder)!r})
        source = D.FileSource(source.files, list(range(len(source))), [str(i) for i in range(len(source))])
        loader = D.make_loader(source, Preprocessing(input_size=32, mean=(0.5,) * 3, std=(0.25,) * 3), 4,
                               train=True, seed=2, backend="torch", shard_id=rank, num_shards=world)
        seen = []
        for epoch in range(3):
            loader.set_epoch(epoch)
            seen.append(sum((y.tolist() for _, y in loader), []))
        with open(os.path.join({str(tmp_path)!r}, f"rank{{rank}}.json"), "w") as f:
            json.dump(seen, f)
        dist.destroy_process_group()
    """))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             "--master_port=29541", str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    import json

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for epoch in range(3):
        a, b = ranks[0][epoch], ranks[1][epoch]
        assert not set(a) & set(b) and sorted(a + b) == list(range(18)), epoch
    assert ranks[0][0] != ranks[0][1]  # a new order each epoch
