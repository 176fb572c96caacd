//! The OpenAI API: `/v1/completions`, `/v1/chat/completions` (streaming or not, with usage in
//! the last chunk when `stream_options.include_usage`), `/v1/models`.

use crate::error::{ApiError, ApiJson};
use crate::logprobs::{LogprobsRequest, Renderer};
use crate::messages::{to_chat, RequestMessage};
use crate::registry::ReaderState;
use crate::service::{ModelService, TokenStream};
use crate::structured;
use crate::AppState;
use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::stream::{self, StreamExt};
use liftoff_engine::sampling::SamplingParams;
use liftoff_engine::sampling::MAX_LOGPROBS;
use liftoff_engine::scheduler::TokenEvent;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// `stop`: one string or several.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum StopInput {
    One(String),
    Many(Vec<String>),
}

/// `prompt`: a string, a list of one string, token ids, or a list of one list of token ids.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PromptInput {
    One(String),
    Many(Vec<String>),
    Ids(Vec<u32>),
    ManyIds(Vec<Vec<u32>>),
}

#[derive(Debug, Deserialize, Default)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
    /// vLLM's extension: usage in every chunk.
    pub continuous_usage_stats: Option<bool>,
}

/// Fields shared by both endpoints.
#[derive(Debug, Deserialize)]
pub struct SamplingFields {
    pub model: Option<String>,
    pub max_tokens: Option<usize>,
    pub max_completion_tokens: Option<usize>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<usize>,
    pub seed: Option<u64>,
    pub stop: Option<StopInput>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub n: Option<usize>,
    pub frequency_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub min_tokens: Option<usize>,
    /// vLLM's extension: keep generating past EOS (benchmarks).
    pub ignore_eos: Option<bool>,
    /// vLLM's extension: tokens in log-probabilities as `token_id:<id>`.
    pub return_tokens_as_token_ids: Option<bool>,
    /// Structured output: `{"type": "text" | "json_object" | "json_schema", ...}`.
    pub response_format: Option<Value>,
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub prompt: PromptInput,
    /// Log-probabilities of each token and of this many alternatives (0..=20).
    pub logprobs: Option<usize>,
    pub echo: Option<bool>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
    /// Every other field (refused unless it cannot change the output).
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<RequestMessage>,
    /// Log-probabilities of each token.
    pub logprobs: Option<bool>,
    /// And of this many alternatives (0..=20; needs `logprobs`).
    pub top_logprobs: Option<usize>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
    /// Every other field (refused unless it cannot change the output).
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

/// Fields OpenAI clients send that cannot change what is generated: accepted and unused.
const INERT_FIELDS: &[&str] = &["user", "metadata", "store", "service_tier"];

/// 400 for a field this server does not implement, so that nothing a client asks for is
/// silently ignored; a null or empty value (`"logit_bias": {}`, `"tools": []`) asks for
/// nothing and passes.
fn refuse_unsupported(other: &BTreeMap<String, Value>) -> Result<(), ApiError> {
    for (name, value) in other {
        let empty = match value {
            Value::Null => true,
            Value::Object(m) => m.is_empty(),
            Value::Array(a) => a.is_empty(),
            Value::String(s) => s.is_empty(),
            _ => false,
        };
        if !empty && !INERT_FIELDS.contains(&name.as_str()) {
            return Err(ApiError::invalid(
                name,
                format!("{name} is not supported by this server"),
            ));
        }
    }
    Ok(())
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn request_id(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    format!(
        "{prefix}-{}-{}",
        now(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

fn params(
    service: &ModelService,
    f: &SamplingFields,
    prompt_len: usize,
    lp: Option<LogprobsRequest>,
) -> Result<SamplingParams, ApiError> {
    if f.n.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid("n", "only n = 1 is supported"));
    }
    for (name, v) in [
        ("frequency_penalty", f.frequency_penalty),
        ("presence_penalty", f.presence_penalty),
    ] {
        if v.is_some_and(|v| v != 0.0) {
            return Err(ApiError::invalid(
                name,
                format!("{name} is not supported; use repetition_penalty"),
            ));
        }
    }
    let requested = f.max_completion_tokens.or(f.max_tokens);
    let field = if f.max_completion_tokens.is_some() {
        "max_completion_tokens"
    } else {
        "max_tokens"
    };
    let max_new = service.max_new_tokens(prompt_len, requested, field)?;
    let constraint = match &f.response_format {
        Some(v) => structured::check(service, structured::response_format(v)?)?,
        None => None,
    };
    let p = SamplingParams {
        temperature: f.temperature.unwrap_or(1.0),
        top_k: f.top_k.unwrap_or(0),
        top_p: f.top_p.unwrap_or(1.0),
        repetition_penalty: f.repetition_penalty.unwrap_or(1.0),
        no_repeat_ngram_size: 0,
        min_new_tokens: f.min_tokens.unwrap_or(0).min(max_new),
        max_new_tokens: max_new,
        stop: match &f.stop {
            None => Vec::new(),
            Some(StopInput::One(s)) => vec![s.clone()],
            Some(StopInput::Many(v)) => v.clone(),
        },
        seed: f.seed,
        ignore_eos: f.ignore_eos.unwrap_or(false),
        logprobs: lp.map_or(0, |l| l.top),
        token_logprobs: lp.is_some(),
        prompt_logprobs: 0,
        constraint,
    };
    p.validate().map_err(|e| {
        ApiError::param(
            &e,
            &[
                ("max_new_tokens", "max_tokens"),
                ("min_new_tokens", "min_tokens"),
            ],
        )
    })?;
    Ok(p)
}

/// OpenAI's usage object; `cached` prompt tokens came from the prefix cache.
fn usage(prompt: usize, completion: usize, cached: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
           "prompt_tokens_details": {"cached_tokens": cached}})
}

/// `POST /v1/completions`.
pub async fn completions(
    State(state): State<Arc<AppState>>,
    ApiJson(req): ApiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    let lease = state.lease(req.sampling.model.as_deref(), "model").await?;
    let service = lease.service().clone();
    refuse_unsupported(&req.other)?;
    if req.echo == Some(true) {
        return Err(ApiError::invalid("echo", "echo is not supported"));
    }
    let one = "prompt must be one string or one list of token ids (batches: send several requests)";
    let ids = match req.prompt {
        PromptInput::One(p) => service.prompt_ids(&p, false, None, "prompt")?,
        PromptInput::Many(mut v) if v.len() == 1 => {
            service.prompt_ids(&v.remove(0), false, None, "prompt")?
        }
        PromptInput::Ids(ids) => token_ids(&service, ids)?,
        PromptInput::ManyIds(mut v) if v.len() == 1 => token_ids(&service, v.remove(0))?,
        PromptInput::Many(_) | PromptInput::ManyIds(_) => {
            return Err(ApiError::invalid("prompt", one))
        }
    };
    let lp = match req.logprobs {
        Some(n) if n > MAX_LOGPROBS => {
            return Err(ApiError::invalid(
                "logprobs",
                format!("logprobs: at most {MAX_LOGPROBS}, got {n}"),
            ))
        }
        Some(n) => Some(LogprobsRequest {
            top: n,
            as_ids: req.sampling.return_tokens_as_token_ids.unwrap_or(false),
        }),
        None => None,
    };
    let p = params(&service, &req.sampling, ids.len(), lp)?;
    let stream = lease.submit(ids, p, &state.metrics)?;
    respond(stream, service, &req.sampling, lp, Kind::Completion).await
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    ApiJson(req): ApiJson<ChatRequest>,
) -> Result<Response, ApiError> {
    let lease = state.lease(req.sampling.model.as_deref(), "model").await?;
    let service = lease.service().clone();
    refuse_unsupported(&req.other)?;
    if req.messages.is_empty() {
        return Err(ApiError::invalid("messages", "messages must not be empty"));
    }
    let messages = to_chat(req.messages)?;
    let text = service
        .tokenizer
        .apply_chat_template(&messages, true)
        .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
    let ids = service
        .tokenizer
        .encode(&text, false)
        .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
    service.check_prompt_len(ids.len(), "messages")?;
    let top = req.top_logprobs.unwrap_or(0);
    if top > MAX_LOGPROBS {
        return Err(ApiError::invalid(
            "top_logprobs",
            format!("top_logprobs: at most {MAX_LOGPROBS}, got {top}"),
        ));
    }
    let lp = match req.logprobs {
        Some(true) => Some(LogprobsRequest {
            top,
            as_ids: req.sampling.return_tokens_as_token_ids.unwrap_or(false),
        }),
        _ if req.top_logprobs.is_some() => {
            return Err(ApiError::invalid(
                "top_logprobs",
                "top_logprobs needs logprobs: true",
            ))
        }
        _ => None,
    };
    let p = params(&service, &req.sampling, ids.len(), lp)?;
    let stream = lease.submit(ids, p, &state.metrics)?;
    respond(stream, service, &req.sampling, lp, Kind::Chat).await
}

/// Prompt token ids given as such: each must be in the vocabulary.
fn token_ids(service: &ModelService, ids: Vec<u32>) -> Result<Vec<u32>, ApiError> {
    let vocab = service.tokenizer.vocab_size();
    if ids.is_empty() {
        return Err(ApiError::invalid("prompt", "the prompt is empty"));
    }
    if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab) {
        return Err(ApiError::invalid(
            "prompt",
            format!("token id {bad} is outside the vocabulary of {vocab}"),
        ));
    }
    service.check_prompt_len(ids.len(), "prompt")?;
    Ok(ids)
}

