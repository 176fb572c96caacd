//! End-to-end tests of `liftoff serve`: the real binary on loopback ports, real HTTP clients.

mod common;

use common::{refused_param, Server};
use futures::StreamExt;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// Reads an SSE body into its `data:` payloads (multi-line data joined with newlines).
async fn sse_data(resp: reqwest::Response) -> Vec<(Option<String>, String)> {
    let text = resp.text().await.unwrap();
    let mut out = Vec::new();
    for block in text.split("\n\n") {
        let mut event = None;
        let mut data: Vec<&str> = Vec::new();
        for line in block.lines() {
            if let Some(e) = line.strip_prefix("event:") {
                event = Some(e.trim().to_string());
            } else if let Some(d) = line.strip_prefix("data:") {
                data.push(d.strip_prefix(' ').unwrap_or(d));
            }
        }
        if !data.is_empty() {
            out.push((event, data.join("\n")));
        }
    }
    out
}

#[tokio::test]
async fn takeoff_generate_stream_and_batches() {
    let s = Server::start(&[]).await;
    let greedy = json!({"text": "The capital of France is", "sampling_temperature": 0, "max_new_tokens": 16});
    let (st, one) = s.post("/generate", greedy.clone()).await;
    assert_eq!(st, 200, "{one}");
    let text = one["text"].as_str().unwrap().to_string();
    assert!(text.starts_with(" Paris"), "{text}");

    // A list is a batch of independent requests.
    let (st, many) = s
        .post(
            "/generate",
            json!({"text": ["The capital of France is", "1, 2, 3,"], "sampling_temperature": 0,
                                                "max_new_tokens": 16, "return_metadata": true}),
        )
        .await;
    assert_eq!(st, 200, "{many}");
    assert_eq!(many["text"][0], text.as_str());
    assert_eq!(many["text"].as_array().unwrap().len(), 2);
    assert_eq!(many["metadata"][0]["generated_tokens"], 16);

    // The stream carries the same text, then the metadata event.
    let resp = reqwest::Client::new().post(format!("{}/generate_stream", s.base))
        .json(&json!({"text": "The capital of France is", "sampling_temperature": 0, "max_new_tokens": 16, "return_metadata": true}))
        .send().await.unwrap();
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let events = sse_data(resp).await;
    let streamed: String = events
        .iter()
        .filter(|(e, _)| e.is_none())
        .map(|(_, d)| d.as_str())
        .collect();
    assert_eq!(streamed, text);
    let (ev, meta) = events.last().unwrap();
    assert_eq!(ev.as_deref(), Some("metadata"));
    assert_eq!(
        serde_json::from_str::<Value>(meta).unwrap()["finish_reason"],
        "length"
    );

    // Tokenizer routes as takeoff-client calls them.
    let (st, tok) = s
        .post("/tokenize/primary", json!({"text": "Hello world"}))
        .await;
    assert_eq!(st, 200);
    assert_eq!(tok["tokens_count"], 2);
    let (_, detok) = s
        .post("/detokenize/primary", json!({"tokens": tok["token_ids"]}))
        .await;
    assert_eq!(detok["text"], "Hello world");
    let (_, tmpl) = s
        .post(
            "/chat_template/primary",
            json!({"inputs": [{"role": "user", "content": "Hi"}], "add_generation_prompt": true}),
        )
        .await;
    assert!(tmpl["messages"][0]
        .as_str()
        .unwrap()
        .ends_with("<|im_start|>assistant\n"));
}

