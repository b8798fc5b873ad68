"""Safe evaluation of the per-frame schedules (SPEC.md §1.2, §2.6; DESIGN.md §7).

The original extension ran every schedule through bare `eval` with the full builtins:
arbitrary code execution for whoever could type into the UI. Here a schedule is parsed once
with `ast.parse`, checked against a whitelist before any frame is processed, and evaluated per
frame by walking the checked tree. No code object is ever built from user text, and only the
names below exist, so there is nothing to escape through.

Allowed in every schedule:
- constants: int, float, str, bool, None; list, tuple, set and dict displays;
- `+ - * / // % **`, unary `+ - not`, comparisons (`in`, `not in`, `is`, chains), `and`/`or`,
  `a if c else b`, subscripts and simple slices, f-strings with `!r/!s/!a` and format specs;
- names: `image_i`, `loop_i` (1-based) and every public name of `math` (`sin`, `pi`, `floor`,
  `e`, `tau`, `inf`, ...), written without the `math.` prefix, as in the original;
- calls of math functions and of the builtins abs, bool, float, int, len, max, min, round,
  str, sum (positional arguments only).

`image_post_processing_schedule` is compiled with `compile_post_processing`: the whole text must
be `lambda img: BODY` with exactly one parameter. BODY may additionally use the parameter,
`X.filter(F)` on images and `ImageFilter.NAME` / `ImageFilter.NAME(args...)` for the filters in
`_BUILTIN_FILTERS` and `_PARAMETRIC_FILTERS`, with bounded arguments. Images and filters can only
be filtered, chosen between (`if`/`and`/`or`) and returned; the lambda must return an image.

Caps that keep one evaluation small in time and memory: text <= 10 000 characters, tree depth
<= 100, ints <= 4096 bits, strings and containers <= 100 000 characters or items (nested items
counted), a work budget per evaluation, factorial/comb/perm arguments <= 1000, round() digits
<= 400, format-spec width and precision <= 1000, `%` on numbers only (no printf formatting),
filter radius <= 50, filter sizes odd and <= 9, at most 32 filter applications per frame.

Empty schedules mean "not used" (SPEC.md §1.2): callers skip them. Compiling empty or
whitespace-only text raises VlrtError like any other text that is not an expression.
"""

from __future__ import annotations

import ast
import math
import operator
import re
import warnings
from typing import Any, Callable

from PIL import Image, ImageFilter

from vlrt.errors import VlrtError

MAX_TEXT = 10_000
MAX_DEPTH = 100
MAX_INT_BITS = 4096
MAX_ITEMS = 100_000
MAX_WORK = 2_000_000
MAX_COMBINATORICS_ARG = 1000
MAX_ROUND_DIGITS = 400
MAX_FORMAT_WIDTH = 1000
MAX_INT_TEXT = 2000
MAX_RADIUS = 50
MAX_FILTER_SIZE = 9
MAX_FILTER_CALLS = 32

_MATH: dict[str, Any] = {n: v for n, v in vars(math).items() if not n.startswith("_")}
_BUILTIN_FILTERS = {
    n: getattr(ImageFilter, n)
    for n in ("BLUR", "CONTOUR", "DETAIL", "EDGE_ENHANCE", "EDGE_ENHANCE_MORE", "EMBOSS",
              "FIND_EDGES", "SHARPEN", "SMOOTH", "SMOOTH_MORE")
}
_REQUIRED = object()
# name -> (class, ((parameter, default), ...)) in Pillow's positional order.
_PARAMETRIC_FILTERS: dict[str, tuple[type, tuple[tuple[str, Any], ...]]] = {
    "GaussianBlur": (ImageFilter.GaussianBlur, (("radius", 2),)),
    "BoxBlur": (ImageFilter.BoxBlur, (("radius", _REQUIRED),)),
    "UnsharpMask": (ImageFilter.UnsharpMask, (("radius", 2), ("percent", 150), ("threshold", 3))),
    "MedianFilter": (ImageFilter.MedianFilter, (("size", 3),)),
    "MinFilter": (ImageFilter.MinFilter, (("size", 3),)),
    "MaxFilter": (ImageFilter.MaxFilter, (("size", 3),)),
    "ModeFilter": (ImageFilter.ModeFilter, (("size", 3),)),
    "RankFilter": (ImageFilter.RankFilter, (("size", _REQUIRED), ("rank", _REQUIRED))),
}
_FILTERS = {**_BUILTIN_FILTERS, **{n: c for n, (c, _) in _PARAMETRIC_FILTERS.items()}}
_FILTER_TYPES = tuple(_FILTERS.values())
_DATA_TYPES = (type(None), bool, int, float, str, list, tuple, set, dict)
_NUMBER_TYPES = (bool, int, float)

