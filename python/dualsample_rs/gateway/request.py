"""Each generation route's body, checked and read into one :class:`SampleRequest`.

Unknown fields are ignored, as vLLM ignores them. A field whose value would change the
sampled law in a way the gateway cannot reproduce (a penalty, beam search, a logit bias,
guided decoding, images) is refused with a 400 naming it; its neutral value passes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..server.completions import INT64, MAX_PROMPTS
from ..server.errors import load_json, text_problem
from .errors import RequestError
from .sampler import Prompt, Route, SampleRequest

__all__ = [
    "Limits",
    "parse_body",
    "parse_chat",
    "parse_completions",
    "parse_json",
    "parse_sglang",
    "parse_vllm_generate",
]


@dataclass(frozen=True)
class Limits:
    """Caps on one request.

    Attributes:
        max_logprobs: alternatives per position (vLLM's ``--max-logprobs``, 20).
        max_n: samples per prompt.
        max_prompts: prompts per request (vLLM's 1024).
    """

    max_logprobs: int = 20
    max_n: int = 256
    max_prompts: int = MAX_PROMPTS


def parse_json(raw: bytes) -> Any:
    """The decoded body, or a 400."""
    try:
        return load_json(raw)
    except ValueError as err:
        raise RequestError(str(err)) from None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _text(value: str, param: str) -> str:
    problem = text_problem(value, param)
    if problem is not None:
        raise RequestError(problem, param)
    return value


class _Fields:
    """Typed reads of a JSON object's fields, each failure a 400 naming the field."""

    def __init__(self, body: Mapping[str, Any], prefix: str = "") -> None:
        self.body = body
        self.prefix = prefix

    def name(self, key: str) -> str:
        return self.prefix + key

    def get(self, key: str) -> Any:
        return self.body.get(key)

    def _typed(self, key: str, ok: Callable[[Any], bool], kind: str) -> Any:
        value = self.body.get(key)
        if value is not None and not ok(value):
            raise RequestError(f"{self.name(key)}: Input should be a valid {kind}", self.name(key))
        return value

    def integer(self, key: str, minimum: int | None = None, maximum: int | None = None) -> int | None:
        value: int | None = self._typed(key, _is_int, "integer")
        if value is not None and minimum is not None and value < minimum:
            raise RequestError(f"{self.name(key)} must be at least {minimum}, got {value}.", self.name(key))
        if value is not None and maximum is not None and value > maximum:
            raise RequestError(f"{self.name(key)} must be at most {maximum}, got {value}.", self.name(key))
        return value

    def number(self, key: str, low: float | None = None, high: float | None = None) -> float | None:
        value = self._typed(key, _is_number, "number")
        if value is None:
            return None
        out = float(value)
        if out != out or (low is not None and out < low) or (high is not None and out > high):
            raise RequestError(f"{self.name(key)} must be in [{low}, {high}], got {value}.", self.name(key))
        return out

    def flag(self, key: str, default: bool) -> bool:
        value = self._typed(key, lambda v: isinstance(v, bool), "boolean")
        return default if value is None else bool(value)

    def string(self, key: str) -> str | None:
        value = self._typed(key, lambda v: isinstance(v, str), "string")
        return None if value is None else _text(value, self.name(key))

    def mapping(self, key: str) -> dict[str, Any] | None:
        value: dict[str, Any] | None = self._typed(key, lambda v: isinstance(v, dict), "dictionary")
        return value

    def refuse_unless(self, key: str, neutral: Callable[[Any], bool], why: str) -> None:
        value = self.body.get(key)
        if value is not None and not neutral(value):
            raise RequestError(f"{self.name(key)} is not supported by the gateway: {why}", self.name(key))


# Fields refused unless neutral: (name, is neutral, why). The same names across routes
# (vLLM's top level or SamplingParams, SGLang's sampling_params).
def _zero(v: Any) -> bool:
    return _is_number(v) and v == 0


def _one(v: Any) -> bool:
    return _is_number(v) and v == 1


def _false(v: Any) -> bool:
    return v is False


def _empty(v: Any) -> bool:
    return v in ({}, [], "")


_LAW = "it would change the distribution tokens are drawn from, which q* defines"
_REFUSED: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("presence_penalty", _zero, _LAW),
    ("frequency_penalty", _zero, _LAW),
    ("repetition_penalty", _one, _LAW),
    ("length_penalty", _one, "beam search is not supported"),
    ("best_of", _one, "only one sample per choice is drawn"),
    ("use_beam_search", _false, "beam search is not supported"),
    ("logit_bias", _empty, _LAW),
    ("allowed_token_ids", _empty, _LAW),
    ("bad_words", _empty, _LAW),
    ("guided_json", _empty, "guided decoding is not supported"),
    ("guided_regex", _empty, "guided decoding is not supported"),
    ("guided_choice", _empty, "guided decoding is not supported"),
    ("guided_grammar", _empty, "guided decoding is not supported"),
    ("structured_outputs", _empty, "guided decoding is not supported"),
    ("regex", _empty, "guided decoding is not supported"),
    ("json_schema", _empty, "guided decoding is not supported"),
    ("ebnf", _empty, "guided decoding is not supported"),
    ("structural_tag", _empty, "guided decoding is not supported"),
    ("prompt_logprobs", lambda v: False, "prompt log probabilities are not served"),
    ("logprob_token_ids", lambda v: False, "scoring given ids is not served"),
    ("trace_decode_token_ids", lambda v: False, "replaying a continuation is not served"),
    ("truncate_prompt_tokens", lambda v: False, "prompts are not truncated"),
    ("prompt_embeds", lambda v: False, "prompt embeddings are not supported"),
    ("flat_logprobs", _false, "log probabilities come in the engine's default layout"),
    ("return_routed_experts", _false, "routed experts are not reported"),
    ("suffix", _empty, "suffixes are not supported"),
)
_MEDIA = ("image_data", "video_data", "audio_data", "features", "multi_modal_data", "lora_path", "input_embeds")


def _refuse(fields: _Fields, extra: tuple[str, ...] = ()) -> None:
    for name, neutral, why in _REFUSED:
        fields.refuse_unless(name, neutral, why)
    for name in (*_MEDIA, *extra):
        fields.refuse_unless(name, _empty, "only text and token prompts are supported")
    fmt = fields.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise RequestError("response_format is not supported by the gateway: guided decoding", "response_format")


def _ids(value: Any, param: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not value or not all(_is_int(t) for t in value):
        raise RequestError(f"{param} must be a non-empty list of integers", param)
    if any(t < 0 for t in value):
        raise RequestError(f"{param} must not contain negative token ids", param)
    return tuple(value)


def _prompt_items(value: Any, param: str, limits: Limits) -> tuple[Prompt, ...]:
    """A prompt as text, ids, or a list of either (a batch)."""
    if value is None or value == "" or value == []:
        raise RequestError(f"{param} must be provided and non-empty.", param)
    if isinstance(value, str):
        items: list[Any] = [value]
    elif isinstance(value, list) and all(_is_int(t) for t in value):
        items = [value]
    elif isinstance(value, list):
        items = value
    else:
        raise RequestError(f"{param} must be a string, a list of strings, or token ids", param)
    if len(items) > limits.max_prompts:
        raise RequestError(f"At most {limits.max_prompts} prompts are allowed per request, got {len(items)}.", param)
    out = []
    for item in items:
        if isinstance(item, str):
            if not item:
                raise RequestError(f"{param} must be provided and non-empty.", param)
            out.append(Prompt(text=_text(item, param)))
        elif isinstance(item, list):
            out.append(Prompt(token_ids=_ids(item, param)))
        else:
            raise RequestError(f"{param} must be a string, a list of strings, or token ids", param)
    return tuple(out)


def _messages(value: Any, param: str) -> tuple[Mapping[str, Any], ...]:
    """Chat messages, each content a string (text parts joined as vLLM joins them)."""
    if not isinstance(value, list) or not value:
        raise RequestError(f"{param} must be a non-empty list of messages", param)
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RequestError(f"{param}[{i}] must be an object with a string role", param)
        content = m.get("content")
        if isinstance(content, list):
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise RequestError(f"{param}[{i}].content: only text parts are supported", param)
                texts.append(part["text"])
            content = "\n".join(texts)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise RequestError(f"{param}[{i}].content must be a string or a list of text parts", param)
        out.append({**m, "content": _text(content, param)})
    return tuple(out)


def _stop(fields: _Fields) -> tuple[str, ...]:
    stop = fields.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    name = fields.name("stop")
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise RequestError(f"{name} must be a string or a list of strings", name)
    if any(s == "" for s in stop):
        raise RequestError(f"{name} cannot contain an empty string.", name)
    return tuple(_text(s, name) for s in stop)


def _stop_ids(fields: _Fields) -> tuple[int, ...]:
    value = fields.get("stop_token_ids")
    if value is None:
        return ()
    name = fields.name("stop_token_ids")
    if not isinstance(value, list) or not all(_is_int(t) and t >= 0 for t in value):
        raise RequestError(f"{name} must be a list of non-negative integers", name)
    return tuple(value)


def _logprob_count(fields: _Fields, key: str, limits: Limits) -> int | None:
    if isinstance(fields.get(key), bool):  # as pydantic reads it for vLLM: true is 1 (rLLM sends it)
        return int(fields.get(key))
    value = fields.integer(key)
    if value is None:
        return None
    name = fields.name(key)
    if value < 0:
        raise RequestError(f"`{name}` must be a non-negative value.", name)
    if value > limits.max_logprobs:
        raise RequestError(
            f"Requested sample logprobs of {value}, which is greater than max allowed: {limits.max_logprobs} "
            f"(parameter={name}, value={value})",
            name,
        )
    return value


def _top_k(fields: _Fields) -> int | None:
    value = fields.integer("top_k")
    if value is None or value in (-1, 0):
        return None
    if value < -1:
        raise RequestError(f"{fields.name('top_k')} must be -1 (disable), or at least 1, got {value}.",
                           fields.name("top_k"))  # fmt: skip
    return value


def _seed(fields: _Fields, key: str = "seed") -> int | None:
    return fields.integer(key, INT64[0], INT64[1])


def _common(fields: _Fields, limits: Limits, temperature_max: float | None) -> dict[str, Any]:
    """The sampling fields every route shares, by their vLLM names."""
    n = fields.integer("n", 1, limits.max_n)
    return {
        "n": 1 if n is None else n,
        "temperature": fields.number("temperature", 0.0, temperature_max),
        "top_p": _top_p(fields),
        "top_k": _top_k(fields),
        "min_p": fields.number("min_p", 0.0, 1.0),
        "stop": _stop(fields),
        "stop_token_ids": _stop_ids(fields),
        "ignore_eos": fields.flag("ignore_eos", False),
        "skip_special_tokens": fields.flag("skip_special_tokens", True),
        "include_stop_str_in_output": fields.flag("include_stop_str_in_output", False),
        "min_tokens": fields.integer("min_tokens", 0) or 0,
        "stream_interval": fields.integer("stream_interval", 1),
    }


def _top_p(fields: _Fields) -> float | None:
    value = fields.number("top_p", 0.0, 1.0)
    if value is not None and value <= 0.0:
        raise RequestError(f"{fields.name('top_p')} must be in (0, 1], got {value}.", fields.name("top_p"))
    return value


def _teachers(fields: _Fields) -> tuple[str | None, Mapping[str, float] | None]:
    teacher = fields.string("teacher")
    mix = fields.get("teachers")
    if mix is None:
        return teacher, None
    if teacher is not None:
        raise RequestError("give teacher or teachers, not both", "teachers")
    if (
        not isinstance(mix, dict)
        or not mix
        or not all(_is_number(w) and w >= 0 and w == w and w != float("inf") for w in mix.values())
        or not sum(mix.values()) > 0
    ):
        raise RequestError("teachers must map teacher names to weights >= 0 with a positive sum", "teachers")
    return None, {str(k): float(v) for k, v in mix.items()}


def _request_id(fields: _Fields) -> str | int | None:
    """The extension id, as sent: a string or an integer (each keys the draws as that
    id in an input line does, so 5 and "5" differ)."""
    value = fields.get("id")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise RequestError("id must be a string or an integer", "id")
    return value if isinstance(value, int) else _text(value, "id")


def _teacher_prompts(body: Mapping[str, Any], prompts: tuple[Prompt, ...], limits: Limits) -> tuple[Prompt, ...] | None:
    value = body.get("teacher_prompt")
    if value is None:
        return None
    items = _prompt_items(value, "teacher_prompt", limits)
    if len(items) != len(prompts):
        raise RequestError(f"teacher_prompt: {len(items)} prompts for {len(prompts)} prompts", "teacher_prompt")
    return items


def _object(body: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(body, dict):
        raise RequestError(f"the body of {what} must be a JSON object")
    return body


def _stream_options(fields: _Fields, stream: bool) -> bool:
    opts = fields.mapping("stream_options")
    if opts is None:
        return False
    if not stream:
        raise RequestError("Stream options can only be defined when `stream=True`.", "stream_options")
    include = opts.get("include_usage", False)
    if not isinstance(include, bool):
        raise RequestError("stream_options.include_usage must be a boolean", "stream_options")
    return include


def parse_completions(body: Any, limits: Limits = Limits()) -> SampleRequest:
    """``POST /v1/completions``."""
    fields = _Fields(_object(body, "/v1/completions"))
    _refuse(fields)
    prompts = _prompt_items(fields.get("prompt"), "prompt", limits)
    common = _common(fields, limits, 2.0)
    logprobs = _logprob_count(fields, "logprobs", limits)
    echo = fields.flag("echo", False)
    if echo and logprobs is not None:
        raise RequestError("echo with logprobs (prompt log probabilities) is not supported by the gateway", "echo")
    stream = fields.flag("stream", False)
    teacher, teachers = _teachers(fields)
    max_tokens = fields.integer("max_tokens", 1)
    return SampleRequest(
        route="completions",
        prompts=prompts,
        max_tokens=16 if max_tokens is None else max_tokens,
        seed=_seed(fields),
        logprobs=logprobs,
        echo=echo,
        return_token_ids=fields.flag("return_token_ids", False),
        tokens_as_ids=fields.flag("return_tokens_as_token_ids", False),
        stream=stream,
        include_usage=_stream_options(fields, stream),
        model=fields.string("model"),
        teacher_prompts=_teacher_prompts(fields.body, prompts, limits),
        teacher=teacher,
        teachers=teachers,
        id=_request_id(fields),
        extra=_extra(fields),
        **common,
    )


def parse_chat(body: Any, limits: Limits = Limits()) -> SampleRequest:
    """``POST /v1/chat/completions``."""
    fields = _Fields(_object(body, "/v1/chat/completions"))
    _refuse(fields)
    messages = _messages(fields.get("messages"), "messages")
    teacher_messages = fields.get("teacher_messages")
    teacher_prompts = None
    if teacher_messages is not None:
        teacher_prompts = (Prompt(messages=_messages(teacher_messages, "teacher_messages")),)
    common = _common(fields, limits, 2.0)
    want = fields.flag("logprobs", False)
    top = _logprob_count(fields, "top_logprobs", limits)
    if top is not None and top > 0 and not want:
        raise RequestError("when using `top_logprobs`, `logprobs` must be set to true.", "top_logprobs")
    stream = fields.flag("stream", False)
    max_tokens = fields.integer("max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = fields.integer("max_tokens", 1)
    tools = fields.get("tools")
    if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
        raise RequestError("tools must be a list of objects", "tools")
    kwargs = fields.mapping("chat_template_kwargs")
    teacher, teachers = _teachers(fields)
    return SampleRequest(
        route="chat",
        prompts=(Prompt(messages=messages),),
        max_tokens=max_tokens,
        seed=_seed(fields),
        logprobs=(top or 0) if want else None,
        return_token_ids=fields.flag("return_token_ids", False),
        tokens_as_ids=fields.flag("return_tokens_as_token_ids", False),
        stream=stream,
        include_usage=_stream_options(fields, stream),
        model=fields.string("model"),
        add_generation_prompt=fields.flag("add_generation_prompt", True),
        continue_final_message=fields.flag("continue_final_message", False),
        tools=tuple(tools) if tools else None,
        chat_template_kwargs=kwargs,
        teacher_prompts=teacher_prompts,
        teacher=teacher,
        teachers=teachers,
        id=_request_id(fields),
        extra=_extra(fields),
        **common,
    )


def parse_vllm_generate(body: Any, limits: Limits = Limits()) -> SampleRequest:
    """vLLM's tokens-in/out ``POST /inference/v1/generate``: ``token_ids`` and the
    engine's ``sampling_params``; one prompt, ``n`` samples."""
    top = _Fields(_object(body, "/inference/v1/generate"))
    _refuse(top)
    ids = _ids(top.get("token_ids"), "token_ids")
    if top.flag("stream", False):
        raise RequestError("stream is not supported on /inference/v1/generate by the gateway", "stream")
    mode = top.string("output_mode")
    if mode not in (None, "tokens"):
        raise RequestError("output_mode: only 'tokens' is supported by the gateway", "output_mode")
    params = top.mapping("sampling_params") or {}
    fields = _Fields(params, "sampling_params.")
    _refuse(fields)
    common = _common(fields, limits, 2.0)
    max_tokens = fields.integer("max_tokens", 1)
    prompts = (Prompt(token_ids=ids),)
    teacher, teachers = _teachers(top)
    return SampleRequest(
        route="vllm_generate",
        prompts=prompts,
        max_tokens=16 if max_tokens is None else max_tokens,
        seed=_seed(fields),
        logprobs=_logprob_count(fields, "logprobs", limits),
        return_token_ids=top.flag("return_token_ids", False),
        tokens_as_ids=True,
        model=top.string("model"),
        teacher_prompts=_teacher_prompts(top.body, prompts, limits),
        teacher=teacher,
        teachers=teachers,
        id=_request_id(top),
        rids=None if top.get("request_id") is None else (str(top.get("request_id")),),
        extra=_extra(top),
        **common,
    )


def parse_sglang(body: Any, limits: Limits = Limits()) -> SampleRequest:
    """SGLang's native ``POST /generate``: ``input_ids`` or ``text`` (one, or a batch),
    ``sampling_params``, ``return_logprob``, ``top_logprobs_num``."""
    top = _Fields(_object(body, "/generate"))
    _refuse(top, extra=("token_ids_logprob",))
    ids, text = top.get("input_ids"), top.get("text")
    if ids is None and text is None:
        raise RequestError("Either text or input_ids should be provided.", "input_ids")
    if ids is not None and text is not None:
        raise RequestError("Either text or input_ids should be provided, not both.", "input_ids")
    param = "input_ids" if ids is not None else "text"
    value = ids if ids is not None else text
    single = isinstance(value, str) or (isinstance(value, list) and bool(value) and all(_is_int(t) for t in value))
    if ids is not None and not isinstance(ids, list):
        raise RequestError("input_ids must be a list of integers or a list of such lists", "input_ids")
    if text is not None and not (
        isinstance(text, str) or (isinstance(text, list) and all(isinstance(t, str) for t in text))
    ):
        raise RequestError("text must be a string or a list of strings", "text")
    prompts = _prompt_items(value, param, limits)
    params = top.get("sampling_params")
    if isinstance(params, list):
        if len(params) != len(prompts) or any(p != params[0] for p in params):
            raise RequestError("sampling_params: one object for the whole batch is supported", "sampling_params")
        params = params[0] if params else None
    if params is not None and not isinstance(params, dict):
        raise RequestError("sampling_params must be an object", "sampling_params")
    fields = _Fields(params or {}, "sampling_params.")
    _refuse(fields)
    common = _common(fields, limits, None)
    if common["min_tokens"] == 0:
        common["min_tokens"] = fields.integer("min_new_tokens", 0) or 0
    want = top.flag("return_logprob", False)
    start = top.get("logprob_start_len")
    if start is not None and start != -1:
        raise RequestError("logprob_start_len: input log probabilities are not served by the gateway",
                           "logprob_start_len")  # fmt: skip
    top_n = _logprob_count(top, "top_logprobs_num", limits)
    stream = top.flag("stream", False)
    rid = top.get("rid")
    rids = None
    if rid is not None:
        rid_list = rid if isinstance(rid, list) else [rid]
        if len(rid_list) != len(prompts) or not all(isinstance(r, (str, int)) for r in rid_list):
            raise RequestError(f"rid: one id per prompt ({len(prompts)})", "rid")
        rids = tuple(str(r) for r in rid_list)
    max_new = fields.integer("max_new_tokens", 1)
    teacher, teachers = _teachers(top)
    return SampleRequest(
        route="sglang_generate",
        prompts=prompts,
        max_tokens=128 if max_new is None else max_new,
        seed=_seed(fields, "sampling_seed"),
        logprobs=(top_n or 0) if want else None,
        tokens_as_ids=True,
        stream=stream,
        teacher_prompts=_teacher_prompts(top.body, prompts, limits),
        teacher=teacher,
        teachers=teachers,
        id=_request_id(top),
        single=single,
        rids=rids,
        return_text_in_logprobs=top.flag("return_text_in_logprobs", False),
        extra=_extra(top),
        **common,
    )


# Fields handed on to the sampler as sent (the base may want them: cache salts, priorities).
_EXTRA = ("cache_salt", "priority", "user", "add_special_tokens", "lora_name")


def _extra(fields: _Fields) -> dict[str, Any]:
    return {k: fields.body[k] for k in _EXTRA if fields.body.get(k) is not None}


PARSERS: dict[Route, Callable[[Any, Limits], SampleRequest]] = {
    "completions": parse_completions,
    "chat": parse_chat,
    "vllm_generate": parse_vllm_generate,
    "sglang_generate": parse_sglang,
}


def parse_body(route: Route, raw: bytes, limits: Limits = Limits()) -> SampleRequest:
    """A route's raw body read into a :class:`SampleRequest`, or a :class:`RequestError`."""
    return PARSERS[route](parse_json(raw), limits)