#[tokio::test]
async fn openai_routes_stream_with_usage() {
    let s = Server::start(&[]).await;
    let (st, c) = s
        .post(
            "/v1/completions",
            json!({"model": "primary", "prompt": "1, 2, 3,", "max_tokens": 8, "temperature": 0}),
        )
        .await;
    assert_eq!(st, 200, "{c}");
    assert_eq!(c["usage"]["completion_tokens"], 8);
    assert_eq!(c["choices"][0]["finish_reason"], "length");

    let resp = reqwest::Client::new().post(format!("{}/v1/chat/completions", s.base))
        .json(&json!({"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 12, "temperature": 0,
                      "stream": true, "stream_options": {"include_usage": true}}))
        .send().await.unwrap();
    let events = sse_data(resp).await;
    assert_eq!(events.last().unwrap().1, "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|(_, d)| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let usage = &chunks.last().unwrap()["usage"];
    assert!(usage["completion_tokens"].as_u64().unwrap() >= 1, "{usage}");
    // One chunk per generated token, even one without text of its own.
    let token_chunks = chunks
        .iter()
        .filter(|c| c["choices"].as_array().is_some_and(|a| !a.is_empty()))
        .count();
    assert_eq!(
        Some(token_chunks as u64),
        usage["completion_tokens"].as_u64()
    );
    assert_eq!(
        usage["total_tokens"].as_u64(),
        Some(
            usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
        )
    );

    let models = reqwest::get(format!("{}/v1/models", s.base))
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["id"], "SmolLM2-135M-Instruct");
}

#[tokio::test]
async fn bad_requests_get_4xx_json_naming_the_field() {
    let s = Server::start(&[]).await;
    let client = reqwest::Client::new();
    let r = client
        .post(format!("{}/generate", s.base))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.json::<Value>().await.unwrap()["error"]["message"].is_string());
    let cases = [
        (
            "/generate",
            json!({"text": "x", "max_new_tokens": "many"}),
            400,
            "max_new_tokens",
        ),
        (
            "/generate",
            json!({"text": "x", "sampling_topp": 1.5}),
            400,
            "sampling_topp",
        ),
        (
            "/generate",
            json!({"text": "x", "sampling_temperature": -1}),
            400,
            "sampling_temperature",
        ),
        ("/generate", json!({"text": ""}), 400, "text"),
        ("/generate", json!({"text": []}), 400, "text"),
        (
            "/generate",
            json!({"text": "x", "regex_string": "[a-z"}),
            400,
            "regex_string",
        ),
        (
            "/generate",
            json!({"text": "x", "json_schema": {"type": "object", "minProperties": "two"}}),
            400,
            "json_schema",
        ),
        (
            "/generate",
            json!({"text": "x", "consumer_group": "nope"}),
            404,
            "consumer_group",
        ),
        (
            "/generate",
            json!({"text": "word ".repeat(1100)}),
            400,
            "maximum sequence length",
        ),
        (
            "/generate",
            json!({"text": "x", "max_new_tokens": 5000}),
            400,
            "max_new_tokens",
        ),
        ("/generate", json!({"prompt": "x"}), 400, "text"),
        (
            "/v1/completions",
            json!({"model": "gpt-4", "prompt": "x"}),
            404,
            "model",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": []}),
            400,
            "messages",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user"}]}),
            400,
            "content",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "top_p": 0}),
            400,
            "top_p",
        ),
    ];
    for (path, body, status, needle) in cases {
        let (st, v) = s.post(path, body.clone()).await;
        assert_eq!(st, status, "{path} {body}: {v}");
        let err = &v["error"];
        let text = format!("{} {}", err["message"], err["param"]);
        assert!(text.contains(needle), "{path} {body}: {v}");
    }
    let r = client.get(format!("{}/nope", s.base)).send().await.unwrap();
    assert_eq!(r.status(), 404);
    // The server is still fine.
    assert_eq!(
        s.post("/generate", json!({"text": "ok", "max_new_tokens": 2}))
            .await
            .0,
        200
    );
}

