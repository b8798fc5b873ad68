"""Tests for the safe schedule evaluator (vlrt/settings/schedule.py).

The original extension ran schedules with bare `eval`; these tests pin the replacement down:
the SPEC §1.2 placeholders still work, a hostile corpus is refused with one clear line and never
touches the file system, and a grammar fuzz checks that forbidden constructs are always refused
before anything is evaluated.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import math
import os
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFilter

from vlrt.errors import VlrtError
from vlrt.settings.schedule import Expression, compile_expression, compile_post_processing

POST = "image_post_processing_schedule"


def run_expr(name: str, text: str, image_i: int = 3, loop_i: int = 6) -> Any:
    return compile_expression(name, text)(image_i, loop_i)


# --- SPEC §1.2 placeholders, expected values worked out by hand -------------------------------

PLACEHOLDERS = [
    # sin(pi*45/90) = sin(pi/2) = 1 -> (1+1)/2*0.07; sin(3pi/2) = -1 -> 0.
    ("subseed_strength_schedule", "(sin(pi*image_i/90)+1)/2*0.07", [(45, 1, 0.07), (135, 2, 0.0)]),
    ("denoising_schedule", "0.4 if loop_i<3 else 0.3", [(1, 2, 0.4), (1, 3, 0.3)]),
    ("step_schedule", "10 if loop_i<3 else 20", [(7, 1, 10), (7, 3, 20)]),
    # image_i//5%3: 1 -> 0, 5 -> 1, 12 -> 2, 15 -> 3%3 = 0.
    ("seed_schedule", "[111,222,333][image_i//5%3]",
     [(1, 1, 111), (5, 1, 222), (12, 1, 333), (15, 1, 111)]),
    ("subseed_schedule", "112233+image_i*2", [(1, 1, 112235), (10, 4, 112253)]),
    ("cfg_schedule", "7 if image_i in {1,5,7} else 8", [(5, 1, 7), (2, 1, 8)]),
    ("superimpose_alpha_schedule", "0.3 if loop_i<3 else 0.2 if loop_i<5 else 0.1",
     [(1, 2, 0.3), (1, 4, 0.2), (1, 5, 0.1)]),
    ("temporal_superimpose_schedule", "[0.1, 0.8, 0.1] if loop_i<=3 else [0.0, 1.0, 0.0]",
     [(1, 3, [0.1, 0.8, 0.1]), (1, 4, [0.0, 1.0, 0.0])]),
    ("prompt_schedule", "['1girl,smile','1girl,closed mouth'][image_i//10%2]",
     [(9, 1, "1girl,smile"), (10, 1, "1girl,closed mouth"), (20, 1, "1girl,smile")]),
    # 1.0 + 15/30 = 1.5 and 1.0 + 3/30 = 1.1, both printed exactly by str(float).
    ("negative_prompt_schedule", "f' low quality, (blurry:{1.0+loop_i/30})'",
     [(1, 15, " low quality, (blurry:1.5)"), (1, 3, " low quality, (blurry:1.1)")]),
    ("batch_count_schedule", "5 if loop_i<=5 else 1", [(1, 5, 5), (1, 6, 1)]),
    ("batch_count_schedule", "(2, 3) if loop_i > 1 else 4", [(1, 2, (2, 3)), (1, 1, 4)]),
]


@pytest.mark.parametrize(("name", "text", "points"), PLACEHOLDERS)
def test_placeholders_evaluate_like_the_extension(name: str, text: str, points: list) -> None:
    expression = compile_expression(name, text)
    assert isinstance(expression, Expression)
    assert (expression.name, expression.source) == (name, text)
    for image_i, loop_i, expected in points:
        value = expression(image_i, loop_i)
        assert type(value) is type(expected)
        if isinstance(expected, float):
            assert value == pytest.approx(expected, abs=1e-12)
        else:
            assert value == expected


def test_post_processing_placeholder_filters_only_on_listed_loops() -> None:
    text = ("lambda img: img.filter(ImageFilter.EDGE_ENHANCE).filter(ImageFilter.SMOOTH) "
            "if loop_i in {6,8} else img")
    image = Image.linear_gradient("L").convert("RGB").resize((32, 32))
    expression = compile_post_processing(POST, text)
    expected = image.filter(ImageFilter.EDGE_ENHANCE).filter(ImageFilter.SMOOTH)
    for loop_i in (6, 8):
        assert expression(1, loop_i)(image).tobytes() == expected.tobytes()
    assert expression(1, 7)(image) is image


def test_post_processing_parametric_filters_and_names() -> None:
    image = Image.linear_gradient("L").resize((16, 16))
    cases = {
        "GaussianBlur(radius=3)": ImageFilter.GaussianBlur(3),
        "RankFilter(3, 4)": ImageFilter.RankFilter(3, 4),
        "MedianFilter(size=2*loop_i+1)": ImageFilter.MedianFilter(5),
        "UnsharpMask(2, 150, threshold=3)": ImageFilter.UnsharpMask(2, 150, 3),
        "GaussianBlur": ImageFilter.GaussianBlur(),
        "BoxBlur(floor(pi))": ImageFilter.BoxBlur(3),
    }
    for call, flt in cases.items():
        text = f"lambda im: im.filter(ImageFilter.{call})"
        result = compile_post_processing(POST, text)(1, 2)(image)
        assert result.tobytes() == image.filter(flt).tobytes(), text


def test_math_names_builtins_and_syntax_coverage() -> None:
    assert run_expr("s", "floor(tau) + ceil(e) + int(isinf(inf))") == 6 + 3 + 1
    text = "max(image_i, loop_i) - min([4, 2, 9]) + abs(-2) + len('abc')"
    assert run_expr("s", text, 3, 6) == 6 - 2 + 2 + 3
    assert run_expr("s", "round(2.567, 2)") == 2.57
    assert run_expr("s", "sum([1, 2, 3], 10) + factorial(5) + comb(5, 2)") == 16 + 120 + 10
    text = "str(image_i) + f'{loop_i:03d}|{2.5:>6.2f}|{\"x\"!r}'"
    assert run_expr("s", text, 3, 6) == "3006|  2.50|'x'"
    assert run_expr("s", "1 < image_i <= 5 and not loop_i == 2 or None", 3, 6) is True
    text = "{'a': 1, 'b': image_i}['b'] + (1, 2, 3)[-1] + [1, 2, 3][1:][0]"
    assert run_expr("s", text, 3) == 3 + 3 + 2
    assert run_expr("s", "'abcdef'[::2] + ('x' if image_i not in [1, 2] else 'y')", 3) == "acex"
    assert run_expr("s", "2**10 + 7 // 2 + 7 % 3 - -1 + 2.0 ** -1", 1) == 1024 + 3 + 1 + 1 + 0.5
    assert run_expr("s", "  (1 +\n   image_i)  ", 4) == 5  # blanks and line breaks inside brackets
    assert run_expr("s", "float('1.5') + bool('') + int('12')") == 13.5


def test_caps_apply_per_evaluation_not_per_expression() -> None:
    expression = compile_expression("prompt_schedule", "len(str([0]*30000)) + image_i")
    assert [expression(i, 1) for i in range(1, 41)] == [90000 + i for i in range(1, 41)]
    post = compile_post_processing(POST, "lambda img: img" + ".filter(ImageFilter.SMOOTH)" * 32)
    image = Image.new("L", (4, 4))
    for image_i in range(1, 4):
        assert post(image_i, 1)(image).size == (4, 4)


# --- messages ----------------------------------------------------------------------------

def test_messages_name_the_schedule_quote_and_explain() -> None:
    with pytest.raises(VlrtError) as info:
        compile_expression("seed_schedule", "__import__('os').system('true')")
    message = str(info.value)
    assert message.startswith("seed_schedule: ") and "\n" not in message
    assert "\"__import__('os').system\" is not allowed" in message and "(allowed: " in message

    with pytest.raises(VlrtError, match=r"^seed_schedule: '__import__' is not an allowed "
                                        r"name .*image_i, loop_i"):
        compile_expression("seed_schedule", "__import__('os')")
    with pytest.raises(VlrtError, match=r"^cfg_schedule: 'math\.sin' .*write 'sin'"):
        compile_expression("cfg_schedule", "math.sin(1)")
    with pytest.raises(VlrtError, match=r"^step_schedule: syntax error at line 1, column \d+"):
        compile_expression("step_schedule", "(1 + ")
    with pytest.raises(VlrtError, match=r"^step_schedule: '1/\(image_i-1\)' failed at "
                                        r"image_i=1, loop_i=2: ZeroDivisionError"):
        compile_expression("step_schedule", "10 + 1/(image_i-1)")(1, 2)
    with pytest.raises(VlrtError, match=rf"^{POST}: must return an image, got int "
                                        r"at image_i=4, loop_i=5"):
        compile_post_processing(POST, "lambda img: 1")(4, 5)(Image.new("L", (2, 2)))
    with pytest.raises(VlrtError, match=rf"^{POST}: must be a lambda of one image"):
        compile_post_processing(POST, "None")


@pytest.mark.parametrize("text", ["", "   ", "\n\t"])
def test_empty_text_is_an_error_callers_must_skip_it(text: str) -> None:
    with pytest.raises(VlrtError, match="^seed_schedule: the expression is empty"):
        compile_expression("seed_schedule", text)


# --- hostile corpus ----------------------------------------------------------------------
# (kind, stage, text): kind "expr" or "post"; stage "compile" when the text must be refused
# before any evaluation, "run" when only the evaluation caps can see the problem.
# CANARY stands for the quoted path of a file that must never be created.

HOSTILE: list[tuple[str, str, str]] = [
    ("expr", "compile", "__import__('os').system('touch ' + CANARY)"),
    ("expr", "compile", "__import__('os')"),
    ("expr", "compile", "().__class__.__base__.__subclasses__()"),
    ("expr", "compile", "[].__class__"),
    ("expr", "compile", "[c for c in ().__class__.__base__.__subclasses__() "
                        "if c.__name__ == 'Popen'][0]('touch ' + CANARY, shell=True)"),
    ("expr", "compile", "(lambda: 1)()"),
    ("expr", "compile", "lambda: open(CANARY, 'w')"),
    ("expr", "compile", "open(CANARY, 'w')"),
    ("expr", "compile", "eval(\"open(CANARY, 'w')\")"),
    ("expr", "compile", "exec(\"open(CANARY, 'w')\")"),
    ("expr", "compile", "compile('1', 'x', 'eval')"),
    ("expr", "compile", "getattr(1, '__class__')"),
    ("expr", "compile", "setattr(image_i, 'x', 1)"),
    ("expr", "compile", "globals()"),
    ("expr", "compile", "locals()"),
    ("expr", "compile", "vars()"),
    ("expr", "compile", "dir()"),
    ("expr", "compile", "type(1)"),
    ("expr", "compile", "object.__subclasses__()"),
    ("expr", "compile", "breakpoint()"),
    ("expr", "compile", "print(1)"),
    ("expr", "compile", "input()"),
    ("expr", "compile", "help()"),
    ("expr", "compile", "__builtins__"),
    ("expr", "compile", "_"),
    ("expr", "compile", "image_i.__class__"),
    ("expr", "compile", "sin.__self__"),
    ("expr", "compile", "'{0.__class__}'.format(1)"),
    ("expr", "compile", "str.format('{}', 1)"),
    ("expr", "compile", "format(1, '>1000000000')"),
    ("expr", "compile", "math.factorial(10**6)"),
    ("expr", "compile", "[x for x in (1, 2)]"),
    ("expr", "compile", "{x: 1 for x in (1,)}"),
    ("expr", "compile", "sum(x for x in (1,))"),
    ("expr", "compile", "(x := 1)"),
    ("expr", "compile", "[*(1, 2)]"),
    ("expr", "compile", "max(*[1, 2])"),
    ("expr", "compile", "max(**{})"),
    ("expr", "compile", "round(1.5, ndigits=1)"),
    ("expr", "compile", "f'{image_i.__class__}'"),
    ("expr", "compile", "f'{open(CANARY, \"w\")}'"),
    ("expr", "compile", "\uff4f\uff50\uff45\uff4e(CANARY, 'w')"),  # fullwidth "open", NFKC-folded
    ("expr", "compile", "__\uff49mport__('os')"),
    ("expr", "compile", "import os"),
    ("expr", "compile", "(yield)"),
    ("expr", "compile", "await image_i"),
    ("expr", "compile", "(" * 5000 + "1" + ")" * 5000),
    ("expr", "compile", "(" * 300 + "1" + ")" * 300),
    ("expr", "compile", "-" * 100000 + "1"),
    ("expr", "compile", "-" * 9000 + "1"),
    ("expr", "compile", "1+" * 3000 + "1"),
    ("expr", "compile", "not " * 2000 + "1"),
    ("expr", "compile", "[" * 150 + "]" * 150),
    ("expr", "compile", "x" * 20000),
    ("expr", "compile", "1 << 10**9"),
    ("expr", "compile", "~image_i"),
    ("expr", "compile", "image_i @ image_i"),
    ("expr", "compile", "b'abc'"),
    ("expr", "compile", "0x" + "f" * 2000),
    ("expr", "compile", "ImageFilter.BLUR"),
    ("expr", "compile", "sin"),
    ("expr", "compile", "\x00"),
    ("expr", "run", "9**9**9"),
    ("expr", "run", "10**10**10"),
    ("expr", "run", "2**100000"),
    ("expr", "run", "2**4000*2**4000"),
    ("expr", "run", "'a'*10**10"),
    ("expr", "run", "[0]*10**9"),
    ("expr", "run", "[[0]*1000]*1000"),
    ("expr", "run", "'a'*99999 + 'a'*99999"),
    ("expr", "run", "str([0]*99999)"),
    ("expr", "run", "factorial(10**6)"),
    ("expr", "run", "factorial(10**7)"),
    ("expr", "run", "comb(10**9, 10**8)"),
    ("expr", "run", "perm(10**6)"),
    ("expr", "run", "prod([2**4000, 2**4000, 2**4000])"),
    ("expr", "run", "prod(['a', 10**5, 10**5])"),
    ("expr", "run", "lcm(2**4000, 3**2500)"),
    ("expr", "run", "round(10**1000, -10**9)"),
    ("expr", "run", "int('9'*5000)"),
    ("expr", "run", "sum([[0]]*99999, [])"),
    ("expr", "run", "f'{image_i!r:{\">\"*1000000}}'"),
    ("expr", "run", "f'{1:>1000000000}'"),
    ("expr", "run", "f'{1:{10**9}}'"),
    ("expr", "run", "f'{1.5:.1000000f}'"),
    ("expr", "run", "'%*d' % (10**9, 1)"),
    ("expr", "run", "f'{[0]*50000}' + f'{[0]*50000}'"),
    ("expr", "run", "1/0"),
    ("expr", "run", "10.0**400"),
    ("expr", "run", "exp(10**6)"),
    ("expr", "run", "ldexp(1, 10**9)"),
    ("expr", "run", "(-8)**0.5"),
    ("expr", "run", "[1, 2][10**100]"),
    ("expr", "run", "{}[1]"),
    ("expr", "run", "'a' < 1"),
    ("expr", "run", " and ".join(["[0]*99999 == [0]*99999"] * 12)),  # the work budget
    ("post", "compile", "lambda img: img.save(CANARY)"),
    ("post", "compile", "lambda img: img.__class__"),
    ("post", "compile", "lambda img: __import__('os')"),
    ("post", "compile", "lambda img, x: img"),
    ("post", "compile", "lambda: 1"),
    ("post", "compile", "lambda *a: 1"),
    ("post", "compile", "lambda **kw: 1"),
    ("post", "compile", "lambda img=1: img"),
    ("post", "compile", "lambda img: lambda x: x"),
    ("post", "compile", "lambda img: (lambda: img)()"),
    ("post", "compile", "lambda img: img.filter(ImageFilter.Kernel((3, 3), [1] * 9))"),
    ("post", "compile", "lambda img: ImageFilter.__dict__"),
    ("post", "compile", "lambda img: ImageFilter"),
    ("post", "compile", "lambda img: img.filter(img.save)"),
    ("post", "compile", "lambda img: img.filter(lambda i: i)"),
    ("post", "compile", "lambda img: img.filter(ImageFilter.BLUR).save(CANARY)"),
    ("post", "compile", "lambda img: img.filter(ImageFilter.BLUR, 1)"),
    ("post", "compile", "lambda img: img.filter(open(CANARY, 'w'))"),
    ("post", "compile", "lambda img: img.im"),
    ("post", "compile", "lambda img: img.filter.__globals__"),
    ("post", "compile", "lambda img: getattr(img, 'save')(CANARY)"),
    ("post", "compile", "lambda img: [img.filter(f) for f in (ImageFilter.BLUR,)]"),
    ("post", "compile", "lambda img: ImageFilter.GaussianBlur(radius=1, spam=2)"),
    ("post", "compile", "lambda img: ImageFilter.BLUR()"),
    ("post", "compile", "lambda __x: 1"),
    ("post", "compile", "lambda sin: sin"),
    ("post", "compile", "None"),
    ("post", "compile", "img.filter(ImageFilter.BLUR)"),
    ("post", "run", "lambda img: img.filter(ImageFilter.GaussianBlur(10**9))"),
    ("post", "run", "lambda img: img.filter(ImageFilter.GaussianBlur(nan))"),
    ("post", "run", "lambda img: img.filter(ImageFilter.MedianFilter(1001))"),
    ("post", "run", "lambda img: img.filter(ImageFilter.MedianFilter(4))"),
    ("post", "run", "lambda img: img.filter(ImageFilter.RankFilter(3, 100))"),
    ("post", "run", "lambda img: img.filter(ImageFilter.UnsharpMask(2, 10**9, 3))"),
    ("post", "run", "lambda img: img.filter(1)"),
    ("post", "run", "lambda img: (1).filter(ImageFilter.BLUR)"),
    ("post", "run", "lambda img: [img] * 10**9"),
    ("post", "run", "lambda img: img + 1"),
    ("post", "run", "lambda img: f'{img}'"),
    ("post", "run", "lambda img: 1"),
    ("post", "run", "lambda img: img" + ".filter(ImageFilter.BLUR)" * 33),
]


@contextlib.contextmanager
def tripwires(hits: list[str]) -> Iterator[None]:
    """Replaces the dangerous entry points with recorders for the duration of one evaluation.

    compile() stays usable for ast.parse (AST only), imports by the parser and by Pillow pass;
    getattr() is flagged for dunder or side-effect names only, since library code uses it for
    ordinary attributes.
    """
    real_compile, real_getattr, real_setattr = builtins.compile, builtins.getattr, builtins.setattr

    def tripped(label: str) -> Any:
        def record(*args: Any, **kwargs: Any) -> Any:
            hits.append(label)
            raise AssertionError(f"{label} was called")
        return record

    def compile_spy(source: Any, filename: Any, mode: Any, flags: int = 0, *args: Any,
                    **kwargs: Any) -> Any:
        if not flags & ast.PyCF_ONLY_AST:
            hits.append("compile")
        return real_compile(source, filename, mode, flags, *args, **kwargs)

    real_import = builtins.__import__

    def import_spy(module: str, importer: Any = None, *args: Any, **kwargs: Any) -> Any:
        # The parser imports unicodedata to NFKC-fold non-ASCII names; Pillow imports its own
        # modules lazily (from . import ...). Anything else would come from the user's text.
        where = (importer or {}).get("__name__", "")
        if module != "unicodedata" and not where.startswith("PIL."):
            hits.append(f"import {module!r} from {where!r}")
        return real_import(module, importer, *args, **kwargs)

    def getattr_spy(obj: Any, attr: str, *default: Any) -> Any:
        if isinstance(attr, str) and (attr.startswith("__") or attr in ("system", "save", "popen")):
            hits.append(f"getattr {attr}")
        return real_getattr(obj, attr, *default)

    patches: list[tuple[Any, str, Any]] = [
        (builtins, name, tripped(name))
        for name in ("open", "eval", "exec", "globals", "locals", "vars",
                     "breakpoint", "input", "print", "setattr", "delattr", "dir", "help")
    ]
    patches += [(builtins, "__import__", import_spy), (builtins, "compile", compile_spy),
                (builtins, "getattr", getattr_spy),
                (os, "system", tripped("os.system")), (os, "popen", tripped("os.popen")),
                (subprocess, "Popen", tripped("subprocess.Popen"))]
    saved = [(owner, name, real_getattr(owner, name)) for owner, name, _ in patches]
    try:
        for owner, name, spy in patches:
            real_setattr(owner, name, spy)
        yield
    finally:
        for owner, name, original in saved:
            real_setattr(owner, name, original)


def compile_and_run(name: str, post: bool, text: str, image_i: int, loop_i: int,
                    compiled: list[Expression]) -> None:
    """Compiles, then evaluates (and applies, for post-processing); appends what compiled."""
    compiled.append((compile_post_processing if post else compile_expression)(name, text))
    result = compiled[-1](image_i, loop_i)
    if post:
        result(Image.new("RGB", (4, 4), (9, 99, 199)))


def test_hostile_corpus_is_large_enough() -> None:
    assert len(HOSTILE) >= 45
    assert len({text for _, _, text in HOSTILE}) == len(HOSTILE)


@pytest.mark.parametrize(("kind", "stage", "text"), HOSTILE,
                         ids=[f"{i}-{kind}-{stage}" for i, (kind, stage, _) in enumerate(HOSTILE)])
def test_hostile_expression_is_refused(kind: str, stage: str, text: str, tmp_path: Path) -> None:
    canary = tmp_path / "CANARY"
    text = text.replace("CANARY", repr(str(canary)))
    name = POST if kind == "post" else "seed_schedule"
    hits: list[str] = []
    compiled: list[Expression] = []
    with pytest.raises(VlrtError) as info, tripwires(hits):
        compile_and_run(name, kind == "post", text, 3, 6, compiled)
    assert hits == []
    assert len(compiled) == (0 if stage == "compile" else 1)  # refused before any evaluation?
    message = str(info.value)
    assert message.startswith(f"{name}: ") and "\n" not in message and len(message) < 700
    if stage == "run":
        assert "image_i=3, loop_i=6" in message
    assert not canary.exists()
    assert list(tmp_path.iterdir()) == []


# --- grammar fuzz ------------------------------------------------------------------------

SAFE_BUILTINS = {"abs", "bool", "float", "int", "len", "max", "min", "round", "str", "sum"}
MATH_NAMES = {n for n in dir(math) if not n.startswith("_")}
CALLABLE = SAFE_BUILTINS | {n for n in MATH_NAMES if callable(vars(math)[n])}
ALLOWED_NAMES = SAFE_BUILTINS | MATH_NAMES | {"image_i", "loop_i"}
FILTER_NAMES = {"BLUR", "CONTOUR", "DETAIL", "EDGE_ENHANCE", "EDGE_ENHANCE_MORE", "EMBOSS",
                "FIND_EDGES", "SHARPEN", "SMOOTH", "SMOOTH_MORE", "GaussianBlur", "BoxBlur",
                "UnsharpMask", "MedianFilter", "MinFilter", "MaxFilter", "ModeFilter", "RankFilter"}
PARAMETRIC = {"GaussianBlur", "BoxBlur", "UnsharpMask", "MedianFilter", "MinFilter", "MaxFilter",
              "ModeFilter", "RankFilter"}
REFUSED_NODES = (ast.Attribute, ast.Lambda, ast.ListComp, ast.SetComp, ast.DictComp,
                 ast.GeneratorExp, ast.NamedExpr, ast.Starred, ast.Await, ast.Yield, ast.YieldFrom)

GOOD_VALUES = ["image_i", "loop_i", "pi", "e", "inf", "tau"]
GOOD_FUNCS = ["sin", "floor", "factorial", "abs", "max", "len", "str", "int", "round", "sum",
              "comb"]
BAD_NAMES = ["sin", "str", "__import__", "open", "os", "eval", "exec", "getattr", "globals", "vars",
             "type", "compile", "breakpoint", "__builtins__", "_", "_x", "__class__", "math",
             "print",
             "object", "locals", "setattr", "range", "format", "Image", "PIL", "np", "x",
             "ImageFilter", "img", "help", "input"]
ATTRIBUTES = ["__class__", "__base__", "__subclasses__", "__globals__", "__dict__", "__self__",
              "__builtins__", "system", "filter", "real", "format", "mro", "save", "BLUR",
              "GaussianBlur", "MedianFilter", "im", "sin"]
HOSTILE_FSTRINGS = ['f"{ image_i.__class__ }"', 'f"{ x }"', 'f"{ open(CANARY, \'w\') }"',
                    'f"{ image_i!r:{ __import__ } }"', 'f"{ (lambda: 1)() }"',
                    'f"{ [x for x in \'ab\'] }"']
CANARY_CALLS = ["open(CANARY, 'w')", "__import__('os').system('touch ' + CANARY)",
                "eval(\"open(CANARY, 'w')\")", "exec(\"open(CANARY, 'w')\")",
                "img.save(CANARY)", "getattr(img, 'save')(CANARY)",
                "().__class__.__base__.__subclasses__()"]
LITERALS = ["0", "1", "2", "9", "-1", "0.5", "1e308", "10**10", "2**4096", "''", "'a'", "'ab'",
            "[]", "[0]", "()", "{}", "{1, 2}", "True", "None"]
SAFE_BINARY = ["+", "-", "*", "/", "//", "%", "**", "==", "<", "in", "not in", "and", "or", "is"]
BAD_BINARY = ["<<", "&", "@", "|"]
FORMAT_SPECS = ["", ">9", "05d", ".3f", ">1000000000", ",", "x", "{image_i}"]
JUNK = [""] * 4 + [" )", "(", ",", " if", " import os", ";", "\n1"]

good_atoms = st.one_of(st.integers(-300, 300).map(str), st.sampled_from(LITERALS),
                       st.sampled_from(GOOD_VALUES))
image_atoms = st.sampled_from(["img", "ImageFilter.BLUR", "ImageFilter.GaussianBlur(2)"])
hostile_atoms = st.one_of(st.sampled_from(BAD_NAMES), st.sampled_from(CANARY_CALLS),
                          st.sampled_from(HOSTILE_FSTRINGS),
                          st.sampled_from(["b'x'", "1j", "...", "0x" + "f" * 1100]))


def allowed_forms(part: st.SearchStrategy[str], post: bool) -> list[st.SearchStrategy[str]]:
    args = st.lists(part, max_size=3).map(", ".join)
    forms = [
        st.tuples(part, st.sampled_from(SAFE_BINARY), part).map(lambda t: f"({' '.join(t)})"),
        st.tuples(st.sampled_from(["-", "+", "not "]), part).map(lambda t: f"({t[0]}{t[1]})"),
        st.tuples(st.sampled_from(GOOD_FUNCS), args).map(lambda t: f"{t[0]}({t[1]})"),
        st.tuples(part, part).map(lambda t: f"({t[0]})[{t[1]}]"),
        st.tuples(part, part, part).map(lambda t: f"({t[0]})[{t[1]}:{t[2]}]"),
        st.tuples(part, part, part).map(lambda t: f"({t[0]} if {t[1]} else {t[2]})"),
        args.map("[{}]".format),
        st.lists(part, min_size=1, max_size=3).map("({},)".format),
        st.tuples(part, part).map(lambda t: f"{{{t[0]}: {t[1]}}}"),
        # f-strings hold atoms only: Python 3.11 cannot nest f-strings that use the same quote.
        good_atoms.map('f"{{ {} }}"'.format),
        st.tuples(good_atoms, st.sampled_from(FORMAT_SPECS)).map(
            lambda t: f'f"{{ {t[0]}:{t[1]}}}"'),
        st.tuples(good_atoms, good_atoms).map(lambda t: f'f"{{ {t[0]}!r:{{ {t[1]} }}}}"'),
    ]
    if post:
        forms += [
            st.tuples(part, st.sampled_from(sorted(FILTER_NAMES))).map(
                lambda t: f"({t[0]}).filter(ImageFilter.{t[1]})"),
            st.tuples(st.sampled_from(sorted(PARAMETRIC)), args).map(
                lambda t: f"ImageFilter.{t[0]}({t[1]})"),
        ]
    return forms


def hostile_forms(part: st.SearchStrategy[str]) -> list[st.SearchStrategy[str]]:
    args = st.lists(part, max_size=3).map(", ".join)
    return [
        st.tuples(part, st.sampled_from(BAD_BINARY), part).map(lambda t: f"({' '.join(t)})"),
        part.map("(~{})".format),
        st.tuples(st.sampled_from(BAD_NAMES), args).map(lambda t: f"{t[0]}({t[1]})"),
        st.tuples(part, args).map(lambda t: f"({t[0]})({t[1]})"),
        st.tuples(part, st.sampled_from(ATTRIBUTES)).map(lambda t: f"({t[0]}).{t[1]}"),
        st.tuples(part, st.sampled_from(ATTRIBUTES), args).map(
            lambda t: f"({t[0]}).{t[1]}({t[2]})"),
        st.tuples(part, part).map(lambda t: f"({t[0]}).filter({t[1]})"),
        st.tuples(st.sampled_from(GOOD_FUNCS + BAD_NAMES), part).map(
            lambda t: f"{t[0]}({t[1]}, key={t[1]})"),
        st.tuples(part, part).map(lambda t: f"[{t[0]} for x in {t[1]}]"),
        st.tuples(part, part).map(lambda t: f"({t[0]} for x in {t[1]})"),
        part.map("(lambda: {})".format),
        st.tuples(part, part).map(lambda t: f"(lambda x: {t[0]})({t[1]})"),
        part.map("(x := {})".format),
        part.map("[*{}]".format),
    ]


def one_inside(bad: st.SearchStrategy[str],
               clean: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """Allowed forms with the one forbidden piece `bad` somewhere among clean parts."""
    op = st.sampled_from(SAFE_BINARY)
    return st.one_of(
        st.tuples(bad, op, clean).map(lambda t: f"({' '.join(t)})"),
        st.tuples(clean, op, bad).map(lambda t: f"({' '.join(t)})"),
        st.tuples(st.sampled_from(GOOD_FUNCS), bad).map(lambda t: f"{t[0]}({t[1]})"),
        st.tuples(clean, bad).map(lambda t: f"({t[0]})[{t[1]}]"),
        st.tuples(clean, bad, clean).map(lambda t: f"({t[0]} if {t[1]} else {t[2]})"),
        st.tuples(clean, bad).map(lambda t: f"[{t[0]}, {t[1]}]"),
    )


def texts(post: bool) -> st.SearchStrategy[str]:
    """Texts built from allowed forms only (most compile, many evaluate); texts with exactly
    one forbidden piece hidden among allowed ones; and texts that mix forbidden names,
    attributes and constructs in at every level, plus trailing junk."""
    clean_atoms = st.one_of(good_atoms, image_atoms) if post else good_atoms
    clean = st.recursive(clean_atoms, lambda p: st.one_of(allowed_forms(p, post)), max_leaves=6)
    single_bad = st.one_of(st.sampled_from(BAD_NAMES), st.sampled_from(CANARY_CALLS),
                           st.one_of(hostile_atoms, *hostile_forms(clean)))
    one_bad = st.recursive(single_bad, lambda p: one_inside(p, clean), max_leaves=4)
    mixed = st.recursive(st.one_of(clean_atoms, image_atoms, hostile_atoms),
                         lambda p: st.one_of(allowed_forms(p, True) + hostile_forms(p)),
                         max_leaves=6)
    if post:  # mostly return an image, so that the filters really run
        clean = st.one_of(clean, st.tuples(st.sampled_from(sorted(FILTER_NAMES)), clean).map(
            lambda t: f"img.filter(ImageFilter.{t[0]}) if ({t[1]}) else img"))
    return st.one_of(clean, one_bad, st.tuples(mixed, st.sampled_from(JUNK)).map("".join))


cases = st.one_of(st.tuples(st.just(False), texts(False)), st.tuples(st.just(True), texts(True)))


def must_refuse(text: str, post: bool) -> bool:
    """An independent reading of the whitelist with Python's own parser: True when the text
    contains something that must never reach evaluation."""
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return True
    body = tree.body
    if post:
        if not (isinstance(body, ast.Lambda) and len(body.args.args) == 1 and not body.args.defaults
                and not body.args.vararg and not body.args.kwarg and not body.args.kwonlyargs
                and not body.args.posonlyargs):
            return True
        body = body.body
    names = ALLOWED_NAMES | ({"img"} if post else set())
    filter_bases = set()  # ImageFilter names that are the base of an allowed ImageFilter.X
    allowed_attributes = set()
    for node in ast.walk(body):
        if post and isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                and node.value.id == "ImageFilter" and node.attr in FILTER_NAMES:
            allowed_attributes.add(id(node))
            filter_bases.add(id(node.value))
        if post and isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr == "filter" and len(node.args) == 1 and not node.keywords:
            allowed_attributes.add(id(node.func))
    for node in ast.walk(body):
        if isinstance(node, ast.Attribute) and id(node) in allowed_attributes:
            continue
        if isinstance(node, REFUSED_NODES):
            return True
        if isinstance(node, ast.Name) and (node.id.startswith("_") or node.id not in names) \
                and id(node) not in filter_bases:
            return True
        if isinstance(node, ast.Call):
            func = node.func
            plain = isinstance(func, ast.Name) and func.id in CALLABLE and not node.keywords
            filtering = id(func) in allowed_attributes and (
                func.attr == "filter" or func.attr in PARAMETRIC)  # type: ignore[union-attr]
            if not (plain or filtering):
                return True
    return False


def test_must_refuse_agrees_on_known_cases() -> None:
    """Guards the fuzz oracle itself against being too lenient."""
    assert must_refuse("__import__('os')", False) and must_refuse("[].__class__", False)
    assert must_refuse("lambda img: img.save('x')", True) and must_refuse("open('x')", False)
    assert not must_refuse("sin(image_i) + 1", False)
    assert not must_refuse("lambda img: img.filter(ImageFilter.GaussianBlur(2))", True)


@pytest.fixture(scope="module")
def canary_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("canary")


def test_fuzzed_expressions_never_escape(canary_dir: Path) -> None:
    canary = canary_dir / "CANARY"
    quoted = repr(str(canary))
    examples = []

    @settings(max_examples=1000, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    @given(case=cases, image_i=st.integers(1, 20), loop_i=st.integers(1, 10))
    def check(case: tuple[bool, str], image_i: int, loop_i: int) -> None:
        post, text = case
        examples.append(text)
        text = text.replace("CANARY", quoted)
        if post:
            text = "lambda img: " + text
        name = POST if post else "seed_schedule"
        hits: list[str] = []
        compiled: list[Expression] = []
        try:
            with tripwires(hits):
                compile_and_run(name, post, text, image_i, loop_i, compiled)
        except VlrtError as exc:
            assert str(exc).startswith(f"{name}: ") and "\n" not in str(exc)
        assert hits == []
        assert not canary.exists()
        if must_refuse(text, post):
            assert not compiled, f"accepted forbidden text {text!r}"

    check()
    assert len(examples) >= 1000
    assert not any(canary_dir.iterdir())