_NAMES_HINT = "image_i, loop_i, math names such as sin, pi, floor; see 'vlrt render --help'"
_CALL_HINT = ("math functions such as sin, floor, and abs, bool, float, int, len, max, min, "
              "round, str, sum")
_GRAMMAR_HINT = ("numbers, strings, lists, tuples, sets, dicts, + - * / // % **, comparisons, "
                 "and/or/not, 'a if c else b', subscripts, f-strings, calls of "
                 f"{_CALL_HINT}; see 'vlrt render --help'")
_POST_HINT = ("image.filter(F) and ImageFilter.NAME with NAME one of "
              + ", ".join(_FILTERS))
_UNSUPPORTED = {
    ast.ListComp: "comprehensions", ast.SetComp: "comprehensions",
    ast.DictComp: "comprehensions", ast.GeneratorExp: "generator expressions",
    ast.NamedExpr: "assignment expressions (:=)", ast.Starred: "starred expressions (*x)",
    ast.Await: "await", ast.Yield: "yield", ast.YieldFrom: "yield",
    ast.Slice: "extended slices",
}
_BINOPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARYOPS: dict[type, Callable[[Any], Any]] = {
    ast.UAdd: operator.pos, ast.USub: operator.neg, ast.Not: operator.not_,
}
_COMPARISONS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
    ast.Gt: operator.gt, ast.GtE: operator.ge, ast.Is: operator.is_, ast.IsNot: operator.is_not,
    ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b,
}
# Optional fill+align, sign, z, #, 0, width, grouping, .precision, type (Python's mini-language).
_FORMAT_SPEC = re.compile(r"(?:.?[<>=^])?[-+ ]?z?#?0?(\d*)[,_]?(?:\.(\d+))?[bcdeEfFgGnosxX%]?",
                          re.DOTALL)


class _Error(Exception):
    """A cap or type rule broken during evaluation; its text is the user-facing reason."""


class _Failure(Exception):
    """Carries the innermost failing node up to the frame-level error message."""

    def __init__(self, node: ast.AST, cause: Exception) -> None:
        super().__init__()
        self.node, self.cause = node, cause


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _quote(source: str, node: ast.AST) -> str:
    """The offending construct as the user wrote it, on one line and short."""
    segment = _one_line(ast.get_source_segment(source, node) or type(node).__name__)
    return repr(segment if len(segment) <= 60 else segment[:57] + "...")


def _size(value: Any) -> int:
    """Characters plus items, nested containers included; stops counting past the cap."""
    total, stack = 0, [value]
    while stack and total <= MAX_ITEMS:
        item = stack.pop()
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, dict):
            total += len(item)
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set)):
            total += len(item)
            stack.extend(item)
    return total


def _is_number(value: Any) -> bool:
    return type(value) in _NUMBER_TYPES


def _is_filter(value: Any) -> bool:
    return isinstance(value, _FILTER_TYPES) or any(value is t for t in _FILTER_TYPES)


def _int(*args: Any) -> int:
    if args and isinstance(args[0], str) and len(args[0]) > MAX_INT_TEXT:
        raise _Error(f"int() of text longer than {MAX_INT_TEXT} characters")
    return int(*args)


def _round(*args: Any) -> Any:
    if len(args) > 1 and type(args[1]) is int and abs(args[1]) > MAX_ROUND_DIGITS:
        raise _Error(f"round() takes at most {MAX_ROUND_DIGITS} digits")
    return round(*args)


