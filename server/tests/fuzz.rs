//! Bad input cannot break the server: generated and mutated requests (wrong types, huge,
//! negative and out-of-range numbers, deep nesting, invalid UTF-8, long strings, unknown and
//! duplicate fields, empty bodies, wrong content types) go to every route of the in-process
//! routers, over a real scheduler whose model is a stand-in that answers at once. Never a 5xx,
//! never a panic, every error JSON with a message (OpenAI's shape, or TGI's for a TGI body).

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use liftoff_engine::batch::BatchInput;
use liftoff_engine::sampling::{RowSampling, SampledToken};
use liftoff_engine::scheduler::{Executor, Scheduler, SchedulerConfig, SchedulerHandle};
use liftoff_engine::tokenizer::Tokenizer;
use liftoff_server::{AppState, ModelInfo, ModelService, ServerOptions};
use proptest::prelude::*;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tower::ServiceExt;

/// A model that answers every step at once with token 42 (and made-up log-probabilities); a
/// constrained row gets its highest allowed token instead and a forced row its forced token,
/// as a sampler must.
struct Instant;

impl Executor for Instant {
    fn execute(
        &mut self,
        _: &BatchInput,
        sampling: &[RowSampling],
        masks: liftoff_engine::model_runner::MaskWait,
    ) -> liftoff_engine::Result<Vec<SampledToken>> {
        let masks = masks.map_or(Ok(Vec::new()), |wait| wait())?;
        Ok(sampling
            .iter()
            .enumerate()
            .map(|(r, s)| SampledToken {
                token: s.force.unwrap_or_else(|| {
                    masks.iter().find(|m| m.0 == r).map_or(42, |(_, words)| {
                        (0..words.len() * 32)
                            .rev()
                            .find(|&t| liftoff_engine::sampling::mask_allows(words, t))
                            .unwrap_or(0) as u32
                    })
                }),
                top_logprobs: (0..s.logprobs).map(|i| (i, -(i as f32) - 0.5)).collect(),
                logprob: s.token_logprob.then_some(-0.25),
            })
            .collect())
    }
    fn kv_blocks(&self) -> (usize, usize) {
        (512, 16)
    }
}

fn routers() -> (axum::Router, axum::Router) {
    let dir =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models/tiny-llama2-f32");
    let tokenizer = Tokenizer::from_hf_dir(&dir, vec![2]).expect("fixture tokenizer");
    let config = SchedulerConfig {
        max_seq_len: 256,
        ..SchedulerConfig::default()
    };
    let scheduler = Scheduler::new(config, Instant, tokenizer.clone());
    let handle = SchedulerHandle::spawn(scheduler, "fuzz-scheduler").unwrap();
    let info = ModelInfo {
        model_name: "fuzz".into(),
        model_path: dir.display().to_string(),
        consumer_group: "primary".into(),
        dtype: "f32".into(),
        device: "cpu".into(),
        tensor_parallel: 1,
        replicas: 1,
        max_batch_size: 16,
        max_sequence_length: 256,
        max_num_batched_tokens: 512,
        kv_cache_blocks: 512,
        block_size: 16,
        workers: Vec::new(),
    };
    let service = ModelService {
        info,
        tokenizer,
        replicas: vec![handle],
    };
    let options = ServerOptions {
        body_size_limit_bytes: 64 * 1024,
        ..ServerOptions::default()
    };
    let state = Arc::new(AppState::with_options(vec![Arc::new(service)], options).unwrap());
    (
        liftoff_server::inference_router(state.clone()),
        liftoff_server::management_router(state),
    )
}

