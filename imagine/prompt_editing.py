"""AUTOMATIC1111's prompt editing: a prompt whose text changes during the run.

- `[from:to:when]` reads `from` until step `when`, then `to`; `[to:when]` adds `to` from then on; `[from::when]`
  drops `from` then. `when` with a decimal point is a fraction of the steps (0.25 of 20 steps: step 5), without
  one a step number; either is capped at the steps.
- `[a|b|c]` alternates, one word a step (`[cat|]`: the word every other step).
- They nest, inside each other and inside emphasis brackets, which stay in the text for `imagine.emphasis`:
  `(a [red:blue:0.5] ball:1.2)`. A bracket that fits none of these is text; a '|' outside `[a|b]` (A1111's
  grammar has none), a lone backslash at the end or a backslash before a line break leaves the whole prompt
  unparsed, as A1111 leaves it. `when` is a number as A1111's grammar has them (`1e1`, `.5`, `+2`, ASCII digits);
  one past float's range (`1e400`, where A1111's int() fails) is past the steps; brackets nested some hundreds
  deep (past Python's recursion, where A1111's parser fails too) leave the prompt as written.
- An edit at the top level directly followed by a stray `]`, `[`, `(`, `)` or `:` (`[a:b:3]]`, `[a:3]:`) A1111's
  parser (lark's Earley, its ambiguity resolved in an order that changes with Python's hash seed) reads as an edit
  in some processes and as plain text in others; here it is always the edit.

A hires. fix second pass reads the same `when` on one timeline over both passes, as A1111 1.6+ does: a step number
counts from the first pass's start (`[a:b:25]` after a 20-step first pass switches at this pass's step 5), a fraction
from 1 to 2 spans this pass (`[a:b:1.5]`: half way through it), so `[a:b:0.5]` reads `b` all through it. A1111's
"Old prompt editing timelines" (its use_old_scheduling, before 1.6): `when` under 1 a fraction of the steps, else a
step number, decimal point or not, and a second pass read over the first pass's steps.

As A1111 (its `prompt_parser`): the step numbers where the text may change are collected (every `when` from 1 on,
the run's steps, and every step when a prompt alternates); `prompt_schedule` gives, for each, the text at that step.
The sampler's denoiser at step i (from 0) reads the text of the first number >= i (`StepConditioning` in
imagine.guidance): so `[a:b:10]` reads `a` at steps 0 to 10 and `b` after, and `[a|b]` reads a, a, b, a, b, ...,
A1111's counting, kept so that its prompts give its images. A prompt it cannot parse is read as it is.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

_SPECIAL = "[]():|"
# lark's SIGNED_NUMBER: ASCII digits only ('\d' would take other scripts' digits, which float() reads but A1111's
# grammar does not)
_NUMBER = re.compile(r"\s*([+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)\s*")


@dataclass
class _Text:
    text: str


@dataclass
class _Round:  # (prompt) or (prompt:weight): emphasis, kept as text
    inner: list
    weight: list | None


@dataclass
class _Square:  # [prompt]: emphasis, kept as text
    inner: list


@dataclass
class _Scheduled:  # [before:after:when]
    before: list
    after: list
    when: str


@dataclass
class _Alternate:  # [a|b|...]
    options: list


class _Unparsable(Exception):
    pass


class _Parser:
    """A recursive-descent reading of A1111's prompt grammar: plain text, ( ), [ ], ':' and '|'."""

    def __init__(self, text: str):
        self.s, self.i = text, 0

    def peek(self) -> str:
        return self.s[self.i] if self.i < len(self.s) else ""

    def plain(self) -> str:
        start = self.i
        while self.i < len(self.s) and self.s[self.i] not in _SPECIAL:
            if self.s[self.i] == "\\":
                # A1111's plain text takes a backslash with the character after it (its regex's `\\.`), which is
                # not a line break: a backslash before one, or at the end, leaves the prompt unparsed
                if self.i + 1 >= len(self.s) or self.s[self.i + 1] == "\n":
                    raise _Unparsable
                self.i += 2
            else:
                self.i += 1
        return self.s[start:self.i]

    def prompt(self, stops: str) -> list:
        """Items until one of `stops` (not consumed) or the end."""
        items = []
        while self.i < len(self.s) and self.peek() not in stops:
            c = self.peek()
            if c in "([":
                start = self.i
                try:
                    items.append(self.round() if c == "(" else self.square())
                except _Unparsable:
                    if stops:
                        raise
                    self.i = start + 1  # at the top level an unclosed bracket is text, and reading goes on
                    items.append(_Text(c))
            elif c in _SPECIAL:  # a stray closing or ':' is text at the top level, as A1111 reads it; its grammar has
                if stops or c == "|":  # no '|' outside [a|b]: such a prompt is not parsed
                    raise _Unparsable
                items.append(_Text(c))
                self.i += 1
            else:
                items.append(_Text(self.plain()))
        return items

    def round(self):
        self.i += 1
        inner = self.prompt(":)")
        weight = None
        if self.peek() == ":":
            self.i += 1
            weight = self.prompt(")")
        if self.peek() != ")":
            raise _Unparsable
        self.i += 1
        return _Round(inner, weight)

    def square(self):
        self.i += 1
        parts, seps = [self.prompt(":|]")], []
        while self.peek() in (":", "|"):
            seps.append(self.peek())
            self.i += 1
            parts.append(self.prompt(":|]"))
        if self.peek() != "]":
            raise _Unparsable
        self.i += 1
        if not seps:
            return _Square(parts[0])
        if set(seps) == {"|"}:
            return _Alternate(parts)
        if set(seps) == {":"} and len(parts) in (2, 3):
            when = "".join(p.text for p in parts[-1] if isinstance(p, _Text)) if all(
                isinstance(p, _Text) for p in parts[-1]) else ""
            if _NUMBER.fullmatch(when):
                before = parts[0] if len(parts) == 3 else []
                return _Scheduled(before, parts[-2], when.strip())
        raise _Unparsable


