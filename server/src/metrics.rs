//! Prometheus metrics: request counts by route and status, latency histograms (time to first
//! token, inter-token, end-to-end, queue time), token counters, and per-replica gauges and
//! counters read from the schedulers at scrape time (running totals are `*_total` counters,
//! so `rate()` works on them).

use liftoff_engine::scheduler::SchedulerStats;
use prometheus::proto::{Counter, Gauge, LabelPair, Metric, MetricFamily, MetricType};
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder,
};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// All of liftoff's metrics.
pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub ttft: HistogramVec,
    pub inter_token: HistogramVec,
    pub e2e: HistogramVec,
    pub queue_time: HistogramVec,
    pub prompt_tokens: IntCounterVec,
    pub generation_tokens: IntCounterVec,
    pub group_requests: IntCounterVec,
}

const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0,
    40.0, 80.0,
];

/// What a replica's gauges show.
pub struct ReplicaSnapshot<'a> {
    pub model: &'a str,
    pub replica: String,
    pub stats: &'a SchedulerStats,
    pub healthy: bool,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let hist = |name: &str, help: &str| -> Result<HistogramVec, prometheus::Error> {
            let h = HistogramVec::new(
                HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()),
                &["model"],
            )?;
            registry.register(Box::new(h.clone()))?;
            Ok(h)
        };
        let counter =
            |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec, prometheus::Error> {
                let c = IntCounterVec::new(Opts::new(name, help), labels)?;
                registry.register(Box::new(c.clone()))?;
                Ok(c)
            };
        Ok(Self {
            requests: counter(
                "liftoff_requests_total",
                "HTTP requests by route and status",
                &["route", "status"],
            )?,
            ttft: hist(
                "liftoff_time_to_first_token_seconds",
                "Time from arrival to the first token",
            )?,
            inter_token: hist(
                "liftoff_inter_token_latency_seconds",
                "Time between consecutive tokens of a request",
            )?,
            e2e: hist(
                "liftoff_e2e_request_latency_seconds",
                "Time from arrival to the last token",
            )?,
            queue_time: hist(
                "liftoff_request_queue_time_seconds",
                "Time a request waited before it was scheduled",
            )?,
            prompt_tokens: counter(
                "liftoff_prompt_tokens_total",
                "Prompt tokens processed",
                &["model"],
            )?,
            generation_tokens: counter(
                "liftoff_generation_tokens_total",
                "Tokens generated",
                &["model"],
            )?,
            group_requests: counter(
                "liftoff_replica_requests_total",
                "Requests routed to each replica group",
                &["model", "replica"],
            )?,
            registry,
        })
    }

    /// Prometheus text exposition, with the per-replica series read from `replicas`.
    pub fn render(&self, replicas: &[ReplicaSnapshot]) -> String {
        let mut families = self.registry.gather();
        families.extend(replica_families(replicas));
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&families, &mut buf) {
            tracing::error!("encoding metrics: {e}");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// How a per-replica series reads its value.
type Read = fn(&ReplicaSnapshot) -> f64;

fn load(c: &AtomicU64) -> f64 {
    c.load(Relaxed) as f64
}

fn micros(c: &AtomicU64) -> f64 {
    c.load(Relaxed) as f64 / 1e6
}

/// The per-replica series: (name, help, type, value).
const REPLICA_SERIES: &[(&str, &str, MetricType, Read)] = {
    use MetricType::{COUNTER, GAUGE};
    &[
        (
            "liftoff_num_requests_running",
            "Sequences running in a replica group",
            GAUGE,
            |r| load(&r.stats.running),
        ),
        (
            "liftoff_num_requests_waiting",
            "Sequences waiting in a replica group",
            GAUGE,
            |r| load(&r.stats.waiting) + load(&r.stats.queued),
        ),
        (
            "liftoff_kv_cache_used_blocks",
            "KV-cache blocks held by sequences",
            GAUGE,
            |r| load(&r.stats.kv_blocks_used),
        ),
        (
            "liftoff_kv_cache_cached_blocks",
            "KV-cache blocks no sequence holds that keep a cached prefix (evictable)",
            GAUGE,
            |r| load(&r.stats.kv_blocks_cached),
        ),
        (
            "liftoff_kv_cache_total_blocks",
            "KV-cache blocks in the pool",
            GAUGE,
            |r| load(&r.stats.kv_blocks_total),
        ),
        (
            "liftoff_kv_cache_usage_ratio",
            "Fraction of KV-cache blocks held by sequences",
            GAUGE,
            |r| r.stats.kv_usage(),
        ),
        (
            "liftoff_prefix_cache_hit_rate",
            "Fraction of looked-up prompt blocks found in the prefix cache",
            GAUGE,
            |r| r.stats.prefix_hit_rate(),
        ),
        (
            "liftoff_replica_healthy",
            "1 when the replica group is serving",
            GAUGE,
            |r| r.healthy as u8 as f64,
        ),
        (
            "liftoff_prefix_cache_queried_blocks_total",
            "Prompt blocks looked up in the prefix cache",
            COUNTER,
            |r| load(&r.stats.prefix_queried_blocks),
        ),
        (
            "liftoff_prefix_cache_hit_blocks_total",
            "Prompt blocks found in the prefix cache",
            COUNTER,
            |r| load(&r.stats.prefix_hit_blocks),
        ),
        (
            "liftoff_preemptions_total",
            "Sequences preempted for lack of KV blocks",
            COUNTER,
            |r| load(&r.stats.preemptions),
        ),
        (
            "liftoff_cancelled_requests_total",
            "Sequences dropped because their client went away",
            COUNTER,
            |r| load(&r.stats.cancelled),
        ),
        ("liftoff_steps_total", "Model steps run", COUNTER, |r| {
            load(&r.stats.steps)
        }),
        (
            "liftoff_step_time_seconds_total",
            "Time in model steps",
            COUNTER,
            |r| micros(&r.stats.step_micros),
        ),
        (
            "liftoff_worker_compute_time_seconds_total",
            "Forward time on rank 0 of a worker group, collectives included",
            COUNTER,
            |r| micros(&r.stats.compute_micros),
        ),
        (
            "liftoff_allreduce_time_seconds_total",
            "Time rank 0 of a worker group spent in all-reduce and gather",
            COUNTER,
            |r| micros(&r.stats.comm_micros),
        ),
    ]
};

/// One family per series, one sample per replica (labels `model`, `replica`).
fn replica_families(replicas: &[ReplicaSnapshot]) -> Vec<MetricFamily> {
    if replicas.is_empty() {
        return Vec::new();
    }
    REPLICA_SERIES
        .iter()
        .map(|&(name, help, kind, read)| {
            let mut f = MetricFamily::default();
            f.set_name(name.to_string());
            f.set_help(help.to_string());
            f.set_field_type(kind);
            for r in replicas {
                let mut m = Metric::default();
                m.set_label(vec![label("model", r.model), label("replica", &r.replica)]);
                let v = read(r);
                match kind {
                    MetricType::COUNTER => {
                        let mut c = Counter::default();
                        c.set_value(v);
                        m.set_counter(c);
                    }
                    _ => {
                        let mut g = Gauge::default();
                        g.set_value(v);
                        m.set_gauge(g);
                    }
                }
                f.mut_metric().push(m);
            }
            f
        })
        .collect()
}

fn label(name: &str, value: &str) -> LabelPair {
    let mut l = LabelPair::default();
    l.set_name(name.to_string());
    l.set_value(value.to_string());
    l
}
