"""The peer for `engine bench-allreduce`: PyTorch's gloo all-reduce between 2 local processes on CPU, same
sizes, one warm-up, median of ITERS. Prints one JSON line per size from rank 0.
    python gloo_allreduce.py [ITERS] [FLOATS ...]"""
import json, os, statistics, sys, time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def run(rank, world, iters, sizes, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    for n in sizes:
        buf = torch.ones(n)
        dist.all_reduce(buf)  # warm-up
        times = []
        for _ in range(iters):
            buf.fill_(1.0)
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(buf)
            times.append(time.perf_counter() - t0)
        if rank == 0:
            ms = statistics.median(times) * 1e3
            print(json.dumps({"impl": "torch-gloo", "world": world, "floats": n, "median_ms": round(ms, 2),
                              "bus_gb_s": round(2 * (world - 1) / world * n * 4 / (ms / 1e3) / 1e9, 3)}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    iters = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    sizes = [int(x) for x in sys.argv[2:]] or [1_000_000, 16_000_000]
    mp.spawn(run, args=(2, iters, sizes, 29611), nprocs=2)
