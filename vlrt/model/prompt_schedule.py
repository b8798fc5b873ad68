"""The WebUI's prompt editing and alternation: the texts a prompt has at each sampling step.

Written from the WebUI's documented behaviour (its wiki's "Features" page, "Prompt editing" and
"Alternating Words"; the "Seed breaking changes" page for 1.6.0; the examples its prompt parser
documents), not from its code:

- `[from:to:when]` is `from` up to step `when`, then `to`; `[to:when]` (= `[:to:when]`) adds `to`
  after `when`; `[from::when]` removes `from` after it. They nest (`a[b:[c:d:2]:1]e`).
- `when` with a decimal point is a fraction of the steps (`int(when × steps)`), without one it is
  a step number (1.6.0 and later: `[a:b:5.0]` is a fraction, 5 × steps, so `b` never comes); it is
  capped at the steps. Spaces around it are allowed (`[a:b: 0.5 ]`).
- `[a|b|c]` alternates every step; alternatives may be empty (`[fe|]male`).
- `(…)`, `(…:…)` and `[…]` keep their brackets here (emphasis is read afterwards, `prompt_syntax`),
  and `\\x` is kept as written; at the top level unbalanced brackets and `:` are text.
- The schedule is the WebUI's: a list of (end, text), end a step number in 1 … steps; sampling
  step k, counted from 0 at the first step a job runs, uses the first entry with k ≤ end. So
  `[a:b:5]` gives `a` for 6 steps and `[cow|horse]` gives cow, cow, horse, cow, … (the WebUI's
  steps are off by one against its wiki's wording, AUTOMATIC1111/stable-diffusion-webui#7279).

Where vlrt refuses what the WebUI reads silently as something else:
- a `[…]` holding `:` or `|` at its own level that is neither editing nor alternation
  (`[a:b:c:d]`, `[cat:dog]`): the WebUI reads it as text with less attention;
- a `|` outside square brackets in a prompt that uses editing or alternation: the WebUI then
  reads none of the prompt's editing (a `|` alone is text, as in the WebUI);
- `AND` (composable diffusion) in a prompt: vlrt does not combine prompts that way.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from dataclasses import dataclass

from vlrt.errors import VlrtError

_WHEN = re.compile(r"\s*([+-]?(?:[0-9]+\.[0-9]*|\.[0-9]+|[0-9]+)(?:[eE][+-]?[0-9]+)?)\s*\]")
_SPECIAL = "\\[]():|"
_AND = re.compile(r"\bAND\b")


@dataclass(frozen=True)
class _Edit:
    """`[before:after:when]`; `when` as written."""

    before: tuple
    after: tuple
    when: str

    def end(self, steps: int) -> int:
        """The last step of `before`: a fraction of the steps with a decimal point, else a step number, capped."""
        value = float(self.when)
        if "." in self.when:
            value *= steps
        return int(max(-1.0, min(float(steps), value)))


@dataclass(frozen=True)
class _Alternate:
    options: tuple


Schedule = list[tuple[int, str]]


def prompt_schedule(prompt: str, steps: int) -> Schedule:
    """The prompt's texts over `steps` sampling steps, as (end, text) pairs in step order (see above)."""
    nodes, bare_bar = _Parser(prompt).top()
    edits = [node for node in _walk(nodes) if isinstance(node, (_Edit, _Alternate))]
    if bare_bar and edits:
        raise VlrtError(
            "the prompt has a '|' outside square brackets, with which the WebUI reads none of its prompt editing "
            "or alternation: write \\| for a literal '|', or put the alternatives in square brackets [a|b]"
        )
    if not edits:
        return [(steps, prompt)]
    ends = {steps}
    for node in edits:
        if isinstance(node, _Alternate):
            ends.update(range(1, steps + 1))
        elif 1 <= node.end(steps):
            ends.add(node.end(steps))
    return [(end, _text(nodes, end, steps)) for end in sorted(ends)]


def entry_at(ends: list[int] | tuple[int, ...], k: int) -> int:
    """The index of the schedule entry serving sampling step k: the first whose end is at least k
    (the last one past the end, which only a sampler with an extra UNet evaluation reaches)."""
    return min(bisect_left(ends, k), len(ends) - 1)


def refuse_composition(prompt: str) -> None:
    """The WebUI splits a prompt at `AND` into prompts whose predictions it combines (composable
    diffusion); vlrt does not, and read as text the prompt would mean something else."""
    if _AND.search(prompt):
        raise VlrtError(
            "the prompt's AND is the WebUI's composable diffusion (prompts combined with weights), which vlrt does not do: "
            "write the prompts as one, or 'and' in lower case for the word"
        )


def _walk(nodes: tuple):
    for node in nodes:
        if isinstance(node, _Edit):
            yield node
            yield from _walk(node.before)
            yield from _walk(node.after)
        elif isinstance(node, _Alternate):
            yield node
            for option in node.options:
                yield from _walk(option)


