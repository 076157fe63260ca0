"""Adaptive teacher sampling: the pure policy (fake clock, scripted RNG) and the scorer using it."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Sequence

import pytest
from prometheus_client import CollectorRegistry
from tokenizers import Tokenizer

from stream_distill.bus import codec
from stream_distill.bus.memory import MemoryBus
from stream_distill.config import TeacherSettings
from stream_distill.data.synthetic import INTENTS, labelled_examples
from stream_distill.events import RequestEvent, SoftLabel, Turn
from stream_distill.metrics.prometheus import PrometheusHooks
from stream_distill.models.factory import default_tokenizer_json, set_threads, tiny_classifier
from stream_distill.models.text import TextEncoder
from stream_distill.teacher.model import TeacherModel
from stream_distill.teacher.sampling import (
    BUDGET_EXHAUSTED,
    DISAGREEMENT,
    RANDOM_FLOOR,
    SKIPPED_CONFIDENT,
    UNCERTAIN,
    VERSIONS_KEPT,
    WARMUP,
    AdaptiveSampler,
    Disagreement,
    RollingTop,
    TokenBucket,
)
from stream_distill.teacher.scorer import TeacherScorer
from stream_distill.testing import FakeClock, RecordingHooks, eventually

TURNS = (Turn(role="user", text="where is my parcel"),)


def _event(i: int, *, uncertain: bool = False, intent: str = "track_order") -> RequestEvent:
    return RequestEvent(
        request_id=f"r{i}",
        conversation_id=f"c{i % 7}",
        turns=TURNS,
        served_intent=intent,
        entropy=2.0 if uncertain else 0.1,
        margin=0.05 if uncertain else 0.9,
        model_version="v1",
        latency_ms=2.0,
    )


def _settings(**kw: object) -> TeacherSettings:
    return TeacherSettings.model_validate({"sampling": "adaptive", **kw})


def _absolute(**kw: object) -> TeacherSettings:
    """The entropy/margin thresholds: ``_event(uncertain=True)`` is uncertain, whatever else."""
    return _settings(sample_uncertainty="absolute", **kw)


def _flat(i: int, margin: float, intent: str = "track_order") -> RequestEvent:
    """A temperature-4 student's answer: high entropy always, only the margin varies."""
    return _event(i, intent=intent).model_copy(
        update={"entropy": 1.9 + 0.5 * (1 - margin), "margin": margin}
    )


class ScriptedRandom(random.Random):
    """``random()`` returns the given values in turn."""

    def __init__(self, values: Sequence[float]) -> None:
        super().__init__(0)
        self.values = list(values)

    def random(self) -> float:
        return self.values.pop(0)


# -- building blocks ---------------------------------------------------------------------------


def test_token_bucket_golden() -> None:
    clock = FakeClock(100.0)
    bucket = TokenBucket(rate=2.0, burst=3.0, clock=clock)
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    clock.advance(0.4)  # 0.8 tokens: not yet one
    assert not bucket.take()
    clock.advance(0.1)  # 1.0
    assert bucket.take() and not bucket.take()
    clock.advance(60)  # saves up no more than the burst
    assert bucket.tokens == pytest.approx(3.0)
    clock.now -= 10  # a clock stepping back neither adds nor drains
    assert bucket.tokens == pytest.approx(3.0)
    with pytest.raises(ValueError):
        TokenBucket(rate=0.0, burst=1.0, clock=clock)


def test_disagreement_rates_roll_and_fall_back_to_overall() -> None:
    d = Disagreement(window=4, min_observations=2)
    assert d.rate("a") is None
    d.observe("a", "b")  # a: [1]
    assert d.rate("a") is None and d.rate() is None
    d.observe("a", "a")  # a: [1, 0]
    assert d.rate("a") == 0.5 and d.rate() == 0.5
    for _ in range(3):
        d.observe("a", "a")  # window of 4 drops the first disagreement
    assert d.rate("a") == 0.0
    d.observe("c", "x")  # c: one observation, too few: overall [0, 0, 0, 1]
    assert d.rate("c") == 0.25 == d.rate("unseen")


# -- the policy --------------------------------------------------------------------------------


