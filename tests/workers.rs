//! End-to-end tests of the launcher's worker processes: tensor-parallel groups on CPU (one
//! process per rank), replica groups behind one endpoint, a worker killed mid-run, clean
//! shutdown, env-only and manifest configuration, and configuration errors.

mod common;

use common::{assert_one_line_error, fixtures, free_port, liftoff, Server};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

fn fixture(name: &str) -> String {
    fixtures()
        .join("models")
        .join(name)
        .canonicalize()
        .unwrap()
        .display()
        .to_string()
}

/// Pids of the processes whose parent is `pid`.
fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may hold spaces, so read after the last ')'.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let ppid: u32 = rest.split(' ').nth(1).unwrap().parse().unwrap();
        if ppid == pid {
            out.push(p);
        }
    }
    out.sort_unstable();
    out
}

fn is_running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s[s.rfind(')').unwrap() + 2..].starts_with('Z'))
        .unwrap_or(false)
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} {pid}");
}

fn generate_json(model: &str, tp: usize, extra: &[&str]) -> Value {
    let tp = tp.to_string();
    let mut args = vec![
        "generate",
        "--model",
        model,
        "--prompt",
        "The capital of France is",
        "--max-new-tokens",
        "12",
        "--temperature",
        "0",
        "--ignore-eos",
        "--format",
        "json",
        "--logprobs",
        "3",
        "--tensor-parallel",
        &tp,
    ];
    args.extend(extra);
    let out = liftoff(&args);
    assert!(
        out.status.success(),
        "TP={tp}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Same tokens and text; log-probabilities within `tol`.
fn assert_same_generation(a: &Value, b: &Value, tol: f64, what: &str) {
    assert_eq!(a["token_ids"], b["token_ids"], "{what}: tokens");
    assert_eq!(a["text"], b["text"], "{what}: text");
    let (la, lb) = (
        a["top_logprobs"].as_array().unwrap(),
        b["top_logprobs"].as_array().unwrap(),
    );
    assert_eq!(la.len(), lb.len());
    let mut worst = 0f64;
    for (ra, rb) in la.iter().zip(lb) {
        for (x, y) in ra.as_array().unwrap().iter().zip(rb.as_array().unwrap()) {
            assert_eq!(x[0], y[0], "{what}: top-k ids");
            worst = worst.max((x[1].as_f64().unwrap() - y[1].as_f64().unwrap()).abs());
        }
    }
    eprintln!("{what}: max |logprob diff| {worst:e}");
    assert!(worst <= tol, "{what}: logprobs differ by {worst} > {tol}");
}

#[test]
fn generate_with_tensor_parallel_prints_the_same_json() {
    // f32 sharding only reorders additions: ~1e-6 here; 1e-4 leaves room.
    let gqa = fixture("tiny-gqa2-f16");
    let one = generate_json(&gqa, 1, &[]);
    for tp in [2, 4] {
        let many = generate_json(&gqa, tp, &[]);
        assert_same_generation(&one, &many, 1e-4, &format!("tiny-gqa2 TP={tp}"));
    }
}

#[test]
fn smollm2_generates_the_same_at_tp_3() {
    // SmolLM2 (9 heads, 3 KV heads) dequantized to f32: the reordering over 30 layers stays
    // ~1e-5 (engine/tests/tensor_parallel.rs); 1e-3 on log-probabilities.
    let model =
        std::env::var("LIFTOFF_DEFAULT_MODEL").unwrap_or_else(|_| "SmolLM2-135M-Instruct".into());
    let one = generate_json(&model, 1, &["--dtype", "f32"]);
    let three = generate_json(&model, 3, &["--dtype", "f32"]);
    assert_same_generation(&one, &three, 1e-3, "SmolLM2 TP=3");
}

#[test]
fn configuration_errors_are_one_line_with_the_numbers() {
    let model = fixture("tiny-llama2-f32");
    let cases: &[(&[&str], &str)] = &[
        (
            &["serve", "--model", &model, "--tensor-parallel", "3"],
            "tensor parallel size 3 does not divide the 8 attention heads",
        ),
        (
            &["serve", "--model", &model, "--device", "tpu"],
            "unknown device 'tpu' (cpu, cuda, auto)",
        ),
        (
            &["serve", "--model", &model, "--max-step-ms", "fast"],
            "--max-step-ms must be `auto`, `off` or a positive number of milliseconds, not `fast`",
        ),
        (
            &["serve", "--model", &model, "--step-timeout-secs", "0"],
            "--step-timeout-secs must be at least 1, got 0",
        ),
        (
            &["serve", "--model", &model, "--api-key", " , "],
            "--api-key was given but holds no key",
        ),
        (
            &[
                "generate",
                "--model",
                &model,
                "--prompt",
                "x",
                "--tensor-parallel",
                "0",
            ],
            "tensor parallel size must be at least 1",
        ),
    ];
    for (args, needle) in cases {
        assert_one_line_error(&liftoff(args), needle);
    }
    if !cfg!(feature = "cuda") {
        let out = liftoff(&["serve", "--model", &model, "--device", "cuda"]);
        assert_one_line_error(&out, "needs a liftoff built with --features cuda");
    }
}

/// `(replica label, value)` of each sample of metric `name`.
async fn per_replica(s: &Server, name: &str) -> Vec<(String, f64)> {
    s.metrics_text()
        .await
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .map(|l| {
            let replica = l
                .split("replica=\"")
                .nth(1)
                .unwrap()
                .split('"')
                .next()
                .unwrap();
            let v = l.rsplit(' ').next().unwrap().parse().unwrap();
            (replica.to_string(), v)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replica_groups_spread_load_and_survive_a_dead_worker() {
    let model = fixture("tiny-llama2-f32");
    let s = Server::start(&[
        "--model",
        &model,
        "--tensor-parallel",
        "2",
        "--replicas",
        "2",
        "--max-batch-size",
        "4",
        "--kv-cache-memory-mib",
        "16",
    ])
    .await;
    let launcher = s.child.id();

    // One process per rank: 2 groups x 2 ranks, the same pids /info reports.
    let children = children_of(launcher);
    let info: Value = s.info().await;
    let workers = info["models"][0]["workers"].as_array().unwrap().clone();
    let mut pids: Vec<u32> = workers
        .iter()
        .map(|w| w["pid"].as_u64().unwrap() as u32)
        .collect();
    pids.sort_unstable();
    assert_eq!(children.len(), 4, "children {children:?}");
    assert_eq!(children, pids);

    // Load spreads over both groups.
    let load = (0..16).map(|i| {
        s.post(
            "/generate",
            json!({"text": format!("request {i}"), "max_new_tokens": 16, "min_new_tokens": 16}),
        )
    });
    for (status, body) in futures::future::join_all(load).await {
        assert_eq!(status, 200, "{body}");
    }
    let routed = per_replica(&s, "liftoff_replica_requests_total").await;
    assert_eq!(routed.len(), 2, "{routed:?}");
    assert!(routed.iter().all(|(_, n)| *n >= 4.0), "{routed:?}");

    // A long queue on both groups; then rank 1 of group 0 dies.
    let client = reqwest::Client::new();
    let long: Vec<_> = (0..48)
        .map(|i| {
            let c = client.clone();
            let url = format!("{}/generate", s.base);
            tokio::spawn(async move {
                let r = c
                    .post(url)
                    .json(&json!({"text": format!("long {i}"), "max_new_tokens": 200, "min_new_tokens": 200}))
                    .send()
                    .await
                    .unwrap();
                let status = r.status().as_u16();
                (status, r.json::<Value>().await.unwrap_or(Value::Null))
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let victim = workers
        .iter()
        .find(|w| w["group"] == 0 && w["rank"] == 1)
        .unwrap()["pid"]
        .as_u64()
        .unwrap();
    signal(victim as u32, "-KILL");

    // Nothing hangs: every request ends, served (200) or refused with a clear 503.
    let t0 = Instant::now();
    let (mut ok, mut refused) = (0, 0);
    for h in long {
        let (status, body) = tokio::time::timeout(Duration::from_secs(60), h)
            .await
            .expect("a request hung after the worker died")
            .unwrap();
        match status {
            200 => ok += 1,
            503 => {
                refused += 1;
                let msg = body["error"]["message"].as_str().unwrap_or_default();
                assert!(msg.contains("replica group"), "{body}");
            }
            other => panic!("status {other}: {body}"),
        }
    }
    eprintln!(
        "after the kill: {ok} served, {refused} refused in {:?}",
        t0.elapsed()
    );
    assert!(refused >= 1, "group 0 had queued work when its worker died");
    assert!(ok >= 1, "group 1 kept serving");

    // The group is reported down (as its scheduler stops, just after the 503s went out); the
    // other serves everything new.
    let t1 = Instant::now();
    loop {
        let health = reqwest::get(format!("{}/health", s.mgmt)).await.unwrap();
        assert_eq!(health.status(), 200);
        let health: Value = health.json().await.unwrap();
        if health["models"][0]["replicas_healthy"] == json!([false, true]) {
            assert_eq!(health["status"], "degraded");
            break;
        }
        assert!(t1.elapsed() < Duration::from_secs(5), "{health}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let healthy = per_replica(&s, "liftoff_replica_healthy").await;
    assert!(healthy.contains(&("0".into(), 0.0)) && healthy.contains(&("1".into(), 1.0)));
    for i in 0..4 {
        let (status, body) = s
            .post(
                "/generate",
                json!({"text": format!("after {i}"), "max_new_tokens": 4}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }
    // Group 0's other rank was stopped too.
    let left = children_of(launcher);
    assert_eq!(left.len(), 2, "{left:?}");

    // SIGTERM: the launcher drains, stops its workers and exits cleanly.
    let mut s = s;
    signal(launcher, "-TERM");
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = s.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the launcher did not stop"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
    for p in pids {
        assert!(!is_running(p), "worker {p} outlived the launcher");
    }
}

#[tokio::test]
async fn env_only_configuration_through_the_docker_entrypoint() {
    let (port, mport) = (free_port(), free_port());
    let mut cmd = Command::new("sh");
    cmd.arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/docker-entrypoint.sh"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("LIFTOFF_BIN", env!("CARGO_BIN_EXE_liftoff"))
        .env("TAKEOFF_MODEL_NAME", fixture("tiny-gqa2-f16"))
        .env("TAKEOFF_DEVICE", "cpu")
        .env("TAKEOFF_TENSOR_PARALLEL", "2")
        .env("TAKEOFF_MAX_BATCH_SIZE", "3")
        .env("TAKEOFF_MAX_SEQUENCE_LENGTH", "128")
        .env("TAKEOFF_CONSUMER_GROUP", "docker")
        .env("TAKEOFF_HOST", "127.0.0.1")
        .env("TAKEOFF_PORT", port.to_string())
        .env("TAKEOFF_MANAGEMENT_PORT", mport.to_string())
        .env("TAKEOFF_PAGE_CACHE_SIZE", "8")
        .env("TAKEOFF_LOG_LEVEL", "warn")
        .env("HF_TOKEN", "hf_not_a_real_token");
    let s = Server::spawn(cmd, port, mport).await;
    let info: Value = s.info().await;
    let m = &info["models"][0];
    assert_eq!(m["tensor_parallel"], 2);
    assert_eq!(m["consumer_group"], "docker");
    assert_eq!(m["max_batch_size"], 3);
    assert_eq!(m["max_sequence_length"], 128);
    assert_eq!(m["workers"].as_array().unwrap().len(), 2);
    // exec: the entrypoint's process is the launcher, the workers its children.
    assert_eq!(children_of(s.child.id()).len(), 2);
    let r = reqwest::Client::new()
        .post(format!("{}/generate_stream", s.base))
        .json(&json!({"text": "hello", "max_new_tokens": 4, "consumer_group": "docker"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("data:"));
}

#[tokio::test]
async fn a_manifest_serves_two_readers_side_by_side() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("config.yaml");
    std::fs::write(
        &manifest,
        format!(
            "takeoff:\n  server_config:\n    max_num_batched_tokens: 64\n  readers_config:\n    llama:\n      model_name: {}\n      consumer_group: small\n    gqa:\n      model_name: {}\n      consumer_group: sharded\n      tensor_parallel: 2\n      kv_cache_memory_mib: 8\n",
            fixture("tiny-llama2-f32"),
            fixture("tiny-gqa2-f16")
        ),
    )
    .unwrap();
    let s = Server::start(&["--config-file", manifest.to_str().unwrap()]).await;
    let info: Value = s.info().await;
    let models = info["models"].as_array().unwrap();
    assert_eq!(models.len(), 2, "{info}");
    let sharded = models
        .iter()
        .find(|m| m["consumer_group"] == "sharded")
        .unwrap();
    assert_eq!(sharded["tensor_parallel"], 2);
    assert_eq!(sharded["max_num_batched_tokens"], 64, "from server_config");
    for group in ["small", "sharded"] {
        let (status, body) = s
            .post(
                "/generate",
                json!({"text": "hi", "max_new_tokens": 3, "consumer_group": group}),
            )
            .await;
        assert_eq!(status, 200, "{group}: {body}");
    }
}

/// A worker that stops answering (SIGSTOP) is caught by the step deadline
/// (`--step-timeout-secs`): its group is marked down and its requests get 503 within the
/// deadline, the other group keeps serving, and SIGTERM still leaves no process behind (the
/// stopped worker is killed).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hung_worker_is_detected_by_the_step_deadline() {
    let model = fixture("tiny-llama2-f32");
    let s = Server::start(&[
        "--model",
        &model,
        "--isolate-workers",
        "--replicas",
        "2",
        "--step-timeout-secs",
        "2",
        "--kv-cache-memory-mib",
        "16",
    ])
    .await;
    let launcher = s.child.id();
    let info: Value = s.info().await;
    let workers = info["models"][0]["workers"].as_array().unwrap().clone();
    let pid_of = |g: u64| {
        workers.iter().find(|w| w["group"] == g).unwrap()["pid"]
            .as_u64()
            .unwrap() as u32
    };
    let (hung, other) = (pid_of(0), pid_of(1));
    signal(hung, "-STOP");

    let t0 = Instant::now();
    let reqs = (0..8).map(|i| {
        s.post(
            "/generate",
            json!({"text": format!("request {i}"), "max_new_tokens": 8}),
        )
    });
    let results = tokio::time::timeout(Duration::from_secs(30), futures::future::join_all(reqs))
        .await
        .expect("requests hung behind the stopped worker");
    let took = t0.elapsed();
    let (mut ok, mut refused) = (0, 0);
    for (status, body) in results {
        match status {
            200 => ok += 1,
            503 => {
                refused += 1;
                let msg = body["error"]["message"].as_str().unwrap_or_default();
                assert!(msg.contains("did not answer a step"), "{body}");
            }
            other => panic!("status {other}: {body}"),
        }
    }
    eprintln!("hung worker: {ok} served, {refused} refused, all answered in {took:?}");
    assert!(refused >= 1 && ok >= 1, "{ok} served, {refused} refused");
    assert!(took < Duration::from_secs(15), "detection took {took:?}");
    // The group is marked down as its scheduler stops (just after the 503s went out).
    let t1 = Instant::now();
    loop {
        let health: Value = reqwest::get(format!("{}/health", s.mgmt))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if health["models"][0]["replicas_healthy"] == json!([false, true]) {
            break;
        }
        assert!(t1.elapsed() < Duration::from_secs(5), "{health}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, body) = s
        .post("/generate", json!({"text": "after", "max_new_tokens": 4}))
        .await;
    assert_eq!(status, 200, "{body}");

    let mut s = s;
    signal(launcher, "-TERM");
    let t0 = Instant::now();
    while s.child.try_wait().unwrap().is_none() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the launcher did not stop"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for p in [hung, other] {
        assert!(!is_running(p), "worker {p} outlived the launcher");
    }
}
