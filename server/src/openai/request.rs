//! The OpenAI request bodies and the sampling parameters they ask for.

use crate::error::{asks_nothing, ApiError};
use crate::logprobs::LogprobsRequest;
use crate::messages::RequestMessage;
use crate::service::ModelService;
use crate::structured;
use liftoff_engine::constraint::Constraint;
use liftoff_engine::sampling::SamplingParams;
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;

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

/// Most parallel samples (`n`) one request may ask for.
pub const MAX_N: usize = 64;

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
    /// Token id (as a string) -> bias added to its logit, -100..=100.
    pub logit_bias: Option<BTreeMap<String, f32>>,
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
    /// The prompt before the completion (with its tokens' log-probabilities when `logprobs`).
    pub echo: Option<bool>,
    /// Samples to draw, of which the `n` of highest mean token log-probability are returned.
    pub best_of: Option<usize>,
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
    pub tools: Option<Value>,
    pub tool_choice: Option<Value>,
    pub parallel_tool_calls: Option<Value>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
    /// Every other field (refused unless it cannot change the output).
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

/// An OpenAI body as a `T`, or a 400 naming the field that does not fit. serde's `flatten`
/// (the shared sampling fields, a message's other keys) hides the failing field's path, so
/// where the whole body gives none, the sampling fields and each message are read alone.
pub fn parse_body<T: serde::de::DeserializeOwned>(body: Value) -> Result<T, ApiError> {
    let e = match serde_path_to_error::deserialize::<_, T>(&body) {
        Ok(req) => return Ok(req),
        Err(e) => e,
    };
    let named = |prefix: &str, e: serde_path_to_error::Error<serde_json::Error>| {
        let path = e.path().to_string();
        let param = match (prefix, path.as_str()) {
            ("", p) => p.to_string(),
            (pre, ".") => pre.to_string(),
            (pre, p) => format!("{pre}.{p}"),
        };
        ApiError::invalid(&param, format!("{param}: {}", e.inner()))
    };
    if e.path().to_string() != "." {
        return Err(named("", e));
    }
    if !body.is_object() {
        return Err(ApiError::invalid(
            "body",
            format!("the body must be a JSON object: {}", e.inner()),
        ));
    }
    if let Err(e) = serde_path_to_error::deserialize::<_, SamplingFields>(&body) {
        return Err(named("", e));
    }
    let messages = body.get("messages").and_then(Value::as_array);
    for (i, m) in messages.into_iter().flatten().enumerate() {
        if let Err(e) = serde_path_to_error::deserialize::<_, RequestMessage>(m) {
            return Err(named(&format!("messages[{i}]"), e));
        }
    }
    Err(ApiError::invalid("body", e.inner().to_string()))
}

/// Fields OpenAI clients send that cannot change what is generated: accepted and unused.
const INERT_FIELDS: &[&str] = &["user", "metadata", "store", "service_tier"];

/// 400 for a field this server does not implement, so that nothing a client asks for is
/// silently ignored; a null or empty value (`"functions": []`) asks for nothing and passes.
pub fn refuse_unsupported(other: &BTreeMap<String, Value>) -> Result<(), ApiError> {
    for (name, value) in other {
        if !asks_nothing(value) && !INERT_FIELDS.contains(&name.as_str()) {
            return Err(ApiError::invalid(
                name,
                format!("{name} is not supported by this server"),
            ));
        }
    }
    Ok(())
}

/// `stream_options` only with `stream: true` (as vLLM answers).
pub fn check_stream_options(f: &SamplingFields) -> Result<(), ApiError> {
    if f.stream_options.is_some() && f.stream != Some(true) {
        return Err(ApiError::invalid(
            "stream_options",
            "stream_options needs stream: true",
        ));
    }
    Ok(())
}

/// Most samples one request may draw: [`MAX_N`], and no more than the model's batch size.
fn max_samples(service: &ModelService) -> usize {
    MAX_N.min(service.info.max_batch_size.max(1))
}

/// `n`: 1 unless given; at most [`max_samples`].
pub fn samples(service: &ModelService, f: &SamplingFields) -> Result<usize, ApiError> {
    let n = f.n.unwrap_or(1);
    let max = max_samples(service);
    if n == 0 || n > max {
        return Err(ApiError::invalid(
            "n",
            format!("n must be between 1 and {max}, got {n}"),
        ));
    }
    Ok(n)
}

