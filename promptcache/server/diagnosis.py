"""Why did it miss: an exact diagnosis of a request's cache reuse, against an earlier request.

The engine says how many prompt tokens were reused and why reuse ended there (``ReuseStop``:
everything reusable was reused, the next block was being computed by another request, it was
evicted / expired / reset — and when —, or it was never cached). This module adds the prompt
side: each request's prompt is kept per tenant as its *parts* in render order (tools, system,
messages and their content parts, each with its JSON path in the dialect) plus its token ids, so a
later request can be compared with a named earlier one (OpenAI ``comparison_response_id``,
Anthropic ``previous_message_id``) or with the closest earlier one of the same tenant: the first
part that differs, the character offset and a window of text on both sides.

Bounded memory: per tenant at most ``max_records`` prompts and ``max_chars`` characters of text,
and at most ``max_tenants`` tenants (least recently active forgotten first). A tenant's history
only ever holds its own prompts, so a diagnosis can never show another tenant's text.
"""

from __future__ import annotations

import json
import re
import threading
from array import array
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from promptcache.engine.api import EVICTED, EXPIRED, NOT_CACHED, RESET, REUSED_ALL, Usage
from promptcache.sequences import common_prefix_len

if TYPE_CHECKING:
    from promptcache.server.prompt import TemplateMessage

WINDOW = 40  # characters of each version shown around a divergence
TOOLS, SYSTEM, MESSAGES = "tools", "system", "messages"


@dataclass(frozen=True)
class Part:
    path: str  # JSON path in the request, in its dialect: "tools[1]", "system.0", "messages[3].content[0]"
    kind: str  # TOOLS | SYSTEM | MESSAGES
    text: str


@dataclass
class PromptRecord:
    request_id: str
    model: str
    parts: tuple[Part, ...]
    token_ids: array  # prompt, then generated tokens that ran (the K/V a follow-up could reuse)
    prompt_cache_key: str | None = None

    @property
    def num_chars(self) -> int:
        return sum(len(p.text) for p in self.parts)


@dataclass
class _Tenant:
    records: OrderedDict[str, PromptRecord] = field(default_factory=OrderedDict)
    num_chars: int = 0
    divergences: Counter[tuple[str, int]] = field(default_factory=Counter)  # (path, offset) -> times


class History:
    """Recent prompts per tenant (None is the open server's single tenant). Thread-safe: requests
    are diagnosed and recorded in worker threads."""

    def __init__(self, max_records: int = 64, max_chars: int = 4_000_000, max_tenants: int = 1024,
                 max_total_chars: int = 64_000_000) -> None:
        self.max_records, self.max_chars, self.max_tenants = max_records, max_chars, max_tenants
        self.max_total_chars = max_total_chars  # all tenants together (oldest-active tenants give way)
        self._tenants: OrderedDict[str | None, _Tenant] = OrderedDict()
        self._total_chars = 0
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.max_records > 0

    def _tenant(self, tenant: str | None) -> _Tenant:  # with the lock held
        t = self._tenants.get(tenant)
        if t is None:
            t = self._tenants[tenant] = _Tenant()
            while len(self._tenants) > self.max_tenants:
                _, gone = self._tenants.popitem(last=False)
                self._total_chars -= gone.num_chars
        self._tenants.move_to_end(tenant)
        return t

    def add(self, tenant: str | None, record: PromptRecord) -> None:
        if not self.enabled:
            return
        with self._lock:
            t = self._tenant(tenant)
            old = t.records.pop(record.request_id, None)
            if old is not None:
                t.num_chars -= old.num_chars
                self._total_chars -= old.num_chars
            t.records[record.request_id] = record
            t.num_chars += record.num_chars
            self._total_chars += record.num_chars
            while len(t.records) > self.max_records or (t.num_chars > self.max_chars and len(t.records) > 1):
                self._drop_oldest(t)
            for other in list(self._tenants.values()):  # least recently active tenants first
                while self._total_chars > self.max_total_chars and other.records and other is not t:
                    self._drop_oldest(other)

    def _drop_oldest(self, t: _Tenant) -> None:
        _, old = t.records.popitem(last=False)
        t.num_chars -= old.num_chars
        self._total_chars -= old.num_chars

    def extend(self, tenant: str | None, request_id: str, token_ids: Sequence[int]) -> None:
        """A finished request's generated tokens join its record (a follow-up may reuse them)."""
        with self._lock:
            t = self._tenants.get(tenant)
            record = None if t is None else t.records.get(request_id)
            if record is not None:
                record.token_ids = record.token_ids + array("i", token_ids)  # a new array: readers keep theirs

    def get(self, tenant: str | None, request_id: str) -> PromptRecord | None:
        with self._lock:
            t = self._tenants.get(tenant)
            return None if t is None else t.records.get(request_id)

    def closest(self, tenant: str | None, token_ids: Sequence[int], exclude: str) -> PromptRecord | None:
        """The earlier prompt sharing the longest token prefix with ``token_ids`` (newest on ties)."""
        with self._lock:
            t = self._tenants.get(tenant)
            records = list(t.records.values()) if t is not None else []
        best, best_len = None, -1
        for rec in reversed(records):
            if rec.request_id == exclude:
                continue
            n = common_prefix_len(rec.token_ids, token_ids)
            if n > best_len:
                best, best_len = rec, n
        return best

    def note_divergence(self, tenant: str | None, path: str, offset: int) -> int:
        """Count a miss at this place; returns how often this tenant's requests diverged there."""
        with self._lock:
            t = self._tenant(tenant)
            t.divergences[(path, offset)] += 1
            if len(t.divergences) > 256:  # bounded: keep the most frequent
                t.divergences = Counter(dict(t.divergences.most_common(128)))
            return t.divergences[(path, offset)]


