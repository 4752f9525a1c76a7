"""FrameCache: frames built once and shared, failures not kept, memory bounded."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from kevo_repl.repl.frame_cache import ENTRY_OVERHEAD_BYTES, Built, FrameCache
from kevo_repl.repl.frames import Codec, Frame


def _built(first: int, size: int) -> Built:
    return Built(Frame(first, first, Codec.NONE, size, 0, b"x" * size), live=True)


def test_callers_at_one_position_share_one_build() -> None:
    async def main() -> None:
        cache = FrameCache(1 << 20)
        release = asyncio.Event()
        calls = 0

        async def build() -> Built:
            nonlocal calls
            calls += 1
            await release.wait()
            return _built(7, 10)

        waiters = [asyncio.ensure_future(cache.get((7, Codec.ZSTD), build)) for _ in range(3)]
        await asyncio.sleep(0)
        release.set()
        got = await asyncio.gather(*waiters)
        assert calls == 1 and cache.builds == 1 and cache.hits == 2
        assert got[0] is got[1] is got[2]
        # Another codec is another frame.
        other = await cache.get((7, Codec.SNAPPY), build)
        assert calls == 2 and other is not got[0]

    asyncio.run(main())


def test_nothing_and_failures_are_not_kept() -> None:
    async def main() -> None:
        cache = FrameCache(1 << 20)

        async def nothing() -> Built | None:
            return None

        async def fails() -> Built | None:
            await asyncio.sleep(0)
            raise OSError("disk")

        assert await cache.get((1, Codec.ZSTD), nothing) is None
        await asyncio.sleep(0)  # the done callback
        assert len(cache) == 0
        waiters = [asyncio.ensure_future(cache.get((1, Codec.ZSTD), fails)) for _ in range(2)]
        for result in await asyncio.gather(*waiters, return_exceptions=True):
            assert isinstance(result, OSError)  # every waiter sees the failure
        await asyncio.sleep(0)
        assert len(cache) == 0

        async def works() -> Built | None:
            return _built(1, 5)

        assert await cache.get((1, Codec.ZSTD), works) is not None  # built again
        assert cache.builds == 3

    asyncio.run(main())


def test_one_caller_going_away_does_not_cancel_the_build() -> None:
    async def main() -> None:
        cache = FrameCache(1 << 20)
        release = asyncio.Event()

        async def build() -> Built:
            await release.wait()
            return _built(3, 4)

        first = asyncio.ensure_future(cache.get((3, Codec.ZSTD), build))
        second = asyncio.ensure_future(cache.get((3, Codec.ZSTD), build))
        await asyncio.sleep(0)
        first.cancel()  # its replica disconnected
        await asyncio.sleep(0)
        release.set()
        shared = await second
        assert shared is not None and shared.frame.first_seq == 3
        with pytest.raises(asyncio.CancelledError):
            await first

    asyncio.run(main())


def test_held_bytes_stay_under_the_bound_oldest_dropped_first() -> None:
    each = 30 + ENTRY_OVERHEAD_BYTES  # what one 30-byte frame counts for

    async def main() -> None:
        cache = FrameCache(3 * each + 10)
        for first in range(1, 21):

            async def build(first: int = first) -> Built:
                return _built(first, 30)

            await cache.get((first, Codec.ZSTD), build)
            await asyncio.sleep(0)
            assert cache.held_bytes <= 3 * each + 10
        assert len(cache) == 3 and cache.held_bytes == 3 * each  # a fourth would not fit
        calls = 0

        async def again() -> Built:
            nonlocal calls
            calls += 1
            return _built(20, 30)

        await cache.get((20, Codec.ZSTD), again)  # the newest is held
        assert calls == 0
        await cache.get((1, Codec.ZSTD), again)  # the oldest was dropped: built again
        assert calls == 1

        big = FrameCache(10)

        async def huge() -> Built:
            return _built(1, 50)

        await big.get((1, Codec.ZSTD), huge)
        await asyncio.sleep(0)
        assert len(big) == 1  # the newest frame stays, whatever its size

    asyncio.run(main())


def test_a_frame_done_but_not_yet_counted_is_not_dropped_uncounted() -> None:
    """Builds finish in one loop iteration and are counted in the next (done callbacks): the
    eviction that one count starts must not drop another that is done but not counted yet,
    or the held bytes would drift below what is held."""
    each = 1000 + ENTRY_OVERHEAD_BYTES

    async def main() -> None:
        cache = FrameCache(each + each // 2)
        gates = {k: asyncio.Event() for k in (1, 2, 3)}

        def builder(k: int) -> Callable[[], Awaitable[Built]]:
            async def build() -> Built:
                await gates[k].wait()
                return _built(k, 1000)

            return build

        waiters = [asyncio.ensure_future(cache.get((k, Codec.ZSTD), builder(k))) for k in (1, 2, 3)]
        await asyncio.sleep(0)
        gates[2].set()
        await waiters[1]
        await asyncio.sleep(0)
        gates[3].set()
        gates[1].set()  # 3 and 1 finish in the same iteration; 3 is counted first
        await asyncio.gather(*waiters)
        for _ in range(3):
            await asyncio.sleep(0)
        assert len(cache) == 1 and cache.held_bytes == each  # only the newest, counted once
        assert cache.next_start(0, Codec.ZSTD) == 3

    asyncio.run(main())
