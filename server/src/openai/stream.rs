//! Streamed responses: one SSE chunk per generated token of each sample (vLLM's granularity,
//! so clients see every token's timing), the samples interleaved as they arrive, then the
//! usage chunk and `[DONE]`. A chat answer that may be a tool call is held back until it is
//! known to be one (it then arrives as one `tool_calls` delta) or not.

use super::{now, usage, Job, Kind};
use crate::logprobs::CompletionLogprobs;
use crate::service::TokenStream;
use crate::tools::{self, ToolChoice};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::stream::{self, StreamExt};
use liftoff_engine::scheduler::TokenEvent;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::Arc;

/// Where streamed usage goes: a last chunk of its own, and every chunk.
#[derive(Clone, Copy)]
pub struct Usage {
    pub last: bool,
    pub every: bool,
}

/// What one sample's stream yields.
enum Item {
    Chunk(Value),
    Error(String),
    /// The sample ended: its index, prompt, generated and cached token counts.
    Done(usize, usize, usize, usize),
}

/// How the tool-call forms `tools::parse_calls` reads begin (Llama 3 JSON, Mistral's list,
/// Hermes/Qwen's tags).
const CALL_STARTS: &[&str] = &["{", "[", "<|python_tag|>", "<tool_call>"];

/// A chat answer's tool-call state.
enum Calls {
    /// Plain content.
    Off,
    /// `auto`, nothing but whitespace yet: it may still turn out to be a call.
    Undecided,
    /// Held until the end, then parsed.
    Held,
}

/// One sample's progress.
struct Sample {
    stream: TokenStream,
    index: usize,
    first: bool,
    generated: usize,
    /// Where the next token's text starts in the completion (log-probabilities' offsets).
    offset: usize,
    calls: Calls,
    held_text: String,
    held: Vec<TokenEvent>,
}

impl Sample {
    fn new(stream: TokenStream, index: usize, job: &Job) -> Self {
        let calls = match job.tools.as_ref().map(|t| &t.choice) {
            None | Some(ToolChoice::None) => Calls::Off,
            Some(ToolChoice::Auto) => Calls::Undecided,
            Some(_) => Calls::Held,
        };
        Self {
            stream,
            index,
            first: true,
            generated: 0,
            offset: 0,
            calls,
            held_text: String::new(),
            held: Vec::new(),
        }
    }

    /// The chunks for one event.
    fn on_event(&mut self, job: &Job, ev: TokenEvent, every: bool) -> Vec<Item> {
        let finish = ev.finished.map(|f| f.as_str());
        // A request ended before any token (out of memory) carries none.
        let is_token = ev.generated_tokens > self.generated && !job.hide_token;
        self.generated = ev.generated_tokens;
        let generated = if job.hide_token {
            0
        } else {
            ev.generated_tokens
        };
        let (prompt, cached) = (ev.prompt_tokens, ev.cached_tokens);
        let mut out = Vec::new();
        let mut chunk = match job.kind {
            Kind::Completion => {
                let mut text = String::new();
                let mut lps = CompletionLogprobs::default();
                let r = job.lp.map(|req| job.renderer(req));
                if let (true, Some(e)) = (self.first, &job.echo) {
                    text.push_str(&e.text);
                    if let Some(r) = &r {
                        r.push_prompt(&mut lps, &e.ids, &e.rows);
                    }
                    self.offset = e.text.len();
                }
                self.first = false;
                if is_token {
                    if let Some(r) = &r {
                        r.push_events(&mut lps, &[&ev], self.offset);
                    }
                    text.push_str(&ev.text);
                    self.offset += ev.text.len();
                }
                let logprobs = if r.is_some() {
                    lps.to_json()
                } else {
                    Value::Null
                };
                let finish = if job.hide_token {
                    Some("length")
                } else {
                    finish
                };
                json!({"id": job.id, "object": "text_completion", "created": now(), "model": job.model,
                       "choices": [{"index": self.index, "text": text, "logprobs": logprobs, "finish_reason": finish}]})
            }
            Kind::Chat => match self.chat(job, ev, is_token, finish) {
                Some(c) => c,
                None => return out,
            },
        };
        if every {
            chunk["usage"] = usage(prompt, generated, cached);
        }
        out.push(Item::Chunk(chunk));
        if finish.is_some() {
            out.push(Item::Done(self.index, prompt, generated, cached));
        }
        out
    }

