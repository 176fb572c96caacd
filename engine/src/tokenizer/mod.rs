//! Tokenizers: from `tokenizer.json` (Hugging Face directories) or rebuilt from a GGUF file's
//! own vocabulary; chat templates; incremental detokenization.

mod chat_template;
mod detokenizer;
mod gguf_vocab;

pub use chat_template::{ChatMessage, ChatTemplate};
pub use detokenizer::IncrementalDecoder;

use crate::constraint::{GrammarCompiler, LazyCompiler};
use crate::error::{EngineError, Result};
use candle_core::quantized::gguf_file::Value;
use std::collections::HashMap;
use std::path::Path;

/// A tokenizer with its special tokens and chat template.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    eos_token_ids: Vec<u32>,
    chat_template: Option<ChatTemplate>,
    /// The grammar compiler of constrained decoding, built on first use (shared by clones).
    grammar: LazyCompiler,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("eos_token_ids", &self.eos_token_ids)
            .finish()
    }
}

fn tok_err(e: impl std::fmt::Display) -> EngineError {
    EngineError::Tokenizer(e.to_string())
}

/// A special token in `tokenizer_config.json`: a string or an `AddedToken` object.
fn token_string(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json` and `tokenizer_config.json` (chat template, BOS/EOS) from a
    /// Hugging Face model directory; `eos_token_ids` are the model config's.
    pub fn from_hf_dir(dir: &Path, mut eos_token_ids: Vec<u32>) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(EngineError::Tokenizer(format!(
                "{} not found",
                path.display()
            )));
        }
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| EngineError::Tokenizer(format!("{}: {e}", path.display())))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: serde_json::Value = match std::fs::read_to_string(&cfg_path) {
            Ok(text) => serde_json::from_str(&text)
                .map_err(|e| EngineError::Tokenizer(format!("{}: {e}", cfg_path.display())))?,
            Err(_) => serde_json::Value::Null,
        };
        let bos = token_string(cfg.get("bos_token")).unwrap_or_default();
        let eos = token_string(cfg.get("eos_token")).unwrap_or_default();
        if let Some(id) = inner.token_to_id(&eos) {
            if !eos_token_ids.contains(&id) {
                eos_token_ids.push(id);
            }
        }
        let template = match cfg.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            // A list of named templates: take "default".
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
            _ => None,
        };
        let template = match template {
            Some(t) => Some(t),
            None => std::fs::read_to_string(dir.join("chat_template.jinja")).ok(),
        };
        let chat_template = template
            .map(|t| ChatTemplate::new(&t, &bos, &eos))
            .transpose()?;
        Ok(Self {
            inner,
            eos_token_ids,
            chat_template,
            grammar: LazyCompiler::default(),
        })
    }

    /// Rebuilds the tokenizer a GGUF file describes (`tokenizer.ggml.*` metadata).
    pub fn from_gguf(metadata: &HashMap<String, Value>) -> Result<Self> {
        let built = gguf_vocab::build(metadata)?;
        let chat_template = match metadata
            .get("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok())
        {
            Some(t) => Some(ChatTemplate::new(t, &built.bos_token, &built.eos_token)?),
            None => None,
        };
        Ok(Self {
            inner: built.tokenizer,
            eos_token_ids: built.eos_token_ids,
            chat_template,
            grammar: LazyCompiler::default(),
        })
    }

    /// The compiler of JSON schemas and regexes into token masks for this tokenizer.
    pub fn grammar(&self) -> std::result::Result<std::sync::Arc<GrammarCompiler>, String> {
        self.grammar.get(|| {
            let json = self.inner.to_string(false).map_err(|e| e.to_string())?;
            GrammarCompiler::new(json.as_bytes(), &self.eos_token_ids)
        })
    }

    /// Token ids of `text`; `add_special_tokens` adds what the tokenizer adds (BOS where
    /// configured). Rendered chat templates carry their own special tokens: pass false.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        Ok(self
            .inner
            .encode(text, add_special_tokens)
            .map_err(tok_err)?
            .get_ids()
            .to_vec())
    }

    /// Ids of a prompt: rendered with the chat template as one user message when `chat`.
    pub fn encode_prompt(&self, prompt: &str, chat: bool) -> Result<Vec<u32>> {
        if chat {
            let text = self.apply_chat_template(&[ChatMessage::new("user", prompt)], true)?;
            self.encode(&text, false)
        } else {
            self.encode(prompt, true)
        }
    }

    /// Text of `ids`; special tokens are left out when `skip_special` is set.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(tok_err)
    }

    /// The token string of one id (for logprob listings).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The id of a token string.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Ids that end generation.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    /// The model's chat template, if it has one.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }

    /// Renders `messages` with the chat template, ending with the assistant's turn when
    /// `add_generation_prompt` is set.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        self.template()?
            .render(messages, add_generation_prompt, None)
    }

    /// The model's chat template.
    pub fn template(&self) -> Result<&ChatTemplate> {
        self.chat_template
            .as_ref()
            .ok_or_else(|| EngineError::ChatTemplate("the model has no chat template".into()))
    }
}