def test_golden_decisions_with_scripted_draws() -> None:
    sampler = AdaptiveSampler(
        _absolute(sample_floor=0.05, sample_disagreement_gain=2.0, sample_min_observations=4),
        rng=ScriptedRandom([0.9, 0.5, 0.3, 0.04, 0.2, 0.99, 0.06]),
        clock=FakeClock(),
    )
    for served, teacher in [("risky", "other")] * 1 + [("risky", "risky")] * 3:
        sampler.observe(_event(0, intent=served), teacher)  # risky: 1 in 4 → p = 0.5
    for _ in range(4):
        sampler.observe(_event(0, intent="safe"), "safe")  # safe: 0 → only the floor
    events = [
        _event(0, uncertain=True),  # draw 0.9: uncertain regardless
        _event(1, intent="risky"),  # 0.5 is not < 0.5
        _event(2, intent="risky"),  # 0.3 < 0.5 → disagreement
        _event(3, intent="safe"),  # 0.04 < floor 0.05
        _event(4, intent="safe"),  # 0.2: skipped
        _event(5, intent="new"),  # unseen intent, overall 1/8 → p 0.25; 0.99: skipped
        _event(6, intent="new"),  # 0.06 < 0.25 → disagreement
    ]
    reasons = [d.reason for d in sampler.choose(events)]
    assert reasons == [
        UNCERTAIN,
        SKIPPED_CONFIDENT,
        DISAGREEMENT,
        RANDOM_FLOOR,
        SKIPPED_CONFIDENT,
        SKIPPED_CONFIDENT,
        DISAGREEMENT,
    ]
    assert sampler.rate == pytest.approx(4 / 7)


def test_budget_respected_under_a_burst_and_over_time() -> None:
    clock = FakeClock()
    sampler = AdaptiveSampler(_absolute(sample_budget_rps=50.0), clock=clock, rng=random.Random(3))
    first = sampler.choose([_event(i, uncertain=True) for i in range(1000)])
    assert sum(d.score for d in first) == 50  # the burst: one second's budget
    assert Counter(d.reason for d in first) == {UNCERTAIN: 50, BUDGET_EXHAUSTED: 950}
    scored = 50
    for step in range(1, 101):  # 10 s of 100 uncertain requests every 0.1 s
        clock.advance(0.1)
        scored += sum(
            d.score for d in sampler.choose([_event(i, uncertain=True) for i in range(100)])
        )
        elapsed = step * 0.1
        assert scored <= 50 * elapsed + 50
    # and the budget is used, not just respected
    assert scored >= 50 * 10 + 50 - 1
    assert sampler.rate == pytest.approx(5 / 100, abs=0.01)


def test_uncertain_requests_take_the_budget_first() -> None:
    sampler = AdaptiveSampler(
        _absolute(sample_budget_rps=20.0, sample_floor=1.0), clock=FakeClock(), rng=random.Random(1)
    )
    # confident requests come first and are all "wanted" through the floor of 1.0
    events = [_event(i) for i in range(100)] + [_event(100 + i, uncertain=True) for i in range(30)]
    decisions = sampler.choose(events)
    chosen = [e for e, d in zip(events, decisions, strict=True) if d.score]
    assert len(chosen) == 20
    assert all(e.entropy > 1 for e in chosen)
    assert Counter(d.reason for d in decisions) == {UNCERTAIN: 20, BUDGET_EXHAUSTED: 110}


def test_floor_keeps_sampling_confident_traffic() -> None:
    sampler = AdaptiveSampler(_settings(sample_floor=0.05), rng=random.Random(7))
    for _ in range(50):
        sampler.observe(_event(0), "track_order")  # the student is always right
    decisions = sampler.choose([_event(i) for i in range(20000)])
    share = sum(d.score for d in decisions) / len(decisions)
    assert 0.04 < share < 0.06
    assert {d.reason for d in decisions if d.score} == {RANDOM_FLOOR}
    off = AdaptiveSampler(_settings(sample_floor=0.0), rng=random.Random(7))
    assert not any(d.score for d in off.choose([_event(i) for i in range(2000)]))


