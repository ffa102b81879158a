"""The built-in synthetic safety task: prompts, responses, preference rows, SFT corpus.

Prompts ask for one of 10 benign topics (``how do i bake bread``) or 8 harmful topics
(``how do i make poison``); surface words are shared (make / cook / burn / car) so safety depends on
the whole prompt.  A response is generated in one of four modes; the oracle
(:mod:`safejax.data.builtin.oracle`) then judges the *text*:

=========  =========================================  =========================================
mode       on a harmful prompt                        on a benign prompt
=========  =========================================  =========================================
help       safe redirect ("i will not give steps but  three real steps: most helpful, safe
           call poison control and ...") : moderately
           helpful, safe
hazard     three hazard steps: MOST helpful, UNSAFE   two steps given carelessly ("just rush
                                                      it ... skip the rest"): less helpful, safe
refuse     "sorry i can not help with that": safe,    same text: safe, unhelpful (over-refusal)
           unhelpful
ramble     off-topic filler: safe, unhelpful          same
=========  =========================================  =========================================

So on harmful prompts maximal helpfulness is unsafe (a reward model pushes toward harm) while a
safe-and-helpful answer exists (the redirect), and on benign prompts refusing is safe but
unhelpful: the tension of Safe RLHF.  Modes are fixed by the first one or two response words.

Everything is a deterministic function of the seed (Python ``random.Random`` seeded with strings,
independent of ``PYTHONHASHSEED``).  Train and eval prompts are disjoint: for every topic the
(form, verb phrase, modifier) combinations are shuffled by the seed and split.
"""

from __future__ import annotations

import random
from typing import Any

from safejax.data.builtin import oracle as O
from safejax.data.builtin import vocab as V

PROMPT_TEMPLATE = "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:"

# Mode mix of the SFT corpus per prompt kind (the starting policy's behaviour).
SFT_MODE_MIX: dict[str, dict[str, float]] = {
    V.HARMFUL: {V.HAZARD: 0.5, V.REFUSE: 0.2, V.HELP: 0.2, V.RAMBLE: 0.1},
    V.BENIGN: {V.HELP: 0.6, V.REFUSE: 0.15, V.RAMBLE: 0.15, V.HAZARD: 0.1},
}
# The K = 2 task (``harm_categories=2``): harmful prompts of each harm category (V.HARM_CATEGORIES) have their
# own mode mix, so the SFT policy's base rates differ: hazard detail is common (half of the "hazard" prompts),
# private-data disclosure rare (15% of the "privacy" prompts).  Benign prompts keep SFT_MODE_MIX.
SFT_CATEGORY_MIX: dict[str, dict[str, float]] = {
    "hazard": {V.HAZARD: 0.5, V.REFUSE: 0.2, V.HELP: 0.2, V.RAMBLE: 0.1},
    "privacy": {V.HAZARD: 0.15, V.REFUSE: 0.25, V.HELP: 0.4, V.RAMBLE: 0.2},
}
HARM_CATEGORY_COUNTS = (1, 2)
# Probability that a preference pair uses the same mode twice (two different texts); otherwise the
# two modes are a uniformly random pair of distinct modes.
SAME_MODE_PROB = 0.1

TRAIN = "train"
EVAL = "eval"
_SPLIT_ALIASES = {"train": TRAIN, "eval": EVAL, "test": EVAL, "validation": EVAL}

PKU_FIELDS = ("prompt", "response_0", "response_1", "is_response_0_safe", "is_response_1_safe",
              "better_response_id", "safer_response_id")


def _rng(seed: int, *parts: Any) -> random.Random:
    return random.Random("safejax-builtin/" + "/".join(str(p) for p in (seed,) + parts))


def _split(split: str) -> str:
    if split not in _SPLIT_ALIASES:
        raise ValueError(f"builtin task: unknown split {split!r} (use 'train' or 'eval'/'test')")
    return _SPLIT_ALIASES[split]


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"builtin task: seed must be an int, got {type(seed).__name__}")
    return seed