/// Streams the tokens as SSE chunks, or collects them into one response object.
async fn respond(
    stream: TokenStream,
    service: Arc<ModelService>,
    sampling: &SamplingFields,
    lp: Option<LogprobsRequest>,
    kind: Kind,
) -> Result<Response, ApiError> {
    let model = service.info.model_name.clone();
    let id = request_id(match kind {
        Kind::Completion => "cmpl",
        Kind::Chat => "chatcmpl",
    });
    if sampling.stream.unwrap_or(false) {
        let opts = sampling.stream_options.as_ref();
        let usage = Usage {
            last: opts.and_then(|o| o.include_usage).unwrap_or(false),
            every: opts.and_then(|o| o.continuous_usage_stats).unwrap_or(false),
        };
        return Ok(sse(stream, id, model, usage, kind, lp, service));
    }
    let c = stream.collect().await?;
    let finish = c.finish_reason.map(|f| f.as_str());
    let events: Vec<&TokenEvent> = c.events.iter().collect();
    let logprobs = lp.map_or(Value::Null, |req| {
        let r = Renderer {
            req,
            tokenizer: &service.tokenizer,
        };
        match kind {
            Kind::Completion => r.completion(&events, 0),
            Kind::Chat => r.chat(&events),
        }
    });
    let (object, choice) = match kind {
        Kind::Completion => (
            "text_completion",
            json!({"index": 0, "text": c.text, "logprobs": logprobs, "finish_reason": finish}),
        ),
        Kind::Chat => (
            "chat.completion",
            json!({"index": 0, "message": {"role": "assistant", "content": c.text},
                                                 "logprobs": logprobs, "finish_reason": finish}),
        ),
    };
    Ok(Json(json!({
        "id": id, "object": object, "created": now(), "model": model,
        "choices": [choice],
        "usage": usage(c.prompt_tokens, c.token_ids.len(), c.cached_tokens),
    }))
    .into_response())
}

