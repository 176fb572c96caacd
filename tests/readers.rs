//! Many models on one server: readers added, used, unloaded, reloaded and deleted at run time
//! through the management API of a real `liftoff serve`, under a memory budget.

mod common;

use common::{fixtures, Server};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

fn model(name: &str) -> String {
    fixtures().join("models").join(name).display().to_string()
}

/// A tiny reader's settings: 4 MiB of KV cache, short context.
fn tiny(name: &str, group: &str) -> Value {
    json!({"model_name": model(name), "device": "cpu", "consumer_group": group,
           "page_cache_size": "4MB", "max_sequence_length": 128})
}

/// A server whose first reader is the tiny f32 model with 4 MiB of KV cache, plus `extra`
/// flags; and that reader's id.
async fn tiny_server(extra: &[&str]) -> (Server, String) {
    let model = model("tiny-llama2-f32");
    let mut args = vec![
        "--model",
        &model,
        "--device",
        "cpu",
        "--kv-cache-memory-mib",
        "4",
    ];
    args.extend_from_slice(extra);
    let s = Server::start(&args).await;
    let id = first_reader(&s).await;
    (s, id)
}

/// The id of the server's first reader.
async fn first_reader(s: &Server) -> String {
    readers(s).await[0]["reader_id"]
        .as_str()
        .unwrap()
        .to_string()
}

async fn mgmt(
    s: &Server,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut r = reqwest::Client::new().request(method, format!("{}{path}", s.mgmt));
    if let Some(b) = body {
        r = r.json(&b);
    }
    let r = r.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn add(s: &Server, body: Value) -> String {
    let (status, v) = mgmt(s, reqwest::Method::POST, "/reader", Some(body)).await;
    assert_eq!(status, 200, "{v}");
    v["reader_id"].as_str().unwrap().to_string()
}

/// Every reader of `/reader_groups`, by id.
async fn readers(s: &Server) -> Vec<Value> {
    let (status, groups) = mgmt(s, reqwest::Method::GET, "/reader_groups", None).await;
    assert_eq!(status, 200);
    let mut all: Vec<Value> = groups
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(group, list)| {
            list.as_array().unwrap().iter().map(move |r| {
                assert_eq!(r["consumer_group"], json!(group));
                r.clone()
            })
        })
        .collect();
    all.sort_by_key(|r| r["reader_id"].as_str().unwrap().to_string());
    all
}

async fn reader(s: &Server, id: &str) -> Value {
    readers(s)
        .await
        .into_iter()
        .find(|r| r["reader_id"] == id)
        .unwrap_or_else(|| panic!("no reader {id}"))
}