def _sum(*args: Any) -> Any:
    # Numbers only: sum() of lists or strings is quadratic and escapes the size caps midway.
    if args and not all(_is_number(v) for v in (*args[0], *args[1:])):
        raise _Error("sum() adds numbers only")
    return sum(*args)


_BUILTINS: dict[str, Callable[..., Any]] = {
    "abs": abs, "bool": bool, "float": float, "int": _int, "len": len, "max": max, "min": min,
    "round": _round, "str": str, "sum": _sum,
}
_CALLABLE = {n for n, v in _MATH.items() if callable(v)} | set(_BUILTINS)
_VALUE_NAMES = {n for n in _MATH if n not in _CALLABLE} | {"image_i", "loop_i"}


def _call_math(name: str, args: list[Any]) -> Any:
    """Math functions accept numbers (or lists of them) only; the huge-int ones are capped."""
    numbers: list[Any] = []
    for arg in args:
        items = arg if isinstance(arg, (list, tuple, set)) else (arg,)
        if not all(_is_number(x) for x in items):
            raise _Error(f"{name}() takes numbers or lists of numbers")
        numbers.extend(items)
    ints = [abs(x) for x in numbers if type(x) is int]
    if name in ("factorial", "comb", "perm") and any(x > MAX_COMBINATORICS_ARG for x in ints):
        raise _Error(f"{name}() arguments are limited to {MAX_COMBINATORICS_ARG}")
    bits = sum(max(x.bit_length() - 1, 0) for x in ints)
    if name in ("prod", "lcm", "sumprod") and bits > MAX_INT_BITS:
        raise _Error(f"{name}() result would exceed {MAX_INT_BITS} bits")
    return _MATH[name](*args)


def _check_filter_arg(param: str, value: Any, size: Any) -> None:
    if param == "radius":
        ok = _is_number(value) and 0 <= value <= MAX_RADIUS
        rule = f"a number from 0 to {MAX_RADIUS}"
    elif param == "size":
        ok = type(value) is int and value % 2 == 1 and 1 <= value <= MAX_FILTER_SIZE
        rule = f"an odd integer from 1 to {MAX_FILTER_SIZE}"
    elif param == "rank":
        ok = type(value) is int and 0 <= value < size * size
        rule = "an integer from 0 to size*size-1"
    elif param == "percent":
        ok = type(value) is int and 0 <= value <= 1000
        rule = "an integer from 0 to 1000"
    else:  # threshold
        ok = type(value) is int and 0 <= value <= 255
        rule = "an integer from 0 to 255"
    if not ok:
        raise _Error(f"filter argument {param}={value!r} must be {rule}")


