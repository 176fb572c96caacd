//! Structured output end to end: 20 JSON schemas and 10 regexes through Takeoff's, OpenAI's
//! and TGI's APIs of a real server on the default model, 16 requests in flight with half of
//! them unconstrained. Every constrained output must parse and validate (the `jsonschema`
//! crate) or fully match (the `regex` crate).

mod common;

use common::{refused_param, Server};
use futures::stream::{self, StreamExt};
use serde_json::{json, Value};

/// Schemas with bounded sizes (strings, arrays, no extra keys), so any output fits the token
/// budget and a truncated one is a failure, not bad luck.
fn schemas() -> Vec<Value> {
    let name = json!({"type": "string", "maxLength": 20});
    let obj = |props: Value, required: Value| json!({"type": "object", "properties": props, "required": required, "additionalProperties": false});
    vec![
        obj(
            json!({"name": name, "age": {"type": "integer", "minimum": 0, "maximum": 120}}),
            json!(["name", "age"]),
        ),
        obj(
            json!({"person": obj(json!({"name": name, "age": {"type": "integer", "minimum": 0, "maximum": 120}}), json!(["name", "age"])),
                   "city": {"type": "string", "maxLength": 20}}),
            json!(["person", "city"]),
        ),
        obj(
            json!({"colors": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 2, "maxItems": 4}}),
            json!(["colors"]),
        ),
        obj(
            json!({"sentiment": {"enum": ["positive", "negative", "neutral"]}}),
            json!(["sentiment"]),
        ),
        obj(
            json!({"temperature": {"type": "number", "minimum": -50, "maximum": 60}}),
            json!(["temperature"]),
        ),
        obj(json!({"is_open": {"type": "boolean"}}), json!(["is_open"])),
        obj(
            json!({"title": {"type": "string", "maxLength": 30}, "subtitle": {"type": "string", "maxLength": 30}}),
            json!(["title"]),
        ),
        obj(
            json!({"zip": {"type": "string", "pattern": "^[0-9]{5}$"}}),
            json!(["zip"]),
        ),
        obj(
            json!({"date": {"type": "string", "format": "date"}}),
            json!(["date"]),
        ),
        obj(
            json!({"email": {"type": "string", "format": "email", "maxLength": 40}}),
            json!(["email"]),
        ),
        obj(
            json!({"items": {"type": "array", "minItems": 1, "maxItems": 3,
                             "items": obj(json!({"name": {"type": "string", "maxLength": 15}, "qty": {"type": "integer", "minimum": 1, "maximum": 9}}), json!(["name", "qty"]))}}),
            json!(["items"]),
        ),
        json!({"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 100}, "minItems": 3, "maxItems": 5}),
        json!({"type": "string", "enum": ["red", "green", "blue"]}),
        obj(
            json!({"version": {"const": 2}, "ok": {"type": "boolean"}}),
            json!(["version", "ok"]),
        ),
        obj(
            json!({"id": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 1000}, {"type": "string", "maxLength": 8}]}}),
            json!(["id"]),
        ),
        obj(
            json!({"middle_name": {"type": ["string", "null"], "maxLength": 10}}),
            json!(["middle_name"]),
        ),
        json!({"$defs": {"point": obj(json!({"x": {"type": "integer", "minimum": -10, "maximum": 10}, "y": {"type": "integer", "minimum": -10, "maximum": 10}}), json!(["x", "y"]))},
               "type": "object", "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
               "required": ["start", "end"], "additionalProperties": false}),
        obj(
            json!({"price": {"type": "number", "exclusiveMinimum": 0, "maximum": 1000}}),
            json!(["price"]),
        ),
        obj(
            json!({"a": obj(json!({"b": obj(json!({"c": {"type": "integer", "minimum": 0, "maximum": 9}}), json!(["c"]))}), json!(["b"]))}),
            json!(["a"]),
        ),
        json!({"type": "array", "prefixItems": [{"type": "string", "maxLength": 10}, {"type": "integer", "minimum": 0, "maximum": 99}], "items": false}),
    ]
}

