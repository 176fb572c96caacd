//! Takeoff's management API, as `takeoff-client` calls it: `POST /reader`,
//! `DELETE /reader/{reader_id}`, `GET /reader_groups`, `GET /config/{reader_id}`,
//! `GET /status`.

use crate::error::{ApiError, ApiJson};
use crate::registry::ReaderState;
use crate::AppState;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};
use std::sync::Arc;

/// `POST /reader`: checks the configuration (400 naming the field, 403 for a model outside
/// the allowed roots, 503 when it cannot fit the memory budget), registers the reader and
/// answers `{"reader_id"}` at once; the weights load in the background.
pub async fn create_reader(
    State(state): State<Arc<AppState>>,
    ApiJson(body): ApiJson<Map<String, Value>>,
) -> Result<Json<Value>, ApiError> {
    let loader =
        state.registry.loader().cloned().ok_or_else(|| {
            ApiError::invalid("reader", "this server cannot add readers at run time")
        })?;
    // Reading a model's config touches the disk.
    let spec = tokio::task::spawn_blocking(move || loader.prepare(&body))
        .await
        .map_err(|e| ApiError::internal(format!("checking the reader failed: {e}")))??;
    let id = state.registry.add(spec)?;
    Ok(Json(json!({"reader_id": id})))
}

/// `DELETE /reader/{reader_id}`: 204 once its requests have drained and its workers exited.
pub async fn delete_reader(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    state.registry.delete(&id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `GET /reader_groups`: every consumer group with its readers.
pub async fn reader_groups(State(state): State<Arc<AppState>>) -> Json<Value> {
    let mut groups = Map::new();
    for r in state.registry.readers() {
        let entry = groups
            .entry(r.consumer_group.clone())
            .or_insert_with(|| json!([]));
        if let Some(list) = entry.as_array_mut() {
            list.push(json!(r));
        }
    }
    Json(Value::Object(groups))
}

/// `GET /config/{reader_id}`: the reader's effective configuration.
pub async fn reader_config(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    state
        .registry
        .config(&id)
        .map(Json)
        .ok_or_else(|| ApiError::not_found("reader_id", format!("no reader '{id}'")))
}

/// `GET /status`: live readers (loading, ready, unloaded, stopping) and dead ones (failed),
/// each by id, with the server's configuration.
pub async fn status(State(state): State<Arc<AppState>>) -> Json<Value> {
    let (mut live, mut dead) = (Map::new(), Map::new());
    for r in state.registry.readers() {
        let side = if r.state == ReaderState::Failed {
            &mut dead
        } else {
            &mut live
        };
        let mut v = json!(r);
        if let Some(c) = state.registry.config(&r.reader_id) {
            v["config"] = c;
        }
        side.insert(r.reader_id.clone(), v);
    }
    Json(json!({
        "status": {"live_readers": live, "dead_readers": dead},
        "config": state.server_config,
    }))
}
