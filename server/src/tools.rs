//! Tool calling on `/v1/chat/completions`: OpenAI's `tools` and `tool_choice`, the tools put
//! before the model (by its chat template when it has a tool section, otherwise in a system
//! message), the model's calls read back in Llama 3's JSON form (`{"name": ..., "parameters":
//! {...}}`, optionally after `<|python_tag|>`, several separated by `;`), and `required` or a
//! named function enforced with the constrained decoder so the arguments always validate.

use crate::error::ApiError;
use liftoff_engine::constraint::{Constraint, JSON_WHITESPACE};
use liftoff_engine::tokenizer::{ChatMessage, ChatTemplate};
use serde_json::{json, Map, Value};

/// What `tool_choice` asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolChoice {
    /// Never call a tool (the tools are not shown to the model).
    None,
    /// The model decides: a call it writes is returned as a call, anything else as text.
    Auto,
    /// Exactly one call to one of the tools.
    Required,
    /// Exactly one call to this function.
    Named(String),
}

/// One function the model may call.
#[derive(Debug, Clone)]
pub struct Function {
    pub name: String,
    /// Its arguments' JSON schema (an object schema).
    pub parameters: Value,
    /// `strict`: a call's arguments must validate against `parameters`, also under `auto`.
    pub strict: bool,
}

/// A request's tools and choice.
#[derive(Debug, Clone)]
pub struct Tools {
    pub functions: Vec<Function>,
    /// The tools as the request sent them (what templates with a tool section read).
    pub raw: Value,
    pub choice: ToolChoice,
    /// `parallel_tool_calls`: whether an answer may hold several calls (false: the first).
    pub parallel: bool,
}

/// A call read from the model's output.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub name: String,
    /// The arguments, a JSON object.
    pub arguments: Value,
}

fn bad(field: &str, msg: impl Into<String>) -> ApiError {
    ApiError::invalid(field, msg)
}

/// Reads `tools`, `tool_choice` and `parallel_tool_calls`; `None` when no tools are given.
pub fn parse(
    tools: Option<Value>,
    tool_choice: Option<Value>,
    parallel_tool_calls: Option<Value>,
) -> Result<Option<Tools>, ApiError> {
    let raw = match tools {
        None | Some(Value::Null) => Value::Array(Vec::new()),
        Some(v @ Value::Array(_)) => v,
        Some(_) => return Err(bad("tools", "tools must be a list of tools")),
    };
    let mut functions: Vec<Function> = Vec::new();
    for (i, t) in raw.as_array().into_iter().flatten().enumerate() {
        let at = |f: &str| format!("tools[{i}].{f}");
        match t.get("type").and_then(Value::as_str) {
            Some("function") => {}
            other => {
                return Err(bad(
                    &at("type"),
                    format!("tools of type {other:?} are not supported (function only)"),
                ))
            }
        }
        let f = t
            .get("function")
            .and_then(Value::as_object)
            .ok_or_else(|| bad(&at("function"), "a function tool needs its function object"))?;
        let name = f
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| {
                !n.is_empty()
                    && n.len() <= 64
                    && n.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            })
            .ok_or_else(|| {
                bad(
                    &at("function.name"),
                    "a function's name is 1-64 characters of a-z, A-Z, 0-9, _ and -",
                )
            })?;
        if functions.iter().any(|g| g.name == name) {
            return Err(bad(
                &at("function.name"),
                format!("two tools are named {name}"),
            ));
        }
        for key in f.keys() {
            if !["name", "description", "parameters", "strict"].contains(&key.as_str()) {
                return Err(bad(
                    &at(&format!("function.{key}")),
                    format!("function.{key} is not supported"),
                ));
            }
        }
        let parameters = match f.get("parameters") {
            None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
            Some(p @ Value::Object(_)) => p.clone(),
            Some(_) => {
                return Err(bad(
                    &at("function.parameters"),
                    "a function's parameters are a JSON schema object",
                ))
            }
        };
        let strict = match f.get("strict") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(bad(&at("function.strict"), "strict is a boolean")),
        };
        functions.push(Function {
            name: name.to_string(),
            parameters,
            strict,
        });
    }
    let choice = match tool_choice {
        None | Some(Value::Null) => {
            if functions.is_empty() {
                ToolChoice::None
            } else {
                ToolChoice::Auto
            }
        }
        Some(Value::String(s)) => match s.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            _ => {
                return Err(bad(
                    "tool_choice",
                    "tool_choice is none, auto, required or {\"type\": \"function\", \"function\": {\"name\": ...}}",
                ))
            }
        },
        Some(v) => {
            let name = v
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .filter(|_| v.get("type").and_then(Value::as_str) == Some("function"))
                .ok_or_else(|| {
                    bad(
                        "tool_choice",
                        "a named tool_choice is {\"type\": \"function\", \"function\": {\"name\": ...}}",
                    )
                })?;
            if !functions.iter().any(|f| f.name == name) {
                return Err(bad(
                    "tool_choice.function.name",
                    format!("tool_choice names {name}, which is not among the tools"),
                ));
            }
            ToolChoice::Named(name.to_string())
        }
    };
    if functions.is_empty() {
        if !matches!(choice, ToolChoice::None) {
            return Err(bad("tool_choice", "tool_choice needs tools"));
        }
        return Ok(None);
    }
    let parallel = match parallel_tool_calls {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => b,
        Some(_) => {
            return Err(bad(
                "parallel_tool_calls",
                "parallel_tool_calls is a boolean",
            ))
        }
    };
    Ok(Some(Tools {
        functions,
        raw,
        choice,
        parallel,
    }))
}

