//! Soak: many requests at high concurrency against one server, streaming and not, with random
//! prompt and output lengths, clients that hang up mid-stream and bad requests mixed in.
//! Afterwards nothing may be left running or holding KV blocks, and resident memory must
//! not keep growing. CI runs 2,000 requests (`LIFTOFF_SOAK_REQUESTS` changes it;
//! `benches/soak.sh` runs 10,000 and writes `docs/reliability.md`).

mod common;

use common::Server;
use futures::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const CONCURRENCY: usize = 32;

/// What one client does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Whole,
    Stream,
    HangUp,
    Bad,
}

const WORDS: &[&str] = &[
    "river", "stone", "quiet", "yellow", "seven", "garden", "north", "paper", "window", "bright",
    "music", "silver", "ocean", "winter", "orange", "candle",
];

/// A request that must get a 4xx (never a 5xx, never a dropped connection).
fn bad_request(i: u64) -> (&'static str, String) {
    match i % 8 {
        0 => (
            "/v1/completions",
            r#"{"prompt": 5, "max_tokens": 3}"#.into(),
        ),
        1 => (
            "/v1/completions",
            r#"{"prompt": "hi", "max_tokens": -1}"#.into(),
        ),
        2 => (
            "/v1/completions",
            r#"{"prompt": "hi", "temperature": "hot"}"#.into(),
        ),
        3 => ("/generate", r#"{"text": "hi", "sampling_topp": 7}"#.into()),
        4 => ("/generate", r#"{"text": "hi""#.into()),
        5 => ("/v1/chat/completions", r#"{"messages": []}"#.into()),
        6 => (
            "/v1/completions",
            r#"{"prompt": "hi", "max_tokens": 100000000}"#.into(),
        ),
        _ => ("/generate", "not json at all".into()),
    }
}

/// Resident memory of `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

async fn one(client: &reqwest::Client, base: &str, i: u64) -> (Kind, u16) {
    // Each client's choices, reproducible from its number.
    let mut rng = StdRng::seed_from_u64(i);
    let kind = match rng.random_range(0..10) {
        0 => Kind::Bad,
        1..=3 => Kind::HangUp,
        4..=6 => Kind::Stream,
        _ => Kind::Whole,
    };
    if kind == Kind::Bad {
        let (path, body) = bad_request(rng.random());
        let r = client
            .post(format!("{base}{path}"))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("a bad request lost its connection");
        let status = r.status().as_u16();
        let v: Value = r.json().await.expect("a 4xx must be JSON");
        assert!((400..500).contains(&status), "{status}: {v}");
        assert!(v["error"]["message"].is_string(), "{v}");
        return (kind, status);
    }
    let words = rng.random_range(1..=40);
    let prompt: Vec<&str> = (0..words)
        .map(|_| WORDS[rng.random_range(0..WORDS.len())])
        .collect();
    let max_tokens: u64 = rng.random_range(1..=24);
    let stream = kind != Kind::Whole;
    let r = client
        .post(format!("{base}/v1/completions"))
        .json(
            &json!({"prompt": prompt.join(" "), "max_tokens": max_tokens,
                      "temperature": 0.8, "seed": i, "stream": stream}),
        )
        .send()
        .await
        .expect("request failed");
    let status = r.status().as_u16();
    assert_eq!(status, 200, "{kind:?}");
    match kind {
        Kind::Whole => {
            let v: Value = r.json().await.unwrap();
            let n = v["usage"]["completion_tokens"].as_u64().unwrap();
            assert!(n >= 1 && n <= max_tokens, "{v}");
        }
        Kind::Stream => {
            let body = r.bytes().await.unwrap();
            let text = String::from_utf8_lossy(&body);
            assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
        }
        _ => {
            // Hang up after a few chunks (or at once).
            let mut chunks = r.bytes_stream();
            for _ in 0..rng.random_range(0..4) {
                if chunks.next().await.is_none() {
                    break;
                }
            }
        }
    }
    (kind, status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn soak() {
    let n: u64 = std::env::var("LIFTOFF_SOAK_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let s = Server::start(&["--max-batch-size", "32"]).await;
    let pid = s.child.id();
    let base = s.base.clone();
    let client = reqwest::Client::new();
    // Memory is compared from the point where the server has warmed up.
    let baseline_at = (n / 2).min(2000) as usize;
    let done = Arc::new(AtomicUsize::new(0));
    let baseline = Arc::new(Mutex::new(None));
    let counts = Arc::new(Mutex::new(BTreeMap::<(Kind, u16), usize>::new()));
    let start = Instant::now();
    futures::stream::iter(0..n)
        .for_each_concurrent(CONCURRENCY, |i| {
            let (client, base, done, baseline, counts) = (
                client.clone(),
                base.clone(),
                done.clone(),
                baseline.clone(),
                counts.clone(),
            );
            async move {
                let key = one(&client, &base, i).await;
                *counts.lock().unwrap().entry(key).or_default() += 1;
                if done.fetch_add(1, Ordering::SeqCst) + 1 == baseline_at {
                    *baseline.lock().unwrap() = Some(rss_kib(pid));
                }
            }
        })
        .await;
    let elapsed = start.elapsed();
    // Hung-up streams are noticed at their next token: give them a moment.
    let t0 = Instant::now();
    let (running, waiting, used) = loop {
        let running = s.metric("liftoff_num_requests_running").await;
        let waiting = s.metric("liftoff_num_requests_waiting").await;
        let used = s.metric("liftoff_kv_cache_used_blocks").await;
        if (running, waiting, used) == (0.0, 0.0, 0.0) || t0.elapsed() > Duration::from_secs(30) {
            break (running, waiting, used);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let before = baseline.lock().unwrap().expect("baseline taken");
    let after = rss_kib(pid);
    let growth = after as f64 / before as f64 - 1.0;
    let counts = counts.lock().unwrap().clone();
    let by: Vec<Value> = counts
        .iter()
        .map(|((k, st), c)| json!({"kind": format!("{k:?}"), "status": st, "count": c}))
        .collect();
    let report = json!({
        "requests": n, "concurrency": CONCURRENCY, "seconds": elapsed.as_secs_f64(),
        "outcomes": by, "running_after": running, "waiting_after": waiting,
        "kv_blocks_used_after": used,
        "kv_blocks_cached_after": s.metric("liftoff_kv_cache_cached_blocks").await,
        "cancelled": s.metric("liftoff_cancelled_requests_total").await,
        "rss_kib_at_baseline": before, "baseline_after_requests": baseline_at,
        "rss_kib_after": after, "rss_growth": growth,
    });
    println!("SOAK {report}");
    assert_eq!(counts.values().sum::<usize>() as u64, n);
    assert_eq!((running, waiting, used), (0.0, 0.0, 0.0), "{report}");
    assert!(
        growth < 0.10,
        "resident memory grew {:.1} %: {report}",
        growth * 100.0
    );
}