const REGEXES: &[&str] = &[
    r"\(\d{3}\) \d{3}-\d{4}",
    r"[A-Z][a-z]{2,10}",
    r"\d{4}-\d{2}-\d{2}",
    r"(yes|no|maybe)",
    r"[0-9]{1,6}(\.[0-9]{1,2})?",
    r"#[0-9a-f]{6}",
    r"[a-z]{3,8}@[a-z]{3,8}\.(com|org)",
    r"(Mon|Tues|Wednes|Thurs|Fri|Satur|Sun)day",
    r"[A-Z]{2}[0-9]{4}",
    r"\d{1,3}(,\d{3}){0,2}",
];

/// One request of the mix: how to send it and what its output must satisfy.
enum Check {
    Schema(Value),
    Regex(&'static str),
    Free,
}

fn valid(check: &Check, text: &str) -> Result<(), String> {
    match check {
        Check::Free => Ok(()),
        Check::Regex(rx) => {
            let full = regex::Regex::new(&format!("^(?:{rx})$")).unwrap();
            full.is_match(text)
                .then_some(())
                .ok_or_else(|| format!("{text:?} does not match {rx}"))
        }
        Check::Schema(schema) => {
            let v: Value = serde_json::from_str(text).map_err(|e| format!("{text:?}: {e}"))?;
            let validator = jsonschema::options()
                .should_validate_formats(true)
                .build(schema)
                .map_err(|e| e.to_string())?;
            validator
                .validate(&v)
                .map_err(|e| format!("{text:?} does not fit {schema}: {e}"))
        }
    }
}

/// Sends one request through `api` and returns the generated text.
async fn run(
    client: &reqwest::Client,
    base: &str,
    api: &str,
    check: &Check,
    prompt: &str,
) -> String {
    let max = 320;
    let (url, body) = match (api, check) {
        ("takeoff", Check::Schema(s)) => (
            "/generate",
            json!({"text": prompt, "json_schema": s, "max_new_tokens": max, "sampling_temperature": 0, "use_chat_template": true}),
        ),
        ("takeoff", Check::Regex(r)) => (
            "/generate",
            json!({"text": prompt, "regex_string": r, "max_new_tokens": max, "sampling_temperature": 0, "use_chat_template": true}),
        ),
        ("takeoff", Check::Free) => (
            "/generate",
            json!({"text": prompt, "max_new_tokens": 48, "sampling_temperature": 0.7, "seed": 3}),
        ),
        ("openai", Check::Schema(s)) => (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": prompt}], "max_tokens": max, "temperature": 0,
                                                                       "response_format": {"type": "json_schema", "json_schema": {"name": "out", "schema": s, "strict": true}}}),
        ),
        ("openai", _) => (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": prompt}], "max_tokens": 48}),
        ),
        ("tgi", Check::Schema(s)) => (
            "/",
            json!({"inputs": prompt, "parameters": {"max_new_tokens": max, "grammar": {"type": "json", "value": s}}}),
        ),
        ("tgi", Check::Regex(r)) => (
            "/",
            json!({"inputs": prompt, "parameters": {"max_new_tokens": max, "grammar": {"type": "regex", "value": r}}}),
        ),
        ("tgi", Check::Free) => (
            "/",
            json!({"inputs": prompt, "parameters": {"max_new_tokens": 48, "do_sample": true, "seed": 5}}),
        ),
        _ => unreachable!(),
    };
    let r = client
        .post(format!("{base}{url}"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status();
    let v: Value = r.json().await.unwrap();
    assert_eq!(status, 200, "{api} {body}: {v}");
    let text = match api {
        "takeoff" => v["text"].as_str(),
        "openai" => v["choices"][0]["message"]["content"].as_str(),
        _ => v["generated_text"].as_str(),
    };
    text.unwrap_or_else(|| panic!("{api}: {v}")).to_string()
}

#[tokio::test]
async fn every_schema_and_regex_holds_through_every_api_with_16_in_flight() {
    let s = Server::start(&["--device", "cpu", "--max-batch-size", "16"]).await;
    let client = reqwest::Client::new();
    let mut jobs: Vec<(&str, Check, String)> = Vec::new();
    for (i, schema) in schemas().into_iter().enumerate() {
        for api in ["takeoff", "openai", "tgi"] {
            let prompt = format!("Answer in JSON. Example {i}: describe something.");
            jobs.push((api, Check::Schema(schema.clone()), prompt.clone()));
            jobs.push((api, Check::Free, prompt));
        }
    }
    for (i, rx) in REGEXES.iter().enumerate() {
        for api in ["takeoff", "tgi"] {
            let prompt = format!("Question {i}: give one value.");
            jobs.push((api, Check::Regex(rx), prompt.clone()));
            jobs.push((api, Check::Free, prompt));
        }
    }
    let n = jobs.len();
    let failures: Vec<String> = stream::iter(jobs)
        .map(|(api, check, prompt)| {
            let (client, base) = (client.clone(), s.base.clone());
            async move {
                let text = run(&client, &base, api, &check, &prompt).await;
                valid(&check, &text).err().map(|e| format!("{api}: {e}"))
            }
        })
        .buffer_unordered(16)
        .filter_map(|f| async move { f })
        .collect()
        .await;
    assert!(
        failures.is_empty(),
        "{} of {n} failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// A list `text` with a schema; out of tokens mid-object is finish reason `length`; schemas
/// and regexes that cannot be compiled are 400s naming their field.
#[tokio::test]
async fn lists_truncation_and_bad_constraints() {
    let s = Server::start(&["--device", "cpu"]).await;
    let schema = schemas().remove(0);
    let (status, v) = s
        .post("/generate", json!({"text": ["Name a person.", "Another person, please."], "json_schema": schema.to_string(),
                                  "max_new_tokens": 120, "sampling_temperature": 0, "use_chat_template": true}))
        .await;
    assert_eq!(status, 200, "{v}");
    for t in v["text"].as_array().unwrap() {
        valid(&Check::Schema(schema.clone()), t.as_str().unwrap()).unwrap();
    }
    let (status, v) = s
        .post("/v1/completions", json!({"prompt": "{", "max_tokens": 3, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}))
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    // A regex only the empty string matches: the answer is empty, ended by the model's end of
    // sequence (not by the token limit), and the stream carries only its metadata event.
    let (status, v) = s
        .post(
            "/generate",
            json!({"text": "Say something.", "regex_string": "", "max_new_tokens": 8}),
        )
        .await;
    assert_eq!((status, &v["text"]), (200, &json!("")), "{v}");
    let stream = reqwest::Client::new()
        .post(format!("{}/generate_stream", s.base))
        .json(&json!({"text": "Say something.", "regex_string": "", "max_new_tokens": 8, "return_metadata": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    let text = stream.text().await.unwrap();
    let events: Vec<&str> = text
        .split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .collect();
    assert_eq!(events.len(), 1, "{text:?}");
    assert!(events[0].starts_with("event: metadata\n"), "{text:?}");
    let m: Value = serde_json::from_str(events[0].split_once("data: ").unwrap().1).unwrap();
    assert_eq!(m["finish_reason"], "stop", "{m}");
    assert!(m["generated_tokens"].as_u64().unwrap() <= 1, "{m}");
    for (path, body, field) in [
        (
            "/generate",
            json!({"text": "x", "json_schema": {"type": "no-such-type"}}),
            "json_schema",
        ),
        (
            "/generate",
            json!({"text": "x", "regex_string": "a(b"}),
            "regex_string",
        ),
        (
            "/generate",
            json!({"text": "x", "regex_string": "a", "json_schema": {"type": "object"}}),
            "regex_string",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}),
            "response_format.json_schema.schema",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}}),
            "response_format.type",
        ),
        (
            "/",
            json!({"inputs": "x", "parameters": {"grammar": {"type": "regex", "value": "(("}}}),
            "parameters.grammar",
        ),
        (
            "/",
            json!({"inputs": "x", "parameters": {"typical_p": 1.5}}),
            "parameters.typical_p",
        ),
        (
            "/",
            json!({"inputs": "x", "parameters": {"bogus": 1}}),
            "parameters.bogus",
        ),
        (
            "/generate",
            json!({"inputs": "x", "parameters": {"frequency_penalty": 2.5}}),
            "parameters.frequency_penalty",
        ),
        // A `stream` that contradicts the route.
        (
            "/generate",
            json!({"inputs": "x", "stream": true}),
            "stream",
        ),
        (
            "/generate_stream",
            json!({"inputs": "x", "stream": false}),
            "stream",
        ),
        // best_of: within 1..=2, sampling only, no seed, no stream.
        (
            "/generate",
            json!({"inputs": "x", "parameters": {"best_of": 3, "do_sample": true}}),
            "parameters.best_of",
        ),
        (
            "/generate",
            json!({"inputs": "x", "parameters": {"best_of": 0}}),
            "parameters.best_of",
        ),
        (
            "/generate",
            json!({"inputs": "x", "parameters": {"best_of": 2}}),
            "parameters.best_of",
        ),
        (
            "/generate",
            json!({"inputs": "x", "parameters": {"best_of": 2, "do_sample": true, "seed": 1}}),
            "parameters.best_of",
        ),
        (
            "/generate_stream",
            json!({"inputs": "x", "parameters": {"best_of": 2, "do_sample": true}}),
            "parameters.best_of",
        ),
    ] {
        let (status, v) = s.post(path, body.clone()).await;
        assert_eq!(refused_param(status, &v, &body), field, "{body}: {v}");
    }
}

/// TGI's schema gives the same greedy text as Takeoff's for the same prompt, and its token
/// log-probabilities are OpenAI's for the same tokens.
#[tokio::test]
async fn tgi_matches_takeoff_and_openai() {
    let s = Server::start(&["--device", "cpu"]).await;
    let prompt = "The capital of France is";
    let (_, takeoff) = s
        .post(
            "/generate",
            json!({"text": prompt, "max_new_tokens": 12, "sampling_temperature": 0}),
        )
        .await;
    let (status, tgi) = s
        .post(
            "/generate",
            json!({"inputs": prompt, "parameters": {"max_new_tokens": 12, "details": true}}),
        )
        .await;
    assert_eq!(status, 200, "{tgi}");
    assert_eq!(tgi["generated_text"], takeoff["text"]);
    let details = &tgi["details"];
    assert_eq!(details["generated_tokens"], 12);
    assert_eq!(details["finish_reason"], "length");
    let (_, openai) = s
        .post(
            "/v1/completions",
            json!({"prompt": prompt, "max_tokens": 12, "temperature": 0, "logprobs": 1}),
        )
        .await;
    let lp = &openai["choices"][0]["logprobs"]["token_logprobs"];
    let tokens = details["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), 12);
    for (i, t) in tokens.iter().enumerate() {
        let (a, b) = (t["logprob"].as_f64().unwrap(), lp[i].as_f64().unwrap());
        assert!(
            a.is_finite() && (a - b).abs() < 1e-5,
            "token {i}: {a} vs {b}"
        );
    }
    // The stream: one event per token, the last with the text and the details.
    let text = reqwest::Client::new()
        .post(format!("{}/generate_stream", s.base))
        .json(&json!({"inputs": prompt, "parameters": {"max_new_tokens": 12}}))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let events: Vec<Value> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|d| serde_json::from_str(d.trim()).unwrap())
        .collect();
    assert_eq!(events.len(), 12, "{text}");
    let last = events.last().unwrap();
    assert_eq!(last["generated_text"], takeoff["text"]);
    assert_eq!(last["details"]["finish_reason"], "length");
    assert!(events[..11].iter().all(|e| e["generated_text"].is_null()));
    let info: Value = reqwest::get(format!("{}/info", s.base))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(info["model_id"], "SmolLM2-135M-Instruct");
    assert_eq!(info["max_total_tokens"], 1024);
}

/// A TGI answer's top 20 `(id, logprob)` of its first generated token (`top_n_tokens` 20),
/// most likely first, every log-probability finite.
fn first_top_20(v: &Value) -> Vec<(u64, f64)> {
    let raw: Vec<(u64, f64)> = v["details"]["top_tokens"][0]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["id"].as_u64().unwrap(), t["logprob"].as_f64().unwrap()))
        .collect();
    assert_eq!(raw.len(), 20, "{v}");
    assert!(raw.iter().all(|r| r.1.is_finite()), "{raw:?}");
    raw
}