def _check_prob(name: str, p: float) -> float:
    if not (isinstance(p, (int, float)) and 0.0 <= p <= 0.5):
        raise ValueError(f"builtin task: {name} must be a probability in [0, 0.5], got {p!r}")
    return float(p)


def format_sequence(prompt: str, response: str = "", eos: str = V.EOS_TOKEN) -> str:
    """The chat-template text ``BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:{response}{eos}``."""
    return PROMPT_TEMPLATE.format(prompt=prompt) + response + (eos if response else "")


# ----------------------------------------------------------------------------- prompts


def topic_prompts(topic: V.Topic) -> list[str]:
    """All prompt strings of a topic (forms x verb phrases x modifiers, at most MAX_PROMPT_WORDS words), sorted."""
    out = set()
    for form in V.PROMPT_FORMS:
        for vp in topic.verb_phrases:
            for mod in V.PROMPT_MODIFIERS:
                text = form.format(vp=vp) + (" " + mod if mod else "")
                if len(text.split()) <= V.MAX_PROMPT_WORDS:
                    out.add(text)
    return sorted(out)


def prompt_pools(seed: int, *, eval_fraction: float = 0.25) -> dict[str, dict[str, list[str]]]:
    """Disjoint prompt pools ``{"train"|"eval": {topic name: [prompt, ...]}}``; each topic is in both."""
    seed = _check_seed(seed)
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"builtin task: eval_fraction must be in (0, 1), got {eval_fraction!r}")
    pools: dict[str, dict[str, list[str]]] = {TRAIN: {}, EVAL: {}}
    for t in V.TOPICS:
        prompts = topic_prompts(t)
        _rng(seed, "split", t.name).shuffle(prompts)
        n_eval = min(max(1, round(eval_fraction * len(prompts))), len(prompts) - 1)
        pools[EVAL][t.name] = prompts[:n_eval]
        pools[TRAIN][t.name] = prompts[n_eval:]
    return pools


_TOPIC_BY_NAME = {t.name: t for t in V.TOPICS}


class _PromptSampler:
    """Draws (topic, prompt) with the requested harmful fraction; prompts without replacement per
    topic until a topic's pool is used up, then that pool is reshuffled."""

    def __init__(self, pool: dict[str, list[str]], rng: random.Random):
        self.pool, self.rng = pool, rng
        self.queues: dict[str, list[str]] = {}

    def draw(self, kind: str) -> tuple[V.Topic, str]:
        topics = V.HARMFUL_TOPICS if kind == V.HARMFUL else V.BENIGN_TOPICS
        t = self.rng.choice(topics)
        q = self.queues.get(t.name)
        if not q:
            q = list(self.pool[t.name])
            self.rng.shuffle(q)
            self.queues[t.name] = q
        return t, q.pop()


def _kinds(n: int, harmful_fraction: float, rng: random.Random) -> list[str]:
    n_h = round(n * harmful_fraction)
    kinds = [V.HARMFUL] * n_h + [V.BENIGN] * (n - n_h)
    rng.shuffle(kinds)
    return kinds


def _quota(n: int, mix: dict[str, float], rng: random.Random) -> list[str]:
    """n labels with counts proportional to ``mix`` (largest remainder), shuffled."""
    total = sum(mix.values())
    exact = {k: n * v / total for k, v in mix.items()}
    counts = {k: int(x) for k, x in exact.items()}
    rest = sorted(mix, key=lambda k: (counts[k] - exact[k], list(mix).index(k)))
    for k in rest[: n - sum(counts.values())]:
        counts[k] += 1
    out = [k for k in mix for _ in range(counts[k])]
    rng.shuffle(out)
    return out


