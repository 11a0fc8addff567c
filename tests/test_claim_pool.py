"""The CPU gather's threads (csrc/cpu/claim_pool.h): the caller and up to threads - 1 helpers claim
chunks of rows from one counter, and the caller waits only for chunks a helper has begun. Checked
through ShardTable.gather against a float64 reference: chunk edges, more threads than chunks,
gathers from several Python threads at once (the binding releases the GIL), a forked child (which
has none of its parent's helpers) and a process exiting with its helpers asleep."""
import multiprocessing
import os
import subprocess
import sys
import threading
import zlib

import pytest
import torch

from fasttl.cache.kernels import ShardTable

CHUNK_ROWS = 128  # claim_pool's chunk for 512 fp16 columns: 128 KiB of the cache


def generator_for(request) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def sharded(generator, rows: int, columns: int, shard_rows: int, dtype=torch.float16):
    full = torch.randn(rows, columns, generator=generator, dtype=torch.float64) * 3
    shards = [full[s:s + shard_rows].to(dtype).contiguous() for s in range(0, rows, shard_rows)]
    return shards, torch.cat([s.double() for s in shards])


def poisoned(rows: int, columns: int) -> torch.Tensor:
    return torch.full((rows, columns), float("nan"))


@pytest.mark.parametrize("rows", [0, 1, CHUNK_ROWS - 1, CHUNK_ROWS, CHUNK_ROWS + 1, 5 * CHUNK_ROWS + 37])
@pytest.mark.parametrize("threads", [1, 2, 3, 64])
def test_every_row_is_gathered_once_whatever_the_threads(request, rows, threads):
    generator = generator_for(request)
    shards, reference = sharded(generator, 3000, 512, 700)
    indices = torch.randint(0, 3000, (rows,), generator=generator)
    out = poisoned(rows, 512)
    ShardTable(shards).gather(indices, out=out, threads=threads)
    assert torch.equal(out.double(), reference[indices])  # fp16 -> fp32 is exact


@pytest.mark.parametrize("columns", [1, 3, 1280])
def test_int8_rows_and_odd_widths(request, columns):
    generator = generator_for(request)
    shards = [torch.randint(-127, 128, (rows, columns), generator=generator, dtype=torch.int8) for rows in (50, 50, 7)]
    scales = [torch.rand(s.shape[0], generator=generator) + 0.01 for s in shards]
    indices = torch.randint(0, 107, (777,), generator=generator)
    out = poisoned(777, columns)
    ShardTable(shards, scales).gather(indices, out=out, threads=2)
    reference = torch.cat(shards).double() * torch.cat(scales).double()[:, None]
    torch.testing.assert_close(out.double(), reference[indices], rtol=1e-6, atol=0)


def test_gathers_from_several_threads_at_once(request):
    generator = generator_for(request)
    shards, reference = sharded(generator, 4000, 64, 1000)
    table = ShardTable(shards)
    batches = [torch.randint(0, 4000, (int(n),), generator=generator) for n in torch.randint(1, 3000, (24,),
                                                                                            generator=generator)]
    wrong = []

    def work(part):
        for indices in batches[part::4]:
            for threads in (1, 2, 5):
                if not torch.equal(table.gather(indices, threads=threads).double(), reference[indices]):
                    wrong.append((part, len(indices), threads))

    workers = [threading.Thread(target=work, args=(part,)) for part in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert not any(w.is_alive() for w in workers) and wrong == []


def _child_gathers(shards, indices, expected, result):
    # torch's own OpenMP team does not survive a fork (a parallel sum hangs in the child, with or
    # without fasttl): one torch thread, as DataLoader workers run; the gather still uses helpers.
    torch.set_num_threads(1)
    before = len(os.listdir("/proc/self/task"))
    gathered = ShardTable(shards).gather(indices, threads=2)
    result.put((torch.equal(gathered.double(), expected), len(os.listdir("/proc/self/task")) - before))


@pytest.mark.skipif(sys.platform != "linux", reason="fork is the start method that copies a pool's state")
def test_a_forked_child_gathers_with_helpers_of_its_own(request):
    generator = generator_for(request)
    shards, reference = sharded(generator, 2000, 512, 500)
    indices = torch.randint(0, 2000, (1500,), generator=generator)
    assert torch.equal(ShardTable(shards).gather(indices, threads=2).double(), reference[indices])  # helpers started
    context = multiprocessing.get_context("fork")
    result = context.Queue()
    child = context.Process(target=_child_gathers, args=(shards, indices, reference[indices], result))
    child.start()
    child.join(timeout=120)
    if child.is_alive():
        child.kill()
    assert child.exitcode == 0 and result.get(timeout=5) == (True, 1)  # right, and one helper started


def test_a_process_exits_with_its_helpers_asleep():
    code = ("import torch; from fasttl.cache.kernels import ShardTable; "
            "t = ShardTable([torch.ones(4096, 512, dtype=torch.float16)]); "
            "assert float(t.gather(torch.arange(4096), threads=4).sum()) == 4096 * 512; print('done')")
    finished = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0 and finished.stdout.strip() == "done", finished.stderr[-2000:]



def test_helpers_are_capped_however_many_threads_torch_is_given():
    """torch.set_num_threads(600) and no count given: the gather starts at most MOST_THREADS - 1
    helpers (255 on a machine of fewer cores), not 599 for the rest of the process."""
    code = ("import os, torch; from fasttl.cache import kernels; from fasttl.cache.gather_threads import MOST_THREADS; "
            "torch.set_num_threads(600); float(torch.randn(10 ** 6).sum()); "  # torch's own team started first
            "before = len(os.listdir('/proc/self/task')); "
            "out = kernels.gather(torch.ones(40000, 64, dtype=torch.float16), torch.arange(40000)); "
            "print(len(os.listdir('/proc/self/task')) - before, MOST_THREADS, float(out.sum()))")
    finished = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr[-2000:]
    started, most, total = finished.stdout.split()
    assert int(started) == min(int(most), 600) - 1 and float(total) == 40000 * 64
