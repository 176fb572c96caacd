//! Hugging Face TGI's text-generation API on the same routes as Takeoff's: a body with
//! `inputs` (TGI) instead of `text` (Takeoff) on `POST /generate` and `POST /generate_stream`,
//! and TGI's compatibility route `POST /` (streamed when the body says `"stream": true`).
//! Answers in TGI's shape: `{"generated_text", "details"}` and stream events
//! `{"index", "token", "generated_text", "details"}`.

use crate::error::ApiError;
use crate::logprobs::prompt_rows;
use crate::service::{sample_seed, Completion, ModelService, TokenStream};
use crate::{structured, AppState};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::stream::{self, StreamExt};
use liftoff_engine::sampling::SamplingParams;
use liftoff_engine::scheduler::TokenEvent;
use liftoff_engine::sequence::FinishReason;
use serde::Deserialize;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::Arc;

/// Most stop sequences a TGI request may give (`max_stop_sequences` in `/info`).
pub const MAX_STOP_SEQUENCES: usize = 16;

/// Most sequences a TGI request may sample to keep the best of (`max_best_of` in `/info`;
/// TGI's default `--max-best-of`).
pub const MAX_BEST_OF: usize = 2;

/// A TGI request body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TgiRequest {
    pub inputs: String,
    #[serde(default)]
    pub parameters: Parameters,
    /// On `POST /` only: stream the answer.
    pub stream: Option<bool>,
}

/// TGI's `parameters` (null fields are unset).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Parameters {
    pub max_new_tokens: Option<usize>,
    pub temperature: Option<f32>,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub typical_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub stop: Option<Vec<String>>,
    pub seed: Option<u64>,
    pub do_sample: Option<bool>,
    pub details: Option<bool>,
    pub decoder_input_details: Option<bool>,
    pub return_full_text: Option<bool>,
    pub truncate: Option<usize>,
    pub grammar: Option<Value>,
    pub top_n_tokens: Option<usize>,
    pub best_of: Option<usize>,
    pub watermark: Option<bool>,
    pub adapter_id: Option<String>,
}

/// What a checked TGI request runs with.
struct Prepared {
    ids: Vec<u32>,
    params: SamplingParams,
    details: bool,
    /// `decoder_input_details`: the prompt tokens with their log-probabilities in
    /// `details.prefill`.
    prefill: bool,
    prefix: String,
    top_n: usize,
    /// Sequences to sample, keeping the one of highest mean token log-probability.
    best_of: usize,
}

fn refuse(field: &str, why: &str) -> ApiError {
    ApiError::invalid(
        &format!("parameters.{field}"),
        format!("parameters.{field}: {why}"),
    )
}

fn prepare(service: &ModelService, req: &TgiRequest, stream: bool) -> Result<Prepared, ApiError> {
    let p = &req.parameters;
    let best_of = p.best_of.unwrap_or(1);
    if !(1..=MAX_BEST_OF).contains(&best_of) {
        return Err(refuse(
            "best_of",
            &format!("must be between 1 and {MAX_BEST_OF}"),
        ));
    }
    if p.watermark == Some(true) {
        return Err(refuse("watermark", "watermarking is not supported"));
    }
    if p.adapter_id.is_some() {
        return Err(refuse("adapter_id", "LoRA adapters are not supported yet"));
    }
    if p.stop
        .as_ref()
        .is_some_and(|s| s.len() > MAX_STOP_SEQUENCES)
    {
        return Err(refuse(
            "stop",
            &format!("at most {MAX_STOP_SEQUENCES} stop sequences"),
        ));
    }
    let ids = service.prompt_ids(&req.inputs, false, p.truncate, "inputs")?;
    let max_new =
        service.max_new_tokens(ids.len(), p.max_new_tokens, "parameters.max_new_tokens")?;
    // TGI samples when asked to, or when a sampling parameter is given; else greedy.
    let sample = p.do_sample.unwrap_or(false)
        || p.temperature.is_some_and(|t| t != 1.0)
        || p.top_k.is_some()
        || p.top_p.is_some()
        || p.typical_p.is_some_and(|t| t < 1.0);
    if best_of > 1 {
        // TGI's rules: several samples of greedy decoding would be the same sequence, one
        // seed would make them the same draws, and a stream can carry one sequence. (TGI takes
        // any temperature given as sampling; here a temperature of 1 alone is greedy, as
        // everywhere in this API, so it is refused rather than repeated.)
        let why = if !sample {
            Some("best_of > 1 is not allowed for greedy decoding (set do_sample or a sampling parameter)")
        } else if p.seed.is_some() {
            Some("best_of > 1 takes no seed (each sequence draws its own; details.seed reports them)")
        } else if stream {
            Some("best_of > 1 is not supported when streaming tokens (as in TGI)")
        } else {
            None
        };
        if let Some(why) = why {
            return Err(refuse("best_of", why));
        }
    }
    let top_n = p.top_n_tokens.unwrap_or(0);
    let prefill = p.decoder_input_details.unwrap_or(false);
    if prefill && stream {
        return Err(refuse(
            "decoder_input_details",
            "not supported when streaming tokens (as in TGI)",
        ));
    }
    let constraint = match &p.grammar {
        Some(g) => structured::check(service, structured::tgi_grammar(g)?)?,
        None => None,
    };
    let params = SamplingParams {
        temperature: if sample {
            p.temperature.unwrap_or(1.0)
        } else {
            0.0
        },
        top_k: p.top_k.unwrap_or(0),
        top_p: p.top_p.unwrap_or(1.0),
        typical_p: p.typical_p.unwrap_or(1.0),
        repetition_penalty: p.repetition_penalty.unwrap_or(1.0),
        relative_frequency_penalty: p.frequency_penalty.unwrap_or(0.0),
        max_new_tokens: max_new,
        stop: p.stop.clone().unwrap_or_default(),
        seed: p.seed,
        logprobs: top_n,
        token_logprobs: true,
        prompt_logprobs: prefill.then_some(0),
        constraint,
        ..SamplingParams::default()
    };
    params.validate().map_err(|e| {
        ApiError::param(
            &e,
            &[
                ("temperature", "parameters.temperature"),
                ("top_p", "parameters.top_p"),
                ("top_k", "parameters.top_k"),
                ("typical_p", "parameters.typical_p"),
                ("repetition_penalty", "parameters.repetition_penalty"),
                ("relative_frequency_penalty", "parameters.frequency_penalty"),
                ("logprobs", "parameters.top_n_tokens"),
            ],
        )
    })?;
    Ok(Prepared {
        ids,
        params,
        details: p.details.unwrap_or(false),
        prefill,
        prefix: if p.return_full_text.unwrap_or(false) {
            req.inputs.clone()
        } else {
            String::new()
        },
        top_n,
        best_of,
    })
}

