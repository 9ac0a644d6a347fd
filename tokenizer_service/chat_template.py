"""A model's own Jinja chat template (GGUF ``tokenizer.chat_template``, HF ``tokenizer_config.json``).

Rendered the way Hugging Face transformers renders it (``ImmutableSandboxedEnvironment`` with
``trim_blocks``/``lstrip_blocks``, ``raise_exception``, ``tojson``, ``strftime_now``), so a template
cannot reach Python internals. The rendered text is then encoded so that only the template's own
special-token text becomes special tokens: each message's content is wrapped in two private-use
marker characters before rendering, and special-token text between a pair of markers is encoded as
ordinary text. A user who types ``<|im_end|>`` gets the tokens of those characters, never id 2.

A template comes from a model file, which may be hostile: besides the sandbox, a render has a budget
(``RENDER_SECONDS`` of Python time; no string, list or output longer than ``RENDER_CHARS`` plus four
characters per character of input; no number argument above ``MAX_TEMPLATE_INT``), checked before
an operation allocates where it can be (``*``, ``**``, ``+``, ``~``, ``%``, ``replace``, widths,
indents, format strings) and on every template line and Python call otherwise. Over budget is an ``InvalidArgument`` naming it.

``TemplateRenderer`` (template -> ``RenderedChat``) needs no tokenizer: the service runs it in worker
processes (template_workers.py), so a template that escapes the budget still never holds the
server's GIL; ``JinjaChatFormat.encode`` then turns the rendering into ids in the server.
"""

from __future__ import annotations

import functools
import itertools
import json
import operator
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.compiler import CodeGenerator, Frame
from jinja2.nodes import Concat, EvalContext
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llama_grpc_runtime.errors import InvalidArgument, short
from model_files.chat import JINJA_CHAT_FORMAT

from .chat_format import ChatPrompt
from .tokenizer import Tokenizer
from .vocabulary import Vocabulary

RENDER_SECONDS = 2.0
RENDER_CHARS = 1 << 20  # + 4 per input character: the longest string, list or rendering allowed
MAX_TEMPLATE_INT = 100_000  # largest number a template may pass to a call or filter (Jinja's MAX_RANGE)


class TemplateRefusal(jinja2.TemplateError):
    """``raise_exception("...")`` in a template: the messages break the template's rules."""


class TemplateBudgetExceeded(jinja2.TemplateError):
    """The template used more time or memory than a chat prompt can need."""


class _Budget:
    """Per render, per thread: a deadline checked on each template line and Python call, and a size
    limit checked before the operations that can grow a value by a large factor."""

    _current = threading.local()

    def __init__(self, seconds: float, chars: int) -> None:
        self.deadline = time.monotonic() + seconds
        self.seconds = seconds
        self.chars = chars

    @classmethod
    def current(cls) -> _Budget | None:
        return getattr(cls._current, "budget", None)

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateBudgetExceeded(f"rendering took more than {self.seconds:g} s")

    def check_size(self, size: int, what: str) -> None:
        if size > self.chars:
            raise TemplateBudgetExceeded(f"{what} of {size} items is more than the limit of {self.chars}")

    def _trace(self, frame: Any, event: str, arg: Any) -> Callable | None:
        self.check_time()
        return self._trace_lines if frame.f_code.co_filename == "<template>" else None

    def _trace_lines(self, frame: Any, event: str, arg: Any) -> Callable | None:
        if event == "line":
            self.check_time()
        return self._trace_lines

    def __enter__(self) -> _Budget:
        self._previous_trace = sys.gettrace()
        self._current.budget = self
        sys.settrace(self._trace)  # this thread only
        return self

    def __exit__(self, *exc: Any) -> None:
        sys.settrace(self._previous_trace)
        self._current.budget = None


def _size(value: Any) -> int:
    return len(value) if isinstance(value, str | bytes | list | tuple | dict) else 0


def _check_ints(args: tuple, kwargs: dict) -> None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_TEMPLATE_INT:
            raise TemplateBudgetExceeded(f"number {_short_int(value)} is larger than the limit of {MAX_TEMPLATE_INT}")


def _short_int(value: int) -> str:
    """A number for a message: Python refuses to print one of more than 4300 digits."""
    return str(value) if abs(value) < 10**30 else f"of about {int(abs(value).bit_length() / 3.32)} digits"


def _check_result(value: Any, what: str) -> Any:
    if (budget := _Budget.current()) is not None:
        budget.check_size(_size(value), what)
    return value


