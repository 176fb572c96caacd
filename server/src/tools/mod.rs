//! Tool calling on `/v1/chat/completions`: OpenAI's `tools` and `tool_choice` read here, with
//! the constraint that `required`, a named function or a `strict` function puts on the output
//! (so the arguments always validate); the tools put before the model in [`render`], the
//! model's calls read back in [`calls`].

use crate::error::ApiError;
use liftoff_engine::constraint::{Constraint, JSON_WHITESPACE};
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

mod calls;
mod render;

pub use calls::{calls_json, parse_calls, ToolCall};
pub use render::render;

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

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn weather() -> Value {
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
}