/// TGI's token object.
fn token(service: &ModelService, id: u32, text: &str, logprob: Option<f32>) -> Value {
    let special = service.tokenizer.eos_token_ids().contains(&id);
    json!({"id": id, "text": text, "logprob": logprob, "special": special})
}

/// TGI's finish reasons: `length`, `eos_token`, `stop_sequence`.
fn finish_reason(service: &ModelService, reason: Option<FinishReason>, last: u32) -> &'static str {
    match reason {
        Some(FinishReason::Stop) if service.tokenizer.eos_token_ids().contains(&last) => {
            "eos_token"
        }
        Some(FinishReason::Stop) => "stop_sequence",
        _ => "length",
    }
}

fn top_tokens(service: &ModelService, ev: &TokenEvent) -> Vec<Value> {
    ev.top_logprobs
        .iter()
        .map(|&(id, lp)| {
            let text = service.tokenizer.decode(&[id], false).unwrap_or_default();
            token(service, id, &text, Some(lp))
        })
        .collect()
}

/// Serves a TGI body on a route that streams (`Some(true)`), answers at once
/// (`Some(false)`) or follows the body's `stream` (`None`, `POST /`). Errors come in TGI's
/// shape (see [`error_response`]).
pub async fn serve(state: Arc<AppState>, body: Value, route_streams: Option<bool>) -> Response {
    let run = async {
        let req = parse(body)?;
        let stream = match (route_streams, req.stream) {
            (None, s) => s.unwrap_or(false),
            (Some(r), Some(s)) if r != s => {
                return Err(ApiError::invalid(
                    "stream",
                    format!(
                        "stream: {s} on a route that {} (use POST / to choose)",
                        if r { "streams" } else { "does not stream" }
                    ),
                ))
            }
            (Some(r), _) => r,
        };
        generate(state, req, stream).await
    };
    run.await.unwrap_or_else(error_response)
}

/// An error in TGI's shape, which TGI's clients (huggingface_hub, text-generation) read to
/// raise their own exceptions: `{"error": message, "error_type"}`, plus `param` naming the
/// field. Bad input is TGI's 422 `validation`; a full queue or no replica `overloaded` (503,
/// with `Retry-After`); a failed generation `generation`.
pub fn error_response(e: ApiError) -> Response {
    let (status, error_type) = match e.status {
        StatusCode::BAD_REQUEST => (StatusCode::UNPROCESSABLE_ENTITY, "validation"),
        StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS => (e.status, "overloaded"),
        StatusCode::INTERNAL_SERVER_ERROR => (e.status, "generation"),
        s if s.is_client_error() => (s, "validation"),
        s => (s, "unknown"),
    };
    e.response_as(
        status,
        json!({"error": e.message, "error_type": error_type, "param": e.param}),
    )
}

