"""Bulk throughput: our TCP stack <-> the Linux kernel through the TUN bridge.

Beside it, in the same run, kernel <-> kernel over loopback inside a namespace with the same
Python socket peer (tests/tun_peer.py), so the numbers can be compared on a machine whose
load changes from run to run. Needs root (network namespaces, /dev/net/tun).

    python bench/stack_kernel_bench.py [--mib 64] [--mtu 65535 1500] [--repeat 1]
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import netns
from tun_peer import payload
from tunbridge import KernelPeer, configure_kernel, open_kernel_peer, open_tun_bridge

from norouter_trio.tcp.netstack import NetStack

PORT = 5001
SEED = 1


def _mbps(size: int, seconds: float) -> float:
    return size / (1 << 20) / seconds if seconds > 0 else float("inf")


async def _received(peer: KernelPeer, size: int, timeout: float) -> float:
    """Seconds the kernel sink took from first byte to EOF; checks the data."""
    await peer.expect("connected", timeout)
    fields = await peer.expect("received", timeout)
    if fields[1:3] != [str(size), hashlib.sha256(payload(size, SEED)).hexdigest()]:
        raise SystemExit(f"kernel received corrupt data: {fields}")
    return float(fields[3])


async def kernel_to_kernel(size: int) -> float:
    with netns.namespaces("nrbench") as (ns,):
        configure_kernel(ns)  # cubic, as on the TUN side
        async with open_kernel_peer(ns, "--listen", "127.0.0.1:0", "recv", "close") as sink:
            port = int((await sink.expect("listening"))[1])
            async with open_kernel_peer(ns, "--connect", f"127.0.0.1:{port}",
                                        f"send:{size}:{SEED}", "shut", "recv") as source:
                seconds = await _received(sink, size, 300)
                await source.expect("connected")
        return _mbps(size, seconds)


async def stack_runs(mtu: int, size: int) -> tuple[float, float]:
    """(kernel -> stack, stack -> kernel) MB/s through one bridge."""
    async with open_tun_bridge(mtu=mtu, check_packets=False) as br:
        stack = NetStack(br.vip, br.to_kernel)
        async with trio.open_nursery() as nursery:
            await nursery.start(stack.run, br.from_kernel)
            listener = stack.listen(br.vip, PORT)
            async with br.open_peer("--connect", f"{br.vip}:{PORT}", f"send:{size}:{SEED}",
                                    "shut", "recv"):
                stream = await listener.accept()
                digest, count = hashlib.sha256(), 0
                first = await stream.receive_some(1 << 20)
                started = trio.current_time()
                data = first
                while data:
                    digest.update(data)
                    count += len(data)
                    data = await stream.receive_some(1 << 20)
                inbound = _mbps(size, trio.current_time() - started)
                if (count, digest.hexdigest()) != (size, hashlib.sha256(
                        payload(size, SEED)).hexdigest()):
                    raise SystemExit(f"stack received corrupt data ({count} bytes)")
                await stream.aclose()
            async with br.open_peer("--listen", f"{br.kernel_ip}:0", "recv", "close") as sink:
                port = int((await sink.expect("listening"))[1])
                stream = await stack.connect(br.kernel_ip, port)
                view = memoryview(payload(size, SEED))
                for i in range(0, size, 1 << 20):
                    await stream.send_all(view[i:i + (1 << 20)])
                await stream.send_eof()
                outbound = _mbps(size, await _received(sink, size, 300))
                await stream.aclose()
            nursery.cancel_scope.cancel()
    return inbound, outbound


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64, help="bytes per transfer, in MiB")
    parser.add_argument("--mtu", type=int, nargs="+", default=[65535, 1500])
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    if not netns.netns_available():
        raise SystemExit("needs root, iproute2 and /dev/net/tun")
    size = args.mib << 20
    rows: list[tuple[str, str, float]] = []
    for _ in range(args.repeat):
        rows.append(("kernel -> kernel", "lo 65536", await kernel_to_kernel(size)))
        for mtu in args.mtu:
            inbound, outbound = await stack_runs(mtu, size)
            rows.append(("kernel -> our stack", f"tun {mtu}", inbound))
            rows.append(("our stack -> kernel", f"tun {mtu}", outbound))
    print(f"bulk transfer of {args.mib} MiB, Python socket peer, first byte to EOF")
    print(f"{'path':<22}{'link MTU':<12}{'MB/s':>10}")
    for path, link, mbps in rows:
        print(f"{path:<22}{link:<12}{mbps:>10.1f}")


if __name__ == "__main__":
    trio.run(main)