/// TGI's `frequency_penalty` lowers each token's logit by the penalty times its share of the
/// sequence so far, prompt included. Checked on the first generated token against the raw
/// distribution's top 20 (`top_n_tokens`) and the prompt's ids (`decoder_input_details`): the
/// greedy choice must be the top token after subtracting `penalty * count / length`, for
/// penalties of both signs on repetitive prompts, in at least one of which that is not the raw
/// arg max.
#[tokio::test]
async fn tgi_frequency_penalty_is_relative_to_the_sequence() {
    let s = Server::start(&["--device", "cpu"]).await;
    // Each changes the greedy choice at one of the two signs (with the default GGUF).
    let prompts = [
        "one two one two one",
        "x y x y x y x",
        "He said: no, no, no, no",
        "ha ha ha ha ha ha ha",
    ];
    let (mut checked, mut changed) = (0, 0);
    for prompt in prompts {
        for penalty in [2.0, -2.0] {
            let (status, v) = s
                .post(
                    "/generate",
                    json!({"inputs": prompt, "parameters": {
                        "max_new_tokens": 1, "frequency_penalty": penalty, "details": true,
                        "decoder_input_details": true, "top_n_tokens": 20}}),
                )
                .await;
            assert_eq!(status, 200, "{v}");
            let details = &v["details"];
            let ids: Vec<u64> = details["prefill"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["id"].as_u64().unwrap())
                .collect();
            let raw = first_top_20(&v);
            let adjusted = |(id, lp): (u64, f64)| {
                let count = ids.iter().filter(|&&t| t == id).count() as f64;
                lp - penalty * count / ids.len() as f64
            };
            let best = raw
                .iter()
                .copied()
                .max_by(|a, b| adjusted(*a).total_cmp(&adjusted(*b)))
                .unwrap();
            // A token outside the top 20 was below the 20th raw value and rises by at most
            // |penalty|: the best of the 20 is the arg max when it stays that far above it.
            let twentieth = raw.iter().map(|r| r.1).fold(f64::INFINITY, f64::min);
            if adjusted(best) < twentieth + penalty.abs() {
                eprintln!("skipped {prompt:?} at {penalty}: the top 20 cannot settle it");
                continue;
            }
            assert_eq!(
                details["tokens"][0]["id"].as_u64(),
                Some(best.0),
                "{prompt:?} at {penalty}: {raw:?}"
            );
            let raw_best = raw
                .iter()
                .copied()
                .max_by(|a, b| a.1.total_cmp(&b.1))
                .unwrap();
            checked += 1;
            changed += usize::from(best.0 != raw_best.0);
        }
    }
    assert!(checked >= 4, "only {checked} cases could be checked");
    assert!(
        changed >= 2,
        "the penalty changed {changed} choices in {checked} cases"
    );
}

