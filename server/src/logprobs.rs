//! Log-probabilities in OpenAI's shapes: the legacy completions object (`tokens`,
//! `token_logprobs`, `top_logprobs`, `text_offset`) and the chat object (`content`: one entry
//! per token with its `top_logprobs`). Values are the log-softmax of the raw logits (before
//! temperature, penalties and bans), as vLLM reports them by default.

use liftoff_engine::scheduler::TokenEvent;
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

    fn top<'e>(&'e self, ev: &'e TokenEvent) -> impl Iterator<Item = (String, f64)> + 'e {
        ev.top_logprobs
            .iter()
            .take(self.req.top)
            .map(|&(id, lp)| (self.token(id), Self::number(lp)))
    }

    /// The completions object for `events` (one per token), `offset` being where the first
    /// token's text starts in the completion.
    pub fn completion(&self, events: &[&TokenEvent], mut offset: usize) -> Value {
        let (mut tokens, mut lps, mut tops, mut offsets) = (vec![], vec![], vec![], vec![]);
        for ev in events {
            let token = self.token(ev.token_id);
            let lp = Self::number(ev.logprob.unwrap_or(f32::NEG_INFINITY));
            // The chosen token is always among the alternatives, as OpenAI shows them.
            let mut top: Map<String, Value> = self.top(ev).map(|(t, v)| (t, json!(v))).collect();
            top.entry(token.clone()).or_insert(json!(lp));
            tokens.push(json!(token));
            lps.push(json!(lp));
            tops.push(Value::Object(top));
            offsets.push(json!(offset));
            offset += ev.text.len();
        }
        json!({"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets})
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
                e["top_logprobs"] = self.top(ev).map(|(t, v)| self.entry(t, v)).collect();
                e
            })
            .collect();
        json!({"content": content})
    }
}