impl Tools {
    /// Whether the model is shown the tools and its output read for calls.
    pub fn active(&self) -> bool {
        self.choice != ToolChoice::None
    }

    /// The constraint on the output: for `required` or a named function a JSON object
    /// `{"name": <one of the functions>, "parameters": <its arguments>}`; for `auto` with a
    /// `strict` function, text (not starting with `{`) or such a call, its arguments valid
    /// against the schema of a strict function (any object for the others).
    pub fn constraint(&self) -> Option<Constraint> {
        let (enforced, calls): (Vec<&Function>, bool) = match &self.choice {
            ToolChoice::None => return None,
            ToolChoice::Auto if !self.functions.iter().any(|f| f.strict) => return None,
            ToolChoice::Auto => (self.functions.iter().collect(), true),
            ToolChoice::Named(n) => (
                self.functions.iter().filter(|f| &f.name == n).collect(),
                false,
            ),
            ToolChoice::Required => (self.functions.iter().collect(), false),
        };
        let mut defs = Map::new();
        let schemas: Vec<Value> = enforced
            .iter()
            .map(|f| {
                let parameters = if calls && !f.strict {
                    json!({"type": "object"})
                } else {
                    hoist(f, &mut defs)
                };
                json!({"type": "object",
                       "properties": {"name": {"const": f.name}, "parameters": parameters},
                       "required": ["name", "parameters"], "additionalProperties": false})
            })
            .collect();
        let mut root = match schemas.len() {
            1 => schemas.into_iter().next().unwrap_or_default(),
            _ => json!({"anyOf": schemas}),
        };
        if !defs.is_empty() {
            root["$defs"] = Value::Object(defs);
        }
        if !calls {
            return Some(Constraint::JsonSchema(root));
        }
        root["x-guidance"] = json!({"whitespace_pattern": JSON_WHITESPACE});
        Some(Constraint::Lark(format!(
            "start: TEXT | WS? call\ncall: %json {root}\nWS: /\\s+/\nTEXT: /\\s*[^{{\\s](.|\\n)*/\n"
        )))
    }

    /// Reads the calls in `text`; `None` when it is not (only) calls to these functions.
    pub fn parse_calls(&self, text: &str) -> Option<Vec<ToolCall>> {
        let mut calls = parse_calls(text)?;
        if !self.parallel {
            calls.truncate(1);
        }
        calls
            .iter()
            .all(|c| self.functions.iter().any(|f| f.name == c.name))
            .then_some(calls)
    }
}

/// `f`'s parameters schema as a reference into the combined schema's `$defs`: the schema goes
/// there under the function's name, its own `$defs` / `definitions` under `<name>__<key>`, and
/// every local `$ref` is rewritten to match (a schema nested under another root would
/// otherwise resolve its references against the wrong document).
fn hoist(f: &Function, defs: &mut Map<String, Value>) -> Value {
    // Without references the schema is inlined (llguidance compiles it faster).
    if !has_ref(&f.parameters) {
        let mut params = f.parameters.clone();
        if let Some(obj) = params.as_object_mut() {
            obj.remove("$defs");
            obj.remove("definitions");
        }
        return params;
    }
    let mut params = f.parameters.clone();
    let mut own = Map::new();
    if let Some(obj) = params.as_object_mut() {
        for key in ["$defs", "definitions"] {
            if let Some(Value::Object(d)) = obj.remove(key) {
                own.extend(d);
            }
        }
    }
    let rewrite = |v: &mut Value| rewrite_refs(v, &f.name);
    for (k, mut v) in own {
        rewrite(&mut v);
        defs.insert(format!("{}__{k}", f.name), v);
    }
    rewrite(&mut params);
    defs.insert(f.name.clone(), params);
    json!({"$ref": format!("#/$defs/{}", f.name)})
}

