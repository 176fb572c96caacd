//! liftoff's HTTP front end (axum): the Takeoff and OpenAI APIs, health, info and Prometheus
//! metrics, routing each request to a replica group of the model its consumer group serves.

pub mod error;
mod logprobs;
mod messages;
pub mod metrics;
mod openai;
pub mod service;
mod takeoff;

pub use service::{ModelInfo, ModelService, WorkerInfo};

use axum::extract::{MatchedPath, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Json;
use error::ApiError;
use metrics::{Metrics, ReplicaSnapshot};
use serde_json::json;
use std::sync::{Arc, RwLock};
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
    services: RwLock<Vec<Arc<ModelService>>>,
    pub metrics: Arc<Metrics>,
    pub options: ServerOptions,
    started: Instant,
}

impl AppState {
    /// State serving `services`, open, with the default body limit.
    pub fn new(services: Vec<Arc<ModelService>>) -> Result<Self, prometheus::Error> {
        Self::with_options(services, ServerOptions::default())
    }

    /// State serving `services` with `options`.
    pub fn with_options(
        services: Vec<Arc<ModelService>>,
        options: ServerOptions,
    ) -> Result<Self, prometheus::Error> {
        Ok(Self {
            services: RwLock::new(services),
            metrics: Arc::new(Metrics::new()?),
            options,
            started: Instant::now(),
        })
    }

    /// The served models.
    pub fn services(&self) -> Vec<Arc<ModelService>> {
        self.services.read().map(|s| s.clone()).unwrap_or_default()
    }

    /// The model of a consumer group (`None`: the first one, Takeoff's "primary").
    pub fn service_for_group(&self, group: Option<&str>) -> Result<Arc<ModelService>, ApiError> {
        let services = self.services();
        match group {
            None => services.first().cloned(),
            Some(g) => services
                .iter()
                .find(|s| s.info.consumer_group == g)
                .cloned(),
        }
        .ok_or_else(|| {
            ApiError::not_found(
                "consumer_group",
                format!(
                    "no model serves consumer group '{}'",
                    group.unwrap_or("primary")
                ),
            )
        })
    }

    /// The model named `reader_id` (its name or its consumer group).
    pub fn service_for_reader(&self, reader: &str) -> Result<Arc<ModelService>, ApiError> {
        self.services()
            .into_iter()
            .find(|s| s.info.model_name == reader || s.info.consumer_group == reader)
            .ok_or_else(|| ApiError::not_found("reader_id", format!("no reader '{reader}'")))
    }

    /// The model an OpenAI request names (its name or consumer group; any when unset).
    pub fn service_for_model(&self, model: Option<&str>) -> Result<Arc<ModelService>, ApiError> {
        match model {
            None => self.service_for_group(None),
            Some(m) => self
                .services()
                .into_iter()
                .find(|s| s.info.model_name == m || s.info.consumer_group == m)
                .ok_or_else(|| {
                    ApiError::not_found("model", format!("the model '{m}' does not exist"))
                }),
        }
    }
}

/// The inference API (port 3000 by default).
pub fn inference_router(state: Arc<AppState>) -> axum::Router {
    axum::Router::new()
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
        .route("/reader_groups", get(reader_groups))
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

/// `GET /health`: 200 when every model has a serving replica group, else 503 with details.
async fn health(State(state): State<Arc<AppState>>) -> Response {
    let services = state.services();
    let groups: Vec<_> = services
        .iter()
        .map(|s| {
            let replicas: Vec<bool> = s.replicas.iter().map(|r| r.is_alive()).collect();
            json!({"model": s.info.model_name, "consumer_group": s.info.consumer_group, "replicas_healthy": replicas})
        })
        .collect();
    let ok = !services.is_empty() && services.iter().all(|s| s.is_healthy());
    let degraded = services
        .iter()
        .any(|s| s.replicas.iter().any(|r| !r.is_alive()));
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

/// `GET /info`: models, limits and version.
async fn info(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    let models: Vec<_> = state.services().iter().map(|s| json!(s.info)).collect();
    Json(json!({
        "name": "liftoff",
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_s": state.started.elapsed().as_secs(),
        "models": models,
    }))
}

/// `GET /reader_groups`: Takeoff's view of consumer groups and their readers.
async fn reader_groups(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    let mut groups = serde_json::Map::new();
    for s in state.services() {
        let entry = groups
            .entry(s.info.consumer_group.clone())
            .or_insert_with(|| json!([]));
        if let Some(list) = entry.as_array_mut() {
            list.push(
                json!({"reader_id": s.info.model_name, "model_name": s.info.model_name,
                             "device": s.info.device, "consumer_group": s.info.consumer_group}),
            );
        }
    }
    Json(serde_json::Value::Object(groups))
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
    let body = state.metrics.render(&snaps);
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        body,
    )
        .into_response()
}
