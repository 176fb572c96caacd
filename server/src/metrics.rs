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
    reader_requests: IntCounterVec,
    reader_failures: IntCounterVec,
    reader_queue_time: HistogramVec,
    reader_loads: IntCounterVec,
    reader_unloads: IntCounterVec,
    reader_load_seconds: HistogramVec,
}

/// The labels of a reader's series (Triton-style: `reader_id`, `model`, `consumer_group`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReaderLabels {
    pub reader_id: String,
    pub model: String,
    pub consumer_group: String,
}

impl ReaderLabels {
    fn values(&self) -> [&str; 3] {
        [&self.reader_id, &self.model, &self.consumer_group]
    }
}

const READER_LABELS: &[&str] = &["reader_id", "model", "consumer_group"];

const LOAD_BUCKETS: &[f64] = &[
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

/// What a reader's gauges show at scrape time.
pub struct ReaderSnapshot<'a> {
    pub labels: &'a ReaderLabels,
    pub state: &'static str,
    pub memory_bytes: u64,
    pub in_flight: usize,
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
            reader_requests: counter(
                "liftoff_reader_requests_total",
                "Requests routed to each reader",
                READER_LABELS,
            )?,
            reader_failures: counter(
                "liftoff_reader_request_failures_total",
                "Requests to each reader that failed (load refused or failed, no healthy group, step errors)",
                READER_LABELS,
            )?,
            reader_queue_time: {
                let h = HistogramVec::new(
                    HistogramOpts::new(
                        "liftoff_reader_queue_time_seconds",
                        "Time a request waited for its reader (to load) and for a place in a batch",
                    )
                    .buckets(LATENCY_BUCKETS.to_vec()),
                    READER_LABELS,
                )?;
                registry.register(Box::new(h.clone()))?;
                h
            },
            reader_loads: counter(
                "liftoff_reader_loads_total",
                "Times each reader was loaded",
                READER_LABELS,
            )?,
            reader_unloads: counter(
                "liftoff_reader_unloads_total",
                "Times each reader was unloaded to make room for another",
                READER_LABELS,
            )?,
            reader_load_seconds: {
                let h = HistogramVec::new(
                    HistogramOpts::new("liftoff_reader_load_seconds", "Time each load took")
                        .buckets(LOAD_BUCKETS.to_vec()),
                    READER_LABELS,
                )?;
                registry.register(Box::new(h.clone()))?;
                h
            },
            registry,
        })
    }

    /// A request was routed to a reader.
    pub fn reader_request(&self, r: &ReaderLabels) {
        self.reader_requests.with_label_values(&r.values()).inc();
    }

    /// A request to a reader failed.
    pub fn reader_failure(&self, r: &ReaderLabels) {
        self.reader_failures.with_label_values(&r.values()).inc();
    }

    /// A request waited `secs` before it was scheduled.
    pub fn reader_queued(&self, r: &ReaderLabels, secs: f64) {
        self.reader_queue_time
            .with_label_values(&r.values())
            .observe(secs);
    }

    /// A reader finished loading in `secs`. Its counters start at 0 (exported from then on, so
    /// `rate()` over them works before the first request or failure).
    pub fn reader_loaded(&self, r: &ReaderLabels, secs: f64) {
        let v = r.values();
        for c in [
            &self.reader_requests,
            &self.reader_failures,
            &self.reader_unloads,
        ] {
            c.with_label_values(&v);
        }
        self.reader_loads.with_label_values(&v).inc();
        self.reader_load_seconds
            .with_label_values(&r.values())
            .observe(secs);
    }

    /// A reader was unloaded to make room.
    pub fn reader_unloaded(&self, r: &ReaderLabels) {
        self.reader_unloads.with_label_values(&r.values()).inc();
    }

    /// Drops a deleted reader's series.
    pub fn forget_reader(&self, r: &ReaderLabels) {
        let v = r.values();
        for c in [
            &self.reader_requests,
            &self.reader_failures,
            &self.reader_loads,
            &self.reader_unloads,
        ] {
            let _ = c.remove_label_values(&v);
        }
        for h in [&self.reader_queue_time, &self.reader_load_seconds] {
            let _ = h.remove_label_values(&v);
        }
    }

    /// Prometheus text exposition, with the per-replica series read from `replicas`.
    pub fn render(&self, replicas: &[ReplicaSnapshot], readers: &[ReaderSnapshot]) -> String {
        let mut families = self.registry.gather();
        families.extend(replica_families(replicas));
        families.extend(reader_families(readers));
        families.extend(profile_family());
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
            "liftoff_constrained_steps_total",
            "Steps with constrained-decoding rows",
            COUNTER,
            |r| load(&r.stats.mask_rows_steps),
        ),
        (
            "liftoff_constrained_mask_seconds_total",
            "Time computing constrained-decoding token masks (on the CPU, while the forward pass runs)",
            COUNTER,
            |r| micros(&r.stats.mask_micros),
        ),
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

