//! Structured output: the constraint each API asks for (Takeoff's `json_schema` and
//! `regex_string`, OpenAI's `response_format`, TGI's `parameters.grammar`), checked against
//! the model's tokenizer so that a schema or regex that cannot be compiled is a 400 naming its
//! field. Decoding under it is the engine's (llguidance).

use crate::error::ApiError;
use crate::service::ModelService;
use liftoff_engine::constraint::Constraint;
use serde_json::Value;

/// A JSON schema given as an object or as a string holding one.
fn schema(v: Value, field: &str) -> Result<Value, ApiError> {
    let v = match v {
        Value::String(s) => serde_json::from_str(&s)
            .map_err(|e| ApiError::invalid(field, format!("{field}: not a JSON schema ({e})")))?,
        v => v,
    };
    match v {
        Value::Object(_) | Value::Bool(_) => Ok(v),
        _ => Err(ApiError::invalid(
            field,
            format!("{field}: a JSON schema is an object"),
        )),
    }
}

/// Takeoff's `json_schema` / `regex_string` (at most one of them).
pub fn takeoff(
    json_schema: Option<Value>,
    regex: Option<String>,
) -> Result<Option<(Constraint, &'static str)>, ApiError> {
    match (json_schema.filter(|v| !v.is_null()), regex) {
        (Some(_), Some(_)) => Err(ApiError::invalid(
            "regex_string",
            "give json_schema or regex_string, not both",
        )),
        (Some(s), None) => Ok(Some((
            Constraint::JsonSchema(schema(s, "json_schema")?),
            "json_schema",
        ))),
        (None, Some(r)) => Ok(Some((Constraint::Regex(r), "regex_string"))),
        (None, None) => Ok(None),
    }
}

/// OpenAI's `response_format`: `{"type": "text"}`, `{"type": "json_object"}` or
/// `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`.
pub fn response_format(v: &Value) -> Result<Option<(Constraint, &'static str)>, ApiError> {
    const F: &str = "response_format";
    if v.is_null() {
        return Ok(None);
    }
    match v.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some((
            Constraint::JsonSchema(serde_json::json!({"type": "object"})),
            F,
        ))),
        Some("json_schema") => {
            let s = v
                .get("json_schema")
                .and_then(|j| j.get("schema"))
                .cloned()
                .ok_or_else(|| {
                    ApiError::invalid(
                        "response_format.json_schema.schema",
                        "response_format of type json_schema needs json_schema.schema",
                    )
                })?;
            Ok(Some((
                Constraint::JsonSchema(schema(s, "response_format.json_schema.schema")?),
                F,
            )))
        }
        _ => Err(ApiError::invalid(
            "response_format.type",
            "response_format.type must be text, json_object or json_schema",
        )),
    }
}

/// TGI's `parameters.grammar`: `{"type": "json" | "json_object" | "regex", "value": ...}`.
pub fn tgi_grammar(v: &Value) -> Result<Option<(Constraint, &'static str)>, ApiError> {
    const F: &str = "parameters.grammar";
    if v.is_null() {
        return Ok(None);
    }
    let value = v.get("value").cloned().unwrap_or(Value::Null);
    match v.get("type").and_then(Value::as_str) {
        Some("json") | Some("json_object") => Ok(Some((
            Constraint::JsonSchema(schema(value, "parameters.grammar.value")?),
            F,
        ))),
        Some("regex") => match value {
            Value::String(r) => Ok(Some((Constraint::Regex(r), F))),
            _ => Err(ApiError::invalid(
                "parameters.grammar.value",
                "a regex grammar's value is a string",
            )),
        },
        _ => Err(ApiError::invalid(
            "parameters.grammar.type",
            "parameters.grammar.type must be json or regex",
        )),
    }
}

/// Compiles `c` for the model's tokenizer: 400 naming `field` when it cannot be used.
pub fn check(
    service: &ModelService,
    c: Option<(Constraint, &'static str)>,
) -> Result<Option<Constraint>, ApiError> {
    let Some((c, field)) = c else {
        return Ok(None);
    };
    let compiler = service
        .tokenizer
        .grammar()
        .map_err(|e| ApiError::invalid(field, e))?;
    compiler
        .matcher(&c)
        .map_err(|e| ApiError::invalid(field, format!("{field}: {e}")))?;
    Ok(Some(c))
}
