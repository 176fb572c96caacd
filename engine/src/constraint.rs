//! Constrained decoding with llguidance: a request's JSON schema or regex becomes a grammar,
//! each constrained sequence holds a matcher, and every step the matcher gives the tokens
//! allowed next as a bitmask that the sampler applies where it samples (CPU or GPU). EOS is
//! allowed only where the grammar accepts.

use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// What a request's output must match.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Constraint {
    /// A JSON document valid against this schema (`{"type": "object"}` for any object).
    JsonSchema(serde_json::Value),
    /// Text that fully matches this regular expression.
    Regex(String),
    /// A grammar in llguidance's Lark dialect (terminals as regexes, `%json {schema}` for a
    /// JSON document valid against a schema).
    Lark(String),
}

/// Whitespace JSON output may have between two tokens: at most this many characters, so that
/// a model cannot loop on newlines inside a document (a schema's own `x-guidance` options
/// take precedence).
pub const JSON_WHITESPACE: &str = r"[\x20\x0A\x0D\x09]{1,20}";

impl Constraint {
    fn grammar(&self) -> TopLevelGrammar {
        match self {
            Self::JsonSchema(schema) => {
                let mut schema = schema.clone();
                if let Some(obj) = schema.as_object_mut() {
                    obj.entry("x-guidance").or_insert_with(
                        || serde_json::json!({"whitespace_pattern": JSON_WHITESPACE}),
                    );
                }
                TopLevelGrammar::from_json_schema(schema)
            }
            Self::Regex(rx) => TopLevelGrammar::from_regex(rx),
            Self::Lark(g) => TopLevelGrammar::from_lark(g.clone()),
        }
    }
}

/// Compiles constraints for one tokenizer (built once per tokenizer: it indexes the
/// vocabulary).
pub struct GrammarCompiler {
    factory: ParserFactory,
    eos: Vec<u32>,
}

impl GrammarCompiler {
    /// A compiler for the tokenizer serialised as `tokenizer_json`, ending sequences with
    /// `eos`.
    pub fn new(tokenizer_json: &[u8], eos: &[u32]) -> Result<Self, String> {
        let mut bytes = toktrie_hf_tokenizers::ByteTokenizer::from_json_bytes(tokenizer_json)
            .map_err(|e| format!("constrained decoding cannot use this tokenizer: {e}"))?;
        if !eos.is_empty() {
            bytes.set_eos_tokens(eos);
        }
        let env = bytes
            .into_tok_env(None)
            .map_err(|e| format!("constrained decoding cannot use this tokenizer: {e}"))?;
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
        factory.quiet();
        Ok(Self {
            factory,
            eos: eos.to_vec(),
        })
    }

    /// A matcher for one sequence; `Err` says why the schema or regex cannot be used.
    pub fn matcher(&self, c: &Constraint) -> Result<SeqConstraint, String> {
        let parser = self
            .factory
            .create_parser(c.grammar())
            .map_err(|e| first_line(&e.to_string()))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(first_line(&e));
        }
        Ok(SeqConstraint {
            matcher,
            eos: self.eos.clone(),
        })
    }
}

/// One sequence's place in its grammar.
pub struct SeqConstraint {
    matcher: Matcher,
    eos: Vec<u32>,
}

impl std::fmt::Debug for SeqConstraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SeqConstraint")
            .field("stopped", &self.matcher.is_stopped())
            .finish()
    }
}

impl SeqConstraint {
    /// The tokens allowed next, as a bitmask (bit `t % 32` of word `t / 32`): what the grammar
    /// allows, with the EOS tokens exactly where it accepts. A finished grammar (or a matcher
    /// in error) allows only EOS, so the sequence ends.
    pub fn mask(&mut self) -> Vec<u32> {
        let (mut words, accepting) = if self.matcher.is_stopped() {
            (Vec::new(), true)
        } else {
            match self.matcher.compute_mask() {
                Ok(v) => {
                    let accepting = self.matcher.is_accepting().unwrap_or(false);
                    (v.as_slice().to_vec(), accepting)
                }
                Err(e) => {
                    tracing::warn!("constrained decoding: {e}; ending the sequence");
                    (Vec::new(), true)
                }
            }
        };
        for &t in &self.eos {
            let (w, bit) = (t as usize / 32, 1u32 << (t % 32));
            if words.len() <= w {
                words.resize(w + 1, 0);
            }
            if accepting {
                words[w] |= bit;
            } else {
                words[w] &= !bit;
            }
        }
        words
    }

    /// Moves past `token` (an EOS token ends the grammar instead).
    pub fn advance(&mut self, token: u32) -> Result<(), String> {
        if self.eos.contains(&token) || self.matcher.is_stopped() {
            return Ok(());
        }
        self.matcher
            .consume_token(token)
            .map_err(|e| first_line(&e.to_string()))
    }
}