const ROUTES: &[(&str, &str)] = &[
    ("POST", "/generate"),
    ("POST", "/generate_stream"),
    ("POST", "/tokenize/fuzz"),
    ("POST", "/detokenize/primary"),
    ("POST", "/chat_template/fuzz"),
    ("POST", "/tokenize/nobody"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/chat/completions"),
    ("GET", "/v1/models"),
    ("GET", "/health"),
    ("GET", "/info"),
    ("GET", "/metrics"),
    ("POST", "/no/such/route"),
    ("GET", "/reader_groups"),
    ("POST", "/reader"),
    ("DELETE", "/reader/nobody"),
    ("GET", "/config/fuzz"),
    ("GET", "/config/nobody"),
    ("GET", "/status"),
];

/// Field names the routes know, and some they do not.
const FIELDS: &[&str] = &[
    "text",
    "prompt",
    "messages",
    "role",
    "content",
    "max_tokens",
    "max_new_tokens",
    "min_new_tokens",
    "min_tokens",
    "temperature",
    "sampling_temperature",
    "top_p",
    "sampling_topp",
    "top_k",
    "sampling_topk",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "include_usage",
    "n",
    "logprobs",
    "top_logprobs",
    "repetition_penalty",
    "no_repeat_ngram_size",
    "consumer_group",
    "model",
    "use_chat_template",
    "tokens",
    "skip_special_tokens",
    "inputs",
    "add_generation_prompt",
    "ignore_eos",
    "json_schema",
    "regex_string",
    "prompt_max_tokens",
    "return_metadata",
    "bogus",
    "",
];

/// Valid bodies to mutate, per route.
fn template(path: &str) -> Value {
    match path {
        "/generate" | "/generate_stream" => json!({"text": "hello there", "max_new_tokens": 3}),
        p if p.starts_with("/tokenize") => json!({"text": "hello"}),
        p if p.starts_with("/detokenize") => json!({"tokens": [1, 2, 3]}),
        p if p.starts_with("/chat_template") => {
            json!({"inputs": [{"role": "user", "content": "hi"}], "add_generation_prompt": true})
        }
        "/reader" => json!({"model_name": "fuzz", "device": "cpu", "consumer_group": "x"}),
        "/v1/chat/completions" => {
            json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        }
        _ => json!({"prompt": "hello", "max_tokens": 3}),
    }
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-1e6f64..1e6).prop_map(|x| json!(x)),
        Just(json!(1e308)),
        Just(json!(-1e308)),
        Just(json!(-1)),
        Just(json!(0)),
        Just(json!(2)),
        Just(json!(1u64 << 63)),
        ".{0,24}".prop_map(Value::from),
        Just(Value::from("\u{0}\u{7f}\u{ffff}\u{10ffff}")),
        (0usize..5000).prop_map(|n| Value::from("é".repeat(n))),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(4, 24, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::vec((prop::sample::select(FIELDS), inner), 0..5).prop_map(|kv| {
                Value::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
            }),
        ]
    })
}

