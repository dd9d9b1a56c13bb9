"""Stream a completion and a chat from the split cluster over gRPC with the Tandem client (services.client).

    tandem up examples/local-split.yaml        # in another terminal: gateway + prefill + 2 decode
    python examples/client_stream.py "The capital of France is"

Options: --target HOST:PORT (default 127.0.0.1:50051), --max-tokens N, --api-key KEY (or env TANDEM_API_KEY).
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from services.client import AsyncClient, Client


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt", nargs="?", default="The capital of France is")
    p.add_argument("--target", default="127.0.0.1:50051")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--api-key", default=None)
    a = p.parse_args()

    with Client(a.target, api_key=a.api_key, timeout=60) as client:
        # 1. A completion, token by token (greedy, so the output is reproducible).
        stream = client.stream(a.prompt, max_tokens=a.max_tokens, temperature=0)
        for delta in stream:
            sys.stdout.write(delta.text)
            sys.stdout.flush()
            if delta.finish_reason:
                t = delta.timings or {}
                print(f"\n[{delta.finish_reason}; {delta.usage.completion_tokens} tokens; "
                      f"TTFT {t.get('ttft_s', 0) * 1e3:.0f} ms; workers {', '.join(delta.workers)}; "
                      f"request {stream.request_id}]", file=sys.stderr)
        # 2. A chat, as one whole answer.
        answer = client.generate(messages=[("user", a.prompt)], max_tokens=a.max_tokens, temperature=0)
        print(f"chat: {answer.text!r} ({answer.finish_reason})")

    # 3. The same from asyncio: two streams at once on one channel.
    async def two() -> list[str]:
        async with AsyncClient(a.target, api_key=a.api_key, timeout=60) as client:
            answers = await asyncio.gather(*(client.generate(f"{a.prompt} {i}", max_tokens=8, temperature=0)
                                             for i in range(2)))
        return [x.text for x in answers]

    print("async:", asyncio.run(two()))


if __name__ == "__main__":
    main()