/// llguidance's errors carry a dump of the parser's state after the first line.
fn first_line(e: &str) -> String {
    e.lines().next().unwrap_or_default().to_string()
}

/// Builds a tokenizer's compiler once, on first use, and shares it.
#[derive(Clone, Default)]
pub struct LazyCompiler(Arc<std::sync::OnceLock<Result<Arc<GrammarCompiler>, String>>>);

impl LazyCompiler {
    /// The compiler, built with `make` the first time.
    pub fn get(
        &self,
        make: impl FnOnce() -> Result<GrammarCompiler, String>,
    ) -> Result<Arc<GrammarCompiler>, String> {
        self.0.get_or_init(|| make().map(Arc::new)).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn tokenizer() -> crate::tokenizer::Tokenizer {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/models/tiny-llama2-f32");
        crate::tokenizer::Tokenizer::from_hf_dir(&dir, vec![2]).unwrap()
    }

    /// Walks a grammar greedily by the lowest allowed id: the text it produces must match.
    fn walk(c: &Constraint, steps: usize) -> (String, bool) {
        let tok = tokenizer();
        let compiler = tok.grammar().unwrap();
        let mut m = compiler.matcher(c).unwrap();
        let mut ids = Vec::new();
        for _ in 0..steps {
            let mask = m.mask();
            // The highest allowed id that is not EOS, else EOS.
            let allowed: Vec<u32> = (0..mask.len() as u32 * 32)
                .filter(|&t| liftoff_kernels::sampling::mask_allows(&mask, t as usize))
                .collect();
            assert!(!allowed.is_empty());
            let next = allowed.iter().rev().find(|&&t| t != 2).copied();
            match next {
                Some(t) => {
                    ids.push(t);
                    m.advance(t).unwrap();
                }
                None => return (tok.decode(&ids, true).unwrap(), true),
            }
        }
        (tok.decode(&ids, true).unwrap(), false)
    }

    #[test]
    fn a_regex_is_followed_to_its_end_and_then_only_eos_is_allowed() {
        let (text, ended) = walk(&Constraint::Regex("ab[0-9]{3}".into()), 20);
        assert!(ended, "{text}");
        assert_eq!(text.len(), 5, "{text}");
        assert!(text.starts_with("ab") && text[2..].chars().all(|c| c.is_ascii_digit()));
    }

    #[test]
    fn eos_waits_for_an_accepting_state() {
        let tok = tokenizer();
        let compiler = tok.grammar().unwrap();
        let mut m = compiler
            .matcher(&Constraint::JsonSchema(
                serde_json::json!({"type": "integer"}),
            ))
            .unwrap();
        let mask = m.mask();
        assert!(
            !liftoff_kernels::sampling::mask_allows(&mask, 2),
            "no EOS before a digit"
        );
        let one = tok.encode("1", false).unwrap()[0];
        assert!(liftoff_kernels::sampling::mask_allows(&mask, one as usize));
        m.advance(one).unwrap();
        assert!(liftoff_kernels::sampling::mask_allows(&m.mask(), 2));
    }

    /// Whether the grammar accepts `text` whole (tokenized as the tokenizer does).
    pub(crate) fn accepts(c: &Constraint, text: &str) -> bool {
        let tok = tokenizer();
        let compiler = tok.grammar().unwrap();
        let mut m = compiler.matcher(c).unwrap();
        for id in tok.encode(text, false).unwrap() {
            if !liftoff_kernels::sampling::mask_allows(&m.mask(), id as usize)
                || m.advance(id).is_err()
            {
                return false;
            }
        }
        liftoff_kernels::sampling::mask_allows(&m.mask(), 2)
    }

    #[test]
    fn a_lark_grammar_takes_text_or_a_json_document() {
        let g = Constraint::Lark(
            r#"start: TEXT | %json {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"], "additionalProperties": false}
TEXT: /[^{\s](.|\n)*/"#
                .into(),
        );
        assert!(accepts(&g, "hello there"));
        let ws = Constraint::Lark(
            r#"start: TEXT | WS? call
call: %json {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"], "additionalProperties": false}
WS: /\s+/
TEXT: /\s*[^{\s](.|\n)*/"#
                .into(),
        );
        assert!(accepts(&ws, " \n{\"a\": 1}"));
        assert!(accepts(&ws, "\nhello {"));
        assert!(!accepts(&ws, " {\"a\": true}"));
        assert!(accepts(&g, r#"{"a": 12}"#));
        assert!(!accepts(&g, r#"{"a": "x"}"#));
        assert!(!accepts(&g, r#"{"b": 1}"#));
    }

    #[test]
    fn bad_schemas_and_regexes_are_errors() {
        let tok = tokenizer();
        let compiler = tok.grammar().unwrap();
        assert!(compiler.matcher(&Constraint::Regex("a(b".into())).is_err());
        let bad = Constraint::JsonSchema(serde_json::json!({"type": "no-such-type"}));
        assert!(compiler.matcher(&bad).is_err());
    }
}
