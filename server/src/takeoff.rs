//! The Takeoff API, as the `takeoff-client` package calls it: `/generate`, `/generate_stream`
//! (server-sent events), `/tokenize/{reader_id}`, `/detokenize/{reader_id}`,
//! `/chat_template/{reader_id}`.

use crate::error::{ApiError, ApiJson};
use crate::registry::Lease;
use crate::service::TokenStream;
use crate::AppState;
use crate::{structured, tgi};
use axum::extract::{Path, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::stream::{self, Stream, StreamExt};
use liftoff_engine::sampling::SamplingParams;
use liftoff_engine::tokenizer::ChatMessage;
use serde::Deserialize;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::Arc;

/// `text`: one prompt or a batch of independent prompts.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum TextInput {
    One(String),
    Many(Vec<String>),
}

/// A Takeoff generation request (unset fields may be absent or null).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateRequest {
    pub text: TextInput,
    pub sampling_temperature: Option<f32>,
    pub sampling_topp: Option<f32>,
    pub sampling_topk: Option<usize>,
    pub repetition_penalty: Option<f32>,
    pub no_repeat_ngram_size: Option<usize>,
    pub max_new_tokens: Option<usize>,
    pub min_new_tokens: Option<usize>,
    pub regex_string: Option<String>,
    pub json_schema: Option<Value>,
    /// Takeoff's choice of JSON decoder (`lmfe`, `outlines`): accepted; liftoff enforces
    /// `json_schema` and `regex_string` with llguidance whichever is named.
    #[allow(dead_code)]
    pub constrained_decoding_backend: Option<String>,
    pub return_metadata: Option<bool>,
    pub prompt_max_tokens: Option<usize>,
    pub consumer_group: Option<String>,
    pub use_chat_template: Option<bool>,
    pub lora_id: Option<String>,
    pub seed: Option<u64>,
    pub stop: Option<Vec<String>>,
}

struct Prepared {
    lease: Lease,
    prompts: Vec<(Vec<u32>, SamplingParams)>,
    metadata: bool,
}

async fn prepare(state: &AppState, req: GenerateRequest) -> Result<Prepared, ApiError> {
    if req.lora_id.is_some() {
        return Err(ApiError::invalid(
            "lora_id",
            "LoRA adapters are not supported yet",
        ));
    }
    let lease = state
        .lease(req.consumer_group.as_deref(), "consumer_group")
        .await?;
    let service = lease.service().clone();
    let constraint = structured::check(
        &service,
        structured::takeoff(req.json_schema.clone(), req.regex_string.clone())?,
    )?;
    let texts = match req.text {
        TextInput::One(t) => vec![t],
        TextInput::Many(v) if v.is_empty() => {
            return Err(ApiError::invalid("text", "text must not be an empty list"))
        }
        TextInput::Many(v) => v,
    };
    let chat = req.use_chat_template.unwrap_or(false);
    let mut prompts = Vec::with_capacity(texts.len());
    for t in &texts {
        let ids = service.prompt_ids(t, chat, req.prompt_max_tokens, "text")?;
        let max_new = service.max_new_tokens(ids.len(), req.max_new_tokens, "max_new_tokens")?;
        let params = SamplingParams {
            temperature: req.sampling_temperature.unwrap_or(1.0),
            top_k: req.sampling_topk.unwrap_or(0),
            top_p: req.sampling_topp.unwrap_or(1.0),
            repetition_penalty: req.repetition_penalty.unwrap_or(1.0),
            no_repeat_ngram_size: req.no_repeat_ngram_size.unwrap_or(0),
            min_new_tokens: req.min_new_tokens.unwrap_or(0),
            max_new_tokens: max_new,
            stop: req.stop.clone().unwrap_or_default(),
            seed: req.seed,
            ignore_eos: false,
            logprobs: 0,
            token_logprobs: false,
            prompt_logprobs: None,
            constraint: constraint.clone(),
            ..SamplingParams::default()
        };
        params
            .validate()
            .map_err(|e| ApiError::param(&e, TAKEOFF_NAMES))?;
        prompts.push((ids, params));
    }
    Ok(Prepared {
        lease,
        prompts,
        metadata: req.return_metadata.unwrap_or(false),
    })
}