def _make_filter(name: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
    cls, params = _PARAMETRIC_FILTERS[name]
    values = {**{p: d for p, d in params}, **dict(zip((p for p, _ in params), args)), **kwargs}
    for param, value in values.items():
        _check_filter_arg(param, value, values.get("size"))
    return cls(**values)


def _check_format_spec(spec: str) -> None:
    match = _FORMAT_SPEC.fullmatch(spec)
    if match is None:
        raise _Error(f"format spec {_one_line(spec)[:40]!r} is not supported")
    for number in match.groups():
        if number and int(number) > MAX_FORMAT_WIDTH:
            raise _Error(f"format width and precision are limited to {MAX_FORMAT_WIDTH}")


class _Checker:
    """Walks a parsed schedule once and rejects everything outside the whitelist."""

    def __init__(self, name: str, source: str, post: bool) -> None:
        self.name, self.source, self.post = name, source, post

    def reject(self, node: ast.AST, reason: str) -> VlrtError:
        return VlrtError(f"{self.name}: {_quote(self.source, node)} {reason}")

    def not_allowed(self, node: ast.AST, what: str) -> VlrtError:
        return self.reject(node, f"is not allowed: {what} are not supported "
                                 f"(allowed: {_GRAMMAR_HINT})")

    def check(self, node: ast.AST, depth: int, scope: frozenset[str]) -> None:
        if depth > MAX_DEPTH:
            raise VlrtError(f"{self.name}: the expression is nested more than {MAX_DEPTH} "
                            "levels deep")
        children: list[ast.AST | None]
        if isinstance(node, ast.Constant):
            if type(node.value) not in (type(None), bool, int, float, str):
                raise self.not_allowed(node, f"{type(node.value).__name__} constants")
            if type(node.value) is int and node.value.bit_length() > MAX_INT_BITS:
                raise self.reject(node, f"is too large (integers are limited to "
                                        f"{MAX_INT_BITS} bits)")
            children = []
        elif isinstance(node, ast.Name):
            self.check_name(node, scope)
            children = []
        elif isinstance(node, (ast.List, ast.Tuple, ast.Set)):
            children = list(node.elts)
        elif isinstance(node, ast.Dict):
            if any(k is None for k in node.keys):
                raise self.not_allowed(node, "dict unpackings (**d)")
            children = [*node.keys, *node.values]
        elif isinstance(node, ast.UnaryOp):
            if type(node.op) not in _UNARYOPS:
                raise self.reject(node, "is not allowed: the only unary operators are + - not")
            children = [node.operand]
        elif isinstance(node, ast.BinOp):
            if type(node.op) not in _BINOPS:
                raise self.reject(node, "is not allowed: the only operators are + - * / // % **")
            children = [node.left, node.right]
        elif isinstance(node, ast.BoolOp):
            children = list(node.values)
        elif isinstance(node, ast.Compare):
            children = [node.left, *node.comparators]
        elif isinstance(node, ast.IfExp):
            children = [node.test, node.body, node.orelse]
        elif isinstance(node, ast.Subscript):
            children = [node.value]
            if isinstance(node.slice, ast.Slice):
                children += [node.slice.lower, node.slice.upper, node.slice.step]
            else:
                children.append(node.slice)
        elif isinstance(node, ast.JoinedStr):
            children = list(node.values)
        elif isinstance(node, ast.FormattedValue):
            children = [node.value, node.format_spec]
        elif isinstance(node, ast.Call):
            children = self.check_call(node, scope)
        elif isinstance(node, ast.Attribute) and self.is_filter_name(node):
            children = []
        elif isinstance(node, ast.Attribute):
            raise self.bad_attribute(node)
        elif isinstance(node, ast.Lambda):
            raise self.reject(node, "is not allowed: a lambda can only be the whole "
                                    "image_post_processing_schedule ('lambda img: ...')")
        else:
            raise self.not_allowed(node, _UNSUPPORTED.get(type(node), "such expressions"))
        for child in children:
            if child is not None:
                self.check(child, depth + 1, scope)

    def check_name(self, node: ast.Name, scope: frozenset[str]) -> None:
        if node.id in scope or node.id in _VALUE_NAMES:
            return
        if node.id in _CALLABLE:
            raise self.reject(node, f"is a function: call it, e.g. {node.id}(x)")
        if self.post and node.id == "ImageFilter":
            raise self.reject(node, f"can only be used as ImageFilter.NAME (allowed: {_POST_HINT})")
        rule = "names starting with '_' never are; " if node.id.startswith("_") else ""
        raise self.reject(node, f"is not an allowed name ({rule}allowed: {_NAMES_HINT})")

    def is_filter_name(self, node: ast.Attribute) -> bool:
        return (self.post and isinstance(node.value, ast.Name) and node.value.id == "ImageFilter"
                and node.attr in _FILTERS)

    def bad_attribute(self, node: ast.Attribute) -> VlrtError:
        if self.post:
            return self.reject(node, f"is not allowed: the only attribute uses are {_POST_HINT}")
        if isinstance(node.value, ast.Name) and node.value.id == "math" and node.attr in _MATH:
            return self.reject(node, "is not allowed: math names are available directly, "
                                     f"write {node.attr!r}")
        return self.not_allowed(node, "attribute accesses")

    def check_call(self, node: ast.Call, scope: frozenset[str]) -> list[ast.AST | None]:
        """Validates the callee and returns the argument nodes still to check."""
        func, args, keywords = node.func, list(node.args), node.keywords
        if any(k.arg is None for k in keywords):
            raise self.not_allowed(node, "keyword unpackings (**kw)")
        if isinstance(func, ast.Name):
            if func.id not in _CALLABLE:
                self.check_name(func, scope)
                raise self.reject(func, f"is not a function (callable: {_CALL_HINT})")
            if keywords:
                raise self.reject(node, "is not allowed: keyword arguments are only supported "
                                        "for ImageFilter.NAME(...)")
            return args
        if self.post and isinstance(func, ast.Attribute) and func.attr == "filter":
            if len(args) != 1 or keywords:
                raise self.reject(node, "must pass exactly one filter, "
                                        "e.g. img.filter(ImageFilter.BLUR)")
            return [func.value, args[0]]
        is_filter = isinstance(func, ast.Attribute) and self.is_filter_name(func)
        if is_filter and func.attr in _PARAMETRIC_FILTERS:
            params = [p for p, _ in _PARAMETRIC_FILTERS[func.attr][1]]
            given = params[:len(args)] + [k.arg for k in keywords]
            required = [p for p, d in _PARAMETRIC_FILTERS[func.attr][1] if d is _REQUIRED]
            if (len(args) > len(params) or len(set(given)) != len(given)
                    or not set(given) <= set(params) or not set(required) <= set(given)):
                raise self.reject(node, f"has the wrong arguments: ImageFilter.{func.attr} takes "
                                        f"({', '.join(params)})")
            return [*args, *(k.value for k in keywords)]
        if is_filter:
            raise self.reject(node, f"is not allowed: ImageFilter.{func.attr} takes no arguments, "
                                    f"use img.filter(ImageFilter.{func.attr})")
        if isinstance(func, ast.Attribute):
            raise self.bad_attribute(func)
        raise self.reject(func, f"cannot be called (callable: {_CALL_HINT})")


class _Evaluator:
    """One evaluation: the names in scope and the work spent so far (never shared)."""

    def __init__(self, env: dict[str, Any]) -> None:
        self.env, self.work, self.filter_calls = env, 0, 0

    def evaluate(self, node: ast.AST) -> Any:
        try:
            value = self._HANDLERS[type(node)](self, node)
            self.charge(value)
        except _Failure:
            raise
        except (_Error, ArithmeticError, LookupError, TypeError, ValueError) as exc:
            raise _Failure(node, exc) from exc
        return value

    def charge(self, value: Any) -> None:
        """Enforces the size caps on every intermediate value and the per-evaluation budget."""
        kind = type(value)
        size = 1
        if kind is int and value.bit_length() > MAX_INT_BITS:
            raise _Error(f"integer result exceeds {MAX_INT_BITS} bits")
        if kind in (str, list, tuple, set, dict):
            size += _size(value)
            if size > MAX_ITEMS:
                raise _Error(f"result exceeds {MAX_ITEMS} characters or items")
        elif kind not in _DATA_TYPES and not (isinstance(value, Image.Image) or _is_filter(value)):
            raise _Error(f"{kind.__name__} values are not supported")
        self.work += size
        if self.work > MAX_WORK:
            raise _Error("the expression does too much work for one frame")

    def data(self, node: ast.AST) -> Any:
        value = self.evaluate(node)
        if type(value) not in _DATA_TYPES:
            raise _Failure(node, _Error("images and filters can only be filtered, chosen "
                                        "with if/and/or, or returned"))
        return value

    def eval_constant(self, node: ast.Constant) -> Any:
        return node.value

    def eval_name(self, node: ast.Name) -> Any:
        return self.env[node.id] if node.id in self.env else _MATH[node.id]

    def eval_list(self, node: ast.List) -> Any:
        return [self.data(e) for e in node.elts]

    def eval_tuple(self, node: ast.Tuple) -> Any:
        return tuple(self.data(e) for e in node.elts)

    def eval_set(self, node: ast.Set) -> Any:
        return {self.data(e) for e in node.elts}

    def eval_dict(self, node: ast.Dict) -> Any:
        return {self.data(k): self.data(v) for k, v in zip(node.keys, node.values)}

    def eval_unaryop(self, node: ast.UnaryOp) -> Any:
        return _UNARYOPS[type(node.op)](self.data(node.operand))

    def eval_binop(self, node: ast.BinOp) -> Any:
        left, right, op = self.data(node.left), self.data(node.right), type(node.op)
        if op is ast.Mult:
            for seq, count in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and type(count) in (bool, int) \
                        and _size(seq) * max(count, 0) > MAX_ITEMS:
                    raise _Error(f"repetition exceeds {MAX_ITEMS} characters or items")
        elif op is ast.Pow and type(left) in (bool, int) and type(right) in (bool, int) \
                and (abs(left).bit_length() - 1) * right > MAX_INT_BITS:
            raise _Error(f"integer power exceeds {MAX_INT_BITS} bits")
        elif op is ast.Mod and not (_is_number(left) and _is_number(right)):
            raise _Error("'%' works on numbers only (format text with f-strings)")
        return _BINOPS[op](left, right)

    def eval_boolop(self, node: ast.BoolOp) -> Any:
        want = isinstance(node.op, ast.Or)
        for child in node.values:
            value = self.evaluate(child)
            if bool(value) is want:
                return value
        return value

    def eval_compare(self, node: ast.Compare) -> Any:
        left = self.data(node.left)
        for op, comparator in zip(node.ops, node.comparators):
            right = self.data(comparator)
            if not _COMPARISONS[type(op)](left, right):
                return False
            left = right
        return True

    def eval_ifexp(self, node: ast.IfExp) -> Any:
        return self.evaluate(node.body) if self.evaluate(node.test) else self.evaluate(node.orelse)

    def eval_subscript(self, node: ast.Subscript) -> Any:
        value, part = self.data(node.value), node.slice
        if isinstance(part, ast.Slice):
            bounds = (part.lower, part.upper, part.step)
            return value[slice(*(None if p is None else self.data(p) for p in bounds))]
        return value[self.data(part)]

    def eval_joinedstr(self, node: ast.JoinedStr) -> Any:
        return "".join(self.evaluate(part) for part in node.values)

    def eval_formattedvalue(self, node: ast.FormattedValue) -> Any:
        value = self.data(node.value)
        convert = {ord("r"): repr, ord("s"): str, ord("a"): ascii}.get(node.conversion)
        value = convert(value) if convert else value
        spec = self.evaluate(node.format_spec) if node.format_spec else ""
        _check_format_spec(spec)
        return format(value, spec)

    def eval_attribute(self, node: ast.Attribute) -> Any:
        return _FILTERS[node.attr]

    def eval_call(self, node: ast.Call) -> Any:
        func = node.func
        if isinstance(func, ast.Name):
            args = [self.data(a) for a in node.args]
            return _BUILTINS[func.id](*args) if func.id in _BUILTINS else _call_math(func.id, args)
        if func.attr == "filter":
            image, chosen = self.evaluate(func.value), self.evaluate(node.args[0])
            if not isinstance(image, Image.Image):
                raise _Error(f".filter() needs an image, got {type(image).__name__}")
            if not _is_filter(chosen):
                raise _Error(f".filter() needs an ImageFilter.NAME, got {type(chosen).__name__}")
            self.filter_calls += 1
            if self.filter_calls > MAX_FILTER_CALLS:
                raise _Error(f"more than {MAX_FILTER_CALLS} filters for one frame")
            return image.filter(chosen)
        args = [self.data(a) for a in node.args]
        return _make_filter(func.attr, args, {k.arg: self.data(k.value) for k in node.keywords})

    _HANDLERS: dict[type, Callable[[_Evaluator, Any], Any]] = {
        ast.Constant: eval_constant, ast.Name: eval_name, ast.List: eval_list,
        ast.Tuple: eval_tuple, ast.Set: eval_set, ast.Dict: eval_dict,
        ast.UnaryOp: eval_unaryop, ast.BinOp: eval_binop, ast.BoolOp: eval_boolop,
        ast.Compare: eval_compare, ast.IfExp: eval_ifexp, ast.Subscript: eval_subscript,
        ast.JoinedStr: eval_joinedstr, ast.FormattedValue: eval_formattedvalue,
        ast.Attribute: eval_attribute, ast.Call: eval_call,
    }


class Expression:
    """A user expression parsed and checked once, evaluated per frame by walking its AST.

    For a post-processing schedule, calling it returns the image function for that frame.
    """

    def __init__(self, name: str, source: str, checked: str, body: ast.AST,
                 param: str | None) -> None:
        self.name, self.source = name, source
        self._checked, self._body, self._param = checked, body, param

    def __repr__(self) -> str:
        return f"Expression({self.name!r}, {self.source!r})"

    def __call__(self, image_i: int, loop_i: int) -> Any:
        env: dict[str, Any] = {"image_i": image_i, "loop_i": loop_i}
        if self._param is None:
            return self._evaluate(env)
        param = self._param

        def post_process(img: Image.Image) -> Image.Image:
            result = self._evaluate({**env, param: img})
            if not isinstance(result, Image.Image):
                raise VlrtError(f"{self.name}: must return an image, got {type(result).__name__} "
                                f"at image_i={image_i}, loop_i={loop_i}")
            return result

        return post_process

    def _evaluate(self, env: dict[str, Any]) -> Any:
        try:
            return _Evaluator(env).evaluate(self._body)
        except _Failure as failure:
            cause = failure.cause
            reason = str(cause) if isinstance(cause, _Error) else f"{type(cause).__name__}: {cause}"
            raise VlrtError(
                f"{self.name}: {_quote(self._checked, failure.node)} failed at "
                f"image_i={env['image_i']}, loop_i={env['loop_i']}: {_one_line(reason)}"
            ) from cause


def _parse(name: str, text: str) -> tuple[str, ast.expr]:
    """Parses without ever compiling to code; every parser failure becomes one clear line."""
    if len(text) > MAX_TEXT:
        raise VlrtError(f"{name}: the expression is {len(text)} characters long "
                        f"(at most {MAX_TEXT})")
    checked = text.strip()  # leading blanks would be an IndentationError
    if not checked:
        raise VlrtError(f"{name}: the expression is empty (leave the schedule unset to not use it)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escapes: -W error must not change parsing
            return checked, ast.parse(checked, mode="eval").body
    except SyntaxError as exc:
        where = f" at line {exc.lineno}" if exc.lineno else ""
        where += f", column {exc.offset}" if exc.offset else ""
        raise VlrtError(f"{name}: syntax error{where}: {_one_line(str(exc.msg))}") from None
    except (RecursionError, MemoryError):
        raise VlrtError(f"{name}: the expression is nested too deeply "
                        f"(at most {MAX_DEPTH} levels)") from None
    except ValueError as exc:  # NUL characters
        raise VlrtError(f"{name}: cannot parse the expression: {_one_line(str(exc))}") from None


def compile_expression(name: str, text: str) -> Expression:
    """Parses and checks a numeric/text/list schedule; raises VlrtError before any frame runs."""
    checked, body = _parse(name, text)
    _Checker(name, checked, post=False).check(body, 1, frozenset())
    return Expression(name, text, checked, body, None)


def compile_post_processing(name: str, text: str) -> Expression:
    """Like compile_expression for `lambda img: ...`; calling the result with (image_i, loop_i)
    gives that frame's image function."""
    checked, body = _parse(name, text)
    if not isinstance(body, ast.Lambda):
        raise VlrtError(f"{name}: must be a lambda of one image, e.g. 'lambda img: "
                        f"img.filter(ImageFilter.SMOOTH)' (got {_quote(checked, body)})")
    spec = body.args
    if spec.posonlyargs or spec.vararg or spec.kwonlyargs or spec.kwarg or spec.defaults \
            or len(spec.args) != 1:
        raise VlrtError(f"{name}: {_quote(checked, body)} must take exactly one parameter, "
                        "the image ('lambda img: ...')")
    param = spec.args[0].arg
    if param.startswith("_") or param in _MATH or param in _BUILTINS \
            or param in ("image_i", "loop_i", "ImageFilter"):
        raise VlrtError(f"{name}: the lambda parameter {param!r} is not allowed; call it 'img'")
    _Checker(name, checked, post=True).check(body.body, 2, frozenset({param}))
    return Expression(name, text, checked, body.body, param)
