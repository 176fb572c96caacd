//! The OpenAI API: `/v1/completions` (with `echo` and the prompt's log-probabilities),
//! `/v1/chat/completions` (with tools), `n` parallel samples of one prompt, streaming or not
//! (usage in the last chunk with `stream_options.include_usage`, in every chunk with vLLM's
//! `continuous_usage_stats`), and `/v1/models`. `docs/api.md` lists every field.

mod request;
mod stream;

use crate::error::{ApiError, ApiJson};
use crate::logprobs::{CompletionLogprobs, LogprobsRequest, Renderer};
use crate::messages::to_chat;
use crate::registry::ReaderState;
use crate::service::{Completion, ModelService, TokenStream};
use crate::tools::{self, Tools};
use crate::AppState;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use liftoff_engine::sampling::MAX_LOGPROBS;
use liftoff_engine::scheduler::{PromptLogprob, TokenEvent};
use request::{ChatRequest, CompletionRequest, PromptInput, SamplingFields};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

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

/// OpenAI's usage object; `cached` prompt tokens came from the prefix cache.
fn usage(prompt: usize, completion: usize, cached: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
           "prompt_tokens_details": {"cached_tokens": cached}})
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Completion,
    Chat,
}

/// `echo`: the prompt shown before each completion, with its tokens' log-probabilities when
/// asked for (computed once, by the first sample, and shown in every choice).
struct Echo {
    text: String,
    ids: Vec<u32>,
    rows: Vec<PromptLogprob>,
}

/// What a request's samples turn into, for whole and streamed responses alike.
struct Job {
    kind: Kind,
    id: String,
    model: String,
    service: Arc<ModelService>,
    lp: Option<LogprobsRequest>,
    echo: Option<Echo>,
    /// `max_tokens: 0` with `echo`: one token is computed (the engine always samples one)
    /// and not shown.
    hide_token: bool,
    /// Tools the model may call (not `tool_choice: none`).
    tools: Option<Tools>,
}

impl Job {
    fn renderer(&self, req: LogprobsRequest) -> Renderer<'_> {
        Renderer {
            req,
            tokenizer: &self.service.tokenizer,
        }
    }
}

