"""The OpenAI API as agents, benchmarks and evaluation harnesses send it, through the unchanged
`openai` SDK: parallel samples, penalties and logit_bias against a reference on the served
log-probabilities, echo with the prompt's log-probabilities against transformers, cached
tokens, and tool calls."""
import json
import math
import os
import time
import urllib.request

import pytest
from openai import OpenAI
from takeoff_client import TakeoffClient

from conftest import FIXTURES

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REFERENCE = os.path.join(ROOT, "tests", "fixtures", "reference")
# Long enough to fill several KV blocks (16 tokens each).
STORY = ("Once upon a time, in a small village by the sea, there lived an old fisherman who "
         "went out every morning before the sun rose and came back every evening with his boat "
         "full of fish. One day he caught")


def client(server):
    return OpenAI(base_url=f"http://127.0.0.1:{server[0]}/v1", api_key="unused", max_retries=0)


def metric(server, name):
    """The sum of a counter over its labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server[0]}/metrics", timeout=10) as r:
        text = r.read().decode()
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith(name + "{") or line.startswith(name + " ")]
    assert values, f"{name} not exported"
    return sum(values)


def token_id(s):
    assert s.startswith("token_id:"), s
    return int(s.split(":", 1)[1])


def test_n_samples_share_one_prompt_prefill(server):
    c = client(server)
    before = metric(server, "liftoff_prefix_cache_hit_blocks_total")
    out = c.completions.create(model="primary", prompt=STORY, max_tokens=12, n=3, seed=11, temperature=1.0)
    hits = metric(server, "liftoff_prefix_cache_hit_blocks_total") - before
    prompt = out.usage.prompt_tokens
    assert sorted(ch.index for ch in out.choices) == [0, 1, 2]
    texts = [ch.text for ch in out.choices]
    assert len(set(texts)) >= 2, texts
    assert 3 <= out.usage.completion_tokens <= 36
    # Samples 1 and 2 found every full block of sample 0's prompt in the cache.
    assert hits >= 2 * (prompt // 16), (hits, prompt)
    # Seeded: the same request gives the same samples; sample i is the single request seeded
    # seed + i.
    again = c.completions.create(model="primary", prompt=STORY, max_tokens=12, n=3, seed=11, temperature=1.0)
    assert [ch.text for ch in again.choices] == texts
    second = c.completions.create(model="primary", prompt=STORY, max_tokens=12, seed=12, temperature=1.0)
    assert second.choices[0].text == texts[1]
    # Streamed, the chunks of both samples arrive tagged with their index.
    parts = {0: "", 1: ""}
    for chunk in c.chat.completions.create(
            model="primary", messages=[{"role": "user", "content": "Name a fruit."}], n=2, seed=5,
            max_tokens=8, stream=True):
        for ch in chunk.choices:
            parts[ch.index] += ch.delta.content or ""
    whole = c.chat.completions.create(model="primary", messages=[{"role": "user", "content": "Name a fruit."}],
                                      n=2, seed=5, max_tokens=8)
    assert [parts[0], parts[1]] == [ch.message.content for ch in whole.choices]
    with pytest.raises(Exception) as e:
        c.completions.create(model="primary", prompt="x", n=0, max_tokens=2)
    assert "n must be" in str(e.value)


def penalised_choice(top, generated, frequency, presence):
    """OpenAI's penalties on the served raw log-probabilities (ids -> logprob): the token
    greedy decoding must choose, or None when a token outside the list could win."""
    counts = {}
    for t in generated:
        counts[t] = counts.get(t, 0) + 1
    adjusted = {t: lp - frequency * counts.get(t, 0) - (presence if counts.get(t, 0) else 0.0)
                for t, lp in top.items()}
    best = max(adjusted, key=lambda t: (adjusted[t], -t))
    ordered = sorted(adjusted.values(), reverse=True)
    assert all(math.isfinite(v) for v in ordered + list(top.values()))
    # A token outside the raw top 20 (the list may also hold the chosen token, lower) has a
    # raw log-probability at most the 20th, and penalties only lower it: the choice is certain
    # when the best beats that bound (a clear margin also rules out ties decided by rounding).
    bound = sorted(top.values(), reverse=True)[min(19, len(top) - 1)]
    if ordered[0] > bound + 1e-3 and (len(ordered) < 2 or ordered[0] - ordered[1] > 1e-3):
        return best
    return None


@pytest.mark.parametrize("frequency,presence", [(1.2, 0.0), (0.0, 1.5), (0.7, 0.6), (-0.5, 0.0)])
def test_frequency_and_presence_penalties_follow_openai(server, frequency, presence):
    c = client(server)
    out = c.completions.create(
        model="primary", prompt="The cat sat on the mat. The cat sat on the mat. The cat", max_tokens=24, temperature=0, logprobs=20,
        frequency_penalty=frequency, presence_penalty=presence, extra_body={"return_tokens_as_token_ids": True})
    lp = out.choices[0].logprobs
    generated, checked, changed = [], 0, 0
    for tok, top in zip(lp.tokens, lp.top_logprobs):
        chosen = token_id(tok)
        top = {token_id(k): v for k, v in top.items()}
        want = penalised_choice(top, generated, frequency, presence)
        if want is not None:
            assert chosen == want, (generated, top)
            checked += 1
            changed += want != max(top, key=top.get)
        generated.append(chosen)
    assert checked >= 12, checked
    if frequency > 0 or presence > 0:
        # The penalties changed the greedy choice somewhere (else this test proves nothing).
        assert changed >= 1


def test_logit_bias_forces_and_forbids(server):
    c = client(server)
    plain = c.completions.create(model="primary", prompt="The capital of France is", max_tokens=4,
                                 temperature=0, logprobs=1, extra_body={"return_tokens_as_token_ids": True})
    first = token_id(plain.choices[0].logprobs.tokens[0])
    forced = c.completions.create(model="primary", prompt="The capital of France is", max_tokens=4, temperature=0,
                                  logit_bias={"11": 100}, logprobs=0, extra_body={"return_tokens_as_token_ids": True})
    assert [token_id(t) for t in forced.choices[0].logprobs.tokens] == [11] * 4
    banned = c.completions.create(model="primary", prompt="The capital of France is", max_tokens=4, temperature=0,
                                  logit_bias={str(first): -100}, logprobs=0,
                                  extra_body={"return_tokens_as_token_ids": True})
    assert first not in [token_id(t) for t in banned.choices[0].logprobs.tokens]
    with pytest.raises(Exception) as e:
        c.completions.create(model="primary", prompt="x", max_tokens=2, logit_bias={"99999999": 1})
    assert "logit_bias" in str(e.value)


def wait_ready(tc, group, reader_id):
    deadline = time.time() + 60
    while True:
        mine = [r for r in tc.get_readers().get(group, []) if r["reader_id"] == reader_id]
        if mine and mine[0]["ready"]:
            return
        assert time.time() < deadline, mine
        time.sleep(0.1)


def test_echo_prompt_logprobs_match_transformers(server):
    """`echo` + `logprobs` + `max_tokens: 0`, as lm-evaluation-harness scores text, on an f32
    checkpoint against transformers' logits for the same tokens."""
    port, mport = server
    tc = TakeoffClient(base_url="http://127.0.0.1", port=port, mgmt_port=mport)
    created = tc.create_reader({"model_name": os.path.join(FIXTURES, "tiny-llama2-f32"), "device": "cpu",
                                "consumer_group": "tiny-f32", "max_batch_size": 4, "max_sequence_length": 128})
    wait_ready(tc, "tiny-f32", created["reader_id"])
    c = client(server)
    with open(os.path.join(REFERENCE, "tiny-llama2-f32.json")) as f:
        cases = json.load(f)["cases"]
    compared = 0
    vocab = 474  # the tokenizer's; the random model also writes ids past it (up to 512)
    for case in cases:
        full = case["prompt_ids"] + case["greedy_ids"]
        full = full[:next((i for i, t in enumerate(full) if t >= vocab), len(full))]
        if len(full) < 2:
            continue
        out = c.completions.create(model="tiny-f32", prompt=full, echo=True, logprobs=5, max_tokens=0,
                                   extra_body={"return_tokens_as_token_ids": True})
        ch = out.choices[0]
        assert out.usage.completion_tokens == 0 and ch.finish_reason == "length"
        lp = ch.logprobs
        assert [token_id(t) for t in lp.tokens] == full
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        for i in range(1, len(full)):
            ref = dict((t, logit) for t, logit in case["topk"][i - 1])
            top = {token_id(k): v for k, v in lp.top_logprobs[i].items()}
            assert all(math.isfinite(v) and v <= 0 for v in top.values())
            assert top[full[i]] == lp.token_logprobs[i]
            best = case["topk"][i - 1][0][0]
            # Differences of log-probabilities are differences of logits; f32 on both sides
            # agrees within 5e-4 per logit (engine/tests/reference_checkpoints.rs).
            if full[i] in ref and best in top:
                got = lp.token_logprobs[i] - top[best]
                want = ref[full[i]] - ref[best]
                assert abs(got - want) < 1e-3, (i, got, want)
                compared += 1
        # Streamed: the prompt and its log-probabilities come in the first chunk.
        chunks = list(c.completions.create(model="tiny-f32", prompt=full, echo=True, logprobs=5, max_tokens=0,
                                           stream=True, extra_body={"return_tokens_as_token_ids": True}))
        assert chunks[0].choices[0].logprobs.token_logprobs == lp.token_logprobs
        # Streamed with generated tokens: the prompt once, then the tokens.
        whole = c.completions.create(model="tiny-f32", prompt=full, echo=True, max_tokens=3, temperature=0,
                                     logprobs=1, extra_body={"return_tokens_as_token_ids": True})
        parts = list(c.completions.create(model="tiny-f32", prompt=full, echo=True, max_tokens=3, temperature=0,
                                          logprobs=1, stream=True,
                                          extra_body={"return_tokens_as_token_ids": True}))
        assert "".join(p.choices[0].text for p in parts) == whole.choices[0].text
        assert sum(len(p.choices[0].logprobs.tokens) for p in parts) == len(whole.choices[0].logprobs.tokens)
        # Parallel samples echo the same prompt log-probabilities (computed once).
        two = c.completions.create(model="tiny-f32", prompt=full, echo=True, logprobs=5, max_tokens=1, n=2,
                                   extra_body={"return_tokens_as_token_ids": True})
        for ch in two.choices:
            got = ch.logprobs.token_logprobs[:len(full)]
            assert got[0] is None and all(abs(a - b) < 1e-5 for a, b in zip(got[1:], lp.token_logprobs[1:]))
            assert len(ch.logprobs.tokens) == len(full) + 1
    assert compared >= 20, compared
    tc.delete_reader(created["reader_id"])


