//! `liftoff bench`: drives any OpenAI-compatible server (`/v1/completions`, streaming) with N
//! requests at each concurrency, reports time to first token, inter-token latency, end-to-end
//! latency percentiles and output tokens/s, writes JSON, and (`liftoff bench plot`) draws
//! throughput and latency against concurrency for one or more runs into a PNG.

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use eventsource_stream::Eventsource;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// `liftoff bench ...`
#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    command: BenchCommand,
}

#[derive(Subcommand, Debug)]
enum BenchCommand {
    /// Load-test a server.
    Run(RunArgs),
    /// Plot one or more result files into a PNG.
    Plot(PlotArgs),
    /// Measure this machine's limits (read bandwidth, int8 multiply-add peak per kernel
    /// family, the int8 GEMM's achieved rate) and print them as JSON.
    Limits,
    /// Time every pass of the read-bandwidth loop for a while and print the series as JSON:
    /// the mean over the whole stretch (the fair bound for a run as long), the best pass and
    /// each pass's rate.
    Bandwidth(BandwidthArgs),
}

#[derive(Args, Debug)]
struct BandwidthArgs {
    /// How long to keep reading, in seconds (at most 600).
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// Bytes read by one pass, in MiB (1 to 4096).
    #[arg(long, default_value_t = 256)]
    mib: usize,
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Base URL of the OpenAI-compatible server.
    #[arg(long, default_value = "http://127.0.0.1:3000")]
    url: String,
    /// `model` field of the requests.
    #[arg(long)]
    model: Option<String>,
    /// Concurrency levels, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    concurrency: Vec<usize>,
    /// Requests per level (default: 2 x concurrency, at least 8).
    #[arg(long)]
    requests: Option<usize>,
    /// Tokens generated per request (EOS ignored).
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// Name of this run in the results and the plot.
    #[arg(long, default_value = "liftoff")]
    label: String,
    /// Where to write the JSON results.
    #[arg(long)]
    out: Option<std::path::PathBuf>,
}

#[derive(Args, Debug)]
struct PlotArgs {
    /// Result files written by `bench run`.
    #[arg(required = true)]
    inputs: Vec<std::path::PathBuf>,
    #[arg(long, default_value = "bench.png")]
    out: std::path::PathBuf,
}

/// Percentiles of one latency, in milliseconds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub mean: f64,
}

/// The results of one concurrency level.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Level {
    pub concurrency: usize,
    pub requests: usize,
    pub failed: usize,
    pub output_tokens: usize,
    pub wall_s: f64,
    pub output_tokens_per_s: f64,
    pub ttft_ms: Percentiles,
    pub itl_ms: Percentiles,
    pub e2e_ms: Percentiles,
}

/// A whole run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Run {
    pub label: String,
    pub url: String,
    pub max_tokens: usize,
    pub levels: Vec<Level>,
}

/// Varied prompts of about 100 tokens.
const TOPICS: &[&str] = &[
    "the history of the printing press",
    "how vaccines train the immune system",
    "why the sky is blue",
    "the rules of chess for beginners",
    "how a compiler turns code into machine instructions",
    "the water cycle",
    "what makes bread rise",
    "the life of honey bees",
];

fn prompt(i: usize) -> String {
    format!(
        "You are a patient teacher. Explain {} to a curious twelve-year-old. Use short sentences, \
         give two concrete examples from everyday life, and finish with one question that checks \
         understanding. Keep the tone friendly and avoid jargon; if you must use a technical word, \
         define it in plain language right away. Request number {i}.",
        TOPICS[i % TOPICS.len()]
    )
}

fn percentiles(mut v: Vec<f64>) -> Percentiles {
    if v.is_empty() {
        return Percentiles {
            p50: 0.0,
            p90: 0.0,
            p99: 0.0,
            mean: 0.0,
        };
    }
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    Percentiles {
        p50: at(0.5),
        p90: at(0.9),
        p99: at(0.99),
        mean: v.iter().sum::<f64>() / v.len() as f64,
    }
}

struct Sample {
    ttft: f64,
    itls: Vec<f64>,
    e2e: f64,
    tokens: usize,
}

