//! API errors: every failure is a JSON body `{"error": {"message", "type", "param", "code"}}`
//! (OpenAI's shape, also used for the Takeoff routes) with a 4xx or 5xx status; requests in
//! TGI's schema get TGI's shape instead (`tgi::error_response`).

use axum::extract::rejection::JsonRejection;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// Whether a request value asks for nothing: null, or an empty string, list or object (what
/// clients send for a field they leave unset, and may pass where the field is unsupported).
pub fn asks_nothing(v: &serde_json::Value) -> bool {
    use serde_json::Value;
    match v {
        Value::Null => true,
        Value::Object(m) => m.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::String(s) => s.is_empty(),
        _ => false,
    }
}

/// An error answered to a client.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    /// Seconds for a `Retry-After` header (503 when the queue is full).
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// 400: the request is wrong; `param` names the field.
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: Some(param.to_string()),
            retry_after: None,
        }
    }

    /// 400 for a sampling parameter out of range, named as the API calls it (`rename` maps
    /// the engine's field names to the request's).
    pub fn param(e: &liftoff_engine::sampling::ParamError, rename: &[(&str, &str)]) -> Self {
        let field = rename
            .iter()
            .find(|(engine, _)| *engine == e.field)
            .map_or(e.field, |(_, api)| api);
        Self::invalid(field, format!("{field}: {}", e.message))
    }

    /// 404: no such model, reader or consumer group.
    pub fn not_found(param: &str, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            kind: "not_found_error",
            ..Self::invalid(param, message)
        }
    }

    /// 403: the request is understood but not allowed (`param` names the field).
    pub fn forbidden(param: &str, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::FORBIDDEN,
            kind: "permission_error",
            ..Self::invalid(param, message)
        }
    }

    /// 401: no API key, or not one of the server's.
    pub fn unauthorized() -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            message: "missing or invalid API key: send the header 'Authorization: Bearer <key>'"
                .into(),
            kind: "authentication_error",
            param: None,
            retry_after: None,
        }
    }

    /// 503: overloaded or no healthy replica.
    pub fn unavailable(message: impl Into<String>, retry_after: Option<u64>) -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: message.into(),
            kind: "service_unavailable",
            param: None,
            retry_after,
        }
    }

    /// 500: the model failed.
    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            kind: "internal_error",
            param: None,
            retry_after: None,
        }
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status.as_u16()}})
    }
}

impl ApiError {
    /// The response with `status` and `body` in place of this error's own (another API's
    /// shape of the same error), with its headers: `WWW-Authenticate` on a 401 and
    /// `Retry-After` when it has one.
    pub fn response_as(&self, status: StatusCode, body: serde_json::Value) -> Response {
        let mut resp = (status, axum::Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(s) = self.retry_after {
            if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        resp
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.response_as(self.status, self.body())
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        // axum's message names the failing field path (serde_path_to_error).
        Self {
            status: match r.status() {
                StatusCode::UNSUPPORTED_MEDIA_TYPE => StatusCode::UNSUPPORTED_MEDIA_TYPE,
                StatusCode::PAYLOAD_TOO_LARGE => StatusCode::PAYLOAD_TOO_LARGE,
                _ => StatusCode::BAD_REQUEST,
            },
            message: r.body_text(),
            kind: "invalid_request_error",
            param: None,
            retry_after: None,
        }
    }
}

/// A request body already read as JSON, as a `T`: a 400 naming the field that does not fit.
pub fn from_json<T: serde::de::DeserializeOwned>(body: serde_json::Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(body).map_err(|e| {
        let path = e.path().to_string();
        ApiError::invalid(&path, format!("{path}: {}", e.inner()))
    })
}

/// A JSON body extractor whose rejections are [`ApiError`]s.
#[derive(Debug, Clone, Copy, Default, axum::extract::FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct ApiJson<T>(pub T);