def _format_growth(fmt: str) -> int:
    """At most what the numbers in a format string (``%99999s``, ``{:>99999}``) can add to it."""
    return sum(int(digits) for digits in re.findall(r"\d+", fmt))


def _predicted_size(op: str, left: Any, right: Any) -> int:
    """The length ``left op right`` would have, computed without building it."""
    if op == "*":
        for sequence, times in ((left, right), (right, left)):
            if _size(sequence) and isinstance(times, int):
                return _size(sequence) * max(times, 0)
    if op == "*" and isinstance(left, int) and isinstance(right, int):  # digits of the product: squaring
        return int((abs(left).bit_length() + abs(right).bit_length()) / 3.3)  # doubles them, unchecked otherwise
    if op == "+":
        return _size(left) + _size(right)
    if op == "%" and isinstance(left, str):
        return len(left) + _format_growth(left) + len(str(right))
    if op == "**" and isinstance(left, int | float) and isinstance(right, int | float):
        digits = abs(right) * max(abs(left), 2).bit_length() / 3.3 if abs(left) > 1 else 0
        return int(digits)  # a huge power is a huge number: as costly as a huge string
    return 0


def _predicted_call_size(name: str, text: str, args: list, kwargs: dict) -> int:
    """An upper bound on the length of ``text.name(*args)`` / ``text | name(*args)`` before it runs."""
    values = [*args, *kwargs.values()]
    if name == "replace" and len(args) >= 2:
        old, new = str(args[0]), str(args[1])
        return len(text) + (len(text) + 1) * max(len(new) - len(old), 0)
    if name in ("format", "format_map"):
        return len(text) + _format_growth(text) + sum(len(str(value)) for value in values)
    numbers = [abs(value) for value in values if isinstance(value, int) and not isinstance(value, bool)]
    # center/ljust/rjust/zfill add at most the width; indent a width per line; expandtabs one per tab.
    widths = [len(value) for value in values if isinstance(value, str)] + numbers  # indent(width="    ")
    return len(text) + max(widths, default=0) * (text.count("\n") + text.count("\t") + 1)


def _check_call(name: str, text: Any, args: list, kwargs: dict) -> None:
    _check_ints(tuple(args), kwargs)
    if isinstance(text, str) and (budget := _Budget.current()) is not None:
        budget.check_size(_predicted_call_size(name, text, args, kwargs), f"{name} result")


def _checked_filter(name: str, function: Callable) -> Callable:
    @functools.wraps(function)
    def checked(*args: Any, **kwargs: Any) -> Any:
        values = [arg for arg in args if not isinstance(arg, EvalContext | Context)]
        if values:
            _check_call(name, values[0], values[1:], kwargs)
        else:
            _check_ints((), kwargs)
        return _check_result(function(*args, **kwargs), f"{name} result")

    return checked


def _checked_concat(parts: tuple) -> str:
    if (budget := _Budget.current()) is not None:
        budget.check_size(sum(len(str(part)) for part in parts), "~ result")
    return "".join(map(str, parts))


