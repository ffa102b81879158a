"""Elo ratings from pairwise judgements, with bootstrap confidence intervals.

The paper rates policies on two separate axes, helpfulness and harmlessness (ALGORITHM.md §7.2). Here a
*judgement* is one comparison of two policies' answers to the same prompt; it comes from

* the reward model (helpfulness: the higher reward wins) or the cost model (harmlessness: the lower cost wins),
  via :func:`judge_pairs` with ``judge="higher"`` / ``"lower"``;
* any pluggable judge function ``judge(prompt_id, model_a, answer_a, model_b, answer_b) -> "a" | "b" | "tie"``
  (e.g. :func:`cached_judge`, which reads cached LLM-judge verdicts from a JSONL file);
* a JSONL file of verdicts read directly with :func:`judgements_from_file`.

Ratings are the **maximum-likelihood Bradley-Terry** fit (not the order-dependent online Elo update):

    P(a beats b) = 1 / (1 + 10 ** ((R_b - R_a) / scale)),

a tie counting as half a win for each side. Internally ``theta = R * ln(10) / scale`` (natural log-odds units) is
fitted by Newton's method with a backtracking line search; the anchor model is pinned at ``anchor_rating``.
An optional ridge penalty ``l2/2 * sum_i (theta_i - mean(theta))**2`` (a Gaussian prior with standard deviation
``1/sqrt(l2)`` log-odds units on each model's deviation from the mean; symmetric in the models) keeps ratings
finite when a model wins or loses every comparison (common in bootstrap resamples of small evaluations). With the
default ``l2 = 1e-2`` the prior's standard deviation is 10 log-odds units (~1737 Elo points), so its pull on
well-determined ratings is negligible; ``l2 = 0`` gives the pure MLE, which exists only when the "scored at least
a tie against" graph is strongly connected, and raises ``ValueError`` otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Iterator, Any, Callable, Hashable, Iterable, Mapping, NamedTuple, Sequence

import numpy as np

from safejax.errors import DataError
from safejax.evaluate.stats import as_scores

__all__ = [
    "WINNERS",
    "Judgement",
    "EloEstimate",
    "judge_pairs",
    "judgements_from_file",
    "write_judgements",
    "cached_judge",
    "win_probability",
    "fit_elo",
    "bootstrap_elo",
]

WINNERS = ("a", "b", "tie")
AXES = ("helpfulness", "harmlessness")  # the two judge axes of the paper's Elo evaluation
_SCORE_A = {"a": 1.0, "b": 0.0, "tie": 0.5}


@dataclasses.dataclass(frozen=True)
class Judgement:
    """One pairwise verdict: ``winner`` is ``"a"`` (model_a's answer is better), ``"b"`` or ``"tie"``.

    ``prompt_id`` is optional; :func:`bootstrap_elo` needs it only with ``cluster="prompt"``.
    """

    model_a: str
    model_b: str
    winner: str
    prompt_id: Hashable | None = None

    def __post_init__(self):
        for field in ("model_a", "model_b"):
            v = getattr(self, field)
            if not isinstance(v, str) or not v:
                raise ValueError(f"Judgement.{field}: expected a non-empty model name string, got {v!r}")
        if self.model_a == self.model_b:
            raise ValueError(f"Judgement: model_a and model_b are the same model {self.model_a!r}")
        if self.winner not in WINNERS:
            raise ValueError(f"Judgement.winner: expected one of {WINNERS}, got {self.winner!r}")


class EloEstimate(NamedTuple):
    """A rating with its bootstrap percentile interval (``low <= high``); unpacks as ``(rating, low, high)``."""

    rating: float
    low: float
    high: float


# ----------------------------------------------------------------------------------------------------------------
# Producing judgements
# ----------------------------------------------------------------------------------------------------------------


def judge_pairs(
    answers: Mapping[str, Sequence[Any]],
    judge: str | Callable[[Any, str, Any, str, Any], str] = "higher",
    *,
    tie_tol: float = 0.0,
    prompt_ids: Sequence[Hashable] | None = None,
) -> list[Judgement]:
    """Pairwise judgements for every prompt and every pair of policies.

    Args:
      answers: ``{policy: [N] per-prompt answers}``, all aligned on the same ``N`` prompts. With a string
        ``judge`` the answers are scores (floats); with a callable judge they can be anything it understands
        (texts, score tuples, ...).
      judge: ``"higher"`` (higher score wins: reward-model helpfulness), ``"lower"`` (lower score wins:
        cost-model harmlessness) or a callable ``judge(prompt_id, model_a, answer_a, model_b, answer_b)``
        returning ``"a"``, ``"b"`` or ``"tie"``.
      tie_tol: with a string judge, ``|score_a - score_b| <= tie_tol`` is a tie.
      prompt_ids: ``[N]`` ids stored in each judgement (default ``0..N-1``).

    Returns ``N * P * (P - 1) / 2`` judgements for ``P`` policies, prompt-major; within a prompt the pairs are
    ``(policies[i], policies[j])`` for ``i < j`` in the mapping's order.
    """
    models = list(answers)
    if len(models) < 2:
        raise ValueError(f"answers: need at least two policies, got {models}")
    if isinstance(judge, str):
        if judge not in ("higher", "lower"):
            raise ValueError(f"judge: expected 'higher', 'lower' or a callable, got {judge!r}")
        if tie_tol < 0:
            raise ValueError(f"tie_tol: must be >= 0, got {tie_tol}")
        cols = {m: as_scores(answers[m], f"answers[{m!r}]") for m in models}
    elif callable(judge):
        cols = {m: list(answers[m]) for m in models}
    else:
        raise ValueError(f"judge: expected 'higher', 'lower' or a callable, got {judge!r}")
    lengths = {m: len(v) for m, v in cols.items()}
    n = lengths[models[0]]
    if len(set(lengths.values())) != 1:
        raise ValueError(f"answers: policies answered different numbers of prompts: {lengths}")
    if prompt_ids is None:
        prompt_ids = list(range(n))
    elif len(prompt_ids) != n:
        raise ValueError(f"prompt_ids: has {len(prompt_ids)} entries, answers have {n} prompts")

    out = []
    sign = 1.0 if judge == "higher" else -1.0
    for k in range(n):
        pid = prompt_ids[k]
        for i in range(len(models)):
            for j in range(i + 1, len(models)):
                a, b = models[i], models[j]
                if isinstance(judge, str):
                    d = sign * (cols[a][k] - cols[b][k])
                    w = "tie" if abs(d) <= tie_tol else ("a" if d > 0 else "b")
                else:
                    w = judge(pid, a, cols[a][k], b, cols[b][k])
                    if w not in WINNERS:
                        raise ValueError(
                            f"judge returned {w!r} for prompt {pid!r} ({a!r} vs {b!r}); expected one of {WINNERS}"
                        )
                out.append(Judgement(a, b, w, pid))
    return out


def judgement_rows(path: str | os.PathLike) -> Iterator[tuple[str, dict, Judgement]]:
    """Parse a verdict JSONL file: ``(where, row, Judgement)`` per non-blank line, where ``where`` is
    ``"file:line"``.  Each line is an object ``{"prompt_id": ..., "model_a": str, "model_b": str,
    "winner": "a"|"b"|"tie"}`` (``prompt_id`` optional; ``winner`` case-insensitive; other fields are
    kept in ``row`` for the caller).  Raises ``ValueError`` naming the file, line and field."""
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
            for field in ("model_a", "model_b", "winner"):
                if field not in row:
                    raise DataError(f"{where}: missing field {field!r}")
                if not isinstance(row[field], str):
                    raise DataError(f"{where}: field {field!r} must be a string, got {row[field]!r}")
            winner = row["winner"].strip().lower()
            if winner not in WINNERS:
                raise DataError(f"{where}: field 'winner' must be one of {WINNERS}, got {row['winner']!r}")
            pid = row.get("prompt_id")
            if isinstance(pid, list):
                pid = tuple(pid)
            try:
                yield where, row, Judgement(row["model_a"], row["model_b"], winner, pid)
            except ValueError as e:
                raise DataError(f"{where}: {e}") from None


def judgements_from_file(path: str | os.PathLike) -> list[Judgement]:
    """Read cached verdicts from a JSONL file (format: :func:`judgement_rows`)."""
    return [j for _, _, j in judgement_rows(path)]


def write_judgements(path: str | os.PathLike, judgements: Iterable[Judgement]) -> None:
    """Write judgements as JSONL readable by :func:`judgements_from_file` (``prompt_id`` must be JSON-able)."""
    with open(os.fspath(path), "w", encoding="utf-8") as f:
        for j in judgements:
            row = {"prompt_id": j.prompt_id, "model_a": j.model_a, "model_b": j.model_b, "winner": j.winner}
            f.write(json.dumps(row) + "\n")


def cached_judge(path: str | os.PathLike) -> Callable[[Any, str, Any, str, Any], str]:
    """A judge function for :func:`judge_pairs` that looks verdicts up in a JSONL cache (e.g. LLM-judge output).

    Verdicts are keyed by ``(prompt_id, model_a, model_b)``; a verdict stored with the models the other way round
    is used with its winner swapped. The answers themselves are ignored. Use ``prompt_ids=`` in
    :func:`judge_pairs` so the ids match the file's. A missing verdict raises ``ValueError``; conflicting
    duplicates in the file raise too.
    """
    path = os.fspath(path)
    table: dict[tuple, str] = {}
    swap = {"a": "b", "b": "a", "tie": "tie"}
    for j in judgements_from_file(path):
        for key, w in (((j.prompt_id, j.model_a, j.model_b), j.winner),
                       ((j.prompt_id, j.model_b, j.model_a), swap[j.winner])):
            if table.setdefault(key, w) != w:
                raise DataError(f"{path}: conflicting verdicts for prompt {key[0]!r} ({key[1]!r} vs {key[2]!r})")

    def judge(prompt_id, model_a, answer_a, model_b, answer_b):  # noqa: ARG001 (answers unused)
        try:
            return table[(prompt_id, model_a, model_b)]
        except KeyError:
            raise DataError(
                f"{path}: no cached verdict for prompt {prompt_id!r} ({model_a!r} vs {model_b!r})"
            ) from None

    return judge


# ----------------------------------------------------------------------------------------------------------------
# Fitting
# ----------------------------------------------------------------------------------------------------------------


def win_probability(rating_a: float, rating_b: float, scale: float = 400.0) -> float:
    """Bradley-Terry / Elo expected score of a against b: ``1 / (1 + 10 ** ((rating_b - rating_a) / scale))``."""
    return 1.0 / (1.0 + 10.0 ** ((rating_b - rating_a) / scale))


def _encode(judgements: Sequence[Judgement]) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Models in order of first appearance; ``ia, ib`` int ``[J]`` indices and ``sa`` float ``[J]`` score of a."""
    index: dict[str, int] = {}
    ia, ib, sa = [], [], []
    for k, j in enumerate(judgements):
        if not isinstance(j, Judgement):
            raise ValueError(f"judgements[{k}]: expected a Judgement, got {type(j).__name__}")
        ia.append(index.setdefault(j.model_a, len(index)))
        ib.append(index.setdefault(j.model_b, len(index)))
        sa.append(_SCORE_A[j.winner])
    if not ia:
        raise ValueError("judgements: empty (need at least one comparison)")
    return list(index), np.asarray(ia), np.asarray(ib), np.asarray(sa, dtype=np.float64)


def _tally(m: int, ia, ib, sa, weights=None) -> tuple[np.ndarray, np.ndarray]:
    """``W [M, M]``: points scored by i against j; ``N [M, M]``: games between i and j (symmetric)."""
    w = np.ones_like(sa) if weights is None else weights.astype(np.float64)
    W = np.zeros((m, m))
    N = np.zeros((m, m))
    np.add.at(W, (ia, ib), w * sa)
    np.add.at(W, (ib, ia), w * (1.0 - sa))
    np.add.at(N, (ia, ib), w)
    np.add.at(N, (ib, ia), w)
    return W, N


def _reachable(adj: np.ndarray, start: int) -> np.ndarray:
    seen = np.zeros(adj.shape[0], dtype=bool)
    seen[start] = True
    frontier = seen.copy()
    while frontier.any():
        new = adj[frontier].any(axis=0) & ~seen
        seen |= new
        frontier = new
    return seen


def _check_graph(models: list[str], W: np.ndarray, N: np.ndarray, anchor: int, l2: float) -> None:
    conn = _reachable(N > 0, anchor)
    if not conn.all():
        lost = [models[i] for i in np.flatnonzero(~conn)]
        raise ValueError(
            f"judgements: models {lost} are never compared (directly or through others) with anchor "
            f"{models[anchor]!r}; their ratings are undetermined"
        )
    if l2 == 0.0:
        fwd = _reachable(W > 0, anchor)  # anchor scored (directly or transitively) against them
        bwd = _reachable((W > 0).T, anchor)  # they scored against the anchor
        if not (fwd.all() and bwd.all()):
            bad = [models[i] for i in np.flatnonzero(~(fwd & bwd))]
            raise ValueError(
                f"judgements: the maximum-likelihood ratings are infinite for {bad} (they win or lose every "
                "comparison against their group); use l2 > 0"
            )


def _objective(theta, W, N, l2):
    d = theta[:, None] - theta[None, :]
    # -sum W_ij log sigma(theta_i - theta_j);  log sigma(x) = -logaddexp(0, -x)
    nll = float(np.sum(W * np.logaddexp(0.0, -d)))
    c = theta - theta.mean()
    return nll + 0.5 * l2 * float(c @ c)


def _fit_theta(W, N, anchor, l2, max_iter=100, tol=1e-10):
    m = W.shape[0]
    theta = np.zeros(m)
    free = np.arange(m) != anchor
    f = _objective(theta, W, N, l2)
    for _ in range(max_iter):
        d = theta[:, None] - theta[None, :]
        p = 1.0 / (1.0 + np.exp(-d))
        grad = -(W.sum(axis=1) - (N * p).sum(axis=1)) + l2 * (theta - theta.mean())
        wts = N * p * (1.0 - p)
        H = np.diag(wts.sum(axis=1)) - wts + l2 * (np.eye(m) - 1.0 / m)
        g_f = grad[free]
        if np.max(np.abs(g_f)) <= tol * max(1.0, N.sum()):
            return theta
        step = np.zeros(m)
        step[free] = np.linalg.solve(H[np.ix_(free, free)], -g_f)
        t = 1.0
        while True:
            cand = theta + t * step
            f_new = _objective(cand, W, N, l2)
            if f_new <= f + 1e-4 * t * float(grad @ step) or t < 1e-12:
                break
            t *= 0.5
        theta, f = cand, f_new
        if np.max(np.abs(t * step)) < 1e-12:
            return theta
    raise ValueError(
        f"Elo fit: Newton iterations did not converge in {max_iter} steps (gradient {np.max(np.abs(g_f)):.3g})"
    )


def _to_ratings(theta, models, anchor_rating, scale) -> dict[str, float]:
    r = anchor_rating + theta * (scale / math.log(10.0))
    return {m: float(v) for m, v in zip(models, r)}


def _check_args(models, anchor, scale, l2) -> int:
    if anchor not in models:
        raise ValueError(f"anchor: {anchor!r} does not appear in the judgements (models: {models})")
    if not scale > 0:
        raise ValueError(f"scale: must be > 0, got {scale}")
    if not l2 >= 0:
        raise ValueError(f"l2: must be >= 0, got {l2}")
    return models.index(anchor)


def fit_elo(
    judgements: Sequence[Judgement],
    *,
    anchor: str,
    anchor_rating: float = 1000.0,
    scale: float = 400.0,
    l2: float = 1e-2,
) -> dict[str, float]:
    """Maximum-likelihood Bradley-Terry (Elo-scale) ratings.

    Args:
      judgements: pairwise verdicts among any number of models (ties = half a win each).
      anchor: the baseline model, pinned at ``anchor_rating``.
      scale: Elo scale; a difference of ``scale`` points means 10:1 odds.
      l2: ridge strength on log-strength deviations from the mean (see the module docstring); 0 = pure MLE.

    Returns ``{model: rating}`` in order of first appearance in ``judgements``.
    """
    models, ia, ib, sa = _encode(judgements)
    a = _check_args(models, anchor, scale, l2)
    W, N = _tally(len(models), ia, ib, sa)
    _check_graph(models, W, N, a, l2)
    return _to_ratings(_fit_theta(W, N, a, l2), models, anchor_rating, scale)


def bootstrap_elo(
    judgements: Sequence[Judgement],
    *,
    anchor: str,
    n_boot: int = 200,
    seed: int = 0,
    ci: float = 0.95,
    anchor_rating: float = 1000.0,
    scale: float = 400.0,
    l2: float = 1e-2,
    cluster: str = "judgement",
) -> dict[str, EloEstimate]:
    """Ratings with bootstrap percentile confidence intervals.

    The point estimate is :func:`fit_elo` on all judgements. Each of the ``n_boot`` replicates refits on a
    resample drawn with replacement: individual judgements (``cluster="judgement"``) or whole prompts with all
    their judgements (``cluster="prompt"``; needs every ``prompt_id`` set, and accounts for judgements of the
    same prompt being correlated). The interval is the ``[(1-ci)/2, (1+ci)/2]`` percentile range of the
    replicates. The anchor's interval is ``(anchor_rating, anchor_rating)``.

    Returns ``{model: EloEstimate(rating, low, high)}`` in order of first appearance.
    """
    models, ia, ib, sa = _encode(judgements)
    a = _check_args(models, anchor, scale, l2)
    if int(n_boot) < 1:
        raise ValueError(f"n_boot: must be >= 1, got {n_boot}")
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci: must be in (0, 1), got {ci}")
    m = len(models)
    W, N = _tally(m, ia, ib, sa)
    _check_graph(models, W, N, a, l2)
    point = _to_ratings(_fit_theta(W, N, a, l2), models, anchor_rating, scale)

    if cluster == "judgement":
        group = np.arange(len(sa))
    elif cluster == "prompt":
        pids = [j.prompt_id for j in judgements]
        missing = [k for k, p in enumerate(pids) if p is None]
        if missing:
            raise ValueError(f"judgements[{missing[0]}]: prompt_id is None (required with cluster='prompt')")
        ids: dict[Hashable, int] = {}
        group = np.asarray([ids.setdefault(p, len(ids)) for p in pids])
    else:
        raise ValueError(f"cluster: expected 'judgement' or 'prompt', got {cluster!r}")
    n_groups = int(group.max()) + 1

    rng = np.random.default_rng(seed)
    samples = np.empty((int(n_boot), m))
    for b in range(int(n_boot)):
        draws = np.bincount(rng.integers(0, n_groups, n_groups), minlength=n_groups)
        Wb, Nb = _tally(m, ia, ib, sa, weights=draws[group])
        try:
            _check_graph(models, Wb, Nb, a, l2)
        except ValueError as e:
            raise ValueError(f"bootstrap replicate {b}: {e}") from None
        samples[b] = _fit_theta(Wb, Nb, a, l2)
    samples = anchor_rating + samples * (scale / math.log(10.0))
    lo, hi = np.quantile(samples, [(1.0 - ci) / 2.0, (1.0 + ci) / 2.0], axis=0)
    return {mod: EloEstimate(point[mod], float(lo[i]), float(hi[i])) for i, mod in enumerate(models)}


# ----------------------------------------------------------------------------- cached verdict files


def read_verdicts(spec: str) -> dict[str, list[Judgement]]:
    """Cached verdicts per axis from ``spec`` (a folder with ``<axis>.jsonl`` files, or one JSONL with ``axis``)."""
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        out = {}
        for axis in AXES:
            f = os.path.join(path, f"{axis}.jsonl")
            if os.path.exists(f):
                out[axis] = judgements_from_file(f)
        if not out:
            raise DataError(f"{path}: no helpfulness.jsonl or harmlessness.jsonl verdict file in this folder")
        return out
    if not os.path.exists(path):
        raise FileNotFoundError(f"judge file {path!r} does not exist")
    out: dict[str, list[Judgement]] = {}
    for where, row, j in judgement_rows(path):
        axis = row.get("axis")
        if axis not in AXES:
            raise DataError(f"{where}: field 'axis' must be one of {AXES}, got {axis!r}")
        out.setdefault(axis, []).append(j)
    if not out:
        raise DataError(f"{path}: no verdicts in this file")
    return out


def pair_counts(judgements: Sequence[Judgement]) -> list[dict[str, Any]]:
    """Per unordered model pair: games, wins of each side, ties (first-seen orientation)."""
    table: dict[tuple[str, str], dict[str, Any]] = {}
    for j in judgements:
        key = (j.model_a, j.model_b) if (j.model_b, j.model_a) not in table else (j.model_b, j.model_a)
        e = table.setdefault(key, {"model_a": key[0], "model_b": key[1], "games": 0, "a_wins": 0, "b_wins": 0,
                                   "ties": 0})
        e["games"] += 1
        if j.winner == "tie":
            e["ties"] += 1
        elif (j.winner == "a") == (j.model_a == key[0]):
            e["a_wins"] += 1
        else:
            e["b_wins"] += 1
    return list(table.values())