/// `liftoff_forward_part_seconds_total{part}` when the forward pass is profiled
/// (`serve --profile`): wall time per part, summed over the steps of this process's groups.
fn profile_family() -> Option<MetricFamily> {
    use liftoff_engine::profile;
    if !profile::enabled() {
        return None;
    }
    let mut f = MetricFamily::default();
    f.set_name("liftoff_forward_part_seconds_total".to_string());
    f.set_help(
        "Wall time per part of the forward pass, over the steps of in-process groups (serve --profile)"
            .to_string(),
    );
    f.set_field_type(MetricType::COUNTER);
    for (part, secs) in profile::totals() {
        let mut m = Metric::default();
        m.set_label(vec![label("part", part.name())]);
        let mut c = Counter::default();
        c.set_value(secs);
        m.set_counter(c);
        f.mut_metric().push(m);
    }
    Some(f)
}

/// The per-reader gauges: footprint, requests in flight, and one `liftoff_reader_state`
/// series per state (1 for the current one).
fn reader_families(readers: &[ReaderSnapshot]) -> Vec<MetricFamily> {
    if readers.is_empty() {
        return Vec::new();
    }
    let gauge = |name: &str, help: &str, samples: Vec<(Vec<LabelPair>, f64)>| {
        let mut f = MetricFamily::default();
        f.set_name(name.to_string());
        f.set_help(help.to_string());
        f.set_field_type(MetricType::GAUGE);
        for (labels, v) in samples {
            let mut m = Metric::default();
            m.set_label(labels);
            let mut g = Gauge::default();
            g.set_value(v);
            m.set_gauge(g);
            f.mut_metric().push(m);
        }
        f
    };
    let labels = |r: &ReaderSnapshot| {
        READER_LABELS
            .iter()
            .zip(r.labels.values())
            .map(|(n, v)| label(n, v))
            .collect::<Vec<_>>()
    };
    let states = ["loading", "ready", "unloaded", "failed", "stopping"];
    vec![
        gauge(
            "liftoff_reader_memory_bytes",
            "Measured footprint of a loaded reader (weights and KV cache); 0 when not loaded",
            readers
                .iter()
                .map(|r| (labels(r), r.memory_bytes as f64))
                .collect(),
        ),
        gauge(
            "liftoff_reader_requests_in_flight",
            "Requests holding or waiting for a reader",
            readers
                .iter()
                .map(|r| (labels(r), r.in_flight as f64))
                .collect(),
        ),
        gauge(
            "liftoff_reader_state",
            "1 for the reader's current state",
            readers
                .iter()
                .flat_map(|r| {
                    states.iter().map(move |s| {
                        let mut l = labels(r);
                        l.push(label("state", s));
                        (l, (r.state == *s) as u8 as f64)
                    })
                })
                .collect(),
        ),
    ]
}

fn label(name: &str, value: &str) -> LabelPair {
    let mut l = LabelPair::default();
    l.set_name(name.to_string());
    l.set_value(value.to_string());
    l
}