/// Takeoff's names for the engine's sampling fields.
const TAKEOFF_NAMES: &[(&str, &str)] = &[
    ("temperature", "sampling_temperature"),
    ("top_p", "sampling_topp"),
    ("top_k", "sampling_topk"),
];

/// Whether a body is TGI's (`inputs`, no `text`): it gets TGI's answers and errors.
fn is_tgi(body: &Value) -> bool {
    body.get("inputs").is_some() && body.get("text").is_none()
}

/// `POST /generate`: the whole text at once (`text` is a list when the request's was); a TGI
/// body gets TGI's answer.
pub async fn generate(
    State(state): State<Arc<AppState>>,
    ApiJson(body): ApiJson<Value>,
) -> Result<Response, ApiError> {
    if is_tgi(&body) {
        return Ok(tgi::serve(state, body, Some(false)).await);
    }
    let req = crate::error::from_json(body)?;
    Ok(generate_takeoff(state, req).await?.into_response())
}

/// `POST /`: TGI's compatibility route, streamed when the body's `stream` is true.
pub async fn tgi_compat(
    State(state): State<Arc<AppState>>,
    ApiJson(body): ApiJson<Value>,
) -> Response {
    tgi::serve(state, body, None).await
}

async fn generate_takeoff(
    state: Arc<AppState>,
    req: GenerateRequest,
) -> Result<Json<Value>, ApiError> {
    let many = matches!(req.text, TextInput::Many(_));
    let p = prepare(&state, req).await?;
    // Submit all first so the batch runs together.
    let streams: Vec<TokenStream> = p
        .prompts
        .into_iter()
        .map(|(ids, params)| p.lease.submit(ids, params, &state.metrics))
        .collect::<Result<_, _>>()?;
    let results = futures::future::join_all(streams.into_iter().map(|s| s.collect())).await;
    let mut texts = Vec::new();
    let mut meta = Vec::new();
    for r in results {
        let c = r?;
        meta.push(json!({
            "prompt_tokens": c.prompt_tokens,
            "generated_tokens": c.token_ids.len(),
            "finish_reason": c.finish_reason.map(|f| f.as_str()),
        }));
        texts.push(c.text);
    }
    let mut body = if many {
        json!({"text": texts})
    } else {
        json!({"text": texts.pop().unwrap_or_default()})
    };
    if p.metadata {
        body["metadata"] = if many {
            Value::Array(meta)
        } else {
            meta.pop().unwrap_or(Value::Null)
        };
    }
    Ok(Json(body))
}

/// `POST /generate_stream`: server-sent events, one per decoded piece of text; with
/// `return_metadata`, a last `metadata` event. A list `text` streams its prompts one after
/// another.
pub async fn generate_stream(
    State(state): State<Arc<AppState>>,
    ApiJson(body): ApiJson<Value>,
) -> Result<Response, ApiError> {
    if is_tgi(&body) {
        return Ok(tgi::serve(state, body, Some(true)).await);
    }
    let req: GenerateRequest = crate::error::from_json(body)?;
    let p = prepare(&state, req).await?;
    let mut streams = Vec::new();
    for (ids, params) in p.prompts {
        streams.push(p.lease.submit(ids, params, &state.metrics)?);
    }
    let metadata = p.metadata;
    let events = stream::iter(streams).flat_map(move |s| token_events(s, metadata));
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response())
}

fn token_events(s: TokenStream, metadata: bool) -> impl Stream<Item = Result<Event, Infallible>> {
    stream::unfold((s, false, 0usize), move |(mut s, done, generated)| async move {
        if done {
            return None;
        }
        match s.next().await? {
            Err(e) => Some((vec![Event::default().event("error").data(e.body().to_string())], (s, true, generated))),
            Ok(ev) => {
                let mut out = Vec::new();
                if !ev.text.is_empty() {
                    out.push(Event::default().data(ev.text.clone()));
                }
                let finished = ev.finished.is_some();
                if finished && metadata {
                    let m = json!({"prompt_tokens": ev.prompt_tokens, "generated_tokens": ev.generated_tokens,
                                   "finish_reason": ev.finished.map(|f| f.as_str())});
                    out.push(Event::default().event("metadata").data(m.to_string()));
                }
                Some((out, (s, finished, ev.generated_tokens.max(generated))))
            }
        }
    })
    .flat_map(|events| stream::iter(events.into_iter().map(Ok)))
}