/// `best_of` (completions): `n` unless given; at least `n`, at most as many as `n` may be.
/// Above `n` the results cannot be streamed (as in OpenAI's API) and need sampling (several
/// greedy samples would be one sequence, as vLLM says).
pub fn best_of(
    service: &ModelService,
    f: &SamplingFields,
    n: usize,
    best_of: Option<usize>,
) -> Result<usize, ApiError> {
    let best_of = best_of.unwrap_or(n);
    let max = max_samples(service);
    let why = if best_of < n || best_of > max {
        Some(format!(
            "best_of must be between n ({n}) and {max}, got {best_of}"
        ))
    } else if best_of > n && f.stream.unwrap_or(false) {
        Some("best_of above n cannot be streamed".to_string())
    } else if best_of > n && f.temperature == Some(0.0) {
        Some("best_of above n needs sampling (temperature 0 is greedy)".to_string())
    } else {
        None
    };
    match why {
        Some(why) => Err(ApiError::invalid("best_of", why)),
        None => Ok(best_of),
    }
}

/// `logit_bias` with its keys read as token ids of the vocabulary.
fn logit_bias(service: &ModelService, f: &SamplingFields) -> Result<Vec<(u32, f32)>, ApiError> {
    let vocab = service.tokenizer.vocab_size();
    let mut out = Vec::new();
    for (k, &v) in f.logit_bias.iter().flatten() {
        let field = format!("logit_bias.{k}");
        let id: u32 = k.parse().map_err(|_| {
            ApiError::invalid(&field, format!("logit_bias: {k:?} is not a token id"))
        })?;
        if id as usize >= vocab {
            return Err(ApiError::invalid(
                &field,
                format!("logit_bias: token id {id} is outside the vocabulary of {vocab}"),
            ));
        }
        out.push((id, v));
    }
    Ok(out)
}

/// What the request asks of the sampler. `max_new` is the number of tokens to generate;
/// `constraint` comes from `response_format` or the tools (never both).
pub fn params(
    service: &ModelService,
    f: &SamplingFields,
    max_new: usize,
    lp: Option<LogprobsRequest>,
    tool_constraint: Option<Constraint>,
) -> Result<SamplingParams, ApiError> {
    let format = match &f.response_format {
        Some(v) => structured::response_format(v)?,
        None => None,
    };
    let constraint =
        match (format, tool_constraint) {
            (Some(_), Some(_)) => return Err(ApiError::invalid(
                "response_format",
                "response_format cannot be combined with tool_choice required or a named function",
            )),
            (Some(c), None) => structured::check(service, Some(c))?,
            (None, Some(c)) => structured::check(service, Some((c, "tools")))?,
            (None, None) => None,
        };
    let p = SamplingParams {
        temperature: f.temperature.unwrap_or(1.0),
        top_k: f.top_k.unwrap_or(0),
        top_p: f.top_p.unwrap_or(1.0),
        // TGI's; OpenAI's API has no typical sampling.
        typical_p: 1.0,
        repetition_penalty: f.repetition_penalty.unwrap_or(1.0),
        frequency_penalty: f.frequency_penalty.unwrap_or(0.0),
        presence_penalty: f.presence_penalty.unwrap_or(0.0),
        // TGI's penalty; OpenAI has only its own.
        relative_frequency_penalty: 0.0,
        logit_bias: logit_bias(service, f)?,
        no_repeat_ngram_size: 0,
        // An explicit max_tokens below min_tokens is an error; a default one is not.
        min_new_tokens: match requested_tokens(f).0 {
            Some(_) => f.min_tokens.unwrap_or(0),
            None => f.min_tokens.unwrap_or(0).min(max_new),
        },
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
        prompt_logprobs: None,
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

/// The requested number of new tokens (`max_completion_tokens` or `max_tokens`) and the
/// field it came from.
pub fn requested_tokens(f: &SamplingFields) -> (Option<usize>, &'static str) {
    match f.max_completion_tokens {
        Some(n) => (Some(n), "max_completion_tokens"),
        None => (f.max_tokens, "max_tokens"),
    }
}
