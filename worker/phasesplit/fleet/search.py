"""The provisioning search: which designs (non-split with whole prefills, the paper's baseline;
non-split with chunked prefill, what vLLM runs by default; or split pools of each hardware
pairing), how many machines each, checked by simulation against the SLOs.

Splitwise provisions each pool on its own; so does this: for a split design, the prompt pool is
the fewest machines that meet the SLOs with a generous token pool, then the token pool the fewest
that still meet them with that prompt pool. A split design with a mixed pool starts from the same
design without one and shrinks its prompt and token pools as far as the mixed pool (lent to
whichever side is overloaded) lets them; the search tries each mixed-pool size asked for, so the
ranking shows whether lending machines beats owning them. Under a cost or power budget, a design is
sized at a load where it fills the budget (the pools' ratio found there, not at a small load and
then scaled: starting from any rate, the sizing rate moves by the budget's ratio to the sized
design's price until the two are within `FILL_TOLERANCE`), grown to the budget, and its highest
rate at the SLOs found by bisection. `max_machines` caps every candidate's machines.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from phasesplit.fleet.perf import Profiles
from phasesplit.fleet.report import Slo, slos_met, summarize
from phasesplit.fleet.sim import PoolSpec, SimConfig, simulate
from phasesplit.fleet.trace import Trace, redraw

MAX_MACHINES = 512
FILL_TOLERANCE = 0.1   # a design sized within 10% of the budget is sized at the budget
SIZING_ROUNDS = 6
COLOCATED = ("baseline", "chunked")   # one mixed pool: whole prefills first, or chunks beside the decodes


@dataclass(frozen=True)
class Design:
    """`baseline` or `chunked` (one mixed pool, without or with chunked prefill) on one hardware, or
    `split` with a prompt and a token hardware."""
    kind: str
    prompt_hw: str
    token_hw: str = ""
    mixed_hw: str = ""      # a split design's optional mixed pool
    mixed_machines: int = 0

    def pools(self, prompt: int, token: int = 0) -> tuple[PoolSpec, ...]:
        if self.kind in COLOCATED:
            return (PoolSpec("mixed", self.prompt_hw, prompt),)
        pools = (PoolSpec("prompt", self.prompt_hw, prompt), PoolSpec("token", self.token_hw, token))
        return pools + ((PoolSpec("mixed", self.mixed_hw, self.mixed_machines),) if self.mixed_machines else ())

    def __str__(self) -> str:
        if self.kind in COLOCATED:
            return f"{self.kind} {self.prompt_hw}"
        mixed = f" + mixed {self.mixed_hw}" if self.mixed_machines else ""
        return f"split {self.prompt_hw} -> {self.token_hw}{mixed}"


@dataclass
class Candidate:
    design: Design
    prompt: int              # machines (the baseline's only pool)
    token: int
    rate: float
    summary: dict = field(default_factory=dict)
    met: bool = False
    sized_at: float | None = None   # the rate (req/s) its pools' sizes were found at

    @property
    def machines(self) -> int:
        return self.prompt + self.token + self.design.mixed_machines

    @property
    def cost(self) -> float:
        return self.summary.get("cost_per_hour", math.inf)

    @property
    def power(self) -> float:
        return self.summary.get("power_w", math.inf)


@dataclass
class Planner:
    profiles: Profiles
    base: SimConfig          # model, tp, engine settings (its pools are replaced)
    trace: Trace             # request sizes (and arrivals when `rate` is None)
    slos: tuple[Slo, ...]
    reference: str
    num_requests: int = 2000
    seed: int = 0
    chunk_budget: int = 2048  # the step budget of `chunked` designs
    max_machines: int = MAX_MACHINES
    simulations: int = 0
    _seen: dict = field(default_factory=dict, repr=False)

    def evaluate(self, design: Design, prompt: int, token: int, rate: float | None) -> Candidate:
        key = (design, prompt, token, rate)
        if key not in self._seen:
            self._seen[key] = self._simulate(design, prompt, token, rate)
        return self._seen[key]

    def _simulate(self, design: Design, prompt: int, token: int, rate: float | None) -> Candidate:
        trace = self.trace if rate is None else redraw(self.trace, rate, self.num_requests, self.seed)
        config = replace(self.base, pools=design.pools(prompt, token),
                         chunked_prefill=self.chunk_budget if design.kind == "chunked" else 0)
        reference = self.profiles.get(self.base.model, self.reference, self.base.tp)
        summary = summarize(simulate(config, self.profiles, trace), reference)
        self.simulations += 1
        return Candidate(design, prompt, token, rate if rate is not None else trace.rate, summary,
                         slos_met(summary, self.slos))

    # ---- the fewest machines for a load ----
    def smallest(self, design: Design, rate: float | None) -> Candidate | None:
        """The fewest machines that meet the SLOs at `rate` (None: the trace's own arrivals), within
        `max_machines`; None when there are none."""
        c = self._smallest(design, rate)
        if c is None or c.machines > self.max_machines:
            return None
        c.sized_at = c.rate
        return c

    def _smallest(self, design: Design, rate: float | None) -> Candidate | None:
        limit = self.max_machines - design.mixed_machines
        if design.kind in COLOCATED:
            n = _fewest(lambda n: self.evaluate(design, n, 0, rate).met, limit=limit)
            return None if n is None else self.evaluate(design, n, 0, rate)
        if design.mixed_machines:
            alone = self.smallest(replace(design, mixed_hw="", mixed_machines=0), rate)
            if alone is None:
                return None
            high_prompt, high_token = alone.prompt, alone.token
        else:
            generous = _fewest(lambda t: self.evaluate(design, t, t, rate).met, limit=max(limit - 1, 1))
            if generous is None:
                return None
            high_prompt = high_token = generous
        prompt = _fewest(lambda p: self.evaluate(design, p, high_token, rate).met, high=high_prompt)
        token = _fewest(lambda t: self.evaluate(design, prompt, t, rate).met, high=high_token)
        return self.evaluate(design, prompt, token, rate)

    # ---- the highest rate within a budget ----
    def price(self, design: Design, prompt: int, token: int, measure: str) -> float:
        """Cost per hour or power (`measure`: cost_per_hour, power_w) of a design's machines."""
        return sum(pool.machines * getattr(self.profiles.catalog[pool.hardware], measure)
                   for pool in design.pools(prompt, token))

    def _room(self, design: Design, prompt: int, token: int, measure: str, limit: float) -> float:
        """How many times over the design's machines fit the budget and `max_machines`."""
        return min(limit / self.price(design, prompt, token, measure),
                   (self.max_machines - design.mixed_machines) / max(prompt + token, 1))

    def within_budget(self, design: Design, measure: str, limit: float,
                      start_rate: float) -> tuple[int, int, float] | None:
        """The design sized at a rate where it fills `limit` (of `measure`), searched from `start_rate`,
        then grown to the budget: (prompt machines, token machines, the sizing rate); None when it
        cannot be sized."""
        rate, sized = start_rate, None
        for _ in range(SIZING_ROUNDS):
            found = self.smallest(design, rate)
            if found is None:
                if sized is not None:
                    break          # more load than the machine cap allows: keep the last fit
                return None
            sized = found
            room = self._room(design, sized.prompt, sized.token, measure, limit)
            if abs(room - 1) <= FILL_TOLERANCE:
                break
            rate *= room
        rate = sized.rate
        room = self._room(design, sized.prompt, sized.token, measure, limit)
        prompt, token = max(1, math.floor(sized.prompt * room)), math.floor(sized.token * room)
        if design.kind == "split":
            token = max(1, token)
            while prompt > 1 and (self.price(design, prompt, token, measure) > limit
                                  or prompt + token + design.mixed_machines > self.max_machines):
                prompt -= 1
        return prompt, token, rate

    def best_rate(self, design: Design, measure: str, limit: float, start_rate: float) -> Candidate | None:
        """Size the design where it fills `limit` (of `measure`), grow it to the budget, find its top rate."""
        grown = self.within_budget(design, measure, limit, start_rate)
        if grown is None or self.price(design, grown[0], grown[1], measure) > limit:
            return None
        prompt, token, sized_at = grown
        best = self.top_rate(design, prompt, token, sized_at)
        if best is not None:
            best.sized_at = sized_at
        return best

    def top_rate(self, design: Design, prompt: int, token: int, guess: float) -> Candidate | None:
        """The highest Poisson rate at which the design meets the SLOs (doubling, then bisection)."""
        best, rate = None, guess
        for _ in range(8):
            c = self.evaluate(design, prompt, token, rate)
            if not c.met:
                break
            best, rate = c, rate * 2
        low, high = (best.rate if best else 0.0), rate
        while high - low > 0.02 * high:
            mid = (low + high) / 2
            c = self.evaluate(design, prompt, token, mid)
            if c.met:
                best, low = c, mid
            else:
                high = mid
        return best


def _fewest(ok: Callable[[int], bool], high: int | None = None, limit: int = MAX_MACHINES) -> int | None:
    """The smallest n >= 1 (at most `limit`) with ok(n), assuming more machines never hurt (doubling,
    then bisection)."""
    if high is None:
        high = 1
        while not ok(high):
            if high >= limit:
                return None
            high = min(high * 2, limit)
    low = 0   # ok(low) is false or low is 0
    while high - low > 1:
        mid = (low + high) // 2
        if ok(mid):
            high = mid
        else:
            low = mid
    return high


def designs(hardware: list[str], split: bool = True, baseline: bool = True, mixed: str | None = None,
            mixed_sizes: tuple[int, ...] = (), chunked: bool = True) -> list[Design]:
    """Baselines of each hardware (whole prefills, then with chunked prefill), and split designs of
    each pairing, each with every mixed-pool size."""
    out = [Design(kind, hw) for hw in hardware for kind in COLOCATED if kind != "chunked" or chunked] \
        if baseline else []
    if split:
        sizes = mixed_sizes if mixed else (0,)
        out += [Design("split", p, t, mixed if n else "", n) for p in hardware for t in hardware for n in sizes]
    return out