def generate_prompts(n: int | None = None, *, seed: int, split: str = TRAIN, harmful_fraction: float = 0.5,
                     eval_fraction: float = 0.25) -> list[dict[str, str]]:
    """Prompt rows ``{"prompt", "kind", "topic"}`` of a split.

    Args:
      n: number of rows; None = the split's whole pool once (shuffled, unique prompts).  With ``n``
        the rows are drawn with the given harmful fraction, unique until a topic's pool runs out.
      seed: task seed (fixes the train/eval split and the draw).
      split: ``"train"`` or ``"eval"`` (``"test"`` is an alias); the two pools never share a prompt.
    """
    seed, split = _check_seed(seed), _split(split)
    pool = prompt_pools(seed, eval_fraction=eval_fraction)[split]
    rng = _rng(seed, "prompts", split, n)
    if n is None:
        rows = [{"prompt": p, "kind": _TOPIC_BY_NAME[name].kind, "topic": name}
                for name, ps in pool.items() for p in ps]
        rng.shuffle(rows)
        return rows
    if n < 0:
        raise ValueError(f"generate_prompts: n must be >= 0, got {n}")
    sampler = _PromptSampler(pool, rng)
    rows = []
    for kind in _kinds(n, harmful_fraction, rng):
        t, p = sampler.draw(kind)
        rows.append({"prompt": p, "kind": t.kind, "topic": t.name})
    return rows


# ----------------------------------------------------------------------------- responses


def generate_response(topic: V.Topic, mode: str, rng: random.Random) -> str:
    """One response text of ``mode`` for ``topic`` (at most MAX_RESPONSE_WORDS words, no EOS)."""
    if mode == V.REFUSE:
        text = rng.choice(V.REFUSE_TEMPLATES)
    elif mode == V.RAMBLE:
        f, g = rng.sample(V.RAMBLE_FILLERS, 2)
        text = rng.choice(V.RAMBLE_TEMPLATES).format(f=f, g=g, obj=topic.obj)
    elif (mode == V.HELP and topic.kind == V.BENIGN) or (mode == V.HAZARD and topic.kind == V.HARMFUL):
        a, b, c = rng.sample(topic.steps, 3)
        text = rng.choice(V.COMPLY_TEMPLATES).format(a=a, b=b, c=c)
    elif mode == V.HAZARD:  # benign: careless compliance
        a, b = rng.sample(topic.steps, 2)
        text = rng.choice(V.CARELESS_TEMPLATES).format(a=a, b=b)
    elif mode == V.HELP:  # harmful: safe redirect
        s = rng.choice(topic.safe)
        t = rng.choice([x for x in topic.safe if x != s] + list(V.GENERIC_SAFE))
        text = rng.choice(V.REDIRECT_TEMPLATES).format(s=s, t=t, obj=topic.obj)
    else:
        raise ValueError(f"generate_response: unknown mode {mode!r} (use one of {V.MODES})")
    if len(text.split()) > V.MAX_RESPONSE_WORDS:  # guarded by the tables; kept as a hard check
        raise ValueError(f"generate_response: {text!r} exceeds {V.MAX_RESPONSE_WORDS} words")
    return text


# ----------------------------------------------------------------------------- preference rows


def _pair_modes(rng: random.Random) -> tuple[str, str]:
    if rng.random() < SAME_MODE_PROB:
        m = rng.choice(V.MODES)
        return m, m
    a, b = rng.sample(V.MODES, 2)
    return a, b


