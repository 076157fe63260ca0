"""A chatbot wired to serve: multi-turn conversations, answers from the intent, feedback.

Start serve with a feedback token, then point the bot at it::

    SD_SERVE__FEEDBACK_TOKENS='{"chatbot": "s3cret"}' stream-distill serve
    python examples/chatbot.py --url http://127.0.0.1:8000 --token s3cret --conversations 20

Simulated users (``TrafficGenerator``) stand in for real ones. Each user turn is
classified with the whole dialogue so far (so "yes please do that" is read in
its context); the bot answers from the returned intent, asks instead when it is
unsure, and sends the intent the user then confirms back as feedback. The last
line printed is the summary: served accuracy against the users' true intents
and the round-trip latency.
"""

from __future__ import annotations

import argparse
import sys
import time

from stream_distill.client import Classification, Client, ClientError
from stream_distill.data.synthetic import TrafficConfig, TrafficGenerator
from stream_distill.events import Turn

ASK_BELOW = 0.4  # below this confidence the bot asks instead of acting


def reply(answer: Classification) -> str:
    """What the agent says back: act on a confident intent, otherwise ask which one."""
    if answer.confidence < ASK_BELOW and len(answer.top) > 1:
        options = " or ".join(t.intent.replace("_", " ") for t in answer.top[:2])
        return f"Sorry, do you mean {options}?"
    return f"Sure, I can help with {answer.intent.replace('_', ' ')}. Is that what you need?"


def percentile(xs: list[float], q: float) -> float:
    ordered = sorted(xs)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="serve's base URL")
    parser.add_argument("--token", default=None, help="bearer token for feedback")
    parser.add_argument("--conversations", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0, help="seed of the simulated users")
    parser.add_argument("--timeout-s", type=float, default=5.0, help="deadline of each call")
    parser.add_argument("-v", "--verbose", action="store_true", help="print the dialogues")
    args = parser.parse_args(argv)

    users = TrafficGenerator(TrafficConfig(seed=args.seed))
    turns = correct = feedback = failed = 0
    latencies_ms: list[float] = []
    with Client(args.url, feedback_token=args.token, timeout_s=args.timeout_s) as bot:
        for _ in range(args.conversations):
            history: list[Turn] = []  # this bot's own dialogue: user turns and its replies
            for labelled in users.conversation():
                user_turn = labelled.turns[-1]
                history.append(user_turn)
                t0 = time.perf_counter()
                try:
                    answer = bot.classify(turns=history, conversation_id=labelled.conversation_id)
                except ClientError as exc:
                    print(f"classify failed: {exc}", file=sys.stderr)
                    failed += 1
                    break  # a real bot would hand over to a human here
                latencies_ms.append((time.perf_counter() - t0) * 1e3)
                turns += 1
                correct += answer.intent == labelled.intent
                history.append(Turn(role="agent", text=reply(answer)))
                if args.verbose:
                    print(f"[{labelled.conversation_id}] user: {user_turn.text}")
                    print(f"[{labelled.conversation_id}]  bot: {history[-1].text}")
                try:  # the user's confirmation (or correction) is the label serve learns from
                    bot.feedback(answer.request_id, labelled.confirmed_intent)
                    feedback += 1
                except ClientError as exc:
                    print(f"feedback failed: {exc}", file=sys.stderr)
                    failed += 1

    accuracy = correct / turns if turns else float("nan")
    p50, p99 = percentile(latencies_ms, 0.5), percentile(latencies_ms, 0.99)
    print(
        f"summary: conversations={args.conversations} turns={turns} accuracy={accuracy:.3f} "
        f"feedback={feedback} failed={failed} latency_p50_ms={p50:.1f} latency_p99_ms={p99:.1f}"
    )
    return 0 if turns and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