fn has_ref(v: &Value) -> bool {
    match v {
        Value::Object(obj) => obj.contains_key("$ref") || obj.values().any(has_ref),
        Value::Array(a) => a.iter().any(has_ref),
        _ => false,
    }
}

fn rewrite_refs(v: &mut Value, name: &str) {
    match v {
        Value::Object(obj) => {
            if let Some(Value::String(r)) = obj.get_mut("$ref") {
                let rest = r
                    .strip_prefix("#/$defs/")
                    .or_else(|| r.strip_prefix("#/definitions/"));
                if let Some(rest) = rest {
                    *r = format!("#/$defs/{name}__{rest}");
                } else if let Some(pointer) = r.strip_prefix('#') {
                    *r = format!("#/$defs/{name}{pointer}");
                }
            }
            obj.values_mut().for_each(|x| rewrite_refs(x, name));
        }
        Value::Array(a) => a.iter_mut().for_each(|x| rewrite_refs(x, name)),
        _ => {}
    }
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

    fn weather() -> Value {
        json!([{"type": "function", "function": {"name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}])
    }

    #[test]
    fn parses_choices_and_refuses_bad_tools() {
        let t = parse(Some(weather()), None, None).unwrap().unwrap();
        assert_eq!(t.choice, ToolChoice::Auto);
        let t = parse(Some(weather()), Some(json!("required")), None)
            .unwrap()
            .unwrap();
        assert_eq!(t.choice, ToolChoice::Required);
        let named = json!({"type": "function", "function": {"name": "get_weather"}});
        let t = parse(Some(weather()), Some(named), None).unwrap().unwrap();
        assert_eq!(t.choice, ToolChoice::Named("get_weather".into()));
        let other = json!({"type": "function", "function": {"name": "nope"}});
        assert_eq!(
            parse(Some(weather()), Some(other), None)
                .unwrap_err()
                .param
                .as_deref(),
            Some("tool_choice.function.name")
        );
        let code = json!([{"type": "code_interpreter"}]);
        assert_eq!(
            parse(Some(code), None, None).unwrap_err().param.as_deref(),
            Some("tools[0].type")
        );
        assert!(parse(None, Some(json!("required")), None).is_err());
        assert!(parse(None, Some(json!("none")), None).unwrap().is_none());
    }

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
    fn required_and_named_choices_constrain_the_call() {
        let t = parse(Some(weather()), Some(json!("required")), None)
            .unwrap()
            .unwrap();
        let Some(Constraint::JsonSchema(s)) = t.constraint() else {
            panic!("no schema")
        };
        assert_eq!(s["properties"]["name"]["const"], "get_weather");
        assert_eq!(s["properties"]["parameters"]["required"][0], "city");
        assert!(s.get("$defs").is_none());
        let auto = parse(Some(weather()), None, None).unwrap().unwrap();
        assert!(auto.constraint().is_none());
        let mut strict = weather();
        strict[0]["function"]["strict"] = json!(true);
        let auto = parse(Some(strict), None, None).unwrap().unwrap();
        let Some(Constraint::Lark(g)) = auto.constraint() else {
            panic!("strict under auto needs a grammar")
        };
        assert!(
            g.starts_with("start: TEXT | WS? call\ncall: %json {"),
            "{g}"
        );
        assert!(g.contains(r#""required":["city"]"#), "{g}");
    }

    #[test]
    fn nested_definitions_are_hoisted_with_their_references() {
        // As openai.pydantic_function_tool writes a model with a nested one.
        let tools = json!([{"type": "function", "function": {"name": "book", "parameters": {
            "type": "object", "required": ["guest"],
            "properties": {"guest": {"$ref": "#/$defs/Person"}, "again": {"$ref": "#"}},
            "$defs": {"Person": {"type": "object", "properties": {
                "name": {"type": "string"}, "friend": {"$ref": "#/$defs/Person"}}}}}}}]);
        let t = parse(Some(tools), Some(json!("required")), None)
            .unwrap()
            .unwrap();
        let Some(Constraint::JsonSchema(s)) = t.constraint() else {
            panic!("no schema")
        };
        let d = &s["$defs"];
        assert_eq!(
            d["book"]["properties"]["guest"]["$ref"],
            "#/$defs/book__Person"
        );
        assert_eq!(d["book"]["properties"]["again"]["$ref"], "#/$defs/book");
        assert_eq!(
            d["book__Person"]["properties"]["friend"]["$ref"],
            "#/$defs/book__Person"
        );
        assert!(d["book"].get("$defs").is_none());
    }

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
    }
}