    /// A chat chunk for `ev`, or `None` while a possible tool call is held back.
    fn chat(
        &mut self,
        job: &Job,
        mut ev: TokenEvent,
        is_token: bool,
        finish: Option<&'static str>,
    ) -> Option<Value> {
        let mut events: Vec<TokenEvent> = Vec::new();
        // The chat renderer reads the events' ids and log-probabilities, not their text.
        let mut text = std::mem::take(&mut ev.text);
        let mut tool_calls = None;
        let mut finish = finish;
        if !matches!(self.calls, Calls::Off) {
            self.held_text.push_str(&text);
            if is_token {
                self.held.push(ev);
            }
            if matches!(self.calls, Calls::Undecided) {
                let start = self.held_text.trim_start();
                if CALL_STARTS.iter().any(|m| start.starts_with(m)) {
                    self.calls = Calls::Held;
                } else if !start.is_empty() && !CALL_STARTS.iter().any(|m| m.starts_with(start)) {
                    self.calls = Calls::Off;
                }
            }
            if finish.is_none() && !matches!(self.calls, Calls::Off) {
                return None;
            }
            // Decided (plain text after all) or ended: release what was held.
            text = std::mem::take(&mut self.held_text);
            events = std::mem::take(&mut self.held);
            if finish.is_some() {
                let calls = job.tools.as_ref().and_then(|t| t.parse_calls(&text));
                if let Some(calls) = calls {
                    tool_calls = Some(tools::calls_json(
                        &calls,
                        &format!("{}_{}", job.id, self.index),
                        true,
                    ));
                    finish = Some("tool_calls");
                    text.clear();
                }
            }
            self.calls = Calls::Off;
        } else if is_token {
            events.push(ev);
        }
        let refs: Vec<&TokenEvent> = events.iter().collect();
        let logprobs = match job.lp {
            Some(req) if !refs.is_empty() => job.renderer(req).chat(&refs),
            _ => Value::Null,
        };
        let mut delta = json!({});
        if self.first {
            delta["role"] = json!("assistant");
            self.first = false;
        }
        if let Some(calls) = tool_calls {
            delta["tool_calls"] = calls;
        } else if !(text.is_empty() && finish.is_some()) {
            // The final chunk carries only the finish reason when its token adds no text.
            delta["content"] = json!(text);
        }
        Some(
            json!({"id": job.id, "object": "chat.completion.chunk", "created": now(), "model": job.model,
                   "choices": [{"index": self.index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}),
        )
    }
}

/// The SSE response for `streams` (one per sample).
pub fn sse(job: Arc<Job>, streams: Vec<TokenStream>, usage_opts: Usage) -> Response {
    let n = streams.len();
    let per_sample = streams.into_iter().enumerate().map(|(i, s)| {
        let job = job.clone();
        let sample = Sample::new(s, i, &job);
        stream::unfold(Some(sample), move |state| {
            let job = job.clone();
            async move {
                let mut sample = state?;
                match sample.stream.next().await? {
                    Err(e) => Some((vec![Item::Error(e.body().to_string())], None)),
                    Ok(ev) => {
                        let items = sample.on_event(&job, ev, usage_opts.every);
                        let done = items.iter().any(|i| matches!(i, Item::Done(..)));
                        Some((items, (!done).then_some(sample)))
                    }
                }
            }
        })
        .flat_map(stream::iter)
        .boxed()
    });
    // Ends as soon as every sample is done or one failed, without waiting on the others.
    struct Merge {
        left: usize,
        prompt: usize,
        generated: usize,
        cached: usize,
        ended: bool,
    }
    let start = Merge {
        left: n,
        prompt: 0,
        generated: 0,
        cached: 0,
        ended: false,
    };
    let merged = stream::unfold(
        (stream::select_all(per_sample), start, job),
        move |(mut items, mut m, job)| async move {
            if m.ended {
                return None;
            }
            let mut events = Vec::new();
            match items.next().await? {
                Item::Chunk(c) => events.push(Event::default().data(c.to_string())),
                Item::Error(body) => {
                    events.push(Event::default().data(body));
                    events.push(Event::default().data("[DONE]"));
                    m.ended = true;
                }
                Item::Done(index, p, g, c) => {
                    m.left -= 1;
                    m.prompt = p;
                    m.generated += g;
                    // The first sample's: the others share its prompt by design.
                    if index == 0 {
                        m.cached = c;
                    }
                    if m.left == 0 {
                        if usage_opts.last {
                            let object = match job.kind {
                                Kind::Completion => "text_completion",
                                Kind::Chat => "chat.completion.chunk",
                            };
                            let u = json!({"id": job.id, "object": object, "created": now(), "model": job.model,
                                           "choices": [], "usage": usage(m.prompt, m.generated, m.cached)});
                            events.push(Event::default().data(u.to_string()));
                        }
                        events.push(Event::default().data("[DONE]"));
                        m.ended = true;
                    }
                }
            }
            Some((events, (items, m, job)))
        },
    );
    let events =
        merged.flat_map(|events| stream::iter(events.into_iter().map(Ok::<_, Infallible>)));
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}
