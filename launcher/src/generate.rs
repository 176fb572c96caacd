//! `liftoff generate`: one prompt in, text (streamed) or one JSON object out.

use crate::model_resolve;
use crate::reader::{start_groups, Placement};
use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use liftoff_engine::sampling::SamplingParams;
use liftoff_engine::{DTypeChoice, Engine, EngineOptions, KvBudget};
use std::io::Write;

/// Output format of `generate`.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum OutputFormat {
    /// Stream the text as it decodes.
    Text,
    /// Print one JSON object at the end.
    Json,
}

/// Arguments of `liftoff generate`.
#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// A .gguf file, a Hugging Face model directory, or the default model's name.
    #[arg(long, env = "TAKEOFF_MODEL_NAME", default_value = model_resolve::DEFAULT_MODEL)]
    model: String,
    /// The prompt.
    #[arg(long)]
    prompt: String,
    /// Apply the model's chat template (the prompt is one user message).
    #[arg(long)]
    chat: bool,
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    #[arg(long, default_value_t = 0)]
    min_new_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 1.0)]
    temperature: f32,
    /// 0 disables.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// 0 disables.
    #[arg(long, default_value_t = 0)]
    no_repeat_ngram_size: usize,
    /// Stop when the text contains this (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    #[arg(long)]
    seed: Option<u64>,
    /// Keep generating past the end-of-sequence token.
    #[arg(long)]
    ignore_eos: bool,
    /// Report the top K log-probabilities of every generated token (JSON output).
    #[arg(long, default_value_t = 0)]
    logprobs: usize,
    /// Report the top K log-probabilities of the next token at every prompt position (JSON
    /// output, `prompt_logprobs`; entry i is the distribution of prompt token i + 1).
    #[arg(long, default_value_t = 0)]
    prompt_logprobs: usize,
    /// auto keeps GGUF weights quantized; f32 dequantizes for exact comparison.
    #[arg(long, default_value = "auto")]
    dtype: String,
    /// Longest prompt + output in tokens (defaults to the model's context length).
    #[arg(long, env = "TAKEOFF_MAX_SEQUENCE_LENGTH")]
    max_seq_len: Option<usize>,
    #[arg(long, value_enum, default_value = "text")]
    format: OutputFormat,
    /// cpu, cuda, or auto.
    #[arg(long, env = "TAKEOFF_DEVICE", default_value = "auto")]
    device: String,
    /// Ranks (worker processes) sharing the model.
    #[arg(long, env = "TAKEOFF_TENSOR_PARALLEL", default_value_t = 1)]
    tensor_parallel: usize,
    /// GPUs to use, e.g. "0,1".
    #[arg(long, env = "TAKEOFF_CUDA_VISIBLE_DEVICES")]
    cuda_visible_devices: Option<String>,
    /// Hugging Face token for gated models (also read from HF_TOKEN).
    #[arg(long, env = "TAKEOFF_ACCESS_TOKEN", hide_env_values = true)]
    access_token: Option<String>,
    /// Print where the time went (per part of the forward pass, summed over steps) to stderr.
    /// Parts of worker processes (tensor parallel > 1) are not seen here.
    #[arg(long)]
    profile: bool,
}

/// Runs `liftoff generate`.
pub fn run(args: GenerateArgs, log_level: &str) -> Result<()> {
    let dtype: DTypeChoice = args.dtype.parse()?;
    let params = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        repetition_penalty: args.repetition_penalty,
        no_repeat_ngram_size: args.no_repeat_ngram_size,
        min_new_tokens: args.min_new_tokens,
        max_new_tokens: args.max_new_tokens,
        stop: args.stop.clone(),
        seed: args.seed,
        ignore_eos: args.ignore_eos,
        logprobs: args.logprobs,
        token_logprobs: false,
        prompt_logprobs: (args.prompt_logprobs > 0).then_some(args.prompt_logprobs),
        constraint: None,
        ..SamplingParams::default()
    };
    params.validate()?;
    let path = model_resolve::resolve(&args.model, args.access_token.as_deref())?;
    let mut opts = EngineOptions::new(&path);
    opts.dtype = dtype;
    opts.max_seq_len = args.max_seq_len;
    let place = Placement {
        device: &args.device,
        tensor_parallel: args.tensor_parallel,
        replicas: Some(1),
        cuda_visible_devices: args.cuda_visible_devices.as_deref(),
        isolate: false,
        // A cache for one sequence of the longest length.
        kv_budget: KvBudget::OneSequence,
        // One long prompt may be a slow step; only a worker that stopped answering trips it.
        step_timeout: std::time::Duration::from_secs(600),
    };
    let (groups, tokenizer) = start_groups(&opts, &place, log_level)
        .with_context(|| format!("loading {}", path.display()))?;
    let executor = groups
        .executors
        .into_iter()
        .next()
        .context("no replica group started")?;
    let mut engine = Engine::new(
        executor,
        tokenizer,
        groups.max_seq_len,
        opts.max_batched_tokens,
    );
    let prompt_ids = engine.tokenizer().encode_prompt(&args.prompt, args.chat)?;
    let stream = matches!(args.format, OutputFormat::Text);
    let mut stdout = std::io::stdout().lock();
    if args.profile {
        liftoff_engine::profile::enable();
    }
    let started = std::time::Instant::now();
    let generation = engine.generate(&prompt_ids, &params, |step| {
        if stream && !step.text.is_empty() {
            let _ = stdout.write_all(step.text.as_bytes());
            let _ = stdout.flush();
        }
    })?;
    if args.profile {
        print_profile(started.elapsed().as_secs_f64(), generation.token_ids.len());
    }
    if stream {
        writeln!(stdout)?;
    } else {
        serde_json::to_writer(&mut stdout, &generation)?;
        writeln!(stdout)?;
    }
    drop(engine);
    if let Some(s) = groups.supervisor {
        s.shutdown(std::time::Duration::from_secs(10));
    }
    Ok(())
}

/// The `--profile` table, on stderr.
fn print_profile(wall: f64, tokens: usize) {
    let parts = liftoff_engine::profile::totals();
    let timed: f64 = parts.iter().map(|p| p.1).sum();
    let steps = tokens.max(1) as f64;
    eprintln!("| part | total ms | ms per generated token | share |");
    eprintln!("| --- | ---: | ---: | ---: |");
    let row = |name: &str, secs: f64| {
        eprintln!(
            "| {name} | {:.1} | {:.3} | {:.1} % |",
            secs * 1e3,
            secs * 1e3 / steps,
            100.0 * secs / wall.max(1e-9)
        )
    };
    for (part, secs) in parts {
        row(part.name(), secs);
    }
    row(
        "other (scheduling, detokenization, copies)",
        (wall - timed).max(0.0),
    );
    row("total", wall);
}
