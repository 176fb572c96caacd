"""The official `openai` SDK and Titan's `takeoff-client` against a real `liftoff serve`.

Run by scripts/test.sh with LIFTOFF_BIN pointing at the built binary.
"""
import json
import os
import re
import time

import pytest

from huggingface_hub import InferenceClient
from huggingface_hub.errors import ValidationError
from openai import OpenAI
from takeoff_client import TakeoffClient
from takeoff_client.exceptions import TakeoffException

from conftest import FIXTURES


def test_openai_completion_and_models(server):
    port, _ = server
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
    out = client.completions.create(model="primary", prompt="The capital of France is", max_tokens=8, temperature=0)
    assert out.choices[0].text.startswith(" Paris")
    assert out.usage.completion_tokens == 8
    # best_of as the SDK sends it: two samples, the likelier one returned, both billed.
    best = client.completions.create(model="primary", prompt="Once upon a time", max_tokens=6,
                                     best_of=2, seed=3, logprobs=0, extra_body={"ignore_eos": True})
    assert len(best.choices) == 1 and best.usage.completion_tokens == 12
    both = client.completions.create(model="primary", prompt="Once upon a time", max_tokens=6,
                                     n=2, seed=3, logprobs=0, extra_body={"ignore_eos": True})
    mean = lambda c: sum(c.logprobs.token_logprobs) / len(c.logprobs.token_logprobs)
    assert best.choices[0].text == max(both.choices, key=mean).text
    assert [m.id for m in client.models.list().data] == ["SmolLM2-135M-Instruct"]


def test_openai_chat_stream_with_usage(server):
    port, _ = server
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
    stream = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "Name a colour."}],
        max_tokens=16, temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    assert chunks[-1].usage.completion_tokens >= 1
    full = client.chat.completions.create(
        model="primary", messages=[{"role": "user", "content": "Name a colour."}], max_tokens=16, temperature=0)
    assert full.choices[0].message.content == text


def test_openai_content_parts_and_logprobs(server):
    port, _ = server
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
    ask = dict(model="primary", max_tokens=8, temperature=0, logprobs=True, top_logprobs=2)
    plain = client.chat.completions.create(messages=[{"role": "user", "content": "Name a colour."}], **ask)
    parts = client.chat.completions.create(
        messages=[{"role": "user", "content": [{"type": "text", "text": "Name a "},
                                               {"type": "text", "text": "colour."}]}], **ask)
    assert parts.choices[0].message.content == plain.choices[0].message.content
    content = parts.choices[0].logprobs.content
    assert len(content) == parts.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)
    # Greedy: each chosen token is the most likely one.
    assert all(t.top_logprobs[0].token == t.token for t in content)


def test_openai_error_is_raised_cleanly(server):
    port, _ = server
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    with pytest.raises(Exception) as e:
        client.completions.create(model="primary", prompt="x", max_tokens=8, top_p=3)
    assert "top_p" in str(e.value)


def test_takeoff_client_generate_and_stream(server):
    port, mport = server
    client = TakeoffClient(base_url="http://127.0.0.1", port=port, mgmt_port=mport)
    one = client.generate("The capital of France is", sampling_temperature=0, max_new_tokens=8)
    assert one["text"].startswith(" Paris")
    many = client.generate(["The capital of France is", "1, 2, 3,"], sampling_temperature=0, max_new_tokens=8)
    assert many["text"][0] == one["text"] and len(many["text"]) == 2
    streamed = "".join(ev.data for ev in client.generate_stream(
        "The capital of France is", sampling_temperature=0, max_new_tokens=8))
    assert streamed == one["text"]


def test_takeoff_client_tokenizer_routes(server):
    port, mport = server
    client = TakeoffClient(base_url="http://127.0.0.1", port=port, mgmt_port=mport)
    readers = client.get_readers()
    reader_id = readers["primary"][0]["reader_id"]
    assert client.tokens_count("Hello world", reader_id) == 2
    rendered = client.chat_template([{"role": "user", "content": "Hi"}], reader_id, add_generation_prompt=True)
    assert rendered[0].endswith("<|im_start|>assistant\n")


def test_takeoff_client_manages_readers(server):
    """Takeoff's management calls, unchanged client: add a reader, wait for it, generate
    through its consumer group, read its config and the status, delete it."""
    port, mport = server
    client = TakeoffClient(base_url="http://127.0.0.1", port=port, mgmt_port=mport)
    created = client.create_reader({
        "model_name": os.path.join(FIXTURES, "tiny-llama3-bf16"), "device": "cpu",
        "consumer_group": "tiny", "max_batch_size": 4, "max_sequence_length": 128})
    reader_id = created["reader_id"]
    deadline = time.time() + 60
    while True:
        mine = [r for r in client.get_readers().get("tiny", []) if r["reader_id"] == reader_id]
        if mine and mine[0]["ready"]:
            break
        assert time.time() < deadline, mine
        time.sleep(0.1)
    assert mine[0]["state"] == "ready" and mine[0]["memory_bytes"] > 0
    out = client.generate("The quick brown fox", consumer_group="tiny", sampling_temperature=0, max_new_tokens=4)
    assert out["text"]
    assert client.generate("The capital of France is", sampling_temperature=0, max_new_tokens=8)["text"].startswith(" Paris")
    config = client.get_reader_config(reader_id)
    assert config["consumer_group"] == "tiny" and config["max_batch_size"] == 4
    assert reader_id in client.get_status()["status"]["live_readers"]
    client.delete_reader(reader_id)
    assert "tiny" not in client.list_all_readers()
    with pytest.raises(TakeoffException) as e:
        client.generate("x", consumer_group="tiny")
    assert e.value.status_code == 404
    with pytest.raises(TakeoffException) as e:
        client.create_reader({"model_name": "/etc", "device": "cpu", "consumer_group": "x"})
    assert e.value.status_code == 403


PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 20},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120}}}


def check_person(text):
    v = json.loads(text)
    assert set(v) == {"name", "age"} and isinstance(v["name"], str) and len(v["name"]) <= 20
    assert isinstance(v["age"], int) and 0 <= v["age"] <= 120


def test_huggingface_inference_client(server):
    """TGI's API as huggingface_hub calls it: plain, details, best_of, stream, grammar."""
    port, _ = server
    client = InferenceClient(model=f"http://127.0.0.1:{port}")
    prompt = "The capital of France is"
    text = client.text_generation(prompt, max_new_tokens=8)
    assert text.startswith(" Paris")
    out = client.text_generation(prompt, max_new_tokens=8, details=True)
    assert out.generated_text == text
    assert out.details.finish_reason == "length" and out.details.generated_tokens == 8
    assert len(out.details.tokens) == 8 and all(t.logprob <= 0 for t in out.details.tokens)
    # The prompt's tokens and log-probabilities (TGI's decoder_input_details), equal to what
    # the OpenAI route's echo reports for the same prompt.
    scored = client.text_generation(prompt, max_new_tokens=1, details=True, decoder_input_details=True)
    prefill = scored.details.prefill
    assert prefill[0].logprob is None and all(t.logprob <= 0 for t in prefill[1:])
    echo = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused").completions.create(
        model="primary", prompt=prompt, max_tokens=0, echo=True, logprobs=0).choices[0].logprobs
    assert len(echo.tokens) == len(prefill)
    assert all(abs(a.logprob - b) < 1e-5 for a, b in zip(prefill[1:], echo.token_logprobs[1:]))
    streamed = list(client.text_generation(prompt, max_new_tokens=8, stream=True))
    assert "".join(streamed) == text
    # What LangChain's TGI wrappers send by default (typical_p 0.95 among them), with TGI's
    # frequency penalty: sampled, reproducible with a seed.
    langchain = dict(max_new_tokens=8, top_p=0.95, typical_p=0.95, temperature=0.8,
                     frequency_penalty=0.5, seed=5)
    first = client.text_generation(prompt, **langchain)
    assert first and client.text_generation(prompt, **langchain) == first
    # best_of: two samples, the likelier returned, the other in details.best_of_sequences,
    # parsed by huggingface_hub's own types, with the seeds they drew with.
    best = client.text_generation(prompt, max_new_tokens=8, do_sample=True, best_of=2, details=True)
    (other,) = best.details.best_of_sequences
    mean = lambda tokens: sum(t.logprob for t in tokens) / len(tokens)
    assert mean(best.details.tokens) >= mean(other.tokens)
    assert abs(best.details.seed - other.seed) == 1 and other.generated_text is not None
    # Errors come in TGI's shape, so the client raises its own ValidationError.
    with pytest.raises(ValidationError, match="best_of"):
        client.text_generation(prompt, max_new_tokens=8, do_sample=True, best_of=3)
    last = list(client.text_generation(prompt, max_new_tokens=8, stream=True, details=True))[-1]
    assert last.generated_text == text and last.details.finish_reason == "length"
    person = client.text_generation("Describe a person as JSON.", max_new_tokens=100,
                                    grammar={"type": "json", "value": PERSON})
    check_person(person)
    code = client.text_generation("A hex colour:", max_new_tokens=20,
                                  grammar={"type": "regex", "value": "#[0-9a-f]{6}"})
    assert re.fullmatch("#[0-9a-f]{6}", code), code


def test_openai_response_format(server):
    port, _ = server
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
    out = client.chat.completions.create(
        model="primary", messages=[{"role": "user", "content": "Describe a person as JSON."}],
        max_tokens=100, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}})
    check_person(out.choices[0].message.content)
    anything = client.chat.completions.create(
        model="primary", messages=[{"role": "user", "content": "Give me a JSON object."}],
        max_tokens=200, temperature=0, response_format={"type": "json_object"})
    if anything.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(anything.choices[0].message.content), dict)


def test_takeoff_client_structured(server):
    port, mport = server
    client = TakeoffClient(base_url="http://127.0.0.1", port=port, mgmt_port=mport)
    out = client.generate("Describe a person as JSON.", json_schema=PERSON, max_new_tokens=100,
                          sampling_temperature=0, use_chat_template=True)
    check_person(out["text"])
    out = client.generate("A date:", regex_string=r"\d{4}-\d{2}-\d{2}", max_new_tokens=20)
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", out["text"]), out
