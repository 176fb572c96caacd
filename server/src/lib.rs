//! liftoff's HTTP front end (axum): the Takeoff and OpenAI APIs, health, info and Prometheus
//! metrics, routing each request to a replica group of the model its consumer group serves.

pub mod error;
mod logprobs;
mod management;
mod messages;
pub mod metrics;
mod openai;
pub mod registry;
pub mod service;
mod structured;
mod takeoff;
mod tgi;
mod tools;

pub use registry::{
    Lease, LoadedReader, ReaderLoader, ReaderSpec, ReaderState, Registry, RegistryOptions, Target,
};
pub use service::{ModelInfo, ModelService, WorkerInfo};

use axum::extract::{MatchedPath, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::Json;
use error::ApiError;
use metrics::{Metrics, ReaderSnapshot, ReplicaSnapshot};
use serde_json::json;
use std::sync::Arc;
use std::time::Instant;

/// How the HTTP front end guards itself.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Keys the inference port accepts as `Authorization: Bearer <key>`; none: open.
    pub api_keys: Vec<String>,
    /// Keys the management port accepts; none: open (it listens on loopback by default).
    pub management_api_keys: Vec<String>,
    /// Largest request body; larger ones get 413.
    pub body_size_limit_bytes: usize,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            api_keys: Vec::new(),
            management_api_keys: Vec::new(),
            // Prompts are text: 8 MiB is far above any context.
            body_size_limit_bytes: 8 * 1024 * 1024,
        }
    }
}

/// Everything the handlers share.
pub struct AppState {
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    pub options: ServerOptions,
    /// The server's settings, as `GET /status` shows them.
    pub server_config: serde_json::Value,
    started: Instant,
}

impl AppState {
    /// State serving `services`, open, with the default body limit.
    pub fn new(services: Vec<Arc<ModelService>>) -> Result<Self, prometheus::Error> {
        Self::with_options(services, ServerOptions::default())
    }

    /// State serving the loaded `services` with `options` (no loader: readers cannot be
    /// added at run time, and these are never unloaded).
    pub fn with_options(
        services: Vec<Arc<ModelService>>,
        options: ServerOptions,
    ) -> Result<Self, prometheus::Error> {
        let state = Self::with_loader(None, options, RegistryOptions::default(), json!({}))?;
        for s in services {
            let service = Arc::try_unwrap(s).unwrap_or_else(|s| ModelService {
                info: s.info.clone(),
                tokenizer: s.tokenizer.clone(),
                replicas: s.replicas.clone(),
            });
            let spec = ReaderSpec {
                reader_id: None,
                model_name: service.info.model_name.clone(),
                consumer_group: service.info.consumer_group.clone(),
                device: service.info.device.clone(),
                pinned: true,
                estimate_bytes: 0,
                config: json!(service.info),
                args: Arc::new(()),
            };
            let id = spec.model_name.clone();
            let loaded = LoadedReader {
                service,
                memory_bytes: 0,
                stop: Box::new(|| {}),
            };
            state.registry.insert_loaded(spec, loaded, Some(&id));
        }
        Ok(state)
    }

    /// State whose readers `loader` loads (added with the registry).
    pub fn with_loader(
        loader: Option<Arc<dyn ReaderLoader>>,
        options: ServerOptions,
        registry_options: RegistryOptions,
        server_config: serde_json::Value,
    ) -> Result<Self, prometheus::Error> {
        let metrics = Arc::new(Metrics::new()?);
        Ok(Self {
            registry: Arc::new(Registry::new(loader, metrics.clone(), registry_options)),
            metrics,
            options,
            server_config,
            started: Instant::now(),
        })
    }

    /// The loaded models.
    pub fn services(&self) -> Vec<Arc<ModelService>> {
        self.registry.services()
    }

    /// Leases a reader for a request: `key` is a reader id, consumer group or model name
    /// (`None`: the primary group); `field` names the request field in a 404.
    pub async fn lease(&self, key: Option<&str>, field: &str) -> Result<Lease, ApiError> {
        let target = key.map_or(Target::Default, Target::Key);
        self.registry.acquire(target, field).await
    }
}