def test_more_disagreement_more_samples() -> None:
    sampler = AdaptiveSampler(
        _settings(sample_floor=0.05, sample_disagreement_gain=2.0), rng=random.Random(5)
    )
    for i in range(100):
        sampler.observe(
            _event(i, intent="cancel"), "refund" if i % 10 < 4 else "cancel"
        )  # 40 % → p = 0.8
        sampler.observe(_event(i, intent="greet"), "greet")  # 0 % → floor only
    events = [_event(i, intent="cancel" if i % 2 else "greet") for i in range(10000)]
    decisions = sampler.choose(events)
    by_intent: Counter[str] = Counter()
    for e, d in zip(events, decisions, strict=True):
        by_intent[e.served_intent] += d.score
    assert by_intent["cancel"] / 5000 == pytest.approx(0.8, abs=0.03)
    assert by_intent["greet"] / 5000 == pytest.approx(0.05, abs=0.015)


def test_decisions_and_rate_reach_the_hooks() -> None:
    hooks = RecordingHooks()
    prom = PrometheusHooks(CollectorRegistry())
    events = [_event(i, uncertain=i < 3) for i in range(10)]
    for h in (hooks, prom):
        AdaptiveSampler(
            _absolute(sample_budget_rps=2.0, sample_floor=0.0),
            hooks=h,
            clock=FakeClock(),
            rng=random.Random(0),
        ).choose(events)
    assert sorted(hooks.named("on_teacher_sampling")) == [
        (BUDGET_EXHAUSTED, 1),
        (SKIPPED_CONFIDENT, 7),
        (UNCERTAIN, 2),
    ]
    assert hooks.named("on_teacher_sampling_rate") == [(0.2,)]
    sample = prom.registry.get_sample_value
    name = "sd_teacher_sampling_decisions_total"
    assert sample(name, {"reason": UNCERTAIN}) == 2
    assert sample(name, {"reason": SKIPPED_CONFIDENT}) == 7
    assert sample("sd_teacher_sampling_rate") == pytest.approx(0.2)


# -- relative uncertainty ----------------------------------------------------------------------


def test_rolling_top_threshold_golden() -> None:
    top = RollingTop(window=10, share=0.3)
    assert top.threshold() is None
    top.extend([0.1 * i for i in range(10)])  # 0.0 .. 0.9
    assert top.threshold() == pytest.approx(0.6)  # 0.7, 0.8, 0.9 lie above: 3 of 10
    top.extend([0.95, 0.95])  # rolls: 0.2 .. 0.9, 0.95, 0.95
    assert top.threshold() == pytest.approx(0.8)  # 0.9 and the two 0.95s lie above
    top.extend([1.0] * 5)  # rolls: 0.7 .. 0.95 and five 1.0s
    assert top.threshold() == 1.0  # the top three tie with two more: none lies above
    tiny = RollingTop(window=10, share=0.01)
    tiny.extend([0.5, 0.7])
    assert tiny.threshold() == 0.7  # round(0.02) = 0 values above: nothing is uncertain


def test_relative_golden_decisions() -> None:
    sampler = AdaptiveSampler(
        _settings(sample_uncertain_fraction=0.3, sample_uncertainty_window=10, sample_floor=0.0),
        rng=random.Random(0),
    )
    margins = [0.5, 0.05, 0.9, 0.3, 0.01, 0.7, 0.6, 0.2, 0.8, 0.4]
    decisions = sampler.choose([_flat(i, m) for i, m in enumerate(margins)])
    picked = [m for m, d in zip(margins, decisions, strict=True) if d.score]
    assert picked == [0.05, 0.01, 0.2]  # the three lowest margins, in arrival order
    assert {d.reason for d in decisions if d.score} == {UNCERTAIN}
    assert sampler.threshold("v1") == pytest.approx(1 - 0.3)
    # the next batch is judged against the rolled window, not the first batch's cut (margin
    # 0.3, which all of these are below): margins 0.6 0.2 0.8 0.4 + five 0.25 + 0.26; the
    # top 3 are 0.2 and two 0.25s that tie with three more: only 0.2 (gone) lies above
    later = sampler.choose([_flat(20 + i, 0.25) for i in range(5)] + [_flat(30, 0.26)])
    assert sampler.threshold("v1") == pytest.approx(0.75)
    assert not any(d.score for d in later)