/// TGI's `typical_p` (LangChain's TGI clients send 0.95 by default): after `top_k` 20 the
/// candidates are the raw distribution's top 20 (`top_n_tokens`), renormalised; with a tiny
/// mass only the token whose surprisal is closest to their entropy is left, whatever the
/// seed. Checked on several prompts, in at least one of which that is not the arg max.
#[tokio::test]
async fn tgi_typical_p_keeps_the_token_nearest_the_entropy() {
    let s = Server::start(&["--device", "cpu"]).await;
    let prompts = [
        "The capital of France is",
        "Once upon a time",
        "My favourite colour is",
        "x y x y x y x",
    ];
    let mut not_arg_max = 0;
    for (n, prompt) in prompts.iter().enumerate() {
        let (status, v) = s
            .post(
                "/generate",
                json!({"inputs": prompt, "parameters": {
                    "max_new_tokens": 1, "top_k": 20, "typical_p": 0.001, "seed": n,
                    "details": true, "top_n_tokens": 20}}),
            )
            .await;
        assert_eq!(status, 200, "{v}");
        let raw = first_top_20(&v);
        let z: f64 = raw.iter().map(|r| r.1.exp()).sum();
        let lq: Vec<f64> = raw.iter().map(|r| r.1 - z.ln()).collect();
        let entropy: f64 = -lq.iter().map(|l| l.exp() * l).sum::<f64>();
        let score = |i: usize| (-lq[i] - entropy).abs();
        let best = (0..raw.len())
            .min_by(|&a, &b| score(a).total_cmp(&score(b)).then(raw[a].0.cmp(&raw[b].0)))
            .unwrap();
        assert_eq!(
            v["details"]["tokens"][0]["id"].as_u64(),
            Some(raw[best].0),
            "{prompt:?}: {raw:?}"
        );
        not_arg_max += usize::from(best != 0);
    }
    assert!(
        not_arg_max >= 1,
        "the typical token was the arg max on every prompt"
    );
}