#[derive(Debug, Deserialize)]
pub struct TokenizeRequest {
    pub text: String,
    pub use_chat_template: Option<bool>,
}

/// `POST /tokenize/{reader_id}`: token strings and their count.
pub async fn tokenize(
    State(state): State<Arc<AppState>>,
    Path(reader): Path<String>,
    ApiJson(req): ApiJson<TokenizeRequest>,
) -> Result<Json<Value>, ApiError> {
    let lease = state.lease(Some(&reader), "reader_id").await?;
    let service = lease.service();
    let chat = req.use_chat_template.unwrap_or(false);
    let ids = service
        .tokenizer
        .encode_prompt(
            &req.text,
            chat && service.tokenizer.chat_template().is_some(),
        )
        .map_err(|e| ApiError::invalid("text", e.to_string()))?;
    let tokens: Vec<String> = ids
        .iter()
        .map(|&i| service.tokenizer.id_to_token(i).unwrap_or_default())
        .collect();
    Ok(Json(
        json!({"tokens": tokens, "token_ids": ids, "tokens_count": ids.len()}),
    ))
}

/// Ids or token strings.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum TokenList {
    Ids(Vec<u32>),
    Strings(Vec<String>),
}

#[derive(Debug, Deserialize)]
pub struct DetokenizeRequest {
    pub tokens: TokenList,
    pub skip_special_tokens: Option<bool>,
}

/// `POST /detokenize/{reader_id}`: text of token ids (or token strings).
pub async fn detokenize(
    State(state): State<Arc<AppState>>,
    Path(reader): Path<String>,
    ApiJson(req): ApiJson<DetokenizeRequest>,
) -> Result<Json<Value>, ApiError> {
    let lease = state.lease(Some(&reader), "reader_id").await?;
    let service = lease.service();
    let tok = &service.tokenizer;
    let ids: Vec<u32> = match req.tokens {
        TokenList::Ids(ids) => ids,
        TokenList::Strings(s) => s
            .iter()
            .map(|t| {
                tok.token_to_id(t)
                    .ok_or_else(|| ApiError::invalid("tokens", format!("unknown token {t:?}")))
            })
            .collect::<Result<_, _>>()?,
    };
    if let Some(bad) = ids.iter().find(|&&i| i as usize >= tok.vocab_size()) {
        return Err(ApiError::invalid(
            "tokens",
            format!(
                "token id {bad} is outside the vocabulary of {}",
                tok.vocab_size()
            ),
        ));
    }
    let text = tok
        .decode(&ids, req.skip_special_tokens.unwrap_or(true))
        .map_err(|e| ApiError::invalid("tokens", e.to_string()))?;
    Ok(Json(json!({"text": text})))
}

/// One conversation or several.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Conversations {
    One(Vec<ChatMessage>),
    Many(Vec<Vec<ChatMessage>>),
}

#[derive(Debug, Deserialize)]
pub struct ChatTemplateRequest {
    pub inputs: Conversations,
    pub add_generation_prompt: Option<bool>,
}

/// `POST /chat_template/{reader_id}`: each conversation rendered with the model's template
/// (`messages` is a list with one string per conversation).
pub async fn chat_template(
    State(state): State<Arc<AppState>>,
    Path(reader): Path<String>,
    ApiJson(req): ApiJson<ChatTemplateRequest>,
) -> Result<Json<Value>, ApiError> {
    let lease = state.lease(Some(&reader), "reader_id").await?;
    let service = lease.service();
    let conversations = match req.inputs {
        Conversations::One(c) => vec![c],
        Conversations::Many(cs) => cs,
    };
    let rendered = conversations
        .iter()
        .map(|c| {
            service
                .tokenizer
                .apply_chat_template(c, req.add_generation_prompt.unwrap_or(false))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ApiError::invalid("inputs", e.to_string()))?;
    Ok(Json(json!({"messages": rendered})))
}