class _BudgetedCodeGenerator(CodeGenerator):
    def visit_Concat(self, node: Concat, frame: Frame) -> None:  # ``a ~ b``: size checked first
        self.write("environment.checked_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _BudgetedEnvironment(ImmutableSandboxedEnvironment):
    code_generator_class = _BudgetedCodeGenerator
    intercepted_binops = frozenset({"*", "**", "+", "%"})
    checked_concat = staticmethod(_checked_concat)
    _binops = {"*": operator.mul, "**": operator.pow, "+": operator.add, "%": operator.mod}

    def call_binop(self, context: Any, op: str, left: Any, right: Any) -> Any:
        if (budget := _Budget.current()) is not None:
            budget.check_size(_predicted_size(op, left, right), f"{op} result")
        return self._binops[op](left, right)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        """``"...".format`` / ``format_map``: Jinja's sandboxed wrapper, with the size checked first."""
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        text, name = value.__self__, value.__name__

        def checked(*args: Any, **kwargs: Any) -> str:
            _check_call(name, text, list(args), kwargs)
            return wrapped(*args, **kwargs)

        return checked

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        _check_call(getattr(__obj, "__name__", ""), getattr(__obj, "__self__", None), list(args), kwargs)
        return _check_result(super().call(__context, __obj, *args, **kwargs), "call result")


def _raise_exception(message: str) -> None:
    raise TemplateRefusal(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters; chat templates expect plain JSON (as in transformers).
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def template_environment() -> ImmutableSandboxedEnvironment:
    env = _BudgetedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.filters = {name: _checked_filter(name, function) for name, function in env.filters.items()}
    env.globals.pop("lipsum", None)  # unbounded text generator; no chat template uses it
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _marker_pair(texts: list[str]) -> tuple[str, str]:
    """Two characters from the supplementary private-use planes that occur in none of ``texts``."""
    used = set().union(*map(set, texts))
    # A lazy chain: building the 131k candidates up front would cost milliseconds a call.
    free = (chr(c) for c in itertools.chain(range(0xF0000, 0xFFFFE), range(0x100000, 0x10FFFE)) if chr(c) not in used)
    try:
        return next(free), next(free)
    except StopIteration:
        raise InvalidArgument("messages", "uses every private-use character; cannot mark content") from None


@dataclass(frozen=True)
class TemplateSpec:
    """Everything rendering a model's template needs, and nothing more: plain data, so it can be sent
    once to each render worker process (template_workers.py), which then builds its own renderer."""

    source: str
    variables: dict[str, str]  # bos_token, eos_token, unk_token, ...
    special_tokens: dict[str, int]  # text -> id, as the tokenizer has them


@dataclass(frozen=True)
class RenderedChat:
    """A rendered chat before encoding: the text, and the same text as ordinary runs (to encode as
    plain text) and the template's own special-token ids, in order."""

    text: str
    pieces: list[str | int]


class TemplateRenderer:
    """A compiled template in its sandbox: messages -> ``RenderedChat``. Holds no tokenizer (the
    render workers hold only this); bad messages or an over-budget template raise InvalidArgument."""

    def __init__(self, spec: TemplateSpec) -> None:
        self.source = spec.source
        self.template = template_environment().from_string(spec.source)
        self.variables = spec.variables
        self.special_tokens = spec.special_tokens
        # Longest first, so a special token that is a prefix of another never wins.
        specials = sorted(spec.special_tokens, key=len, reverse=True)
        self.special_pattern = re.compile("|".join(map(re.escape, specials))) if specials else None
        self.special_names = {token_id: text for text, token_id in spec.special_tokens.items()}

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        input_chars = sum(len(message["role"]) + len(message["content"]) for message in messages)
        budget = _Budget(RENDER_SECONDS, RENDER_CHARS + 4 * input_chars)
        try:
            with budget:
                pieces, size = [], 0
                for piece in self.template.generate(messages=messages, add_generation_prompt=add_generation_prompt,
                                                    tools=None, documents=None, **self.variables):
                    size += len(piece)
                    budget.check_size(size, "rendered prompt")
                    pieces.append(piece)
                return "".join(pieces)
        except (TemplateBudgetExceeded, RecursionError, MemoryError) as exc:
            raise InvalidArgument("messages", f"the model's chat template exceeded its budget on them: {exc}") from exc
        except TemplateRefusal as exc:
            raise InvalidArgument("messages", f"the model's chat template refused them: {exc}") from exc
        except jinja2.TemplateError as exc:  # SecurityError, UndefinedError, ...: still about these messages
            raise InvalidArgument("messages", f"the model's chat template failed on them: {exc}") from exc
        except (ArithmeticError, LookupError, TypeError, ValueError) as exc:  # {{ 1 / 0 }}, {{ 1 + 'a' }}, ...
            raise InvalidArgument("messages", f"the model's chat template failed on them: {type(exc).__name__}: "
                                  f"{short(str(exc), 200)}") from exc

    def rendered_chat(self, messages: list[tuple[str, str]], add_generation_prompt: bool) -> RenderedChat:
        """Messages whose roles are already checked (chat_format.checked_messages) -> the rendering."""
        plain = [{"role": role, "content": content} for role, content in messages]
        text = self.render(plain, add_generation_prompt)
        open_mark, close_mark = _marker_pair([self.source, text, *(content for _, content in messages)])
        # Markers go inside the content's own surrounding whitespace, so `| trim` keeps them.
        marked = [{"role": role, "content": _wrap(content, open_mark, close_mark)} for role, content in messages]
        pieces = self._marked_pieces(self.render(marked, add_generation_prompt), open_mark, close_mark)
        if pieces is None or self._join(pieces) != text:
            pieces = self._unmarked_pieces(text, messages, add_generation_prompt)
        return RenderedChat(text=text, pieces=pieces)

    def _split_specials(self, text: str) -> Iterator[str | int]:
        """``text`` as ordinary runs and special-token ids, in order."""
        position = 0
        if self.special_pattern is not None:
            for match in self.special_pattern.finditer(text):
                yield text[position:match.start()]
                yield self.special_tokens[match.group()]
                position = match.end()
        yield text[position:]

    def _marked_pieces(self, marked: str, open_mark: str, close_mark: str) -> list[str | int] | None:
        """Text runs (markers removed, content kept ordinary) and template special-token ids; None
        when the markers do not come in open/close pairs."""
        parts = re.split(f"({re.escape(open_mark)}|{re.escape(close_mark)})", marked)
        # parts: outside, OPEN, content, CLOSE, outside, OPEN, ...
        pieces: list[str | int] = []
        for index, part in enumerate(parts):
            if index % 2:
                if part != (open_mark if index % 4 == 1 else close_mark):
                    return None
            elif index % 4 == 2:
                pieces.append(part)
            else:
                pieces.extend(self._split_specials(part))
        if len(parts) % 4 != 1:  # an OPEN without its CLOSE
            return None
        return _merge_text(pieces)

    def _unmarked_pieces(self, text: str, messages: list[tuple[str, str]],
                         add_generation_prompt: bool) -> list[str | int]:
        """The template moved or scrambled the markers (it does more to content than trim or replace).
        Special-token text in the rendering is then honoured only when no content carries any and the
        rendering holds exactly the special tokens it holds when every content is a neutral "x"."""
        for index, (_, content) in enumerate(messages):
            if self.special_pattern is not None and self.special_pattern.search(content):
                raise InvalidArgument(f"messages[{index}].content", "contains special-token text, which this "
                                      "model's chat template would not keep as plain text")
        pieces = _merge_text(list(self._split_specials(text)))
        neutral = self.render([{"role": role, "content": "x"} for role, _ in messages], add_generation_prompt)
        if sorted(p for p in pieces if isinstance(p, int)) != sorted(
                p for p in self._split_specials(neutral) if isinstance(p, int)):
            raise InvalidArgument("messages", "their content would turn into special tokens under this model's "
                                  "chat template")
        return pieces

    def _join(self, pieces: list[str | int]) -> str:
        return "".join(piece if isinstance(piece, str) else self.special_names[piece] for piece in pieces)


class JinjaChatFormat:
    """A model's own template as a chat format: render (``TemplateRenderer``, here or in a render
    worker), then ``encode`` the rendering with the tokenizer."""

    name = JINJA_CHAT_FORMAT

    def __init__(self, tokenizer: Tokenizer, vocab: Vocabulary) -> None:
        assert vocab.chat_template is not None
        self.tokenizer = tokenizer
        self.spec = TemplateSpec(source=vocab.chat_template,
                                 variables={"bos_token": vocab.bos_token, "eos_token": vocab.eos_token, **vocab.extra},
                                 special_tokens=dict(tokenizer.special_tokens))
        self.renderer = TemplateRenderer(self.spec)  # compiled now: a template with a syntax error fails the load

    def apply(self, messages: list[tuple[str, str]], add_generation_prompt: bool) -> ChatPrompt:
        """Messages whose roles are already checked (chat_format.checked_messages) -> the prompt."""
        return self.encode(self.renderer.rendered_chat(messages, add_generation_prompt))

    def encode(self, rendered: RenderedChat) -> ChatPrompt:
        token_ids: list[int] = []
        for piece in rendered.pieces:
            if isinstance(piece, int):
                token_ids.append(piece)
            else:
                token_ids.extend(self.tokenizer.encode(piece))
        return ChatPrompt(token_ids=token_ids, text=rendered.text)


def _merge_text(pieces: list[str | int]) -> list[str | int]:
    """Join neighbouring text runs (content and template text around it pre-tokenize together, as
    they do when Hugging Face encodes the rendered prompt) and drop empty ones."""
    merged: list[str | int] = []
    for piece in pieces:
        if isinstance(piece, str) and merged and isinstance(merged[-1], str):
            merged[-1] += piece
        elif piece != "":
            merged.append(piece)
    return merged


def _wrap(content: str, open_mark: str, close_mark: str) -> str:
    core = content.strip()
    start = len(content) - len(content.lstrip())
    return content[:start] + open_mark + core + close_mark + content[start + len(core):]
