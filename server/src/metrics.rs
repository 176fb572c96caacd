//! Prometheus metrics: request counts by route and status, latency histograms (time to first
//! token, inter-token, end-to-end, queue time), token counters, and per-replica gauges read
//! from the schedulers at scrape time.

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

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
    running: IntGaugeVec,
    waiting: IntGaugeVec,
    kv_used: IntGaugeVec,
    kv_total: IntGaugeVec,
    kv_usage: GaugeVec,
    prefix_hit_rate: GaugeVec,
    prefix_queries: IntGaugeVec,
    prefix_hits: IntGaugeVec,
    preemptions: IntGaugeVec,
    cancelled: IntGaugeVec,
    healthy: IntGaugeVec,
    step_micros: IntGaugeVec,
    compute_micros: IntGaugeVec,
    comm_micros: IntGaugeVec,
    steps: IntGaugeVec,
}

const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0,
    40.0, 80.0,
];

/// What a replica's gauges show.
pub struct ReplicaSnapshot<'a> {
    pub model: &'a str,
    pub replica: String,
    pub stats: &'a liftoff_engine::scheduler::SchedulerStats,
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
        let igauge = |name: &str, help: &str| -> Result<IntGaugeVec, prometheus::Error> {
            let g = IntGaugeVec::new(Opts::new(name, help), &["model", "replica"])?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let fgauge = |name: &str, help: &str| -> Result<GaugeVec, prometheus::Error> {
            let g = GaugeVec::new(Opts::new(name, help), &["model", "replica"])?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
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
            running: igauge(
                "liftoff_num_requests_running",
                "Sequences running in a replica group",
            )?,
            waiting: igauge(
                "liftoff_num_requests_waiting",
                "Sequences waiting in a replica group",
            )?,
            kv_used: igauge(
                "liftoff_kv_cache_used_blocks",
                "KV-cache blocks held by sequences",
            )?,
            kv_total: igauge(
                "liftoff_kv_cache_total_blocks",
                "KV-cache blocks in the pool",
            )?,
            kv_usage: fgauge(
                "liftoff_kv_cache_usage_ratio",
                "Fraction of KV-cache blocks in use",
            )?,
            prefix_hit_rate: fgauge(
                "liftoff_prefix_cache_hit_rate",
                "Fraction of looked-up prompt blocks found in the prefix cache",
            )?,
            prefix_queries: igauge(
                "liftoff_prefix_cache_queried_blocks",
                "Prompt blocks looked up in the prefix cache",
            )?,
            prefix_hits: igauge(
                "liftoff_prefix_cache_hit_blocks",
                "Prompt blocks found in the prefix cache",
            )?,
            preemptions: igauge(
                "liftoff_preemptions",
                "Sequences preempted for lack of KV blocks",
            )?,
            cancelled: igauge(
                "liftoff_cancelled_requests",
                "Sequences dropped because their client went away",
            )?,
            healthy: igauge(
                "liftoff_replica_healthy",
                "1 when the replica group is serving",
            )?,
            step_micros: igauge(
                "liftoff_step_time_microseconds",
                "Total time in model steps",
            )?,
            compute_micros: igauge(
                "liftoff_worker_compute_time_microseconds",
                "Total forward time on rank 0 of a worker group, collectives included",
            )?,
            comm_micros: igauge(
                "liftoff_allreduce_time_microseconds",
                "Total time rank 0 of a worker group spent in all-reduce and gather",
            )?,
            steps: igauge("liftoff_steps", "Model steps run")?,
            registry,
        })
    }

    /// Prometheus text exposition, with the gauges refreshed from `replicas`.
    pub fn render(&self, replicas: &[ReplicaSnapshot]) -> String {
        use std::sync::atomic::Ordering::Relaxed;
        for r in replicas {
            let l = [r.model, r.replica.as_str()];
            let s = r.stats;
            let load = |c: &std::sync::atomic::AtomicU64| c.load(Relaxed) as i64;
            let counts = [
                (&self.running, load(&s.running)),
                (&self.waiting, load(&s.waiting) + load(&s.queued)),
                (&self.kv_used, load(&s.kv_blocks_used)),
                (&self.kv_total, load(&s.kv_blocks_total)),
                (&self.prefix_queries, load(&s.prefix_queried_blocks)),
                (&self.prefix_hits, load(&s.prefix_hit_blocks)),
                (&self.preemptions, load(&s.preemptions)),
                (&self.cancelled, load(&s.cancelled)),
                (&self.healthy, r.healthy as i64),
                (&self.step_micros, load(&s.step_micros)),
                (&self.compute_micros, load(&s.compute_micros)),
                (&self.comm_micros, load(&s.comm_micros)),
                (&self.steps, load(&s.steps)),
            ];
            for (gauge, value) in counts {
                gauge.with_label_values(&l).set(value);
            }
            self.kv_usage.with_label_values(&l).set(s.kv_usage());
            self.prefix_hit_rate
                .with_label_values(&l)
                .set(s.prefix_hit_rate());
        }
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::error!("encoding metrics: {e}");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}
