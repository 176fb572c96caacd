//! The model's tool calls read back from its text, and written in OpenAI's shape.

use serde_json::{json, Map, Value};

/// A call read from the model's output.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub name: String,
    /// The arguments, a JSON object.
    pub arguments: Value,
}

/// Reads the tool calls in `text`, and nothing else: Llama 3's JSON objects `{"name": ...,
/// "parameters": {...}}` (`arguments` is accepted for `parameters`, also as a JSON string),
/// optionally after `<|python_tag|>`, separated by `;` or whitespace; Hermes/Qwen's
/// `<tool_call>{...}</tool_call>` blocks; Mistral's `[TOOL_CALLS][{...}, ...]` lists.
pub fn parse_calls(text: &str) -> Option<Vec<ToolCall>> {
    let mut rest = text.trim();
    for prefix in ["<|python_tag|>", "[TOOL_CALLS]"] {
        rest = rest.strip_prefix(prefix).unwrap_or(rest).trim_start();
    }
    let mut calls = Vec::new();
    while !rest.is_empty() {
        let wrapped = rest.strip_prefix("<tool_call>");
        let body = wrapped.unwrap_or(rest).trim_start();
        let mut it = serde_json::Deserializer::from_str(body).into_iter::<Value>();
        let v = it.next()?.ok()?;
        let mut after = body[it.byte_offset()..].trim_start();
        if wrapped.is_some() {
            after = after.strip_prefix("</tool_call>")?.trim_start();
        }
        rest = after.strip_prefix(';').unwrap_or(after).trim_start();
        let items = match v {
            Value::Array(a) => a,
            v => vec![v],
        };
        for item in items {
            calls.push(call_of(&item)?);
        }
    }
    (!calls.is_empty()).then_some(calls)
}

/// One call object.
fn call_of(v: &Value) -> Option<ToolCall> {
    let obj = v.as_object()?;
    let name = obj.get("name")?.as_str()?.to_string();
    let arguments = match obj.get("parameters").or_else(|| obj.get("arguments")) {
        Some(a @ Value::Object(_)) => a.clone(),
        // Some models write the arguments as a JSON string.
        Some(Value::String(s)) => match serde_json::from_str::<Value>(s).ok()? {
            a @ Value::Object(_) => a,
            _ => return None,
        },
        None => Value::Object(Map::new()),
        Some(_) => return None,
    };
    if obj
        .keys()
        .any(|k| !["name", "parameters", "arguments"].contains(&k.as_str()))
    {
        return None;
    }
    Some(ToolCall { name, arguments })
}

/// OpenAI's `tool_calls` list for `calls` (with each call's `index` in a streamed delta); ids
/// are unique per response.
pub fn calls_json(calls: &[ToolCall], id_prefix: &str, streamed: bool) -> Value {
    calls
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let mut v = json!({"id": format!("call_{id_prefix}_{i}"), "type": "function",
                   "function": {"name": c.name, "arguments": c.arguments.to_string()}});
            if streamed {
                v["index"] = json!(i);
            }
            v
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tools::parse;
    use crate::tools::tests::weather;

    #[test]
    fn reads_llama3_json_calls() {
        let c = parse_calls(r#" {"name": "f", "parameters": {"a": 1}} "#).unwrap();
        assert_eq!(
            c,
            vec![ToolCall {
                name: "f".into(),
                arguments: json!({"a": 1})
            }]
        );
        let c = parse_calls(r#"<|python_tag|>{"name": "f", "arguments": "{\"a\": 2}"}; {"name": "g", "parameters": {}}"#).unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].arguments, json!({"a": 2}));
        assert_eq!(c[1].name, "g");
        assert!(parse_calls("The weather is fine.").is_none());
        let hermes = "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": 1}}\n</tool_call>\n<tool_call>{\"name\": \"g\", \"arguments\": {}}</tool_call>";
        let c = parse_calls(hermes).unwrap();
        assert_eq!((c[0].name.as_str(), c[1].name.as_str()), ("f", "g"));
        assert_eq!(c[0].arguments, json!({"a": 1}));
        assert!(
            parse_calls("<tool_call>{\"name\": \"f\"}").is_none(),
            "unclosed"
        );
        let mistral =
            r#"[TOOL_CALLS][{"name": "f", "arguments": {"a": 3}}, {"name": "g", "arguments": {}}]"#;
        let c = parse_calls(mistral).unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].arguments, json!({"a": 3}));
        assert!(parse_calls(r#"{"name": "f", "parameters": {}} and then text"#).is_none());
        assert!(parse_calls(r#"{"city": "Paris"}"#).is_none());
        assert!(parse_calls(r#"{"name": "f", "parameters": [1]}"#).is_none());
        let t = parse(Some(weather()), None, None).unwrap().unwrap();
        assert!(t
            .parse_calls(r#"{"name": "other", "parameters": {}}"#)
            .is_none());
        assert!(t
            .parse_calls(r#"{"name": "get_weather", "parameters": {"city": "Oslo"}}"#)
            .is_some());
    }

    #[test]
    fn calls_are_written_in_openai_shape() {
        let j = calls_json(
            &[ToolCall {
                name: "f".into(),
                arguments: json!({"x": 1}),
            }],
            "abc",
            false,
        );
        assert!(j[0].get("index").is_none());
        assert_eq!(j[0]["function"]["arguments"], "{\"x\":1}");
        assert_eq!(j[0]["type"], "function");
        let streamed = calls_json(
            &[ToolCall {
                name: "f".into(),
                arguments: json!({}),
            }],
            "abc",
            true,
        );
        assert_eq!(streamed[0]["index"], 0);
    }
}