/// How one generated request's body is made.
#[derive(Debug, Clone)]
enum Body_ {
    /// The route's valid body with fields replaced, added and removed.
    Mutated(Vec<(&'static str, Option<Value>)>),
    /// Any JSON value.
    Any(Value),
    /// Raw bytes (invalid UTF-8 and the like).
    Bytes(Vec<u8>),
    /// The valid body cut short.
    Truncated(usize),
    /// Nesting far deeper than any parser allows.
    Deep(usize),
    /// A field given twice.
    Duplicate(&'static str),
    Empty,
}

fn body() -> impl Strategy<Value = Body_> {
    prop_oneof![
        4 => prop::collection::vec(
            (prop::sample::select(FIELDS), prop::option::weighted(0.85, value())),
            1..4
        )
        .prop_map(Body_::Mutated),
        2 => value().prop_map(Body_::Any),
        1 => prop::collection::vec(any::<u8>(), 0..200).prop_map(Body_::Bytes),
        1 => (0usize..60).prop_map(Body_::Truncated),
        1 => (100usize..100_000).prop_map(Body_::Deep),
        1 => prop::sample::select(FIELDS).prop_map(Body_::Duplicate),
        1 => Just(Body_::Empty),
    ]
}

fn render(path: &str, b: &Body_) -> Vec<u8> {
    let t = template(path);
    match b {
        Body_::Mutated(changes) => {
            let mut v = t;
            for (k, change) in changes {
                match change {
                    Some(x) => v[*k] = x.clone(),
                    None => {
                        v.as_object_mut().unwrap().remove(*k);
                    }
                }
            }
            serde_json::to_vec(&v).unwrap()
        }
        Body_::Any(v) => serde_json::to_vec(v).unwrap(),
        Body_::Bytes(b) => b.clone(),
        Body_::Truncated(n) => {
            let s = serde_json::to_vec(&t).unwrap();
            s[..(*n).min(s.len().saturating_sub(1))].to_vec()
        }
        Body_::Deep(n) => format!("{}{}", "[".repeat(*n), "]".repeat(*n)).into_bytes(),
        Body_::Duplicate(k) => {
            let s = serde_json::to_string(&t).unwrap();
            format!("{{\"{k}\": 1, {}", &s[1..]).into_bytes()
        }
        Body_::Empty => Vec::new(),
    }
}

const CONTENT_TYPES: &[Option<&str>] = &[
    Some("application/json"),
    Some("application/json"),
    Some("application/json"),
    Some("text/plain"),
    None,
];

static CASES: AtomicUsize = AtomicUsize::new(0);
/// Answers by class: 2xx, 4xx (a check that everything is refused would prove little).
static OK: AtomicUsize = AtomicUsize::new(0);
static REFUSED: AtomicUsize = AtomicUsize::new(0);

#[test]
fn generated_requests_never_get_a_5xx_or_a_panic() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (inference, management) = routers();
    let cases: u32 = std::env::var("LIFTOFF_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let config = ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    proptest!(config, |(route in prop::sample::select(ROUTES), b in body(),
                        ct in prop::sample::select(CONTENT_TYPES), mgmt in prop::bool::weighted(0.1))| {
        let (method, path) = route;
        let bytes = render(path, &b);
        let mut req = Request::builder().method(Method::from_bytes(method.as_bytes()).unwrap()).uri(path);
        if let Some(ct) = ct {
            req = req.header(header::CONTENT_TYPE, ct);
        }
        let req = req.body(Body::from(bytes.clone())).unwrap();
        let router = if mgmt { management.clone() } else { inference.clone() };
        let (status, ctype, body) = rt.block_on(async move {
            let resp = tokio::time::timeout(std::time::Duration::from_secs(20), router.oneshot(req))
                .await
                .expect("no answer within 20 s")
                .unwrap();
            let status = resp.status();
            let ctype = resp.headers().get(header::CONTENT_TYPE).map(|v| v.to_str().unwrap_or("").to_string());
            let body = tokio::time::timeout(
                std::time::Duration::from_secs(20),
                axum::body::to_bytes(resp.into_body(), 64 << 20),
            )
            .await
            .expect("the body did not end within 20 s")
            .expect("the body broke off");
            (status, ctype, body)
        });
        CASES.fetch_add(1, Ordering::Relaxed);
        if status.is_success() {
            OK.fetch_add(1, Ordering::Relaxed);
        } else if status.is_client_error() {
            REFUSED.fetch_add(1, Ordering::Relaxed);
        }
        let shown = String::from_utf8_lossy(&bytes[..bytes.len().min(300)]).to_string();
        prop_assert!(!status.is_server_error(), "{method} {path} {shown:?} -> {status}: {}", String::from_utf8_lossy(&body));
        if status.is_client_error() {
            let v: Value = serde_json::from_slice(&body)
                .map_err(|e| TestCaseError::fail(format!("{status} not JSON ({e}): {:?}", String::from_utf8_lossy(&body))))?;
            if v["error"].is_string() {
                // TGI's shape, for a TGI body (`inputs`) on a route that takes one.
                prop_assert!(["/", "/generate", "/generate_stream"].contains(&path), "{path}: {v}");
                prop_assert!(v["error"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
                prop_assert!(["validation", "overloaded", "generation"].contains(&v["error_type"].as_str().unwrap_or("")), "{v}");
            } else {
                prop_assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
                prop_assert_eq!(v["error"]["code"].as_u64(), Some(status.as_u16() as u64));
            }
        } else if status == StatusCode::OK && ctype.as_deref().is_some_and(|c| c.contains("text/event-stream")) {
            // A stream runs to its end (with an error event, at worst) and is well-formed SSE.
            // It may hold no event at all: a generation whose output is empty (a constraint such
            // as `regex_string: ""` that only the empty string matches, a stop string at the
            // start, an end-of-sequence token first) has no text to send.
            let text = String::from_utf8_lossy(&body).to_string();
            for line in text.lines() {
                prop_assert!(
                    line.is_empty() || line.starts_with(':') || line.starts_with("data:") || line.starts_with("event:"),
                    "not an SSE line: {line:?} in {text:?}"
                );
            }
            prop_assert!(text.is_empty() || text.ends_with("\n\n"), "an event cut short: {text:?}");
        }
    });
    let (n, ok, refused) = (
        CASES.load(Ordering::Relaxed),
        OK.load(Ordering::Relaxed),
        REFUSED.load(Ordering::Relaxed),
    );
    eprintln!("{n} requests: {ok} answered 2xx, {refused} refused with a 4xx");
    assert!(n >= cases as usize);
    // Both kinds of answer must be common, or the generator is not reaching the handlers.
    assert!(
        ok >= n / 20 && refused >= n / 4,
        "{ok} ok, {refused} refused of {n}"
    );
}