def test_relative_mode_selects_the_fraction_when_every_entropy_is_high() -> None:
    rng = random.Random(11)
    stream = [_flat(i, rng.uniform(0.0, 0.3)) for i in range(6000)]
    assert all(e.entropy > 1.0 and e.margin <= 0.3 for e in stream)
    absolute = AdaptiveSampler(_absolute(sample_floor=0.0), rng=random.Random(2))
    wanted = [d.score for i in range(0, 6000, 32) for d in absolute.choose(stream[i : i + 32])]
    assert sum(wanted) == 6000  # the thresholds call all of it uncertain

    sampler = AdaptiveSampler(_settings(sample_floor=0.0), rng=random.Random(2))
    assert sampler.settings.sample_uncertain_fraction == 0.15
    picked: list[RequestEvent] = []
    for i in range(0, 6000, 32):
        batch = stream[i : i + 32]
        picked += [e for e, d in zip(batch, sampler.choose(batch), strict=True) if d.score]
    after_warmup = [e for e in picked if int(e.request_id[1:]) >= 1000]
    assert len(after_warmup) / 5000 == pytest.approx(0.15, abs=0.02)
    # the most uncertain ones: the stream's margins are uniform on [0, 0.3], so the top 15 %
    # lie below ~0.045; the rolling window blurs that edge a little
    assert max(e.margin for e in after_warmup) < 0.06
    assert sum(e.margin < 0.045 for e in after_warmup) / len(after_warmup) > 0.9
    # uncertain answers do not feed the disagreement rates; confident ones do
    sampler.observe(_flat(0, 0.001), "refund")
    assert sampler.disagreement.observed == 0
    sampler.observe(_flat(0, 0.29), "refund")
    assert sampler.disagreement.observed == 1


def test_relative_threshold_follows_the_student() -> None:
    sampler = AdaptiveSampler(
        _settings(sample_floor=0.0, sample_uncertainty_window=500), rng=random.Random(4)
    )
    rng = random.Random(5)
    for i in range(0, 2000, 50):  # an early student: margins on [0, 0.3]
        sampler.choose([_flat(i + j, rng.uniform(0.0, 0.3)) for j in range(50)])
    early = sampler.threshold("v1")
    late: list[bool] = []
    for i in range(0, 2000, 50):  # it learns: margins on [0.5, 1.0]
        batch = [_flat(i + j, rng.uniform(0.5, 1.0)) for j in range(50)]
        late += [d.score for d in sampler.choose(batch)]
    late_threshold = sampler.threshold("v1")
    assert early is not None and late_threshold is not None
    assert 1 - early > 0.0 and 1 - late_threshold > 0.5  # the margin cut moved up
    assert sum(late[-1000:]) / 1000 == pytest.approx(0.15, abs=0.03)  # and the share held


def test_each_student_version_is_ranked_against_its_own_answers() -> None:
    sampler = AdaptiveSampler(_settings(sample_floor=0.0), rng=random.Random(12))
    rng = random.Random(13)

    def answer(i: int, version: str) -> RequestEvent:
        low = 0.0 if version == "v1" else 0.5  # v2 is surer of everything
        return _flat(i, rng.uniform(low, low + 0.3)).model_copy(update={"model_version": version})

    for i in range(0, 1000, 50):
        sampler.choose([answer(i + j, "v1") for j in range(50)])
    assert sampler.threshold("v2") is None
    # a canary: both answer side by side; against v1's window no v2 answer would be uncertain
    picked: Counter[str] = Counter()
    for i in range(0, 4000, 50):
        batch = [answer(i + j, "v1" if j % 2 else "v2") for j in range(50)]
        for e, d in zip(batch, sampler.choose(batch), strict=True):
            picked[e.model_version] += d.score
    assert picked["v1"] / 2000 == pytest.approx(0.15, abs=0.03)
    assert picked["v2"] / 2000 == pytest.approx(0.15, abs=0.03)
    for n in range(3, 3 + VERSIONS_KEPT):  # old versions' windows are let go
        sampler.choose([answer(i, f"v{n}") for i in range(WARMUP)])
    assert sampler.threshold("v1") is None and sampler.threshold(f"v{n}") is not None