def test_cached_tokens_on_a_repeated_prompt(server):
    c = client(server)
    messages = [{"role": "user", "content": STORY}]
    c.chat.completions.create(model="primary", messages=messages, max_tokens=2, temperature=0)
    again = c.chat.completions.create(model="primary", messages=messages, max_tokens=2, temperature=0)
    details = again.usage.prompt_tokens_details
    assert details.cached_tokens >= 16 * (again.usage.prompt_tokens // 16 - 1), again.usage


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                   "properties": {"city": {"type": "string", "maxLength": 30},
                                  "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The local time in a timezone.",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["timezone"],
                   "properties": {"timezone": {"type": "string", "maxLength": 40}}}}}


def check_weather_args(arguments):
    args = json.loads(arguments)
    assert set(args) == {"city", "unit"} and isinstance(args["city"], str) and len(args["city"]) <= 30
    assert args["unit"] in ("celsius", "fahrenheit")


def test_tool_calls_required_named_auto_and_results(server):
    c = client(server)
    ask = [{"role": "user", "content": "What is the weather like in Paris?"}]
    out = c.chat.completions.create(model="primary", messages=ask, tools=[WEATHER, TIME], tool_choice="required",
                                    max_tokens=80, temperature=0)
    ch = out.choices[0]
    assert ch.finish_reason == "tool_calls" and ch.message.content is None
    call = ch.message.tool_calls[0]
    assert call.type == "function" and call.id and call.function.name in ("get_weather", "get_time")
    if call.function.name == "get_weather":
        check_weather_args(call.function.arguments)
    named = c.chat.completions.create(
        model="primary", messages=ask, tools=[WEATHER, TIME], max_tokens=80, temperature=0.8, seed=3,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = named.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    check_weather_args(call.function.arguments)
    # Streamed: one tool_calls delta the SDK reads as such.
    chunks = list(c.chat.completions.create(
        model="primary", messages=ask, tools=[WEATHER], max_tokens=80, temperature=0, stream=True,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}))
    deltas = [d for ch in chunks for d in (ch.choices[0].delta.tool_calls or []) if ch.choices]
    assert len(deltas) == 1 and deltas[0].function.name == "get_weather"
    check_weather_args(deltas[0].function.arguments)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # auto: a call when the model writes one, text otherwise, never both.
    auto = c.chat.completions.create(model="primary", messages=ask, tools=[WEATHER], max_tokens=60, temperature=0)
    msg = auto.choices[0].message
    if msg.tool_calls:
        assert auto.choices[0].finish_reason == "tool_calls" and msg.content is None
        json.loads(msg.tool_calls[0].function.arguments)
    else:
        assert msg.content and auto.choices[0].finish_reason in ("stop", "length")
    # auto with a strict function: text, or a call whose arguments validate (enforced by the
    # grammar, whichever the model picks; steered towards a call by the bias on "{").
    strict = json.loads(json.dumps(WEATHER))
    strict["function"]["strict"] = True
    for bias in ({}, {"107": 8}):
        out = c.chat.completions.create(model="primary", messages=ask, tools=[strict], max_tokens=80,
                                        temperature=0, logit_bias=bias)
        msg = out.choices[0].message
        if msg.tool_calls:
            check_weather_args(msg.tool_calls[0].function.arguments)
        else:
            assert not msg.content.lstrip().startswith("{"), msg.content
    # The call and its result fed back: the model answers in text.
    turn = ask + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": "get_weather", "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21, "sky": "sunny"})}]
    answer = c.chat.completions.create(model="primary", messages=turn, tools=[WEATHER], tool_choice="none",
                                       max_tokens=30, temperature=0)
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls
    with pytest.raises(Exception) as e:
        c.chat.completions.create(model="primary", messages=ask, tools=[WEATHER], max_tokens=8,
                                  tool_choice={"type": "function", "function": {"name": "nope"}})
    assert "tool_choice" in str(e.value)