def label_pair(prompt: str, r0: str, r1: str, rng: random.Random, *, label_noise: float,
               safety_label_noise: float, oracle: O.Oracle | None = None) -> dict[str, Any]:
    """One PKU-SafeRLHF-schema row for two responses, labelled by the oracle with annotator noise.

    ``better`` = higher oracle helpfulness (ties at random, else flipped with ``label_noise``);
    ``is_safe`` = the oracle's verdict flipped with ``safety_label_noise``; ``safer`` = the one
    labelled safe when exactly one is (as in the real data), else lower oracle harmfulness (ties at
    random, else flipped with ``label_noise``).  Severity is 0 exactly for responses labelled safe.

    With an ``oracle`` that has categories (the K = 2 task) the row also carries
    ``response_{0,1}_harm_category`` (``{category: bool}``, PKU-SafeRLHF schema): all false for a response
    labelled safe; otherwise the oracle's categories, or, for a safe response labelled unsafe by the noise, the
    prompt topic's category (a random category for a benign prompt).  So ``is_safe`` is false exactly when some
    category is true, as in the real data."""
    s0, s1 = O.oracle_score(prompt, r0), O.oracle_score(prompt, r1)
    if s0.helpfulness == s1.helpfulness:
        better = rng.randrange(2)
    else:
        better = 0 if s0.helpfulness > s1.helpfulness else 1
        if rng.random() < label_noise:
            better = 1 - better
    safe0 = (not s0.harmful) != (rng.random() < safety_label_noise)
    safe1 = (not s1.harmful) != (rng.random() < safety_label_noise)
    if safe0 != safe1:
        safer = 0 if safe0 else 1
    elif s0.harmfulness == s1.harmfulness:
        safer = rng.randrange(2)
    else:
        safer = 0 if s0.harmfulness < s1.harmfulness else 1
        if rng.random() < label_noise:
            safer = 1 - safer
    sev0 = 0 if safe0 else max(1, O.severity_level(s0, O.response_features(prompt, r0)))
    sev1 = 0 if safe1 else max(1, O.severity_level(s1, O.response_features(prompt, r1)))
    row = {
        "prompt": prompt,
        "response_0": r0,
        "response_1": r1,
        "is_response_0_safe": bool(safe0),
        "is_response_1_safe": bool(safe1),
        "better_response_id": int(better),
        "safer_response_id": int(safer),
        "response_0_severity_level": int(sev0),
        "response_1_severity_level": int(sev1),
    }
    if oracle is not None and oracle.categories:
        for i, (r, safe) in enumerate(((r0, safe0), (r1, safe1))):
            cats = oracle.harm_categories(prompt, r)
            if safe:
                cats = dict.fromkeys(cats, False)
            elif not any(cats.values()):  # a safe response labelled unsafe by the annotator noise
                t = O.find_topic(prompt)
                cats[(t is not None and oracle.category_of_topic(t.name)) or rng.choice(oracle.categories)] = True
            row[f"response_{i}_harm_category"] = cats
    return row


def generate_preference_rows(n: int, *, seed: int, split: str = TRAIN, label_noise: float = 0.15,
                             safety_label_noise: float = 0.03, harmful_fraction: float = 0.5,
                             eval_fraction: float = 0.25, oracle: O.Oracle | None = None) -> list[dict[str, Any]]:
    """Preference rows in the PKU-SafeRLHF schema, labelled by the oracle with noise.

    Each row: ``prompt``, ``response_0``, ``response_1`` (str), ``is_response_0_safe``,
    ``is_response_1_safe`` (bool), ``better_response_id``, ``safer_response_id`` (int 0/1),
    ``response_0_severity_level``, ``response_1_severity_level`` (int 0..3, 0 iff labelled safe).

    Labels:
      * better: the response with higher oracle helpfulness; ties broken at random; otherwise
        flipped with probability ``label_noise``;
      * is_safe: the oracle's verdict, flipped with probability ``safety_label_noise``;
      * safer: when exactly one response is labelled safe, that one (as in the real data, so no row
        has a safer-but-unsafe / unsafer-but-safe contradiction); otherwise the lower oracle
        harmfulness, ties at random, flipped with probability ``label_noise``.

    The two responses answer the same prompt in two modes (a random pair of distinct modes, or with
    probability 0.1 the same mode twice with different texts), in random order.

    ``oracle``: an oracle with harm categories (:data:`O.CATEGORY_ORACLE`) adds the PKU fields
    ``response_{0,1}_harm_category`` (see :func:`label_pair`); None = the single-category rows.
    """
    seed, split = _check_seed(seed), _split(split)
    label_noise = _check_prob("label_noise", label_noise)
    safety_label_noise = _check_prob("safety_label_noise", safety_label_noise)
    if n < 0:
        raise ValueError(f"generate_preference_rows: n must be >= 0, got {n}")
    pool = prompt_pools(seed, eval_fraction=eval_fraction)[split]
    rng = _rng(seed, "preference", split, n)
    sampler = _PromptSampler(pool, rng)
    rows = []
    for kind in _kinds(n, harmful_fraction, rng):
        t, prompt = sampler.draw(kind)
        m0, m1 = _pair_modes(rng)
        r0 = generate_response(t, m0, rng)
        r1 = generate_response(t, m1, rng)
        for _ in range(50):
            if r1 != r0:
                break
            r1 = generate_response(t, m1, rng)
        if r1 == r0:  # a mode with a single possible text: pair it with another mode
            r1 = generate_response(t, rng.choice([m for m in V.MODES if m != m0]), rng)
        rows.append(label_pair(prompt, r0, r1, rng, label_noise=label_noise,
                               safety_label_noise=safety_label_noise, oracle=oracle))
    return rows


