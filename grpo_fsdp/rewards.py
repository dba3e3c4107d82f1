"""Rewards for GRPO: math-verify correctness, an optional format reward and DAPO's soft overlong
penalty, graded (`grading.py`) in persistent worker processes with a per-sample wall-clock timeout.

    reward_i = w.correct * correct_i + w.format * format_i + w.overlong_penalty * overlong_i

correct_i   math-verify equivalence of the completion's last \\boxed{...} with the gold answer
            (so 0.5 = \\frac12, 18 = \\$18.00, 1,000 = 1000, and 20\\% = 20 dollars = 20 after
            answer_units.py strips the units of a lone number on both sides); with no box, an anchored
            answer ("The answer is 72") in the last 1,000 characters is graded instead.
format_i    exactly one, closed \\boxed{} near the end of a completion that was not truncated.
overlong_i  DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), in [-1, 0].

Why processes: sympy can spend minutes (or forever) on an adversarial answer such as
\\boxed{9^{9^{9^{9}}}}, inside C code that no signal interrupts, and math-verify's own timeout
uses signal.alarm, which works only in the main thread. So workers call math-verify with its
timeout disabled and the parent enforces the wall clock: a sample past the timeout scores 0,
counts in `timeouts`, and its worker is killed and replaced; the rest of the batch goes on.
A step also has a scoring budget (`score(budget_s=...)`): the per-sample timeout alone let a step
with many hanging answers take (hanging answers / workers) x timeout, 22-29 s measured with half
the gold answers adversarial. Once the budget is spent, the answers still being graded and those
not yet started score 0 and count in `timeouts` and in `over_budget`, and the busy workers are
killed and replaced, so one step's scoring takes at most about budget_s (plus the kills). A
replacement imports its grader (seconds) before it takes answers, and that time counts against the
budget of the step it falls in: keep the budget well above a worker's start-up (default 30 s).
Departures: the penalty is added with a weight (DAPO adds it with weight 1), and a sample that
times out or crashes keeps its overlong penalty (it does not depend on grading).
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import signal
import time
from collections import deque
from contextlib import suppress
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from typing import TYPE_CHECKING

from grpo_fsdp.faults import maybe_fault
from grpo_fsdp.grading import find_answer, format_ok, grade_answer, overlong_penalty, parse_gold

if TYPE_CHECKING:  # typing.Self is Python 3.11+; pyproject and the Docker image allow 3.10
    from typing_extensions import Self

@dataclass(frozen=True)
class RewardWeights:
    """Weights of the reward terms; overlong_buffer is DAPO's L_cache, in tokens (0 = hard cut)."""

    correct: float = 1.0
    format: float = 0.0
    overlong_penalty: float = 0.0
    overlong_buffer: int = 0


# ---------------------------------------------------------------- worker processes

_READY = "ready"
_OK, _NO_ANSWER, _ERROR, _TIMEOUT, _OVER_BUDGET = "ok", "no_answer", "error", "timeout", "over_budget"


def _worker_loop(conn) -> None:
    """Grade (kind, answer text, gold) tasks from the pipe until None or the parent goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; no worker tracebacks
    # Import sympy and the LaTeX parser, build the extraction regexes and parsers of both answer kinds, and
    # run a symbolic comparison (sympy's simplify, 0.28 s the first time) before saying ready: the first
    # graded steps took 0.3 s instead of 0.03 s without this (tiny benchmark).
    parse_gold("1")
    for kind, text, gold in (("box", "\\frac{1}{2}", "0.5"), ("tail", "so the answer is $18.00", "18"), ("box", "x+1", "2")):
        with suppress(Exception):  # a warm-up, not a check: grading errors are counted per sample later
            grade_answer(kind, text, gold)
    conn.send(_READY)
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        maybe_fault("reward_grade")  # tests: GRPO_FSDP_FAULT=reward_grade::stop is a worker that hangs on every answer
        try:
            correct, extracted = grade_answer(*task)
            status = _OK if extracted else _NO_ANSWER
        except Exception:  # noqa: BLE001 (RecursionError from deep nesting, sympy bugs, a bad gold)
            correct, status = False, _ERROR
        conn.send((status, correct))


@dataclass
class _Worker:
    proc: mp.process.BaseProcess
    conn: object
    started: float
    ready: bool = False


@dataclass
class ScoreResult:
    """Per-sample rewards, correctness and format, with the step's failure counters."""

    rewards: list[float]
    correct: list[bool]
    formatted: list[bool]
    timeouts: int = 0  # ran out of time: the per-sample timeout, or the step's budget (over_budget)
    over_budget: int = 0  # not graded (or cut off) because the step's scoring budget was spent
    parse_failures: int = 0  # no extractable answer, or grading raised / crashed its worker
    seconds: float = 0.0
    statuses: list[str] = field(default_factory=list, repr=False)

    def metrics(self) -> dict[str, float]:
        n = max(len(self.rewards), 1)
        return {
            "reward/mean": sum(self.rewards) / n,
            "reward/accuracy": sum(self.correct) / n,
            "reward/format": sum(self.formatted) / n,
            "reward/timeouts": float(self.timeouts),
            "reward/over_budget": float(self.over_budget),
            "reward/parse_failures": float(self.parse_failures),
            "perf/reward_seconds": self.seconds,
        }