def _text(nodes: tuple, step: int, steps: int) -> str:
    """The prompt's text at step `step` (1-based, as the WebUI's schedule ends)."""
    out = []
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, _Edit):
            out.append(_text(node.before if step <= node.end(steps) else node.after, step, steps))
        else:
            out.append(_text(node.options[(step - 1) % len(node.options)], step, steps))
    return "".join(out)


class _Parser:
    """Recursive descent over the WebUI's grammar of prompt editing (see the module's docstring).

    `prompt` reads text, escapes and bracket constructs and stops at `]`, `)`, `:`, `|` or a
    bracket that does not parse; only the top level takes such characters as text."""

    def __init__(self, text: str) -> None:
        self.s = text

    def top(self) -> tuple[tuple, bool]:
        """The prompt's nodes, and whether it has a `|` outside any construct."""
        nodes: list = []
        bare_bar = False
        i, n = 0, len(self.s)
        while i < n:
            part, i = self.prompt(i)
            nodes.extend(part)
            if i < n:
                bare_bar |= self.s[i] == "|"
                nodes.append(self.s[i])
                i += 1
        return tuple(nodes), bare_bar

    def prompt(self, i: int) -> tuple[list, int]:
        s, n = self.s, len(self.s)
        nodes: list = []
        while i < n:
            c = s[i]
            if c == "\\":
                nodes.append(s[i : i + 2])
                i += 2
            elif c not in _SPECIAL:
                j = i
                while j < n and s[j] not in _SPECIAL:
                    j += 1
                nodes.append(s[i:j])
                i = j
            elif c in "([":
                parsed = self.round(i) if c == "(" else self.square(i)
                if parsed is None:
                    break
                node, i = parsed
                if isinstance(node, list):
                    nodes.extend(node)
                else:
                    nodes.append(node)
            else:
                break
        return nodes, i

    def round(self, i: int) -> tuple[list, int] | None:
        """`(a)` or `(a:b)`, brackets kept as text."""
        s, n = self.s, len(self.s)
        inner, j = self.prompt(i + 1)
        if j < n and s[j] == ")":
            return ["(", *inner, ")"], j + 1
        if j < n and s[j] == ":":
            second, k = self.prompt(j + 1)
            if k < n and s[k] == ")":
                return ["(", *inner, ":", *second, ")"], k + 1
        return None

    def square(self, i: int) -> tuple[list | _Edit | _Alternate, int] | None:
        """`[a]` (brackets kept), `[a|b|…]`, `[to:when]` or `[from:to:when]`."""
        parsed = self._square(i)
        if parsed is None:
            self._refuse_malformed(i)
        return parsed

    def _square(self, i: int) -> tuple[list | _Edit | _Alternate, int] | None:
        s, n = self.s, len(self.s)
        first, j = self.prompt(i + 1)
        if j >= n:
            return None
        if s[j] == "]":
            return ["[", *first, "]"], j + 1
        if s[j] == "|":
            options = [tuple(first)]
            while j < n and s[j] == "|":
                option, j = self.prompt(j + 1)
                options.append(tuple(option))
            return (_Alternate(tuple(options)), j + 1) if j < n and s[j] == "]" else None
        if s[j] == ":":
            when = _WHEN.match(s, j + 1)
            if when:
                return _Edit((), tuple(first), when.group(1)), when.end()
            second, k = self.prompt(j + 1)
            when = _WHEN.match(s, k + 1) if k < n and s[k] == ":" else None
            if when:
                return _Edit(tuple(first), tuple(second), when.group(1)), when.end()
        return None

    def _refuse_malformed(self, i: int) -> None:
        """A balanced `[…]` with `:` or `|` at its own level that did not parse is a mistake, not text."""
        s, stack, j = self.s, [], i
        while j < len(s):
            c = s[j]
            if c == "\\":
                j += 2
                continue
            if c in "([":
                stack.append(c)
            elif c in ")]":
                if stack.pop() != ("(" if c == ")" else "["):
                    return  # mismatched brackets: text, as in the WebUI
                if not stack:
                    break
            j += 1
        else:
            return  # never closed: text, as in the WebUI
        group = s[i : j + 1]
        if any(c in ":|" for c in _level(group[1:-1])):
            raise VlrtError(
                f"the prompt's {group} is neither prompt editing [from:to:when] (when a number) nor alternation [a|b]: "
                "fix it, or write \\[ \\] for literal brackets"
            )


def _level(inside: str) -> str:
    """The characters of `inside` at its own bracket level (escapes and nested brackets left out)."""
    out, depth, j = [], 0, 0
    while j < len(inside):
        c = inside[j]
        if c == "\\":
            j += 2
            continue
        if c in "([":
            depth += 1
        elif c in ")]":
            depth -= 1
        elif depth == 0:
            out.append(c)
        j += 1
    return "".join(out)