# ---- the diagnosis -------------------------------------------------------------------------------

_VOLATILE = [
    ("a timestamp", re.compile(r"\d{4}-\d{2}-\d{2}([T ]\d{1,2}:\d{2})?|\d{1,2}:\d{2}(:\d{2})?|\b1[6-9]\d{8}\b")),
    ("a UUID", re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")),
    ("a random id", re.compile(r"\b(?=[0-9a-zA-Z_-]*\d)[0-9a-zA-Z_-]{16,}\b")),
    ("a counter", re.compile(r"\d+")),
]


def volatile_cause(before: str, after: str) -> str | None:
    """What the text at a divergence looks like: the likely cause of repeated misses there."""
    for name, pattern in _VOLATILE:
        if pattern.search(before) and pattern.search(after):
            return name
    return None


def _json_keys_reordered(a: str, b: str) -> bool:
    try:
        x, y = json.loads(a), json.loads(b)
    except ValueError:
        return False
    return bool(x == y and a != b)


@dataclass
class Diagnosis:
    prompt_tokens: int
    cached_tokens: int
    reason: str  # REUSED_ALL | "diverged" | "model_changed" | EVICTED | EXPIRED | RESET | IN_FLIGHT | NOT_CACHED
    compared_with: str | None = None
    comparison_found: bool = True  # False: the named request is unknown (or no history is kept)
    reusable_tokens: int = 0  # whole-block tokens this prompt shares with the compared request
    missed_tokens: int = 0  # of those, not reused here: what a change or a loss cost
    divergence: dict[str, Any] | None = None
    lost: dict[str, float] | None = None  # evicted / expired: idle_s, ago_s
    lint: str | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"prompt_tokens": self.prompt_tokens, "cached_tokens": self.cached_tokens,
                               "reuse_ended_at_token": self.cached_tokens, "reason": self.reason,
                               "compared_with": self.compared_with, "reusable_tokens": self.reusable_tokens,
                               "missed_tokens": self.missed_tokens}
        for name in ("divergence", "lost", "lint"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out

    @property
    def changed_kind(self) -> str | None:
        return None if self.divergence is None else str(self.divergence["kind"])


def first_difference(before: Sequence[Part], after: Sequence[Part]) -> dict[str, Any] | None:
    """Where ``after`` first departs from ``before``, in render order; None if it only extends it."""
    for i, new in enumerate(after):
        old = before[i] if i < len(before) else None
        if old is not None and old.kind == new.kind and old.text == new.text:
            continue
        if old is None:
            if i == len(before):
                return None  # new parts appended: the earlier prompt is a prefix
            continue
        offset = common_prefix_len(old.text, new.text)
        diff: dict[str, Any] = {"path": new.path, "kind": new.kind, "char_offset": offset,
                                "before": old.text[max(0, offset - WINDOW): offset + WINDOW],
                                "after": new.text[max(0, offset - WINDOW): offset + WINDOW]}
        cause = volatile_cause(old.text[max(0, offset - 12): offset + 24], new.text[max(0, offset - 12): offset + 24])
        if cause is not None:
            diff["looks_like"] = cause
        if old.kind != new.kind:
            diff["note"] = f"{old.path} ({old.kind}) became {new.path} ({new.kind})"
        if new.kind == TOOLS:
            names = [_tool_name(p.text) for p in before if p.kind == TOOLS]
            new_names = [_tool_name(p.text) for p in after if p.kind == TOOLS]
            diff["tool"] = _tool_name(new.text)
            if sorted(names) == sorted(new_names) and names != new_names:
                diff["note"] = f"the same tools in another order (first differing: {diff['tool']!r})"
            elif _json_keys_reordered(old.text, new.text):
                diff["note"] = f"tool {diff['tool']!r}: the same JSON with its keys in another order"
        return diff
    if len(after) < len(before):
        last = before[len(after)]
        return {"path": last.path, "kind": last.kind, "char_offset": 0, "before": last.text[:WINDOW],
                "after": "", "note": f"{last.path} was removed"}
    return None


def _tool_name(text: str) -> str:
    m = re.search(r'"name"\s*:\s*"([^"]*)"', text)
    return m.group(1) if m else "?"


def diagnose(prev: PromptRecord | None, parts: Sequence[Part], model: str, token_ids: Sequence[int],
             usage: Usage, block_size: int, named: str | None = None) -> Diagnosis:
    """The exact diagnosis of a request's reuse. ``prev``: the compared earlier request (None when
    there is none, or ``named`` is unknown)."""
    n, cached = len(token_ids), usage.cached_tokens
    stop = usage.reuse_stop
    engine_reason = stop.reason if stop is not None else NOT_CACHED
    if prev is None:
        reason = REUSED_ALL if engine_reason == REUSED_ALL and cached else engine_reason
        return Diagnosis(n, cached, reason, named, comparison_found=named is None)
    shared = common_prefix_len(prev.token_ids, token_ids)
    usable = max(0, min(shared, n - 1)) // block_size * block_size  # whole blocks; the last token runs
    could = max(0, min(len(prev.token_ids), n - 1)) // block_size * block_size  # had nothing changed
    diag = Diagnosis(n, cached, REUSED_ALL, prev.request_id, reusable_tokens=usable,
                     missed_tokens=max(0, could - cached))
    if prev.model != model:
        diag.reason, diag.missed_tokens = "model_changed", could
        return diag
    diag.divergence = first_difference(prev.parts, parts)
    if cached < usable:  # the compared request's blocks were there to reuse, and are not
        diag.reason = engine_reason if engine_reason != REUSED_ALL else NOT_CACHED
        if stop is not None and engine_reason in (EVICTED, EXPIRED, RESET) and stop.idle_s is not None:
            diag.lost = {"idle_s": round(stop.idle_s, 3), "ago_s": round(stop.ago_s or 0.0, 3)}
    elif shared < min(len(prev.token_ids), n):
        diag.reason = "diverged"
        if diag.divergence is not None:
            diag.divergence["token"] = shared
    return diag


def lint(history: History, tenant: str | None, diag: Diagnosis) -> None:
    """When this tenant's requests keep diverging at the same place, say so and name the likely cause."""
    d = diag.divergence
    if diag.reason != "diverged" or d is None:
        return
    times = history.note_divergence(tenant, str(d["path"]), int(d["char_offset"]))
    if times >= 3:
        what = d.get("looks_like") or "content that changes between requests"
        diag.lint = (f"requests of this tenant have diverged {times} times at {d['path']} character "
                     f"{d['char_offset']}: it looks like {what}; move it after the stable part of the "
                     f"prompt (or out of it) to keep the prefix cacheable")


# ---- the providers' fields ----------------------------------------------------------------------
# Both providers' diagnostics describe how the prompt *diverged* from the earlier one. Blocks that
# were there and are gone (evicted, expired, reset, still in flight) are no divergence: the
# providers' fields say "unavailable" (their SDKs know no other value) and ``promptcache_diagnosis``
# says exactly what happened.


def openai_diagnostics(diag: Diagnosis) -> dict[str, Any]:
    """``prompt_cache_diagnostics`` of OpenAI's Responses API, for a ``comparison_response_id``."""
    if not diag.comparison_found:
        return {"type": "comparison_response_not_found"}
    if diag.missed_tokens == 0:
        return {"type": "cache_hit"}
    if diag.reason == "model_changed":
        reason = "model_changed"
    elif diag.reason == "diverged":
        reason = "tools_changed" if diag.changed_kind == TOOLS else "input_changed"
    else:
        return {"type": "unavailable"}
    return {"type": "cache_miss", "reason": reason, "cache_missed_tokens": diag.missed_tokens,
            "comparison_reusable_tokens": diag.reusable_tokens}


def anthropic_diagnostics(diag: Diagnosis) -> dict[str, Any] | None:
    """``diagnostics`` of Anthropic's Messages API, for a ``previous_message_id`` (None: no divergence)."""
    if not diag.comparison_found:
        return {"cache_miss_reason": {"type": "previous_message_not_found"}}
    if diag.missed_tokens == 0:
        return None
    if diag.reason == "model_changed":
        kind = "model_changed"
    elif diag.reason == "diverged":
        kind = {TOOLS: "tools_changed", SYSTEM: "system_changed"}.get(diag.changed_kind or "", "messages_changed")
    else:
        return {"cache_miss_reason": {"type": "unavailable"}}
    return {"cache_miss_reason": {"type": kind, "cache_missed_input_tokens": diag.missed_tokens}}


def conversation_parts(tool_dicts: Sequence[dict[str, Any]] | None, messages: Sequence[TemplateMessage], where: str,
                       head: Sequence[Part] = ()) -> list[Part]:
    """A rendered conversation as a diagnosis names it: each tool, then ``head`` (e.g. the
    instructions), then each message's text parts and tool calls, as ``{where}[i].{role}``."""
    parts = [Part(f"tools[{k}]", TOOLS, json.dumps(t, ensure_ascii=False)) for k, t in enumerate(tool_dicts or [])]
    parts += head
    for i, m in enumerate(messages):
        kind = SYSTEM if m.role == "system" else MESSAGES
        parts += [Part(f"{where}[{i}].{m.role}", kind, p) for p in m.parts]
        if m.extra:
            parts.append(Part(f"{where}[{i}].calls", kind, json.dumps(m.extra, ensure_ascii=False)))
    return parts
