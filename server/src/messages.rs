//! Chat messages as OpenAI clients send them: `content` as a string or an array of parts
//! (`text` parts joined in order), roles `system`, `developer` (as system), `user`,
//! `assistant` (with `tool_calls`), `tool` (with `tool_call_id`), and `name`. What the server
//! cannot render yet (images, audio, files) is a 400 naming the field, never dropped.

use crate::error::{asks_nothing, ApiError};
use liftoff_engine::tokenizer::ChatMessage;
use serde::Deserialize;
use serde_json::Value;

/// One message of a request.
#[derive(Debug, Deserialize)]
pub struct RequestMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
    /// A participant's name: accepted, not shown to the model (chat templates have no place
    /// for it).
    #[allow(dead_code)]
    pub name: Option<String>,
    pub tool_calls: Option<Value>,
    pub tool_call_id: Option<String>,
    /// Any other key: refused unless empty (the SDK echoes `"refusal": null`,
    /// `"annotations": []` from earlier answers).
    #[serde(flatten)]
    pub other: std::collections::BTreeMap<String, Value>,
}

/// `content`: a string or a list of parts.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

/// One part of a message's content.
#[derive(Debug, Deserialize)]
pub struct Part {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

/// The messages as the chat template takes them.
pub fn to_chat(messages: Vec<RequestMessage>) -> Result<Vec<ChatMessage>, ApiError> {
    messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            let at = |field: &str| format!("messages[{i}].{field}");
            let role = match m.role.as_str() {
                "system" | "developer" => "system",
                "user" | "assistant" | "tool" => m.role.as_str(),
                other => {
                    return Err(ApiError::invalid(
                        &at("role"),
                        format!(
                            "unknown role '{other}' (system, developer, user, assistant, tool)"
                        ),
                    ))
                }
            }
            .to_string();
            for (key, v) in &m.other {
                if !asks_nothing(v) {
                    return Err(ApiError::invalid(
                        &at(key),
                        format!("messages[{i}].{key} is not supported"),
                    ));
                }
            }
            if m.tool_call_id.is_some() && role != "tool" {
                return Err(ApiError::invalid(
                    &at("tool_call_id"),
                    "only tool messages have a tool_call_id",
                ));
            }
            let tool_calls = match m.tool_calls {
                None | Some(Value::Null) => None,
                Some(calls) if role == "assistant" => Some(check_calls(calls, &at("tool_calls"))?),
                Some(_) => {
                    return Err(ApiError::invalid(
                        &at("tool_calls"),
                        "only assistant messages have tool_calls",
                    ))
                }
            };
            if role == "tool" && m.tool_call_id.is_none() {
                return Err(ApiError::invalid(
                    &at("tool_call_id"),
                    "a tool message needs the tool_call_id it answers",
                ));
            }
            let content = match m.content {
                // Only an assistant message (one that made tool calls) may have none.
                None if role == "assistant" => String::new(),
                None => {
                    return Err(ApiError::invalid(
                        &at("content"),
                        format!("a {} message needs content", m.role),
                    ))
                }
                Some(Content::Text(t)) => t,
                Some(Content::Parts(parts)) => {
                    let mut text = String::new();
                    for (j, p) in parts.into_iter().enumerate() {
                        match (p.kind.as_str(), p.text) {
                            ("text", Some(t)) => text.push_str(&t),
                            ("text", None) => {
                                return Err(ApiError::invalid(
                                    &at(&format!("content[{j}].text")),
                                    "a text part needs its text",
                                ))
                            }
                            (kind, _) => {
                                return Err(ApiError::invalid(
                                    &at(&format!("content[{j}].type")),
                                    format!(
                                    "content parts of type '{kind}' are not supported (text only)"
                                ),
                                ))
                            }
                        }
                    }
                    text
                }
            };
            let mut msg = ChatMessage::new(role, content);
            msg.tool_calls = tool_calls;
            msg.tool_call_id = m.tool_call_id;
            Ok(msg)
        })
        .collect()
}

/// An assistant message's `tool_calls`: a list of `{"type": "function", "function": {"name",
/// "arguments"}}` (an `id` too, usually).
fn check_calls(calls: Value, field: &str) -> Result<Value, ApiError> {
    let list = calls
        .as_array()
        .ok_or_else(|| ApiError::invalid(field, "tool_calls is a list"))?;
    for (i, c) in list.iter().enumerate() {
        let named = c
            .get("function")
            .and_then(|f| f.get("name"))
            .is_some_and(Value::is_string);
        let kind = c.get("type").and_then(Value::as_str).unwrap_or("function");
        if !named || kind != "function" {
            return Err(ApiError::invalid(
                &format!("{field}[{i}]"),
                "a tool call is {\"type\": \"function\", \"function\": {\"name\", \"arguments\"}}",
            ));
        }
    }
    Ok(calls)
}