/// `POST /v1/completions`.
pub async fn completions(
    State(state): State<Arc<AppState>>,
    ApiJson(body): ApiJson<Value>,
) -> Result<Response, ApiError> {
    let req: CompletionRequest = request::parse_body(body)?;
    // Everything that can be checked without the model, before a reader is (re)loaded for it.
    request::refuse_unsupported(&req.other)?;
    request::check_stream_options(&req.sampling)?;
    if req.logprobs.is_some_and(|n| n > MAX_LOGPROBS) {
        return Err(ApiError::invalid(
            "logprobs",
            format!("logprobs: at most {MAX_LOGPROBS}"),
        ));
    }
    let lease = state.lease(req.sampling.model.as_deref(), "model").await?;
    let service = lease.service().clone();
    let one = "prompt must be one string or one list of token ids (batches: send several requests)";
    let (ids, text) = match req.prompt {
        PromptInput::One(p) => (service.prompt_ids(&p, false, None, "prompt")?, Some(p)),
        PromptInput::Many(mut v) if v.len() == 1 => {
            let p = v.remove(0);
            (service.prompt_ids(&p, false, None, "prompt")?, Some(p))
        }
        PromptInput::Ids(ids) => (token_ids(&service, ids)?, None),
        PromptInput::ManyIds(mut v) if v.len() == 1 => (token_ids(&service, v.remove(0))?, None),
        PromptInput::Many(_) | PromptInput::ManyIds(_) => {
            return Err(ApiError::invalid("prompt", one))
        }
    };
    let lp = req.logprobs.map(|n| LogprobsRequest {
        top: n,
        as_ids: req.sampling.return_tokens_as_token_ids.unwrap_or(false),
    });
    let mut echo = req.echo.unwrap_or(false).then(|| Echo {
        text: text.unwrap_or_else(|| service.tokenizer.decode(&ids, false).unwrap_or_default()),
        ids: ids.clone(),
        rows: Vec::new(),
    });
    let (requested, field) = request::requested_tokens(&req.sampling);
    let hide_token = echo.is_some() && requested == Some(0);
    let requested = if hide_token { Some(1) } else { requested };
    let max_new = service.max_new_tokens(ids.len(), requested, field)?;
    let n = request::samples(&service, &req.sampling)?;
    let best_of = request::best_of(&service, &req.sampling, n, req.best_of)?;
    // Scoring the prompt alone (`max_tokens: 0`): every sample would be the same echo.
    let best_of = if hide_token { n } else { best_of };
    let mut params = request::params(&service, &req.sampling, max_new, lp, None)?;
    if echo.is_some() {
        params.prompt_logprobs = lp.map(|l| l.top);
    }
    // The samples are ranked by their tokens' log-probabilities.
    params.token_logprobs |= best_of > n;
    let mut streams = lease
        .submit_samples(ids, params, best_of, &state.metrics)
        .await?;
    if let (Some(e), Some(_)) = (&mut echo, lp) {
        e.rows = streams[0].prompt_logprobs().await;
    }
    let job = Job {
        kind: Kind::Completion,
        id: request_id("cmpl"),
        model: service.info.model_name.clone(),
        service,
        lp,
        echo,
        hide_token,
        tools: None,
    };
    respond(job, streams, n, &req.sampling).await
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    ApiJson(body): ApiJson<Value>,
) -> Result<Response, ApiError> {
    let req: ChatRequest = request::parse_body(body)?;
    // Everything that can be checked without the model, before a reader is (re)loaded for it.
    request::refuse_unsupported(&req.other)?;
    request::check_stream_options(&req.sampling)?;
    if req.messages.is_empty() {
        return Err(ApiError::invalid("messages", "messages must not be empty"));
    }
    let tools = tools::parse(req.tools, req.tool_choice, req.parallel_tool_calls)?;
    let messages = to_chat(req.messages)?;
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
    let lease = state.lease(req.sampling.model.as_deref(), "model").await?;
    let service = lease.service().clone();
    let template = service
        .tokenizer
        .template()
        .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
    let text = tools::render(template, messages, tools.as_ref())?;
    let ids = service
        .tokenizer
        .encode(&text, false)
        .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
    service.check_prompt_len(ids.len(), "messages")?;
    let (requested, field) = request::requested_tokens(&req.sampling);
    let max_new = service.max_new_tokens(ids.len(), requested, field)?;
    let n = request::samples(&service, &req.sampling)?;
    let tools = tools.filter(Tools::active);
    let constraint = tools.as_ref().and_then(Tools::constraint);
    let params = request::params(&service, &req.sampling, max_new, lp, constraint)?;
    let job = Job {
        kind: Kind::Chat,
        id: request_id("chatcmpl"),
        model: service.info.model_name.clone(),
        service,
        lp,
        echo: None,
        hide_token: false,
        tools,
    };
    let streams = lease.submit_samples(ids, params, n, &state.metrics).await?;
    respond(job, streams, n, &req.sampling).await
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

/// Streams the samples as SSE chunks, or collects them into one response object with the
/// `keep` of highest mean token log-probability when there are more (`best_of`); usage
/// counts every sample's tokens, as every one was generated.
async fn respond(
    job: Job,
    streams: Vec<TokenStream>,
    keep: usize,
    sampling: &SamplingFields,
) -> Result<Response, ApiError> {
    if sampling.stream.unwrap_or(false) {
        let opts = sampling.stream_options.as_ref();
        let usage = stream::Usage {
            last: opts.and_then(|o| o.include_usage).unwrap_or(false),
            every: opts.and_then(|o| o.continuous_usage_stats).unwrap_or(false),
        };
        return Ok(stream::sse(Arc::new(job), streams, usage));
    }
    let samples = TokenStream::collect_all(streams).await?;
    let (prompt, cached) = samples
        .first()
        .map_or((0, 0), |c| (c.prompt_tokens, c.cached_tokens));
    let generated = if job.hide_token {
        0
    } else {
        samples.iter().map(|c| c.token_ids.len()).sum()
    };
    let order: Vec<usize> = if samples.len() > keep {
        Completion::ranked(&samples)
            .into_iter()
            .take(keep)
            .collect()
    } else {
        (0..samples.len()).collect()
    };
    let choices: Vec<Value> = order
        .into_iter()
        .enumerate()
        .map(|(i, s)| match job.kind {
            Kind::Completion => completion_choice(&job, i, &samples[s]),
            Kind::Chat => chat_choice(&job, i, &samples[s]),
        })
        .collect();
    let object = match job.kind {
        Kind::Completion => "text_completion",
        Kind::Chat => "chat.completion",
    };
    Ok(Json(json!({
        "id": job.id, "object": object, "created": now(), "model": job.model,
        "choices": choices, "usage": usage(prompt, generated, cached),
    }))
    .into_response())
}

fn completion_choice(job: &Job, index: usize, c: &Completion) -> Value {
    let events: Vec<&TokenEvent> = if job.hide_token {
        Vec::new()
    } else {
        c.events.iter().collect()
    };
    let text = if job.hide_token { "" } else { c.text.as_str() };
    let finish = if job.hide_token {
        Some("length")
    } else {
        c.finish_reason.map(|f| f.as_str())
    };
    let logprobs = job.lp.map_or(Value::Null, |req| {
        let r = job.renderer(req);
        let mut lps = CompletionLogprobs::default();
        let offset = match &job.echo {
            Some(e) => {
                r.push_prompt(&mut lps, &e.ids, &e.rows);
                // Generated tokens start where the echoed text ends.
                e.text.len()
            }
            None => 0,
        };
        r.push_events(&mut lps, &events, offset);
        lps.to_json()
    });
    let text = match &job.echo {
        Some(e) => format!("{}{text}", e.text),
        None => text.to_string(),
    };
    json!({"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish})
}

fn chat_choice(job: &Job, index: usize, c: &Completion) -> Value {
    let events: Vec<&TokenEvent> = c.events.iter().collect();
    let logprobs = job
        .lp
        .map_or(Value::Null, |req| job.renderer(req).chat(&events));
    let calls = job.tools.as_ref().and_then(|t| t.parse_calls(&c.text));
    let (message, finish) = match calls {
        Some(calls) => (
            json!({"role": "assistant", "content": Value::Null,
                   "tool_calls": tools::calls_json(&calls, &format!("{}_{index}", job.id), false)}),
            Some("tool_calls"),
        ),
        None => (
            json!({"role": "assistant", "content": c.text}),
            c.finish_reason.map(|f| f.as_str()),
        ),
    };
    json!({"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish})
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