/// The inference API (port 3000 by default).
pub fn inference_router(state: Arc<AppState>) -> axum::Router {
    axum::Router::new()
        .route("/", post(takeoff::tgi_compat))
        .route("/generate", post(takeoff::generate))
        .route("/generate_stream", post(takeoff::generate_stream))
        .route("/tokenize/{reader_id}", post(takeoff::tokenize))
        .route("/detokenize/{reader_id}", post(takeoff::detokenize))
        .route("/chat_template/{reader_id}", post(takeoff::chat_template))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/models", get(openai::models))
        .merge(management_routes())
        .fallback(not_found)
        .layer(axum::extract::DefaultBodyLimit::max(
            state.options.body_size_limit_bytes,
        ))
        .layer(axum::middleware::from_fn_with_state(
            (state.clone(), Port::Inference),
            require_key,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        .with_state(state)
}

/// The management API (port 3001 by default): health, info, metrics, readers.
pub fn management_router(state: Arc<AppState>) -> axum::Router {
    management_routes()
        .route("/reader_groups", get(management::reader_groups))
        .route("/reader", post(management::create_reader))
        .route("/reader/{reader_id}", delete(management::delete_reader))
        .route("/config/{reader_id}", get(management::reader_config))
        .route("/status", get(management::status))
        .fallback(not_found)
        .layer(axum::extract::DefaultBodyLimit::max(
            state.options.body_size_limit_bytes,
        ))
        .layer(axum::middleware::from_fn_with_state(
            (state.clone(), Port::Management),
            require_key,
        ))
        .with_state(state)
}

/// Which port a request came in on (each has its own keys).
#[derive(Debug, Clone, Copy)]
enum Port {
    Inference,
    Management,
}

/// Answers 401 unless the request carries one of the port's keys (`Authorization: Bearer`),
/// compared in constant time; `/health` stays open for probes.
async fn require_key(
    State((state, port)): State<(Arc<AppState>, Port)>,
    req: Request,
    next: Next,
) -> Response {
    let keys = match port {
        Port::Inference => &state.options.api_keys,
        Port::Management => &state.options.management_api_keys,
    };
    let open = matches!(req.uri().path(), "/health" | "/healthz");
    if keys.is_empty() || open {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    // Every key is compared (no early exit), each in constant time.
    let ok = given.is_some_and(|g| {
        keys.iter().fold(false, |ok, k| {
            ok | constant_time_eq::constant_time_eq(k.as_bytes(), g.as_bytes())
        })
    });
    if ok {
        next.run(req).await
    } else {
        ApiError::unauthorized().into_response()
    }
}

fn management_routes() -> axum::Router<Arc<AppState>> {
    axum::Router::new()
        .route("/health", get(health))
        .route("/healthz", get(health))
        .route("/info", get(info))
        .route("/metrics", get(metrics_text))
}

async fn not_found() -> ApiError {
    ApiError::not_found("path", "no such route")
}

async fn count_requests(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let resp = next.run(req).await;
    if route != "/metrics" && route != "/health" {
        state
            .metrics
            .requests
            .with_label_values(&[&route, resp.status().as_str()])
            .inc();
    }
    resp
}

/// `GET /health`: 200 unless a loaded reader has lost every replica group (503 then), with
/// each reader's state and replica groups.
async fn health(State(state): State<Arc<AppState>>) -> Response {
    let readers = state.registry.readers();
    let groups: Vec<_> = readers
        .iter()
        .map(|r| {
            json!({"reader_id": r.reader_id, "model": r.model_name, "consumer_group": r.consumer_group,
                   "state": r.state, "replicas_healthy": r.replicas_healthy})
        })
        .collect();
    let loaded = || readers.iter().filter(|r| r.state == ReaderState::Ready);
    let ok = loaded().all(|r| r.replicas_healthy.iter().any(|&h| h));
    let degraded = loaded().any(|r| r.replicas_healthy.iter().any(|&h| !h))
        || readers.iter().any(|r| r.state == ReaderState::Failed);
    let status = if !ok {
        "unhealthy"
    } else if degraded {
        "degraded"
    } else {
        "ok"
    };
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(json!({"status": status, "models": groups}))).into_response()
}

/// `GET /info`: loaded models, every reader, limits and version; and the fields TGI's clients
/// read (of the model TGI requests go to).
async fn info(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    let services = state.services();
    let models: Vec<_> = services.iter().map(|s| json!(s.info)).collect();
    let mut body = json!({
        "name": "liftoff",
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_s": state.started.elapsed().as_secs(),
        "models": models,
        "readers": state.registry.readers(),
        "router": "liftoff",
        "max_best_of": tgi::MAX_BEST_OF,
        "max_stop_sequences": tgi::MAX_STOP_SEQUENCES,
        "max_client_batch_size": 1,
        "model_pipeline_tag": "text-generation",
    });
    let primary = services
        .iter()
        .find(|s| s.info.consumer_group == "primary")
        .or(services.first());
    if let Some(s) = primary {
        let i = &s.info;
        let extra = json!({
            "model_id": i.model_name,
            "model_dtype": i.dtype,
            "model_device_type": i.device,
            "max_input_tokens": i.max_sequence_length.saturating_sub(1),
            "max_input_length": i.max_sequence_length.saturating_sub(1),
            "max_total_tokens": i.max_sequence_length,
            "max_batch_total_tokens": i.kv_cache_blocks * i.block_size,
            "max_concurrent_requests": i.max_batch_size * i.replicas,
            "waiting_served_ratio": 1.2,
            "max_waiting_tokens": 20,
            "validation_workers": 1,
        });
        if let (Some(b), serde_json::Value::Object(e)) = (body.as_object_mut(), extra) {
            b.extend(e);
        }
    }
    Json(body)
}

/// `GET /metrics`: Prometheus text format.
async fn metrics_text(State(state): State<Arc<AppState>>) -> Response {
    let services = state.services();
    let snaps: Vec<ReplicaSnapshot> = services
        .iter()
        .flat_map(|s| {
            s.replicas
                .iter()
                .enumerate()
                .map(move |(i, r)| ReplicaSnapshot {
                    model: &s.info.model_name,
                    replica: i.to_string(),
                    stats: r.stats(),
                    healthy: r.is_alive(),
                })
        })
        .collect();
    let readers = state.registry.readers();
    let reader_snaps: Vec<ReaderSnapshot> = readers
        .iter()
        .map(|r| ReaderSnapshot {
            labels: &r.labels,
            state: r.state.name(),
            memory_bytes: r.memory_bytes,
            in_flight: r.in_flight,
        })
        .collect();
    let body = state.metrics.render(&snaps, &reader_snaps);
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        body,
    )
        .into_response()
}