async fn one_request(
    client: &reqwest::Client,
    url: &str,
    model: Option<&str>,
    i: usize,
    max_tokens: usize,
) -> Result<Sample> {
    let mut body = json!({"prompt": prompt(i), "max_tokens": max_tokens, "temperature": 0, "stream": true,
                          "ignore_eos": true, "stream_options": {"include_usage": true}});
    if let Some(m) = model {
        body["model"] = json!(m);
    }
    let start = Instant::now();
    let resp = client
        .post(format!("{url}/v1/completions"))
        .json(&body)
        .send()
        .await?;
    if !resp.status().is_success() {
        bail!(
            "HTTP {}: {}",
            resp.status(),
            resp.text().await.unwrap_or_default()
        );
    }
    let mut events = resp.bytes_stream().eventsource();
    let (mut first, mut last): (Option<Instant>, Option<Instant>) = (None, None);
    let mut itls = Vec::new();
    let (mut chunks, mut usage_tokens) = (0usize, None);
    while let Some(ev) = events.next().await {
        let ev = ev.context("reading the event stream")?;
        if ev.data == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(&ev.data).context("chunk is not JSON")?;
        if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
            usage_tokens = Some(n as usize);
        }
        // A chunk with a choice carries one token (possibly with empty text: part of a
        // character, or a special token); the usage chunk has none.
        let has_token = v["choices"].as_array().is_some_and(|c| !c.is_empty());
        if has_token {
            let now = Instant::now();
            match last {
                None => first = Some(now),
                Some(prev) => itls.push((now - prev).as_secs_f64() * 1e3),
            }
            last = Some(now);
            chunks += 1;
        }
    }
    let end = Instant::now();
    Ok(Sample {
        ttft: first.map_or(0.0, |f| (f - start).as_secs_f64() * 1e3),
        itls,
        e2e: (end - start).as_secs_f64() * 1e3,
        tokens: usage_tokens.unwrap_or(chunks),
    })
}

async fn level(client: &reqwest::Client, a: &RunArgs, concurrency: usize) -> Level {
    let n = a.requests.unwrap_or((2 * concurrency).max(8));
    let sem = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let start = Instant::now();
    let tasks = (0..n).map(|i| {
        let sem = sem.clone();
        async move {
            let _permit = sem.acquire().await;
            one_request(client, &a.url, a.model.as_deref(), i, a.max_tokens).await
        }
    });
    let results = futures::future::join_all(tasks).await;
    let wall = start.elapsed().as_secs_f64();
    let mut samples = Vec::new();
    let mut failed = 0;
    for r in results {
        match r {
            Ok(s) => samples.push(s),
            Err(e) => {
                failed += 1;
                tracing::warn!("request failed: {e:#}");
            }
        }
    }
    let tokens: usize = samples.iter().map(|s| s.tokens).sum();
    Level {
        concurrency,
        requests: n,
        failed,
        output_tokens: tokens,
        wall_s: wall,
        output_tokens_per_s: tokens as f64 / wall.max(1e-9),
        ttft_ms: percentiles(samples.iter().map(|s| s.ttft).collect()),
        itl_ms: percentiles(
            samples
                .iter()
                .flat_map(|s| s.itls.iter().copied())
                .collect(),
        ),
        e2e_ms: percentiles(samples.iter().map(|s| s.e2e).collect()),
    }
}

/// Runs `liftoff bench`.
pub fn run(args: BenchArgs) -> Result<()> {
    match args.command {
        BenchCommand::Run(a) => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            let run = rt.block_on(async {
                let client = reqwest::Client::builder().timeout(Duration::from_secs(3600)).build()?;
                let mut levels = Vec::new();
                for &c in &a.concurrency {
                    let l = level(&client, &a, c).await;
                    println!(
                        "{} c={:>3}: {:>7.1} output tok/s | TTFT p50 {:>7.0} ms p90 {:>7.0} | ITL p50 {:>5.1} ms p90 {:>5.1} | e2e p50 {:>7.0} ms | failed {}",
                        a.label, c, l.output_tokens_per_s, l.ttft_ms.p50, l.ttft_ms.p90, l.itl_ms.p50, l.itl_ms.p90, l.e2e_ms.p50, l.failed
                    );
                    levels.push(l);
                }
                anyhow::Ok(Run { label: a.label.clone(), url: a.url.clone(), max_tokens: a.max_tokens, levels })
            })?;
            if let Some(out) = &a.out {
                std::fs::write(out, serde_json::to_string_pretty(&run)?)
                    .with_context(|| format!("writing {}", out.display()))?;
            }
            Ok(())
        }
        BenchCommand::Limits => {
            println!(
                "{}",
                serde_json::to_string_pretty(&crate::bench_limits::measure())?
            );
            Ok(())
        }
        BenchCommand::Bandwidth(b) => {
            if !(b.seconds > 0.0 && b.seconds <= 600.0) {
                bail!(
                    "--seconds must be above 0 and at most 600, not {}",
                    b.seconds
                );
            }
            if !(1..=4096).contains(&b.mib) {
                bail!("--mib must be from 1 to 4096, not {}", b.mib);
            }
            println!(
                "{}",
                serde_json::to_string_pretty(&crate::bench_limits::bandwidth(
                    b.mib << 20,
                    b.seconds
                ))?
            );
            Ok(())
        }
        BenchCommand::Plot(p) => {
            let runs: Vec<Run> = p
                .inputs
                .iter()
                .map(|f| -> Result<Run> {
                    let text = std::fs::read_to_string(f)
                        .with_context(|| format!("reading {}", f.display()))?;
                    serde_json::from_str(&text).with_context(|| format!("parsing {}", f.display()))
                })
                .collect::<Result<_>>()?;
            crate::bench_plot::draw(&runs, &p.out)
        }
    }
}