/// The log-probabilities of a TGI answer's tokens (`details.tokens` or a best-of sequence's),
/// and their mean; a missing or non-finite one fails the test.
fn mean_logprob(details: &Value) -> f64 {
    let tokens = details["tokens"].as_array().expect("tokens");
    assert!(!tokens.is_empty(), "{details}");
    let lps: Vec<f64> = tokens
        .iter()
        .map(|t| t["logprob"].as_f64().expect("a logprob"))
        .collect();
    assert!(lps.iter().all(|l| l.is_finite() && *l <= 0.0), "{lps:?}");
    lps.iter().sum::<f64>() / lps.len() as f64
}

/// TGI's `best_of`: two samples, the answer the one of higher mean token log-probability,
/// the other in `details.best_of_sequences`, each with the seed it drew with (two seeds, one
/// apart). Each seed, sent alone, gives back its sequence's text, so the texts, the seeds and
/// the choice are the samples' own; `/info` says 2 at most. Six rounds: an answer that were
/// always the first sample would pass with a chance of 1 in 64.
#[tokio::test]
async fn tgi_best_of_keeps_the_likelier_sample() {
    let s = Server::start(&["--device", "cpu"]).await;
    let info = s.info().await;
    assert_eq!(info["max_best_of"], 2, "{info}");
    let prompt = "Once upon a time";
    let params = json!({"max_new_tokens": 12, "do_sample": true, "temperature": 1.5,
                        "details": true, "decoder_input_details": true});
    let mut distinct = 0;
    for _ in 0..6 {
        let mut p = params.clone();
        p["best_of"] = json!(2);
        let (status, v) = s
            .post("/generate", json!({"inputs": prompt, "parameters": p}))
            .await;
        assert_eq!(status, 200, "{v}");
        let best = &v["details"];
        let others = best["best_of_sequences"]
            .as_array()
            .expect("best_of_sequences");
        assert_eq!(others.len(), 1, "{v}");
        let other = &others[0];
        for d in [best, other] {
            let tokens = d["tokens"].as_array().unwrap().len();
            assert!(tokens >= 1 && d["generated_tokens"] == tokens, "{v}");
            assert!(!d["prefill"].as_array().unwrap().is_empty(), "{v}");
        }
        assert!(mean_logprob(best) >= mean_logprob(other), "{v}");
        let (a, b) = (
            best["seed"].as_u64().unwrap(),
            other["seed"].as_u64().unwrap(),
        );
        assert_eq!(a.abs_diff(b), 1, "{v}");
        for (seed, text) in [(a, &v["generated_text"]), (b, &other["generated_text"])] {
            let mut p = params.clone();
            p["seed"] = json!(seed);
            let (status, alone) = s
                .post("/generate", json!({"inputs": prompt, "parameters": p}))
                .await;
            assert_eq!(status, 200, "{alone}");
            assert_eq!(&alone["generated_text"], text, "seed {seed}");
        }
        distinct += usize::from(v["generated_text"] != other["generated_text"]);
    }
    assert!(
        distinct >= 1,
        "the two samples were the same text three times"
    );
}