def _parse(prompt: str) -> list | None:
    p = _Parser(prompt)
    try:
        items = p.prompt("")
    except _Unparsable:
        return None
    except RecursionError:  # brackets nested some hundreds deep (A1111's lark fails on them too): read as written
        return None
    return items


@dataclass(frozen=True)
class Timeline:
    """How `when` is read (A1111's get_learned_conditioning_prompt_schedules): `steps` the pass's steps, `first_pass`
    the first pass's where this is a hires. fix second pass (None: a run of its own), `old` A1111's old rule."""
    steps: int
    first_pass: int | None = None
    old: bool = False

    def when(self, text: str) -> int:
        """The step `when` names, capped at the steps (under 1: the text never reads `before` in this pass)."""
        v = float(text)
        if self.old:
            v = v * self.steps if v < 1 else v
        elif "." in text:
            v = (v - (self.first_pass is not None)) * self.steps
        else:
            v = v - (self.first_pass or 0)
        if math.isinf(v):  # (a number past float's range, 1e400: A1111's int() raises; here it is past either end)
            return self.steps if v > 0 else -1
        return min(self.steps, int(v))


def _walk(items: list, line: Timeline, points: set[int]) -> bool:
    """Collect the steps where the text may change; True if some part alternates."""
    alternates = False
    for it in items:
        if isinstance(it, _Round):
            alternates |= _walk(it.inner, line, points) | _walk(it.weight or [], line, points)
        elif isinstance(it, _Square):
            alternates |= _walk(it.inner, line, points)
        elif isinstance(it, _Scheduled):
            when = line.when(it.when)
            if when >= 1:
                points.add(when)
            alternates |= _walk(it.before, line, points) | _walk(it.after, line, points)
        elif isinstance(it, _Alternate):
            alternates = True
            for o in it.options:
                _walk(o, line, points)
    return alternates


def _render(items: list, step: int, line: Timeline) -> str:
    out = []
    for it in items:
        if isinstance(it, _Text):
            out.append(it.text)
        elif isinstance(it, _Round):
            weight = "" if it.weight is None else ":" + _render(it.weight, step, line)
            out.append("(" + _render(it.inner, step, line) + weight + ")")
        elif isinstance(it, _Square):
            out.append("[" + _render(it.inner, step, line) + "]")
        elif isinstance(it, _Scheduled):
            out.append(_render(it.before if step <= line.when(it.when) else it.after, step, line))
        else:
            out.append(_render(it.options[(step - 1) % len(it.options)], step, line))
    return "".join(out)


def prompt_schedule(prompt: str, steps: int, first_pass: int | None = None, old: bool = False) -> list[tuple[int, str]]:
    """[(last step, text)]: the prompt's text up to each step number where it may change, the last being `steps`.
    A prompt without editing (or that cannot be parsed) -> [(steps, prompt)]. first_pass: this is a hires. fix second
    pass after a first pass of that many steps (one timeline over both); old: A1111's "Old prompt editing timelines"
    (a second pass is then read over the first pass's steps, as A1111 reads it)."""
    for name, value in (("steps", steps), ("first_pass", first_pass)):
        if (value is not None or name == "steps") and (isinstance(value, bool) or not isinstance(value, int)
                                                        or value < 1):
            raise ValueError(f"{name} must be a positive integer; got {value!r}")
    if old and first_pass is not None:
        steps = first_pass
    timeline = Timeline(steps, first_pass, bool(old))
    if "[" not in prompt:
        return [(steps, prompt)]
    items = _parse(prompt)
    if items is None:
        return [(steps, prompt)]
    points = {steps}
    if _walk(items, timeline, points):
        points.update(range(1, steps + 1))
    return [(end, _render(items, end, timeline)) for end in sorted(points)]


def text_at(schedule: list[tuple[int, str]], i: int) -> int:
    """The index of the schedule's text that step i (from 0) reads: the first entry whose last step is >= i; past the
    last (an old-timeline hires pass longer than the first pass, whose steps its schedule spans) the first, as A1111's
    reconstruct_cond_batch starts from it."""
    return next((k for k, (end, _) in enumerate(schedule) if i <= end), 0)
