//! The tools put before the model: through the chat template's tool section when it has one,
//! otherwise as instructions in the system message; earlier calls and tool results rendered
//! as the template expects them.

use super::Tools;
use crate::error::ApiError;
use liftoff_engine::tokenizer::{ChatMessage, ChatTemplate};
use serde_json::{json, Map, Value};

/// The instructions given to a model whose template has no tool section, in Llama 3's JSON
/// tool-calling form.
fn system_prompt(tools: &Tools) -> String {
    let mut s = String::from(
        "You can call functions. To call one, answer with only a JSON object of the form \
         {\"name\": function name, \"parameters\": object of argument names and values}, \
         and nothing else. Do not use variables.\n\nThe functions:\n",
    );
    for t in tools.raw.as_array().into_iter().flatten() {
        s.push_str(&t.to_string());
        s.push('\n');
    }
    s
}

/// An assistant message's `tool_calls` as the JSON text the model writes.
fn calls_as_text(calls: &Value) -> String {
    calls
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| {
            let f = c.get("function")?;
            Some(
                json!({"name": f.get("name")?, "parameters": arguments_object(f.get("arguments"))})
                    .to_string(),
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Arguments as an object (requests carry them as a JSON string).
fn arguments_object(a: Option<&Value>) -> Value {
    match a {
        Some(Value::String(s)) => serde_json::from_str(s).unwrap_or(Value::String(s.clone())),
        Some(v) => v.clone(),
        None => Value::Object(Map::new()),
    }
}

/// The prompt for `messages` with `tools`: the template's tool section when it has one,
/// otherwise a system message with the instructions and the tools; earlier calls and tool
/// results are rendered as the template expects them (or as text).
pub fn render(
    template: &ChatTemplate,
    mut messages: Vec<ChatMessage>,
    tools: Option<&Tools>,
) -> Result<String, ApiError> {
    let err = |e: liftoff_engine::error::EngineError| ApiError::invalid("messages", e.to_string());
    let active = tools.filter(|t| t.active());
    if template.supports_tools() {
        for m in &mut messages {
            // Templates read each call's arguments as an object.
            if let Some(Value::Array(calls)) = &mut m.tool_calls {
                for c in calls.iter_mut() {
                    if let Some(f) = c.get_mut("function") {
                        let args = arguments_object(f.get("arguments"));
                        f["arguments"] = args;
                    }
                }
            }
        }
        return template
            .render(&messages, true, active.map(|t| &t.raw))
            .map_err(err);
    }
    for m in &mut messages {
        if let Some(calls) = m.tool_calls.take() {
            let text = calls_as_text(&calls);
            m.content = if m.content.is_empty() {
                text
            } else {
                format!("{}\n{text}", m.content)
            };
        }
        m.tool_call_id = None;
    }
    if let Some(t) = active {
        let prompt = system_prompt(t);
        match messages.first_mut() {
            Some(m) if m.role == "system" => m.content = format!("{}\n\n{prompt}", m.content),
            _ => messages.insert(0, ChatMessage::new("system", prompt)),
        }
    }
    template.render(&messages, true, None).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tools::parse;
    use crate::tools::tests::weather;

    fn conversation() -> Vec<ChatMessage> {
        let mut call = ChatMessage::new("assistant", "");
        call.tool_calls = Some(json!([{"id": "c0", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]));
        let mut result = ChatMessage::new("tool", "{\"sky\": \"sunny\"}");
        result.tool_call_id = Some("c0".into());
        vec![ChatMessage::new("user", "Weather in Oslo?"), call, result]
    }

    #[test]
    fn a_template_with_a_tool_section_gets_tools_and_calls_as_objects() {
        // In the manner of Llama 3.1's: tools as JSON, a call's arguments read as an object,
        // tool results under their own role.
        let src = "{% if tools %}TOOLS{% for t in tools %} {{ t.function.name }}{% endfor %}\n{% endif %}\
            {% for m in messages %}{% if m.tool_calls %}CALL {{ m.tool_calls[0].function.name }} \
            city={{ m.tool_calls[0].function.arguments.city }}\n{% else %}{{ m.role }}: {{ m.content }}\n\
            {% endif %}{% endfor %}";
        let template = ChatTemplate::new(src, "", "").unwrap();
        assert!(template.supports_tools());
        let tools = parse(Some(weather()), None, None).unwrap().unwrap();
        let out = render(&template, conversation(), Some(&tools)).unwrap();
        assert_eq!(
            out,
            "TOOLS get_weather\nuser: Weather in Oslo?\nCALL get_weather city=Oslo\ntool: {\"sky\": \"sunny\"}\n"
        );
        // tool_choice none: the tools are not shown.
        let none = parse(Some(weather()), Some(json!("none")), None)
            .unwrap()
            .unwrap();
        let out = render(&template, conversation(), Some(&none)).unwrap();
        assert!(!out.contains("TOOLS"), "{out}");
    }

    #[test]
    fn a_template_without_one_gets_the_tools_in_a_system_message() {
        let src = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}";
        let template = ChatTemplate::new(src, "", "").unwrap();
        assert!(!template.supports_tools());
        let tools = parse(Some(weather()), None, None).unwrap().unwrap();
        let out = render(&template, conversation(), Some(&tools)).unwrap();
        assert!(out.starts_with("<system>You can call functions."), "{out}");
        assert!(out.contains("\"name\":\"get_weather\""), "{out}");
        assert!(out.ends_with(
            "<user>Weather in Oslo?<assistant>{\"name\":\"get_weather\",\"parameters\":{\"city\":\"Oslo\"}}<tool>{\"sky\": \"sunny\"}"
        ), "{out}");
    }

    #[test]
    fn earlier_calls_render_as_text_without_a_tool_section() {
        let calls = json!([{"id": "c0", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]);
        assert_eq!(
            calls_as_text(&calls),
            r#"{"name":"get_weather","parameters":{"city":"Oslo"}}"#
        );
    }
}
