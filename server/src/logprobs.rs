//! Log-probabilities in OpenAI's shapes: the legacy completions object (`tokens`,
//! `token_logprobs`, `top_logprobs`, `text_offset`) and the chat object (`content`: one entry
//! per token with its `top_logprobs`). Values are the log-softmax of the raw logits (before
//! temperature, penalties and bans), as vLLM reports them by default.

use liftoff_engine::scheduler::{PromptLogprob, TokenEvent};
use liftoff_engine::tokenizer::Tokenizer;
use serde_json::{json, Map, Value};

/// What a request asked for.
#[derive(Debug, Clone, Copy)]
pub struct LogprobsRequest {
    /// Alternatives per token (0..=20).
    pub top: usize,
    /// vLLM's `return_tokens_as_token_ids`: tokens as `token_id:<id>` instead of text.
    pub as_ids: bool,
}

/// Renders tokens for one response.
pub struct Renderer<'a> {
    pub req: LogprobsRequest,
    pub tokenizer: &'a Tokenizer,
}

impl Renderer<'_> {
    fn token(&self, id: u32) -> String {
        if self.req.as_ids {
            return format!("token_id:{id}");
        }
        self.tokenizer.decode(&[id], false).unwrap_or_default()
    }

    /// A finite number for JSON (a token with no probability is -9999, as vLLM writes it).
    fn number(lp: f32) -> f64 {
        if lp.is_finite() {
            lp as f64
        } else {
            -9999.0
        }
    }

    fn top<'e>(&'e self, top: &'e [(u32, f32)]) -> impl Iterator<Item = (String, Value)> + 'e {
        top.iter()
            .take(self.req.top)
            .map(|&(id, lp)| (self.token(id), json!(Self::number(lp))))
    }

    /// Appends `events` (generated tokens) to `c`; the first token's text starts at `offset`.
    pub fn push_events(
        &self,
        c: &mut CompletionLogprobs,
        events: &[&TokenEvent],
        mut offset: usize,
    ) {
        for ev in events {
            let token = self.token(ev.token_id);
            let lp = Self::number(ev.logprob.unwrap_or(f32::NEG_INFINITY));
            // The chosen token is always among the alternatives, as OpenAI shows them.
            let mut top: Map<String, Value> = self.top(&ev.top_logprobs).collect();
            top.entry(token.clone()).or_insert(json!(lp));
            c.push(token, json!(lp), Value::Object(top), offset);
            offset += ev.text.len();
        }
    }

    /// Appends the prompt's tokens (`echo`): the first has no log-probability (`null`), each
    /// later one its own and its position's alternatives.
    pub fn push_prompt(&self, c: &mut CompletionLogprobs, prompt: &[u32], rows: &[PromptLogprob]) {
        let mut offset = 0;
        for (id, row) in prompt_rows(prompt, rows) {
            let token = self.token(id);
            // Offsets count the prompt's text (special tokens such as BOS add none).
            let len = self.tokenizer.decode(&[id], true).map_or(0, |t| t.len());
            match row {
                Some(row) => {
                    let lp = Self::number(row.logprob);
                    let mut top: Map<String, Value> = self.top(&row.top).collect();
                    top.entry(token.clone()).or_insert(json!(lp));
                    c.push(token, json!(lp), Value::Object(top), offset);
                }
                None => c.push(token, Value::Null, Value::Null, offset),
            }
            offset += len;
        }
    }

    fn entry(&self, token: String, lp: f64) -> Value {
        let bytes: Vec<u8> = token.as_bytes().to_vec();
        json!({"token": token, "logprob": lp, "bytes": bytes})
    }

    /// The chat object for `events`.
    pub fn chat(&self, events: &[&TokenEvent]) -> Value {
        let content: Vec<Value> = events
            .iter()
            .map(|ev| {
                let mut e = self.entry(
                    self.token(ev.token_id),
                    Self::number(ev.logprob.unwrap_or(f32::NEG_INFINITY)),
                );
                e["top_logprobs"] = self
                    .top(&ev.top_logprobs)
                    .map(|(t, v)| self.entry(t, v.as_f64().unwrap_or(-9999.0)))
                    .collect();
                e
            })
            .collect();
        json!({"content": content})
    }
}

/// Each prompt token with its log-probability row (`rows[i]` is token `i + 1`'s; the first
/// token has none).
pub fn prompt_rows<'a>(
    prompt: &'a [u32],
    rows: &'a [PromptLogprob],
) -> impl Iterator<Item = (u32, Option<&'a PromptLogprob>)> + 'a {
    prompt
        .iter()
        .enumerate()
        .map(move |(i, &id)| (id, i.checked_sub(1).and_then(|r| rows.get(r))))
}

/// The legacy completions log-probabilities, built up token by token.
#[derive(Debug, Default)]
pub struct CompletionLogprobs {
    tokens: Vec<Value>,
    token_logprobs: Vec<Value>,
    top_logprobs: Vec<Value>,
    text_offset: Vec<Value>,
}

impl CompletionLogprobs {
    fn push(&mut self, token: String, lp: Value, top: Value, offset: usize) {
        self.tokens.push(json!(token));
        self.token_logprobs.push(lp);
        self.top_logprobs.push(top);
        self.text_offset.push(json!(offset));
    }

    /// OpenAI's object.
    pub fn to_json(&self) -> Value {
        json!({"tokens": self.tokens, "token_logprobs": self.token_logprobs,
               "top_logprobs": self.top_logprobs, "text_offset": self.text_offset})
    }
}