class RewardScorer:
    """A persistent pool of grading processes; `score` one step's completions at a time.

    Workers are started with 'spawn' (or 'forkserver'), never 'fork': the trainer holds torch's
    thread pools, a process group's communication threads and maybe a CUDA context, and fork
    copies only the calling thread, so locks held by the others stay locked forever in the child
    (and CUDA cannot be used in a forked child at all). Spawn starts a clean interpreter that
    imports this module (and, by Python's spawn rules, re-imports the parent's __main__ module,
    so keep entry points import-light). Workers start in the background at construction.
    """

    def __init__(
        self,
        weights: RewardWeights | None = None,
        num_workers: int | None = None,
        timeout_s: float = 5.0,
        start_method: str = "spawn",
        startup_timeout_s: float = 120.0,
    ):
        if start_method == "fork":
            raise ValueError("RewardScorer: start_method='fork' is unsafe in a trainer; use 'spawn' or 'forkserver'")
        self.weights = weights or RewardWeights()
        self.timeout_s = timeout_s
        self.startup_timeout_s = startup_timeout_s
        self._ctx = mp.get_context(start_method)
        n = num_workers or min(4, os.cpu_count() or 1)
        self._workers: list[_Worker] = [self._spawn() for _ in range(n)]

    def _spawn(self) -> _Worker:
        parent, child = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(target=_worker_loop, args=(child,), daemon=True, name="reward-worker")
        proc.start()
        child.close()  # so that the worker's death shows up as EOF on our end
        return _Worker(proc, parent, time.monotonic())

    def _replace(self, slot: int) -> None:
        old = self._workers[slot]
        old.proc.kill()  # SIGKILL: a worker stuck in C code ignores anything gentler
        old.proc.join(timeout=5)
        old.conn.close()
        self._workers[slot] = self._spawn()

    def _on_startup_problem(self, slot: int) -> None:
        w = self._workers[slot]
        if not w.proc.is_alive():
            raise RuntimeError(f"reward worker exited with code {w.proc.exitcode} before it was ready (see its stderr)")
        if time.monotonic() - w.started > self.startup_timeout_s:
            raise RuntimeError(f"reward worker not ready after {self.startup_timeout_s:.0f} s")

    def wait_ready(self) -> None:
        """Block until every worker has imported its grader. The recipe calls it once before step 1: on a
        small machine, workers still importing sympy compete with the first rollout for the cores."""
        while pending := {w.conn: s for s, w in enumerate(self._workers) if not w.ready}:
            for conn in wait(list(pending), timeout=1.0):
                slot = pending[conn]
                try:
                    msg = conn.recv()
                except (EOFError, OSError):
                    w = self._workers[slot]
                    w.proc.join(timeout=5)
                    raise RuntimeError(f"reward worker exited with code {w.proc.exitcode} before it was ready") from None
                self._workers[slot].ready = msg == _READY
            for slot in pending.values():
                if not self._workers[slot].ready:
                    self._on_startup_problem(slot)

    def score(
        self, completions: list[str], golds: list[str], lengths: list[int], max_length: int, budget_s: float | None = None
    ) -> ScoreResult:
        """Grade one step: rewards (weighted sum), correctness, format, and the failure counters.
        budget_s: wall clock for the whole call's grading (None: unbounded; each sample still has timeout_s)."""
        n = len(completions)
        if not (len(golds) == n and len(lengths) == n):
            raise ValueError(f"score: {n} completions, {len(golds)} golds, {len(lengths)} lengths; they must match")
        if not self._workers:
            raise RuntimeError("RewardScorer.score called after close()")
        t0 = time.monotonic()
        # Answers are extracted here (a C rfind, then a scan of the box only) and each distinct
        # (answer, gold) is graded once: a group's G samples often agree, and a 1 MB completion
        # never crosses a pipe.
        keys = [(*find_answer(c), g) for c, g in zip(completions, golds)]
        unique = list(dict.fromkeys(keys))
        graded = dict(zip(unique, self._run(unique, budget_s)))
        statuses = [graded[k][0] for k in keys]
        correct = [graded[k][1] for k in keys]
        # A truncated completion did not end properly, whatever its text looks like.
        formatted = [length < max_length and format_ok(c) for c, length in zip(completions, lengths)]
        w = self.weights
        rewards = [
            float(
                w.correct * ok
                + w.format * f
                + w.overlong_penalty * overlong_penalty(length, max_length, w.overlong_buffer)
            )
            for ok, f, length in zip(correct, formatted, lengths)
        ]
        return ScoreResult(
            rewards=rewards,
            correct=correct,
            formatted=formatted,
            timeouts=statuses.count(_TIMEOUT) + statuses.count(_OVER_BUDGET),
            over_budget=statuses.count(_OVER_BUDGET),
            parse_failures=statuses.count(_NO_ANSWER) + statuses.count(_ERROR),
            seconds=time.monotonic() - t0,
            statuses=statuses,
        )

    def _run(self, tasks: list[tuple[str, str, str]], budget_s: float | None = None) -> list[tuple[str, bool]]:
        """(status, correct) per task; one task per worker at a time, each under a wall-clock deadline,
        all of them under the budget."""
        outcome: list[tuple[str, bool]] = [(_ERROR, False)] * len(tasks)
        todo, busy = deque(range(len(tasks))), {}  # busy: worker slot -> (task index, deadline)
        stop = math.inf if budget_s is None else time.monotonic() + budget_s
        while todo or busy:
            if time.monotonic() >= stop:  # the budget is spent: cut off what runs, skip what waits
                for slot, (i, _) in busy.items():
                    outcome[i] = (_OVER_BUDGET, False)
                    self._replace(slot)
                for i in todo:
                    outcome[i] = (_OVER_BUDGET, False)
                break
            for slot, w in enumerate(self._workers):
                if todo and w.ready and slot not in busy:
                    i = todo.popleft()
                    try:
                        w.conn.send(tasks[i])
                    except OSError:  # died while idle: not this task's fault, retry it elsewhere
                        todo.appendleft(i)
                        self._replace(slot)
                        continue
                    busy[slot] = (i, time.monotonic() + self.timeout_s)
            by_conn = {w.conn: s for s, w in enumerate(self._workers) if s in busy or not w.ready}
            wake = min(min((d for _, d in busy.values()), default=time.monotonic() + 1.0), stop)
            for conn in wait(list(by_conn), timeout=max(0.0, wake - time.monotonic())):
                slot = by_conn[conn]
                try:
                    msg = conn.recv()
                except (EOFError, OSError):  # the worker died: segfault, OOM kill, ...
                    if slot not in busy:  # only workers not yet ready are watched while idle
                        w = self._workers[slot]
                        w.proc.join(timeout=5)
                        raise RuntimeError(f"reward worker exited with code {w.proc.exitcode} before it was ready")
                    outcome[busy.pop(slot)[0]] = (_ERROR, False)
                    self._replace(slot)
                    continue
                if msg == _READY:
                    self._workers[slot].ready = True
                else:
                    outcome[busy.pop(slot)[0]] = msg
            now = time.monotonic()
            for slot, (i, deadline) in list(busy.items()):
                if now >= deadline:
                    del busy[slot]
                    outcome[i] = (_TIMEOUT, False)
                    self._replace(slot)
            for slot, w in enumerate(self._workers):
                if not w.ready:
                    self._on_startup_problem(slot)
        return outcome

    def close(self) -> None:
        for w in self._workers:
            try:
                w.conn.send(None)
            except OSError:
                pass
        for w in self._workers:
            w.proc.join(timeout=2)
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join()
            w.conn.close()
        self._workers = []

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ConstantRewardWatch:
    """Warns when every reward of a step was identical for k steps in a row (zero advantages)."""

    def __init__(self, k: int):
        if k < 1:
            raise ValueError(f"ConstantRewardWatch: k={k}; it must be >= 1")
        self.k = k
        self._streak = 0

    def update(self, rewards: list[float]) -> str | None:
        values = set(rewards)
        self._streak = self._streak + 1 if len(values) == 1 else 0
        if self._streak == 0 or self._streak % self.k:  # warn at k, 2k, ... rather than every step
            return None
        return (
            f"all {len(rewards)} rewards were {rewards[0]} for {self._streak} steps in a row: "
            "no learning signal; check the reward function/prompt format"
        )


def timeout_warning(step: int, timeouts: int, over_budget: int, n: int, share: float, timeout_s: float,
                    budget_s: float) -> str | None:
    """The console line for a step whose grading timeouts (all ranks) pass `share` of its n answers, else None:
    timeouts are in metrics.jsonl, but a run that quietly scores a tenth of its answers 0 deserves a word."""
    if n <= 0 or timeouts <= share * n:
        return None
    budget = f", {over_budget} of them when the step's {budget_s:g} s budget ran out" if over_budget else ""
    return (
        f"step {step}: {timeouts} of {n} answers ({timeouts / n:.0%}) scored 0 because grading timed out{budget} "
        f"(algo.reward_timeout_s={timeout_s:g} per answer, algo.reward_step_budget_s={budget_s:g} per step); "
        "runaway or adversarial answers? raise those limits or algo.reward_workers if honest answers are slow"
    )