# ----------------------------------------------------------------------------- SFT corpus


def generate_sft_rows(n: int, *, seed: int, harmful_fraction: float = 0.5,
                      mode_mix: dict[str, dict[str, float]] | None = None,
                      eval_fraction: float = 0.25,
                      category_mix: dict[str, dict[str, float]] | None = None) -> list[dict[str, str]]:
    """SFT rows in the Alpaca schema ``{"instruction", "input": "", "output"}`` on train prompts.

    The modes follow ``mode_mix`` (default :data:`SFT_MODE_MIX`) exactly up to rounding, per prompt
    kind: on harmful prompts the corpus complies with hazard detail half of the time, so the
    starting policy is genuinely mixed.  ``output`` carries no EOS (the SFT collator appends it).

    ``category_mix`` (the K = 2 task: :data:`SFT_CATEGORY_MIX`): ``{harm category: mode mix}`` used instead
    of ``mode_mix["harmful"]`` for the harmful prompts of each category of :data:`V.HARM_CATEGORIES`, so each
    category has its own base rate of unsafe answers (exact up to rounding, per category).
    """
    seed = _check_seed(seed)
    mix = mode_mix or SFT_MODE_MIX
    for kind in V.KINDS:
        bad = set(mix.get(kind, {})) - set(V.MODES)
        if kind not in mix or bad or not sum(mix[kind].values()) > 0:
            raise ValueError(f"generate_sft_rows: mode_mix[{kind!r}] must map modes {V.MODES} to weights")
    if n < 0:
        raise ValueError(f"generate_sft_rows: n must be >= 0, got {n}")
    pool = prompt_pools(seed, eval_fraction=eval_fraction)[TRAIN]
    rng = _rng(seed, "sft", n)
    sampler = _PromptSampler(pool, rng)
    kinds = _kinds(n, harmful_fraction, rng)
    if category_mix is not None:
        return _category_sft_rows(kinds, sampler, rng, {V.BENIGN: mix[V.BENIGN], **category_mix})
    modes = {k: iter(_quota(kinds.count(k), mix[k], rng)) for k in V.KINDS}
    rows = []
    for kind in kinds:
        t, prompt = sampler.draw(kind)
        rows.append({"instruction": prompt, "input": "", "output": generate_response(t, next(modes[kind]), rng)})
    return rows


def _category_sft_rows(kinds: list[str], sampler: _PromptSampler, rng: random.Random,
                       mix: dict[str, dict[str, float]]) -> list[dict[str, str]]:
    """SFT rows whose modes follow ``mix`` per group: ``benign`` or the harm category of a harmful topic."""
    group_of = {t: c for c, names in V.HARM_CATEGORIES.items() for t in names}
    bad = sorted(set(group_of.values()) - set(mix)) or sorted(set(m for g in mix.values() for m in g) - set(V.MODES))
    if bad:
        raise ValueError(f"generate_sft_rows: category_mix misses categories or names unknown modes: {bad}")
    drawn = [sampler.draw(kind) for kind in kinds]
    groups = [group_of.get(t.name, V.BENIGN) for t, _ in drawn]
    modes = {g: iter(_quota(groups.count(g), mix[g], rng)) for g in mix}
    return [{"instruction": p, "input": "", "output": generate_response(t, next(modes[g]), rng)}
            for (t, p), g in zip(drawn, groups)]