/// Runs a TGI request: the whole answer, or a stream of events.
pub async fn generate(
    state: Arc<AppState>,
    req: TgiRequest,
    stream: bool,
) -> Result<Response, ApiError> {
    let lease = state.lease(None, "model").await?;
    let service = lease.service().clone();
    let mut p = prepare(&service, &req, stream)?;
    if stream {
        let seed = p.params.seed;
        let tokens = lease.submit(p.ids, p.params, &state.metrics)?;
        return Ok(events(tokens, service, p.prefix, p.top_n, seed));
    }
    if p.best_of > 1 {
        // The samples' seeds, reported in their details: `seed + i` (below 2^53, exact as
        // a JSON number in every client).
        p.params.seed = Some(rand::random::<u64>() >> 11);
    }
    let prompt = p.ids.clone();
    let seed = p.params.seed;
    let mut streams = lease
        .submit_samples(p.ids, p.params, p.best_of, &state.metrics)
        .await?;
    let prefill: Vec<Value> = if p.prefill {
        let rows = streams[0].prompt_logprobs().await;
        prompt_rows(&prompt, &rows)
            .map(|(id, row)| {
                let text = service.tokenizer.decode(&[id], false).unwrap_or_default();
                // The first token has no log-probability (nothing before it).
                json!({"id": id, "text": text, "logprob": row.map(|r| r.logprob)})
            })
            .collect()
    } else {
        Vec::new()
    };
    let done = TokenStream::collect_all(streams).await?;
    // The sequence of highest mean token log-probability, as TGI picks among its samples.
    let best = Completion::ranked(&done)[0];
    // Sample `i`'s details (its seed is `sample_seed(seed, i)`).
    let details =
        |i: usize| sequence_details(&service, &done[i], sample_seed(seed, i), &prefill, p.top_n);
    let mut body = json!({"generated_text": format!("{}{}", p.prefix, done[best].text)});
    if p.details {
        let mut d = details(best);
        if done.len() > 1 {
            let others: Vec<Value> = (0..done.len())
                .filter(|&i| i != best)
                .map(|i| {
                    let mut o = details(i);
                    o["generated_text"] = json!(format!("{}{}", p.prefix, done[i].text));
                    o
                })
                .collect();
            d["best_of_sequences"] = Value::Array(others);
        }
        body["details"] = d;
    }
    Ok(Json(body).into_response())
}

/// One sequence's `details`: finish reason, token count, seed, prompt rows and tokens.
fn sequence_details(
    service: &ModelService,
    c: &Completion,
    seed: Option<u64>,
    prefill: &[Value],
    top_n: usize,
) -> Value {
    let last = c.token_ids.last().copied().unwrap_or_default();
    let toks: Vec<Value> = c
        .events
        .iter()
        .map(|ev| token(service, ev.token_id, &ev.text, ev.logprob))
        .collect();
    let mut d = json!({
        "finish_reason": finish_reason(service, c.finish_reason, last),
        "generated_tokens": c.token_ids.len(),
        "seed": seed,
        "prefill": prefill,
        "tokens": toks,
    });
    if top_n > 0 {
        d["top_tokens"] = c
            .events
            .iter()
            .map(|ev| Value::Array(top_tokens(service, ev)))
            .collect();
    }
    d
}

/// TGI's stream: one `data:` event per generated token; the last one also carries the
/// whole text and the details. An error ends the stream with `{"error", "error_type"}`.
fn events(
    s: TokenStream,
    service: Arc<ModelService>,
    prefix: String,
    top_n: usize,
    seed: Option<u64>,
) -> Response {
    let init = (s, false, prefix, 0usize);
    let events = stream::unfold(init, move |(mut s, done, mut text, index)| {
        let service = service.clone();
        async move {
            if done {
                return None;
            }
            let ev = match s.next().await? {
                Err(e) => {
                    let body = json!({"error": e.message, "error_type": "generation"});
                    return Some((Event::default().data(body.to_string()), (s, true, text, index)));
                }
                Ok(ev) => ev,
            };
            text.push_str(&ev.text);
            let finished = ev.finished.is_some();
            let mut out = json!({
                "index": index,
                "token": token(&service, ev.token_id, &ev.text, ev.logprob),
                "generated_text": null,
                "details": null,
                "top_tokens": if top_n > 0 { Value::Array(top_tokens(&service, &ev)) } else { Value::Null },
            });
            if finished {
                out["generated_text"] = json!(text);
                out["details"] = json!({
                    "finish_reason": finish_reason(&service, ev.finished, ev.token_id),
                    "generated_tokens": ev.generated_tokens,
                    "seed": seed,
                });
            }
            Some((
                Event::default().data(out.to_string()),
                (s, finished, text, index + 1),
            ))
        }
    })
    .map(Ok::<_, Infallible>);
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// Parses a TGI body (400 naming the field when it does not fit).
pub fn parse(body: Value) -> Result<TgiRequest, ApiError> {
    crate::error::from_json(body)
}