async fn wait_state(s: &Server, id: &str, state: &str) -> Value {
    let t = Instant::now();
    loop {
        let r = reader(s, id).await;
        if r["state"] == state {
            return r;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "{id}: {r}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Greedy text of the reader serving `group`.
async fn greedy(s: &Server, group: &str, max_new_tokens: usize) -> String {
    let (status, v) = s
        .post(
            "/generate",
            json!({"text": "The quick brown fox", "consumer_group": group,
                   "sampling_temperature": 0, "max_new_tokens": max_new_tokens, "min_new_tokens": max_new_tokens}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    v["text"].as_str().unwrap().to_string()
}

async fn metric_of(s: &Server, name: &str, reader_id: &str) -> f64 {
    let scrape = s.scrape().await;
    scrape
        .samples
        .iter()
        .filter(|x| x.metric == name && x.labels.get("reader_id") == Some(reader_id))
        .map(|x| match x.value {
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v) => v,
            ref other => panic!("{name}: {other:?}"),
        })
        .sum()
}

/// Takeoff's management API end to end: add a reader, see it load, route to it by consumer
/// group and by OpenAI `model`, read its configuration and the server's status, delete it.
#[tokio::test]
async fn readers_are_added_routed_and_deleted_at_run_time() {
    let (s, r0) = tiny_server(&["--max-sequence-length", "128"]).await;
    let first = readers(&s).await;
    assert_eq!(first.len(), 1);
    assert_eq!(first[0]["state"], "ready");
    assert_eq!(first[0]["ready"], true);
    assert!(first[0]["memory_bytes"].as_u64().unwrap() > 4 << 20);

    let id = add(&s, tiny("tiny-llama3-bf16", "second")).await;
    let r = wait_state(&s, &id, "ready").await;
    assert_eq!(r["model_name"], "tiny-llama3-bf16");
    assert_eq!(r["device"], "cpu");
    assert_eq!(r["pinned"], false);
    assert!(!r["pids"].as_array().unwrap().is_empty());
    let kv = 4u64 << 20;
    let mem = r["memory_bytes"].as_u64().unwrap();
    assert!(mem > kv && mem < kv + (2 << 20), "{mem}");

    // Both readers answer, each with its own model.
    let a = greedy(&s, "primary", 8).await;
    let b = greedy(&s, "second", 8).await;
    assert_ne!(a, b);
    let client = reqwest::Client::new();
    let ask = |m: &'static str| {
        let client = client.clone();
        let url = format!("{}/v1/completions", s.base);
        async move {
            let v: Value = client
                .post(url)
                .json(&json!({"model": m, "prompt": "Hello", "max_tokens": 4, "temperature": 0}))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            v["model"].as_str().unwrap_or_default().to_string()
        }
    };
    let (x, y) = tokio::join!(ask("tiny-llama2-f32"), ask("tiny-llama3-bf16"));
    assert_eq!(
        (x.as_str(), y.as_str()),
        ("tiny-llama2-f32", "tiny-llama3-bf16")
    );
    let models: Value = reqwest::get(format!("{}/v1/models", s.base))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["reader_id"].as_str().unwrap())
        .collect();
    assert!(
        ids.contains(&r0.as_str()) && ids.contains(&id.as_str()),
        "{models}"
    );
    // The reader id routes too, for the tokenizer routes as for generation.
    let (status, v) = s
        .post(&format!("/tokenize/{id}"), json!({"text": "fox"}))
        .await;
    assert_eq!(status, 200, "{v}");

    let (status, config) = mgmt(&s, reqwest::Method::GET, &format!("/config/{id}"), None).await;
    assert_eq!(status, 200);
    assert_eq!(config["consumer_group"], "second");
    assert_eq!(config["page_cache_size"], 4);
    assert_eq!(config["max_sequence_length"], 128);
    assert!(
        config.get("port").is_none(),
        "server settings stay out: {config}"
    );
    let (_, status) = mgmt(&s, reqwest::Method::GET, "/status", None).await;
    assert!(
        status["status"]["live_readers"][&id].is_object(),
        "{status}"
    );
    assert_eq!(status["config"]["management_host"], "127.0.0.1");

    let (code, _) = mgmt(&s, reqwest::Method::DELETE, &format!("/reader/{id}"), None).await;
    assert_eq!(code, 204);
    let (code, v) = mgmt(&s, reqwest::Method::DELETE, &format!("/reader/{id}"), None).await;
    assert_eq!(
        (code, v["error"]["param"].as_str()),
        (404, Some("reader_id"))
    );
    let (code, v) = s
        .post(
            "/generate",
            json!({"text": "x", "consumer_group": "second"}),
        )
        .await;
    assert_eq!(code, 404, "{v}");
    assert_eq!(readers(&s).await.len(), 1);
    // The first reader, started by flags, is deleted the same way.
    let (code, _) = mgmt(&s, reqwest::Method::DELETE, &format!("/reader/{r0}"), None).await;
    assert_eq!(code, 204);
    assert!(readers(&s).await.is_empty());
    let health = reqwest::get(format!("{}/health", s.mgmt)).await.unwrap();
    assert_eq!(health.status(), 200, "the server itself stays up");
}

/// Configurations that cannot be valid are refused at once, naming the field; a load that
/// fails later leaves the reader `failed` and the others serving.
#[tokio::test]
async fn bad_readers_are_refused_or_fail_alone() {
    let dir = tempfile::tempdir().unwrap();
    let roots = format!(
        "{},{}",
        fixtures().join("models").display(),
        dir.path().display()
    );
    let (s, _) = tiny_server(&["--model-root", &roots]).await;
    let cases = [
        (
            tiny("tiny-gqa2-f16", "x").tap(|v| v["device"] = json!("tpu")),
            400,
            "device",
        ),
        (
            tiny("tiny-gqa2-f16", "x").tap(|v| v["tensor_parallel"] = json!(3)),
            400,
            "tensor_parallel",
        ),
        (
            tiny("tiny-gqa2-f16", "x").tap(|v| v["model_name"] = json!("/no/such/model.gguf")),
            400,
            "model_name",
        ),
        (
            tiny("tiny-gqa2-f16", "x").tap(|v| v["model_name"] = json!("/etc")),
            403,
            "model_name",
        ),
        (
            tiny("tiny-gqa2-f16", "x").tap(|v| v["max_batch_size"] = json!("many")),
            400,
            "max_batch_size",
        ),
        (
            tiny("tiny-gqa2-f16", "x").tap(|v| v["port"] = json!(80)),
            400,
            "port",
        ),
        (json!({"device": "cpu"}), 400, "model_name"),
    ];
    for (body, code, field) in cases {
        let (status, v) = mgmt(&s, reqwest::Method::POST, "/reader", Some(body.clone())).await;
        assert_eq!(status, code, "{body}: {v}");
        assert_eq!(v["error"]["param"], field, "{body}: {v}");
    }
    // A checkpoint whose vocabulary is smaller than its tokenizer's passes the checks at
    // POST time and fails when it loads.
    let broken = dir.path().join("broken");
    std::fs::create_dir(&broken).unwrap();
    for f in std::fs::read_dir(model("tiny-gqa2-f16")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, broken.join(f.file_name().unwrap())).unwrap();
    }
    let config = broken.join("config.json");
    let mut c: Value = serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    c["vocab_size"] = json!(100);
    std::fs::write(&config, c.to_string()).unwrap();
    let id = add(
        &s,
        json!({"model_name": broken.display().to_string(), "device": "cpu", "consumer_group": "broken", "page_cache_size": 4}),
    )
    .await;
    let r = wait_state(&s, &id, "failed").await;
    assert!(r["error"].as_str().unwrap().contains("vocabulary"), "{r}");
    let (code, v) = s
        .post(
            "/generate",
            json!({"text": "x", "consumer_group": "broken"}),
        )
        .await;
    assert_eq!(code, 503, "{v}");
    let (_, status) = mgmt(&s, reqwest::Method::GET, "/status", None).await;
    assert!(
        status["status"]["dead_readers"][&id].is_object(),
        "{status}"
    );
    let health = reqwest::get(format!("{}/health", s.mgmt)).await.unwrap();
    assert_eq!(health.status(), 200);
    assert_eq!(health.json::<Value>().await.unwrap()["status"], "degraded");
    greedy(&s, "primary", 4).await;
    let (code, _) = mgmt(&s, reqwest::Method::DELETE, &format!("/reader/{id}"), None).await;
    assert_eq!(code, 204);
}

/// A budget that holds two of three readers: loading the third unloads the least recently
/// used idle one; a request to that one reloads it (same greedy output as before) and
/// unloads the next least recently used.
#[tokio::test]
async fn the_least_recently_used_idle_reader_makes_room() {
    let (s, a) = tiny_server(&["--max-sequence-length", "128", "--models-memory-mib", "10"]).await;
    let before = greedy(&s, "primary", 12).await;
    let b = add(&s, tiny("tiny-llama3-bf16", "b")).await;
    wait_state(&s, &b, "ready").await;
    greedy(&s, "b", 4).await;
    assert_eq!(reader(&s, &a).await["state"], "ready", "two fit");

    let c = add(&s, tiny("tiny-gqa2-f16", "c")).await;
    wait_state(&s, &c, "ready").await;
    let ra = reader(&s, &a).await;
    assert_eq!(ra["state"], "unloaded", "a was the least recently used");
    assert_eq!(ra["memory_bytes"], 0);
    assert_eq!(reader(&s, &b).await["state"], "ready");
    assert_eq!(metric_of(&s, "liftoff_reader_unloads_total", &a).await, 1.0);

    // A request for `a` loads it again (unloading b, now the least recently used).
    assert_eq!(greedy(&s, "primary", 12).await, before);
    assert_eq!(reader(&s, &a).await["state"], "ready");
    assert_eq!(reader(&s, &b).await["state"], "unloaded");
    assert_eq!(reader(&s, &c).await["state"], "ready");
    assert_eq!(metric_of(&s, "liftoff_reader_loads_total", &a).await, 2.0);
    let total: f64 = readers(&s)
        .await
        .iter()
        .map(|r| r["memory_bytes"].as_f64().unwrap())
        .sum();
    assert!(total <= (10 << 20) as f64, "{total}");
}

/// A reader streaming a request is never unloaded, a pinned one neither; with nothing left to
/// unload, `POST /reader` is refused with a 503 that gives the budget and the readers in use,
/// while a request for an unloaded reader waits for a busy one to go idle.
#[tokio::test]
async fn busy_and_pinned_readers_stay_loaded() {
    // The default model streams long enough to be busy while readers come and go. Its
    // footprint is measured first, so that the budget holds it and one tiny reader.
    let smol = &[
        "--device",
        "cpu",
        "--kv-cache-memory-mib",
        "32",
        "--max-sequence-length",
        "1024",
    ];
    let probe = Server::start(smol).await;
    let big = readers(&probe).await[0]["memory_bytes"].as_u64().unwrap();
    drop(probe);
    let budget = ((big >> 20) + 7).to_string();
    let root = fixtures().join("models").display().to_string();
    let mut args = smol.to_vec();
    args.extend(["--models-memory-mib", &budget, "--model-root", &root]);
    let s = Server::start(&args).await;
    let smol_id = first_reader(&s).await;

    // A long stream on the default model (read slowly), then the tiny reader used after it.
    let stream = reqwest::Client::new()
        .post(format!("{}/generate_stream", s.base))
        .json(
            &json!({"text": "Tell me a long story.", "max_new_tokens": 400, "min_new_tokens": 400,
                     "return_metadata": true}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    let a = add(&s, tiny("tiny-llama2-f32", "a")).await;
    wait_state(&s, &a, "ready").await;
    greedy(&s, "a", 2).await;
    assert!(reader(&s, &smol_id).await["in_flight"].as_u64().unwrap() > 0);

    // Room for b: the idle a goes, not the busy default model (used less recently).
    let b = add(
        &s,
        tiny("tiny-gqa2-f16", "b").tap(|v| v["pinned"] = json!(true)),
    )
    .await;
    wait_state(&s, &b, "ready").await;
    assert_eq!(reader(&s, &a).await["state"], "unloaded");
    assert_eq!(reader(&s, &smol_id).await["state"], "ready");
    assert_eq!(reader(&s, &b).await["pinned"], true);

    // Every reader busy or pinned: the load is refused, naming the budget and the readers.
    let (code, v) = mgmt(
        &s,
        reqwest::Method::POST,
        "/reader",
        Some(tiny("tiny-llama3-bf16", "c")),
    )
    .await;
    assert_eq!(code, 503, "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains(&format!("{budget} MiB"))
            && msg.contains("pinned")
            && msg.contains("in flight"),
        "{msg}"
    );
    // A request for the unloaded a waits until the default model is idle (its stream done),
    // which is then unloaded for a.
    let (code, v) = s
        .post(
            "/generate",
            json!({"text": "x", "consumer_group": "a", "max_new_tokens": 2}),
        )
        .await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(reader(&s, &smol_id).await["state"], "unloaded");
    assert_eq!(reader(&s, &a).await["state"], "ready");
    // The stream ran to its end first.
    let body = stream.text().await.unwrap();
    assert!(body.contains("\"generated_tokens\":400"), "{body}");
}

/// Several readers in one consumer group share its traffic (the one with the fewest
/// requests gets the next), and deleting one while requests run drops none of them.
#[tokio::test]
async fn a_consumer_group_scales_with_its_readers() {
    let (s, first) = tiny_server(&["--max-sequence-length", "256"]).await;
    let second = add(
        &s,
        tiny("tiny-llama2-f32", "primary").tap(|v| v["max_sequence_length"] = json!(256)),
    )
    .await;
    wait_state(&s, &second, "ready").await;
    let run = |n: usize| {
        let base = s.base.clone();
        async move {
            let client = reqwest::Client::new();
            let jobs = (0..n).map(|i| {
                let (client, base) = (client.clone(), base.clone());
                async move {
                    let r = client
                        .post(format!("{base}/generate"))
                        .json(
                            &json!({"text": format!("request {i}"), "max_new_tokens": 200,
                                      "min_new_tokens": 200, "return_metadata": true}),
                        )
                        .send()
                        .await
                        .unwrap();
                    let status = r.status().as_u16();
                    (status, r.json::<Value>().await.unwrap())
                }
            });
            futures::future::join_all(jobs).await
        }
    };
    for (status, v) in run(16).await {
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["metadata"]["generated_tokens"], 200, "{v}");
    }
    let (x, y) = (
        metric_of(&s, "liftoff_reader_requests_total", &first).await,
        metric_of(&s, "liftoff_reader_requests_total", &second).await,
    );
    assert_eq!(x + y, 16.0);
    assert!(x >= 4.0 && y >= 4.0, "both readers served: {x} and {y}");

    // Delete one while a second wave runs: every request still completes.
    let wave = tokio::spawn(run(64));
    let t = Instant::now();
    while reader(&s, &second).await["in_flight"].as_u64().unwrap() == 0 {
        assert!(t.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (code, _) = mgmt(
        &s,
        reqwest::Method::DELETE,
        &format!("/reader/{second}"),
        None,
    )
    .await;
    assert_eq!(code, 204);
    for (status, v) in wave.await.unwrap() {
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["metadata"]["generated_tokens"], 200, "{v}");
    }
    assert_eq!(readers(&s).await.len(), 1);
}

/// A deleted reader's requests may run on for the drain timeout; then they end with a 503
/// error event, and the reader's workers are gone.
#[tokio::test]
async fn deleting_a_busy_reader_drains_then_stops_it() {
    let s = Server::start(&[
        "--device",
        "cpu",
        "--kv-cache-memory-mib",
        "32",
        "--isolate-workers",
        "--drain-timeout-secs",
        "1",
    ])
    .await;
    let r = readers(&s).await.remove(0);
    let id = r["reader_id"].as_str().unwrap().to_string();
    let pid = r["pids"][0].as_u64().unwrap();
    assert_ne!(pid, s.child.id() as u64, "a worker process");
    let stream = reqwest::Client::new()
        .post(format!("{}/generate_stream", s.base))
        .json(
            &json!({"text": "Tell me a long story.", "max_new_tokens": 900, "min_new_tokens": 900}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    let t = Instant::now();
    let (code, _) = mgmt(&s, reqwest::Method::DELETE, &format!("/reader/{id}"), None).await;
    assert_eq!(code, 204);
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t.elapsed()
    );
    let body = stream.text().await.unwrap();
    assert!(
        body.contains("event: error") && body.contains("503"),
        "{body}"
    );
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/status"))
                .is_ok_and(|st| st.contains("State:\tZ")),
        "the worker exited"
    );
}

/// `Value::tap`: edits a JSON value in place and returns it.
trait Tap {
    fn tap(self, f: impl FnOnce(&mut Self)) -> Self;
}

impl Tap for Value {
    fn tap(mut self, f: impl FnOnce(&mut Self)) -> Self {
        f(&mut self);
        self
    }
}