#[derive(Clone, Copy)]
enum Kind {
    Completion,
    Chat,
}

fn chunk(
    kind: Kind,
    id: &str,
    model: &str,
    text: &str,
    finish: Option<&str>,
    first: bool,
    logprobs: Value,
) -> Value {
    match kind {
        Kind::Completion => {
            json!({"id": id, "object": "text_completion", "created": now(), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}]})
        }
        Kind::Chat => {
            let mut delta = json!({});
            if first {
                delta["role"] = json!("assistant");
            }
            // The final chunk carries only the finish reason when its token adds no text.
            if !(text.is_empty() && finish.is_some()) {
                delta["content"] = json!(text);
            }
            json!({"id": id, "object": "chat.completion.chunk", "created": now(), "model": model,
                "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]})
        }
    }
}

/// Where streamed usage goes: a last chunk of its own, and every chunk.
#[derive(Clone, Copy)]
struct Usage {
    last: bool,
    every: bool,
}

fn sse(
    stream: TokenStream,
    id: String,
    model: String,
    include_usage: Usage,
    kind: Kind,
    lp: Option<LogprobsRequest>,
    service: Arc<ModelService>,
) -> Response {
    // (the stream, whether the next chunk is the first, generated tokens so far, text offset)
    let events = stream::unfold((Some(stream), true, 0usize, 0usize), move |(s, first, n, offset)| {
        let (id, model, service) = (id.clone(), model.clone(), service.clone());
        async move {
            let mut s = s?;
            let mut out = Vec::new();
            match s.next().await? {
                Err(e) => {
                    out.push(Event::default().data(e.body().to_string()));
                    out.push(Event::default().data("[DONE]"));
                    Some((out, (None, false, n, offset)))
                }
                Ok(ev) => {
                    // One chunk per generated token, as vLLM streams: a token whose text is
                    // not final yet (part of a character) or skipped (a special token) still
                    // arrives, with empty text, so clients see every token's timing.
                    let finish = ev.finished.map(|f| f.as_str());
                    // A request ended before any token (out of memory) carries none.
                    let is_token = ev.generated_tokens > n;
                    let logprobs = match lp {
                        Some(req) if is_token => {
                            let r = Renderer { req, tokenizer: &service.tokenizer };
                            match kind {
                                Kind::Completion => r.completion(&[&ev], offset),
                                Kind::Chat => r.chat(&[&ev]),
                            }
                        }
                        _ => Value::Null,
                    };
                    let (n, offset) = (ev.generated_tokens, offset + ev.text.len());
                    let mut data = chunk(kind, &id, &model, &ev.text, finish, first, logprobs);
                    if include_usage.every {
                        data["usage"] = usage(ev.prompt_tokens, ev.generated_tokens, ev.cached_tokens);
                    }
                    out.push(Event::default().data(data.to_string()));
                    if finish.is_some() {
                        if include_usage.last {
                            let object = match kind {
                                Kind::Completion => "text_completion",
                                Kind::Chat => "chat.completion.chunk",
                            };
                            let u = json!({"id": id, "object": object, "created": now(), "model": model, "choices": [],
                                           "usage": usage(ev.prompt_tokens, ev.generated_tokens, ev.cached_tokens)});
                            out.push(Event::default().data(u.to_string()));
                        }
                        out.push(Event::default().data("[DONE]"));
                        return Some((out, (None, false, n, offset)));
                    }
                    Some((out, (Some(s), false, n, offset)))
                }
            }
        }
    })
    .flat_map(|events| stream::iter(events.into_iter().map(Ok::<_, Infallible>)));
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// `GET /v1/models`: every registered reader, with its state (a reader that is not loaded
/// loads when a request names it).
pub async fn models(State(state): State<Arc<AppState>>) -> Json<Value> {
    let data: Vec<Value> = state
        .registry
        .readers()
        .iter()
        .map(|r| {
            let max_len = r
                .max_sequence_length
                .filter(|_| r.state == ReaderState::Ready);
            json!({"id": r.model_name, "object": "model", "created": now(), "owned_by": "liftoff",
                   "reader_id": r.reader_id, "consumer_group": r.consumer_group, "state": r.state,
                   "max_model_len": max_len})
        })
        .collect();
    Json(json!({"object": "list", "data": data}))
}
