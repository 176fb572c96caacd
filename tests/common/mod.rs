//! Helpers shared by the end-to-end tests: a real `liftoff serve` on loopback ports.
#![allow(dead_code)]

use serde_json::Value;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The field a refused request names. A TGI body (`inputs`, no `text`) gets TGI's 422
/// `{"error": message, "error_type": "validation", "param"}`, which TGI's clients read; any
/// other a 400 `{"error": {"message", "param", ...}}`. Panics on another status or shape.
pub fn refused_param(status: u16, v: &Value, body: &Value) -> Value {
    if body.get("inputs").is_some() && body.get("text").is_none() {
        assert_eq!(status, 422, "{body}: {v}");
        assert_eq!(v["error_type"], "validation", "{body}: {v}");
        assert!(
            v["error"].as_str().is_some_and(|m| !m.is_empty()),
            "{body}: {v}"
        );
        v["param"].clone()
    } else {
        assert_eq!(status, 400, "{body}: {v}");
        v["error"]["param"].clone()
    }
}

/// The workspace's `tests/fixtures`.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

/// Runs the `liftoff` binary with `args` (log level warn) and waits for it.
pub fn liftoff(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_liftoff"))
        .args(args)
        .env("TAKEOFF_LOG_LEVEL", "warn")
        .output()
        .expect("run liftoff")
}

/// Asserts a clean failure: non-zero exit, one line on stderr naming `needle`, no panic.
pub fn assert_one_line_error(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure, got success; stderr: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    assert!(
        lines[0].contains(needle),
        "expected {needle:?} in: {stderr}"
    );
}

/// A loopback port nobody listens on, different on every call in this process, taken from the
/// 12 000 ports below the kernel's ephemeral range. A port from `bind(0)` comes from that range,
/// where every outgoing connection also takes its local port, so a running test's HTTP client
/// could take it between this call and the server's bind ("Address already in use").
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const SPAN: u32 = 12_000;
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    let low = ephemeral.saturating_sub(SPAN).max(1024);
    let span = ephemeral.saturating_sub(low).max(1);
    // Processes (test binaries) run one after another; a different start per process anyway.
    let start = std::process::id().wrapping_mul(7919) % span;
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (low + (start + n) % span) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {low}..{}", low + span);
}

/// A running `liftoff serve`, killed on drop.
pub struct Server {
    pub child: Child,
    pub base: String,
    pub mgmt: String,
}

impl Server {
    /// `liftoff serve` on free loopback ports with `extra` flags.
    pub async fn start(extra: &[&str]) -> Server {
        let (port, mport) = (free_port(), free_port());
        let mut args = vec![
            "serve".to_string(),
            "--host".into(),
            "127.0.0.1".into(),
            "--port".into(),
            port.to_string(),
            "--management-port".into(),
            mport.to_string(),
        ];
        if !extra.contains(&"--max-sequence-length") {
            args.extend(["--max-sequence-length".into(), "1024".into()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_liftoff"));
        cmd.args(&args).env("TAKEOFF_LOG_LEVEL", "warn");
        Self::spawn(cmd, port, mport).await
    }

    /// Starts `cmd`, which serves on `port` and `mport`, and waits until it is healthy.
    pub async fn spawn(mut cmd: Command, port: u16, mport: u16) -> Server {
        let child = cmd.stdout(Stdio::null()).spawn().expect("start liftoff");
        let mut s = Server {
            child,
            base: format!("http://127.0.0.1:{port}"),
            mgmt: format!("http://127.0.0.1:{mport}"),
        };
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(120) {
            if let Ok(Some(status)) = s.child.try_wait() {
                panic!("liftoff exited before it was healthy: {status}");
            }
            if let Ok(r) = reqwest::get(format!("{}/health", s.base)).await {
                if r.status() == 200 {
                    return s;
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("server did not become healthy");
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let r = reqwest::Client::new()
            .post(format!("{}{path}", self.base))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// `GET /info` on the management port.
    pub async fn info(&self) -> Value {
        reqwest::get(format!("{}/info", self.mgmt))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// The Prometheus exposition of `/metrics`.
    pub async fn metrics_text(&self) -> String {
        reqwest::get(format!("{}/metrics", self.mgmt))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// `/metrics` parsed by a Prometheus text-format parser.
    pub async fn scrape(&self) -> prometheus_parse::Scrape {
        let text = self.metrics_text().await;
        prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
            .expect("/metrics is Prometheus text")
    }

    /// Waits (up to 10 s) until metric `name` reads `want`: the scheduler publishes its
    /// gauges after the step that sent a request's last token, a moment after the reply.
    pub async fn wait_metric(&self, name: &str, want: f64) {
        let t = Instant::now();
        loop {
            let v = self.metric(name).await;
            if v == want {
                return;
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "{name} is {v}, not {want}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sum of the samples of counter or gauge `name` (all label sets); panics if the metric
    /// is missing or of another type.
    pub async fn metric(&self, name: &str) -> f64 {
        let scrape = self.scrape().await;
        let samples: Vec<_> = scrape.samples.iter().filter(|s| s.metric == name).collect();
        assert!(!samples.is_empty(), "no metric {name} in /metrics");
        samples
            .iter()
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v) => v,
                ref other => panic!("{name} is not a counter or gauge: {other:?}"),
            })
            .sum()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