#[tokio::test]
async fn cancelled_stream_frees_its_sequence_and_blocks() {
    let s = Server::start(&[]).await;
    let resp = reqwest::Client::new()
        .post(format!("{}/generate_stream", s.base))
        .json(
            &json!({"text": "Tell me a long story.", "min_new_tokens": 900, "max_new_tokens": 900}),
        )
        .send()
        .await
        .unwrap();
    let mut body = resp.bytes_stream();
    let mut got = 0;
    while got < 5 {
        if body.next().await.unwrap().is_ok() {
            got += 1;
        }
    }
    assert!(s.metric("liftoff_num_requests_running").await >= 1.0);
    drop(body);
    let t = Instant::now();
    loop {
        let running = s.metric("liftoff_num_requests_running").await;
        let used = s.metric("liftoff_kv_cache_used_blocks").await;
        if running == 0.0 && used == 0.0 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "still running {running}, blocks {used}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        s.metric("liftoff_generation_tokens_total").await < 900.0,
        "generation stopped early"
    );
}

/// 16 concurrent greedy requests give exactly what each gives alone. liftoff's CPU kernels are
/// batch-invariant: every output row of a matmul is the same dot-product code in the same
/// order whatever the batch (the 4-row kernel tiles weights, not activations), attention runs
/// per token, and norms/activations are per row, so batching and chunked prefill change no bit.
#[tokio::test]
async fn concurrent_greedy_equals_alone() {
    let s = Server::start(&["--max-batch-size", "16"]).await;
    let prompts: Vec<String> = (0..16)
        .map(|i| format!("Fact {i}: the number {} is", i * 7 + 3))
        .collect();
    let body = |p: &str| json!({"prompt": p, "max_tokens": 20, "temperature": 0});
    let mut alone = Vec::new();
    for p in &prompts {
        let (_, v) = s.post("/v1/completions", body(p)).await;
        alone.push(v["choices"][0]["text"].as_str().unwrap().to_string());
    }
    let futures = prompts.iter().map(|p| s.post("/v1/completions", body(p)));
    let together: Vec<String> = futures::future::join_all(futures)
        .await
        .into_iter()
        .map(|(st, v)| {
            assert_eq!(st, 200, "{v}");
            v["choices"][0]["text"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(together, alone);
}

#[tokio::test]
async fn full_queue_answers_503_with_retry_after() {
    let s = Server::start(&["--max-batch-size", "1", "--max-waiting", "1"]).await;
    let client = reqwest::Client::new();
    let reqs = (0..6).map(|_| {
        client.post(format!("{}/generate", s.base))
            .json(&json!({"text": "Count to one hundred:", "min_new_tokens": 40, "max_new_tokens": 40}))
            .send()
    });
    let results = futures::future::join_all(reqs).await;
    let mut busy = 0;
    for r in results {
        let r = r.unwrap();
        if r.status() == 503 {
            assert!(r.headers().contains_key("retry-after"));
            busy += 1;
        } else {
            assert_eq!(r.status(), 200);
        }
    }
    assert!(busy >= 1, "some requests must be refused");
}

#[tokio::test]
async fn prefix_cache_hits_on_a_repeated_prompt() {
    let s = Server::start(&[]).await;
    let long = "You are a careful assistant. ".repeat(20);
    for _ in 0..2 {
        let (st, _) = s
            .post("/generate", json!({"text": long, "max_new_tokens": 2}))
            .await;
        assert_eq!(st, 200);
    }
    // Both requests are done: no block is held (the scheduler publishes its numbers just after
    // the last token), the prompt's full blocks stay cached, and the second one hit them.
    s.wait_metric("liftoff_kv_cache_used_blocks", 0.0).await;
    assert!(s.metric("liftoff_kv_cache_cached_blocks").await >= 5.0);
    assert!(s.metric("liftoff_prefix_cache_hit_blocks_total").await >= 5.0);
    assert!(s.metric("liftoff_prefix_cache_hit_rate").await > 0.4);
}

/// `/metrics` as a Prometheus server reads it: every running total is a counter named
/// `*_total`, gauges are gauges, histograms are histograms, and the counters move.
#[tokio::test]
async fn metrics_parse_as_prometheus_text() {
    let s = Server::start(&[]).await;
    let (st, _) = s
        .post("/generate", json!({"text": "Hello", "max_new_tokens": 3}))
        .await;
    assert_eq!(st, 200);
    let scrape = s.scrape().await;
    let kind = |name: &str| {
        let v = &scrape
            .samples
            .iter()
            .find(|x| x.metric == name)
            .unwrap_or_else(|| panic!("no {name}"))
            .value;
        match v {
            prometheus_parse::Value::Counter(_) => "counter",
            prometheus_parse::Value::Gauge(_) => "gauge",
            prometheus_parse::Value::Histogram(_) => "histogram",
            _ => "other",
        }
    };
    for sample in &scrape.samples {
        if sample.metric.ends_with("_total") {
            assert_eq!(kind(&sample.metric), "counter", "{}", sample.metric);
        }
    }
    for c in [
        "liftoff_requests_total",
        "liftoff_steps_total",
        "liftoff_step_time_seconds_total",
        "liftoff_preemptions_total",
        "liftoff_cancelled_requests_total",
        "liftoff_prefix_cache_queried_blocks_total",
        "liftoff_generation_tokens_total",
    ] {
        assert_eq!(kind(c), "counter", "{c}");
    }
    for g in [
        "liftoff_num_requests_running",
        "liftoff_kv_cache_used_blocks",
        "liftoff_kv_cache_cached_blocks",
        "liftoff_kv_cache_total_blocks",
        "liftoff_replica_healthy",
    ] {
        assert_eq!(kind(g), "gauge", "{g}");
    }
    assert_eq!(kind("liftoff_time_to_first_token_seconds"), "histogram");
    assert!(s.metric("liftoff_steps_total").await >= 3.0);
    assert!(s.metric("liftoff_step_time_seconds_total").await > 0.0);
    assert_eq!(s.metric("liftoff_generation_tokens_total").await, 3.0);
    assert_eq!(s.metric("liftoff_replica_healthy").await, 1.0);
    assert!(
        !scrape
            .samples
            .iter()
            .any(|x| x.metric == "liftoff_forward_part_seconds_total"),
        "the forward pass is profiled only with --profile"
    );
}

/// `serve --profile` puts the forward pass's parts on `/metrics`: every part is there, the
/// parts a generation runs through took time, and together they fit in the step time.
#[tokio::test]
async fn profile_breaks_the_step_time_down_by_part() {
    let s = Server::start(&["--profile"]).await;
    let (st, _) = s
        .post(
            "/generate",
            json!({"text": "Hello there", "max_new_tokens": 4}),
        )
        .await;
    assert_eq!(st, 200);
    s.wait_metric("liftoff_num_requests_running", 0.0).await;
    let scrape = s.scrape().await;
    let parts: Vec<(String, f64)> = scrape
        .samples
        .iter()
        .filter(|x| x.metric == "liftoff_forward_part_seconds_total")
        .map(|x| match x.value {
            prometheus_parse::Value::Counter(v) => (x.labels["part"].to_string(), v),
            ref other => panic!("not a counter: {other:?}"),
        })
        .collect();
    assert_eq!(parts.len(), 12, "{parts:?}");
    for name in [
        "qkv projection",
        "attention",
        "gate/up projection",
        "lm head",
        "sampling",
    ] {
        let v = parts.iter().find(|p| p.0 == name).map(|p| p.1);
        assert!(
            matches!(v, Some(v) if v > 0.0),
            "{name}: {v:?} in {parts:?}"
        );
    }
    let sum: f64 = parts.iter().map(|p| p.1).sum();
    let step = s.metric("liftoff_step_time_seconds_total").await;
    assert!(
        sum.is_finite() && sum <= step,
        "parts {sum} s, steps {step} s"
    );
}

/// `--api-key` (a list) guards the inference port and `--management-api-key` the management
/// port: 401 JSON without a right `Authorization: Bearer` key, `/health` open on both, each
/// port taking only its own keys.
#[tokio::test]
async fn api_keys_guard_each_port() {
    let s = Server::start(&["--api-key", "k1, k2", "--management-api-key", "m1"]).await;
    let client = reqwest::Client::new();
    let body = json!({"prompt": "Hi", "max_tokens": 2});
    let send = |key: Option<&str>| {
        let mut r = client
            .post(format!("{}/v1/completions", s.base))
            .json(&body);
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        r.send()
    };
    for key in [None, Some("k3"), Some("m1"), Some("")] {
        let r = send(key).await.unwrap();
        assert_eq!(r.status(), 401, "key {key:?}");
        assert_eq!(r.headers()["www-authenticate"], "Bearer");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["type"], "authentication_error", "{v}");
    }
    for key in ["k1", "k2"] {
        assert_eq!(send(Some(key)).await.unwrap().status(), 200, "key {key}");
    }
    for base in [&s.base, &s.mgmt] {
        let r = client.get(format!("{base}/health")).send().await.unwrap();
        assert_eq!(r.status(), 200, "{base}/health stays open");
    }
    let info = |key: Option<&str>| {
        let mut r = client.get(format!("{}/info", s.mgmt));
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        r.send()
    };
    assert_eq!(info(None).await.unwrap().status(), 401);
    assert_eq!(info(Some("k1")).await.unwrap().status(), 401);
    assert_eq!(info(Some("m1")).await.unwrap().status(), 200);
}

/// `--body-size-limit-bytes`: a larger body gets 413 with a JSON error, a smaller one passes.
#[tokio::test]
async fn bodies_over_the_limit_get_413() {
    let s = Server::start(&["--body-size-limit-bytes", "2000"]).await;
    let (st, v) = s
        .post(
            "/generate",
            json!({"text": "word ".repeat(1000), "max_new_tokens": 1}),
        )
        .await;
    assert_eq!(st, 413, "{v}");
    assert!(v["error"]["message"].is_string(), "{v}");
    let (st, _) = s
        .post(
            "/generate",
            json!({"text": "word ".repeat(100), "max_new_tokens": 1}),
        )
        .await;
    assert_eq!(st, 200);
}

/// A KV cache too small for the batch: sequences are preempted (their blocks freed, their
/// tokens recomputed later), and every output still equals the same request run alone.
#[tokio::test]
async fn preempted_requests_equal_their_runs_alone() {
    let s = Server::start(&[
        "--kv-cache-memory-mib",
        "4",
        "--max-sequence-length",
        "128",
        "--max-batch-size",
        "8",
    ])
    .await;
    let blocks = s.metric("liftoff_kv_cache_total_blocks").await;
    let prompts: Vec<String> = (0..6)
        .map(|i| format!("Name {i} colours, one per line:"))
        .collect();
    // Each request alone fits; six at once need about twice the cache.
    let body =
        |p: &str| json!({"prompt": p, "max_tokens": 40, "temperature": 0, "ignore_eos": true});
    let mut alone = Vec::new();
    for p in &prompts {
        let (st, v) = s.post("/v1/completions", body(p)).await;
        assert_eq!(st, 200, "{v}");
        alone.push(v["choices"][0]["text"].as_str().unwrap().to_string());
    }
    assert_eq!(s.metric("liftoff_preemptions_total").await, 0.0);
    let together: Vec<String> =
        futures::future::join_all(prompts.iter().map(|p| s.post("/v1/completions", body(p))))
            .await
            .into_iter()
            .map(|(st, v)| {
                assert_eq!(st, 200, "{v}");
                v["choices"][0]["text"].as_str().unwrap().to_string()
            })
            .collect();
    let preempted = s.metric("liftoff_preemptions_total").await;
    assert!(preempted >= 1.0, "{blocks} blocks: no preemption happened");
    assert_eq!(together, alone);
    s.wait_metric("liftoff_kv_cache_used_blocks", 0.0).await;
}

/// The served path against transformers: the default model served in f32 (`--dtype f32`, the
/// GGUF dequantized, as the fixtures were made), 16 requests in flight at once (the 4 fixture
/// prompts, 4 times each, as token ids), greedy: every request's tokens equal transformers'
/// greedy tokens, and its top log-probabilities agree with transformers' logits at every
/// generated position (as differences from the top token, where the log-sum-exp cancels;
/// logits agree within 5e-4 in f32, so a difference within twice that).
#[tokio::test]
async fn served_tokens_and_logprobs_match_transformers_with_16_in_flight() {
    let s = Server::start(&["--dtype", "f32", "--max-batch-size", "16"]).await;
    let path = common::fixtures().join("reference/smollm2_f32.json");
    let fixture: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let cases = fixture["cases"].as_array().unwrap();
    let requests = (0..16).map(|i| {
        let case = &cases[i % cases.len()];
        let n = case["greedy_ids"].as_array().unwrap().len();
        s.post(
            "/v1/completions",
            json!({"prompt": case["prompt_ids"], "max_tokens": n, "temperature": 0,
                   "ignore_eos": true, "logprobs": 20, "return_tokens_as_token_ids": true}),
        )
    });
    let results = futures::future::join_all(requests).await;
    let mut worst = 0f64;
    for (i, (status, v)) in results.into_iter().enumerate() {
        assert_eq!(status, 200, "{v}");
        let case = &cases[i % cases.len()];
        let prompt_len = case["prompt_ids"].as_array().unwrap().len();
        let lp = &v["choices"][0]["logprobs"];
        let id = |t: &Value| -> u64 {
            t.as_str()
                .unwrap()
                .strip_prefix("token_id:")
                .unwrap()
                .parse()
                .unwrap()
        };
        let tokens: Vec<u64> = lp["tokens"].as_array().unwrap().iter().map(id).collect();
        let want: Vec<u64> = case["greedy_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap())
            .collect();
        assert_eq!(
            tokens, want,
            "request {i} ({}): greedy tokens",
            case["name"]
        );
        for (step, top) in lp["top_logprobs"].as_array().unwrap().iter().enumerate() {
            let ours: std::collections::HashMap<u64, f64> = top
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (id(&json!(k)), v.as_f64().unwrap()))
                .collect();
            let refs = case["topk"][prompt_len - 1 + step].as_array().unwrap();
            let pair = |r: &Value| (r[0].as_u64().unwrap(), r[1].as_f64().unwrap());
            let (top_id, top_logit) = pair(&refs[0]);
            for r in refs {
                let (tid, logit) = pair(r);
                let err = match (ours.get(&tid), ours.get(&top_id)) {
                    (Some(a), Some(b)) => ((a - b) - (logit - top_logit)).abs(),
                    _ => f64::INFINITY,
                };
                // NaN fails here too.
                assert!(
                    err <= 1e-3,
                    "request {i} step {step} token {tid}: off by {err}"
                );
                worst = worst.max(err);
            }
        }
    }
    eprintln!("served vs transformers: worst logit-difference error {worst:.2e}");
}

/// A field the server does not implement is refused with a 400 naming it, never ignored;
/// fields that cannot change the output (`user`) and empty ones (`functions: []`) pass.
#[tokio::test]
async fn unsupported_openai_fields_are_refused_by_name() {
    let s = Server::start(&[]).await;
    for (field, value) in [
        ("guided_regex", json!("a+")),
        (
            "tools",
            json!([{"type": "function", "function": {"name": "f"}}]),
        ),
        ("guided_json", json!({"type": "object"})),
        ("suffix", json!(" end")),
    ] {
        let mut body = json!({"prompt": "Hi", "max_tokens": 2});
        body[field] = value;
        let (st, v) = s.post("/v1/completions", body).await;
        assert_eq!(st, 400, "{field}: {v}");
        assert_eq!(v["error"]["param"], field, "{v}");
    }
    let (st, v) = s
        .post(
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
                   "user": "someone", "functions": [], "tools": [], "metadata": {"a": "b"}}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
}

/// `best_of` on completions: three seeded samples drawn (seeds `seed`, `seed + 1`, `seed +
/// 2`), the two of highest mean token log-probability returned, best first: the same texts as
/// `n: 3` with the same seed ranked by their own log-probabilities; usage counts all three.
/// Below `n`, streamed or greedy, it is a 400 naming it.
#[tokio::test]
async fn completions_best_of_keeps_the_likeliest_samples() {
    let s = Server::start(&[]).await;
    let body = |n: usize, best_of: usize| {
        json!({"prompt": "Once upon a time", "max_tokens": 10, "ignore_eos": true,
               "temperature": 1.5, "seed": 7, "logprobs": 0, "n": n, "best_of": best_of})
    };
    let mean = |choice: &Value| {
        let lps: Vec<f64> = choice["logprobs"]["token_logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l.as_f64().unwrap())
            .collect();
        assert!(
            lps.len() == 10 && lps.iter().all(|l| l.is_finite()),
            "{lps:?}"
        );
        lps.iter().sum::<f64>() / lps.len() as f64
    };
    let (st, all) = s.post("/v1/completions", body(3, 3)).await;
    assert_eq!(st, 200, "{all}");
    let mut ranked: Vec<(f64, String)> = all["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (mean(c), c["text"].as_str().unwrap().to_string()))
        .collect();
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0));
    let (st, best) = s.post("/v1/completions", body(2, 3)).await;
    assert_eq!(st, 200, "{best}");
    let choices = best["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2, "{best}");
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i, "{best}");
        assert_eq!(c["text"].as_str().unwrap(), ranked[i].1, "{best} vs {all}");
        assert!((mean(c) - ranked[i].0).abs() < 1e-6, "{best}");
    }
    assert_eq!(best["usage"]["completion_tokens"], 30, "{best}");
    for (field, value) in [
        ("n", json!(2)),
        ("stream", json!(true)),
        ("temperature", json!(0)),
    ] {
        let mut b = body(1, 2);
        b[field] = value;
        if field == "n" {
            b["best_of"] = json!(1);
        }
        let (st, v) = s.post("/v1/completions", b).await;
        assert_eq!(st, 400, "{field}: {v}");
        assert_eq!(v["error"]["param"], "best_of", "{field}: {v}");
    }
}

/// Chat messages as OpenAI clients send them: content as parts (text joined in order) gives
/// the same reply as the same text as a string; `developer` is a system message; image parts,
/// malformed tool calls and unknown roles are 400s naming the field.
#[tokio::test]
async fn chat_content_parts_and_roles() {
    let s = Server::start(&[]).await;
    let ask = |messages: Value| {
        s.post(
            "/v1/chat/completions",
            json!({"messages": messages, "max_tokens": 8, "temperature": 0}),
        )
    };
    let (st, plain) = ask(json!([{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": "Name a colour."}]))
    .await;
    assert_eq!(st, 200, "{plain}");
    let (st, parts) = ask(json!([{"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
                                 {"role": "user", "name": "ann", "content": [{"type": "text", "text": "Name a "},
                                                                             {"type": "text", "text": "colour."}]}]))
    .await;
    assert_eq!(st, 200, "{parts}");
    assert_eq!(
        parts["choices"][0]["message"]["content"],
        plain["choices"][0]["message"]["content"]
    );
    for (messages, param) in [
        (
            json!([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
            "messages[0].content[0].type",
        ),
        (
            json!([{"role": "assistant", "content": null, "tool_calls": [{"id": "1"}]}]),
            "messages[0].tool_calls[0]",
        ),
        (
            json!([{"role": "wizard", "content": "hi"}]),
            "messages[0].role",
        ),
    ] {
        let (st, v) = ask(messages).await;
        assert_eq!(st, 400, "{v}");
        assert_eq!(v["error"]["param"], param, "{v}");
    }
}

/// `usage.prompt_tokens_details.cached_tokens` counts the prompt tokens served from the
/// prefix cache, and vLLM's `stream_options.continuous_usage_stats` puts usage in every chunk.
#[tokio::test]
async fn usage_reports_cached_tokens_and_streams_it_per_chunk() {
    let s = Server::start(&[]).await;
    let prompt = "You are a careful assistant. ".repeat(12);
    let body = json!({"prompt": prompt, "max_tokens": 3, "temperature": 0});
    let (st, first) = s.post("/v1/completions", body.clone()).await;
    assert_eq!(st, 200, "{first}");
    assert_eq!(first["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let (_, second) = s.post("/v1/completions", body).await;
    let cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    let prompt_tokens = second["usage"]["prompt_tokens"].as_u64().unwrap();
    // Every full block but the one holding the last prompt token.
    assert!(cached >= 16 && cached < prompt_tokens, "{second}");
    assert_eq!(cached % 16, 0, "whole blocks");

    let resp = reqwest::Client::new()
        .post(format!("{}/v1/completions", s.base))
        .json(
            &json!({"prompt": "Count: 1, 2,", "max_tokens": 4, "temperature": 0, "stream": true,
                      "stream_options": {"continuous_usage_stats": true}}),
        )
        .send()
        .await
        .unwrap();
    let events = sse_data(resp).await;
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|(_, d)| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(chunks.len(), 4);
    for (i, c) in chunks.iter().enumerate() {
        assert_eq!(c["usage"]["completion_tokens"], i + 1, "{c}");
    }
}

/// Bad input on the fields this server added for OpenAI and TGI clients, and wrongly typed
/// fields: each a 400 naming the field.
#[tokio::test]
async fn bad_sampling_tool_and_stream_fields_are_400s_naming_them() {
    let s = Server::start(&[]).await;
    let chat = |extra: Value| {
        let mut body = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    for (path, body, param) in [
        (
            "/v1/chat/completions",
            chat(json!({"stream_options": {"include_usage": true}})),
            "stream_options",
        ),
        (
            "/v1/chat/completions",
            chat(json!({"frequency_penalty": 2.5})),
            "frequency_penalty",
        ),
        (
            "/v1/chat/completions",
            chat(json!({"presence_penalty": -3.0})),
            "presence_penalty",
        ),
        (
            "/v1/chat/completions",
            chat(json!({"logit_bias": {"5": 101.0}})),
            "logit_bias",
        ),
        (
            "/v1/chat/completions",
            chat(json!({"logit_bias": {"x": 1.0}})),
            "logit_bias.x",
        ),
        ("/v1/chat/completions", chat(json!({"n": 0})), "n"),
        (
            "/v1/chat/completions",
            chat(json!({"tools": "get_weather"})),
            "tools",
        ),
        (
            "/v1/chat/completions",
            chat(json!({"tool_choice": "required"})),
            "tool_choice",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "Hi", "audio": {"id": "a"}}], "max_tokens": 2}),
            "messages[0].audio",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "tool", "content": "{}"}], "max_tokens": 2}),
            "messages[0].tool_call_id",
        ),
        (
            "/v1/completions",
            json!({"prompt": "Hi", "max_tokens": 2, "echo": true, "logprobs": 21}),
            "logprobs",
        ),
        (
            "/generate_stream",
            json!({"inputs": "Hi", "parameters": {"decoder_input_details": true}}),
            "parameters.decoder_input_details",
        ),
        // Wrongly typed fields, including those serde reads through `flatten`.
        (
            "/v1/chat/completions",
            chat(json!({"temperature": "hot"})),
            "temperature",
        ),
        (
            "/v1/completions",
            json!({"prompt": "Hi", "max_tokens": "two"}),
            "max_tokens",
        ),
        ("/v1/chat/completions", chat(json!({"stop": 5})), "stop"),
        (
            "/v1/chat/completions",
            chat(json!({"top_logprobs": -1})),
            "top_logprobs",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": 5, "content": "Hi"}], "max_tokens": 2}),
            "messages[0].role",
        ),
        (
            "/v1/completions",
            json!({"prompt": {"text": "Hi"}, "max_tokens": 2}),
            "prompt",
        ),
    ] {
        let (st, v) = s.post(path, body.clone()).await;
        assert_eq!(refused_param(st, &v, &body), param, "{body}: {v}");
    }
}
