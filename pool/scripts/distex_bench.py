"""distex's small-task benchmark, for docs/performance.md ("Pool against distex").

map_async(g, range(100000)) with g(x) = x + 2 over a pool of two local
workers (uvloop, pickle, no encryption), for each qsize given; prints one
line per qsize: qsize, tasks, seconds, tasks/s.

    PATH=/work/venv-distex/bin:$PATH python pool/scripts/distex_bench.py 32 2

(distex starts its workers as `distex_proc`, a script in the venv's bin.)
"""

import asyncio
import sys
import time

from distex import Pool

N = 100_000


def g(x):
    return x + 2


async def run(qsize, chunksize=1):
    pool = Pool(2, qsize=qsize)
    await pool.create()
    # One untimed round, so the workers are up and warm.
    async for _ in pool.map_async(g, range(1000)):
        pass
    t0 = time.perf_counter()
    n = 0
    async for y in pool.map_async(g, range(N), chunksize=chunksize):
        n += 1
    dt = time.perf_counter() - t0
    assert n == N
    print(f"distex qsize {qsize} chunksize {chunksize}: {N} tasks in {dt:.3f} s, {N / dt:,.0f} tasks/s", flush=True)
    await pool.shutdown_async() if hasattr(pool, "shutdown_async") else pool.shutdown()


def main():
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        print("(uvloop not installed: asyncio's own loop)")
    for qsize in [int(a) for a in sys.argv[1:]] or [32, 2]:
        asyncio.run(run(qsize))
    # The chunked case `teleport bench` also runs.
    asyncio.run(run(32, chunksize=16))


if __name__ == "__main__":
    main()
