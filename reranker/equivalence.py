"""Equivalence evaluation: may one block stand in for another?

BlockLLM substitutes a block only after checking, on calibration inputs, that
the substitute computes (nearly) the same thing. Here the candidates for a
tenant block at layer l are

  * the base block, when the tenant's delta there is negligible (a layer the
    fine-tuning barely moved, or an untrained adapter), and
  * another tenant's block at the same layer that computes the same update
    (the same adapter uploaded again after a dtype round trip, say): found by a
    small random-projection fingerprint of each block's update, then checked.

A substitution is accepted only when, on the calibration prompts,
  1. the maximum relative error of the layer's residual update, taken relative
     to the substitute's update, max over tokens of ||u_own - u_sub|| / ||u_sub||,
     is below `max_relative_error`, and
  2. the whole chain with the substitution ranks every calibration prompt's
     documents like the chain without it (mean Kendall tau >= `min_agreement`)
     and moves no calibration score by more than `max_score_change` (so a
     substitution stays within the fp32 tolerance of the tenant's own model).
Every evaluated candidate is recorded as a Decision, accepted or not.
Identical uploads need no evaluation: content addressing already makes them
the same block.

Locking: `EquivalenceChecker._lock` makes evaluations one at a time and guards
the trace and fingerprints; every forward pass of an evaluation also holds the
engine's forward lock (the same one serving batches take), so evaluations and
serving never run the model at once. Zoo calls take the zoo's own lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from enum import StrEnum

import torch

from reranker.blockrank import BlockRankForward, LayerTrace, ScoringSpec
from reranker.prompt import Prompt
from reranker.ranking import kendall_tau
from reranker.routing import LayerDeltas, Route
from reranker.zoo import BlockZoo

log = logging.getLogger(__name__)
FINGERPRINT_DIM = 8  # per token; the fingerprint only shortlists candidates, the exact check decides


class ReplacementKind(StrEnum):
    BASE = "base"
    TENANT = "tenant"


@dataclass(frozen=True)
class Decision:
    tenant: str
    layer: int
    block: str
    replacement: str
    replacement_kind: ReplacementKind
    max_relative_error: float
    ranking_agreement: float  # mean Kendall tau over the calibration prompts
    max_score_change: float  # largest change of a calibration document's score
    accepted: bool
    reason: str
    at: float


class EquivalenceChecker:
    def __init__(self, forward: BlockRankForward, zoo: BlockZoo, calibration: Sequence[Prompt],
                 forward_lock: AbstractContextManager[object],
                 max_relative_error: float = 1e-3, min_agreement: float = 0.999, max_score_change: float = 1e-4,
                 max_decisions: int = 1000) -> None:
        self.forward = forward
        self.forward_lock = forward_lock
        self.zoo = zoo
        self.calibration = list(calibration)
        self.max_relative_error = max_relative_error
        self.min_agreement = min_agreement
        self.max_score_change = max_score_change
        self.max_decisions = max_decisions
        self.decisions: list[Decision] = []
        self._fingerprints: dict[str, torch.Tensor] = {}  # block id -> fingerprint of its update
        self._trace: LayerTrace | None = None
        self._projection: torch.Tensor | None = None
        self._lock = threading.Lock()  # one evaluation at a time

    def check_tenant(self, tenant: str, spec: ScoringSpec) -> list[Decision]:
        """Evaluate every tenant block of the tenant's chain (scored as `spec`); substitute where equivalent."""
        with self._lock:
            resolved = self.zoo.resolve(tenant)
            for gone in self._fingerprints.keys() - self.zoo.known_block_ids():  # blocks unloaded since
                del self._fingerprints[gone]
            trace = self._trace_to(spec.layer)
            made: list[Decision] = []
            for layer in range(spec.layer + 1):
                deltas = resolved.route.at(layer)
                if deltas is None:
                    continue
                block_id = resolved.chain.layers[layer]
                decision = self._check_block(tenant, layer, block_id, deltas, resolved.route, trace, spec)
                if decision is None:
                    continue
                made.append(decision)
                if decision.accepted:
                    self.zoo.replace_block(tenant, layer, decision.replacement)
                    resolved = self.zoo.resolve(tenant)
            self._record(made)
            log.info("equivalence %s: %d candidate(s), %d substituted", tenant, len(made),
                     sum(d.accepted for d in made))
            return made

    # ---- internals -------------------------------------------------------------
    def _check_block(self, tenant: str, layer: int, block_id: str, deltas: LayerDeltas, route: Route,
                     trace: LayerTrace, spec: ScoringSpec) -> Decision | None:
        own = self._update(trace, layer, deltas)
        base = self._update(trace, layer, None)
        self._fingerprints[block_id] = self._fingerprint(own)
        error = _max_relative_error(base, own)
        if error <= self.max_relative_error:
            return self._decide(tenant, layer, block_id, self.zoo.base_chain.layers[layer], ReplacementKind.BASE,
                                error, route, None, spec)
        for other_id, other in self._twins(layer, block_id):
            error = _max_relative_error(self._update(trace, layer, other), own)
            if error <= self.max_relative_error:
                return self._decide(tenant, layer, block_id, other_id, ReplacementKind.TENANT, error, route, other,
                                    spec)
        return None

    def _update(self, trace: LayerTrace, layer: int, deltas: LayerDeltas | None) -> torch.Tensor:
        with self.forward_lock:
            return self.forward.layer_update(trace, layer, deltas)

    def _twins(self, layer: int, block_id: str) -> list[tuple[str, LayerDeltas]]:
        """Resident tenant blocks at this layer whose fingerprint is close to this block's."""
        mine = self._fingerprints[block_id]
        scale = float(mine.norm()) or 1.0
        found: list[tuple[str, LayerDeltas]] = []
        for other in self.zoo.layer_blocks(layer):
            print_ = self._fingerprints.get(other.id)
            if other.id == block_id or print_ is None or other.deltas is None:
                continue
            if float((print_ - mine).norm()) / scale <= 10 * self.max_relative_error:
                found.append((other.id, other.deltas))
        return found

    def _decide(self, tenant: str, layer: int, block_id: str, replacement: str, kind: ReplacementKind, error: float,
                route: Route, replacement_deltas: LayerDeltas | None, spec: ScoringSpec) -> Decision:
        layers = list(route.layers)
        layers[layer] = replacement_deltas
        substituted = Route(layers=tuple(layers), chain_keys=())
        plain = Route(layers=route.layers, chain_keys=())
        n = len(self.calibration)
        with self.forward_lock:
            before = self.forward.score_routed(self.calibration, [spec] * n, [plain] * n)
            after = self.forward.score_routed(self.calibration, [spec] * n, [substituted] * n)
        agreement = sum(kendall_tau(a.tolist(), b.tolist()) for a, b in zip(before, after, strict=True)) / n
        change = max(float((a - b).abs().max()) for a, b in zip(before, after, strict=True))
        if agreement < self.min_agreement:
            accepted, reason = False, f"rankings differ on calibration prompts (tau {agreement:.3f})"
        elif change > self.max_score_change:
            accepted, reason = False, f"scores move by {change:.1e} > {self.max_score_change:.0e}"
        else:
            accepted, reason = True, (f"update error {error:.1e} <= {self.max_relative_error:.0e}, same rankings, "
                                      f"scores move by {change:.1e}")
        return Decision(tenant, layer, block_id, replacement, kind, error, agreement, change, accepted, reason,
                        time.time())

    def _trace_to(self, layer: int) -> LayerTrace:
        if self._trace is None or len(self._trace.states) < layer + 2:
            block_tokens = max(len(d) for p in self.calibration for d in p.docs)
            with self.forward_lock:
                self._trace = self.forward.trace(self.calibration, block_tokens, layer)
        return self._trace

    def _fingerprint(self, update: torch.Tensor) -> torch.Tensor:
        if self._projection is None:
            generator = torch.Generator().manual_seed(0)
            self._projection = torch.randn(update.shape[1], FINGERPRINT_DIM, generator=generator) / FINGERPRINT_DIM
        return (update.cpu() @ self._projection).flatten()

    def _record(self, made: list[Decision]) -> None:
        self.decisions.extend(made)
        del self.decisions[: max(0, len(self.decisions) - self.max_decisions)]


def _max_relative_error(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """max over tokens of ||candidate - reference|| / ||reference||."""
    diff = (candidate - reference).norm(dim=-1)
    return float((diff / reference.norm(dim=-1).clamp_min(1e-12)).max())
