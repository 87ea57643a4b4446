"""What the fairness yield costs: draining a queued burst with recv() and sending a
burst below write_limit, against the price of the loop turns they now give away.

    python bench/fairness.py [--messages 20000] [--uvloop]

Operations that complete without suspending yield to the event loop once every 32 of
them (docs/architecture.md, "Awaitables"). This prints the time per recv() and per
send() in a burst, how many loop turns another task got meanwhile, and the cost of one
bare loop turn (``await asyncio.sleep(0)``) measured in the same run, so the share of
the burst spent on the yields can be read off.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import lightws
from websockets.asyncio.client import connect


async def _turns(stop: asyncio.Event, out: list[int]) -> None:
    while not stop.is_set():
        await asyncio.sleep(0)
        out[0] += 1


async def run(messages: int) -> dict[str, float]:
    release = asyncio.Event()
    result: asyncio.Future[dict[str, float]] = asyncio.get_running_loop().create_future()

    async def handler(conn: lightws.Connection) -> None:
        await release.wait()
        stop = asyncio.Event()
        turns = [0]
        other = asyncio.create_task(_turns(stop, turns))
        await asyncio.sleep(0)
        t0 = time.perf_counter()
        for _ in range(messages):
            await conn.recv()
        recv_s = time.perf_counter() - t0
        recv_turns = turns[0]
        turns[0] = 0
        t0 = time.perf_counter()
        for _ in range(messages):
            await conn.send(b"x")
        send_s = time.perf_counter() - t0
        send_turns = turns[0]
        stop.set()
        await other
        # One bare loop turn, for comparison.
        t0 = time.perf_counter()
        for _ in range(messages):
            await asyncio.sleep(0)
        turn_s = time.perf_counter() - t0
        result.set_result(
            {
                "recv_us": recv_s / messages * 1e6,
                "send_us": send_s / messages * 1e6,
                "recv_turns": recv_turns,
                "send_turns": send_turns,
                "turn_us": turn_s / messages * 1e6,
            }
        )

    def handshake(request: lightws.Request, response: lightws.Response) -> Any:
        return handler

    config = lightws.Config(addr="127.0.0.1:0", handshake=handshake, max_msg_len=1 << 20)
    async with lightws.Server(config) as server:
        async with connect(f"ws://127.0.0.1:{server.port}/", max_queue=None) as ws:
            for _ in range(messages):
                await ws.send(b"m")
            deadline = time.monotonic() + 30
            while server.stats().frames_in.get(lightws.Opcode.BINARY, 0) < messages:
                if time.monotonic() > deadline:
                    raise SystemExit("the burst never arrived")
                await asyncio.sleep(0.01)
            release.set()
            out = await asyncio.wait_for(result, 60)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=20000)
    p.add_argument("--uvloop", action="store_true")
    args = p.parse_args()
    if args.uvloop:
        import uvloop

        r = uvloop.run(run(args.messages))
    else:
        r = asyncio.run(run(args.messages))
    n = args.messages
    for what in ("recv", "send"):
        turns = r[f"{what}_turns"]
        share = turns * r["turn_us"] / (r[f"{what}_us"] * n) * 100 if r[f"{what}_us"] else 0.0
        print(
            f"{what}: {r[f'{what}_us']:.2f} us/op over a burst of {n}; other task ran "
            f"{turns:.0f} times (one per {n / max(turns, 1):.0f} ops); "
            f"yields ~{share:.1f}% of the burst"
        )
    print(f"one bare loop turn (await asyncio.sleep(0)): {r['turn_us']:.2f} us")


if __name__ == "__main__":
    main()