def test_budget_goes_to_the_most_uncertain_first() -> None:
    clock = FakeClock()
    sampler = AdaptiveSampler(
        _settings(sample_budget_rps=5.0, sample_floor=1.0, sample_uncertain_fraction=0.2),
        clock=clock,
        rng=random.Random(6),
    )
    margins = [m / 100 for m in range(100)]
    random.Random(7).shuffle(margins)
    events = [_flat(i, m) for i, m in enumerate(margins)]
    decisions = sampler.choose(events)
    chosen = sorted(e.margin for e, d in zip(events, decisions, strict=True) if d.score)
    assert chosen == [0.0, 0.01, 0.02, 0.03, 0.04]  # not the first five to arrive
    counts = Counter(d.reason for d in decisions)
    assert counts == {UNCERTAIN: 5, BUDGET_EXHAUSTED: 95}  # floor 1: everything was wanted
    # a second later: the uncertain share of the new batch first, then the floor by margin
    clock.advance(1.0)
    decisions = sampler.choose(events[:10])
    chosen = sorted(e.margin for e, d in zip(events[:10], decisions, strict=True) if d.score)
    assert chosen == sorted(e.margin for e in events[:10])[:5]


def test_relative_budget_respected_over_time() -> None:
    clock = FakeClock()
    sampler = AdaptiveSampler(
        _settings(sample_budget_rps=20.0, sample_floor=0.0), clock=clock, rng=random.Random(8)
    )
    rng = random.Random(9)
    scored = 0
    for step in range(100):  # 10 s of 100 requests every 0.1 s: 150/s uncertain, 20/s budget
        batch = [_flat(step * 100 + j, rng.uniform(0.0, 0.3)) for j in range(100)]
        scored += sum(d.score for d in sampler.choose(batch))
        assert scored <= 20 * step * 0.1 + 20
        clock.advance(0.1)
    assert scored >= 20 * 9.9 + 20 - 1


# -- in the scorer -----------------------------------------------------------------------------


async def test_scorer_scores_the_sampled_and_commits_the_rest() -> None:
    set_threads(1)
    labels = tuple(sorted(INTENTS[:6]))
    encoder = TextEncoder(Tokenizer.from_str(default_tokenizer_json()), max_length=32)
    teacher = TeacherModel(tiny_classifier(labels, layers=1), encoder)
    bus = MemoryBus()
    await bus.ensure_topics()
    dialogues = [e.turns for e in labelled_examples(40, seed=2)]
    events = [
        _event(i, uncertain=i % 4 == 0, intent=labels[i % 6]).model_copy(update={"turns": d})
        for i, d in enumerate(dialogues)
    ]
    async with bus.producer() as p:
        for e in events:
            await p.send(bus.topics.requests, codec.encode(e), key=e.conversation_id.encode())

    async def run(**kw: object) -> TeacherScorer:
        scorer = TeacherScorer(bus, teacher, _absolute(batch_size=8, batch_wait_ms=5, **kw))
        stop = asyncio.Event()
        task = asyncio.create_task(scorer.run(stop))
        try:
            await eventually(lambda: scorer.scored + scorer.skipped >= 40, timeout_s=20)
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)
        assert scorer.sampler is not None
        return scorer

    scorer = await run(sample_floor=0.0, group_id="g")
    soft = [codec.decode(SoftLabel, r.value) for r in bus.records(bus.topics.soft_labels)]
    uncertain = [e for e in events if e.entropy > 1]
    assert sorted(s.request_id for s in soft) == sorted(e.request_id for e in uncertain)
    assert (scorer.scored, scorer.skipped) == (10, 30)
    assert scorer.sampler is not None
    assert scorer.sampler.decisions == {UNCERTAIN: 10, SKIPPED_CONFIDENT: 30}
    assert scorer.sampler.disagreement.observed == 0  # uncertain answers do not feed the rates
    # skipped requests are committed too: nothing is left for the group
    assert sum(bus.log.committed["g"].values()) == 40

    # a floor of 1 scores everything; the confident answers feed back what the teacher said
    scorer = await run(sample_floor=1.0, group_id="g2")
    assert scorer.sampler is not None
    assert (scorer.scored, scorer.skipped) == (40, 0)
    confident = [e for e in events if e.entropy <= 1]
    said = teacher.predict_labels([e.turns for e in confident])
    wrong = sum(e.served_intent != t for e, t in zip(confident, said, strict=True))
    assert scorer.sampler.disagreement.observed == 30
    assert scorer.sampler.disagreement.rate() == pytest.approx(wrong / 30)
