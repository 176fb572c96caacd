//! The scheduler on its own, over an executor that answers at once and records each batch:
//! chunked prefill within the token budget, prompt log-probabilities across chunks,
//! preemption, and prefix-cache hits.

use super::*;
use crate::batch::BatchInput;
use std::sync::Mutex;

/// Answers every step with token 7 (log-probabilities made up; a forced row with its forced
/// token, whose log-probability is [`forced_logprob`]) and records the batches and specs.
struct Recorder {
    blocks: usize,
    steps: Arc<Mutex<Vec<usize>>>,
    specs: Arc<Mutex<Vec<RowSampling>>>,
}

/// The stand-in model's log-probability of a forced token.
fn forced_logprob(token: u32) -> f32 {
    -0.5 - token as f32 / 100.0
}

impl Executor for Recorder {
    fn execute(
        &mut self,
        batch: &BatchInput,
        sampling: &[RowSampling],
        masks: crate::model_runner::MaskWait,
    ) -> crate::Result<Vec<SampledToken>> {
        // A constrained row takes its highest allowed token other than EOS (2), else EOS.
        let masks = masks.map_or(Ok(Vec::new()), |w| w())?;
        assert_eq!(
            batch.logits_rows().len(),
            sampling.len(),
            "one spec per logits row"
        );
        self.steps.lock().unwrap().push(batch.num_tokens());
        self.specs.lock().unwrap().extend_from_slice(sampling);
        Ok(sampling
            .iter()
            .enumerate()
            .map(|(r, s)| match s.force {
                Some(token) => SampledToken {
                    token,
                    top_logprobs: (0..s.logprobs).map(|i| (i, -1.0 - i as f32)).collect(),
                    logprob: s.token_logprob.then(|| forced_logprob(token)),
                },
                None => SampledToken {
                    token: masks.iter().find(|m| m.0 == r).map_or(7, |(_, words)| {
                        let allowed =
                            |t: &u32| liftoff_kernels::sampling::mask_allows(words, *t as usize);
                        (0..words.len() as u32 * 32)
                            .rev()
                            .find(|t| *t != 2 && allowed(t))
                            .unwrap_or(2)
                    }),
                    top_logprobs: (0..s.logprobs).map(|i| (i, -1.0 - i as f32)).collect(),
                    logprob: s.token_logprob.then_some(-1.0),
                },
            })
            .collect())
    }
    fn kv_blocks(&self) -> (usize, usize) {
        (self.blocks, 4)
    }
}

fn tokenizer() -> Tokenizer {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/models/tiny-llama2-f32");
    Tokenizer::from_hf_dir(&dir, vec![2]).unwrap()
}

fn scheduler(
    blocks: usize,
    config: SchedulerConfig,
) -> (Scheduler<Recorder>, Arc<Mutex<Vec<usize>>>) {
    let (s, steps, _) = scheduler_with_specs(blocks, config);
    (s, steps)
}

/// [`scheduler`], and every row spec it asked for.
#[allow(clippy::type_complexity)]
fn scheduler_with_specs(
    blocks: usize,
    config: SchedulerConfig,
) -> (
    Scheduler<Recorder>,
    Arc<Mutex<Vec<usize>>>,
    Arc<Mutex<Vec<RowSampling>>>,
) {
    let steps = Arc::new(Mutex::new(Vec::new()));
    let specs = Arc::new(Mutex::new(Vec::new()));
    let exec = Recorder {
        blocks,
        steps: steps.clone(),
        specs: specs.clone(),
    };
    (Scheduler::new(config, exec, tokenizer()), steps, specs)
}

fn request(
    prompt: Vec<u32>,
    params: SamplingParams,
) -> (
    GenerationRequest,
    tokio::sync::mpsc::UnboundedReceiver<SeqEvent>,
) {
    let (events, rx) = tokio::sync::mpsc::unbounded_channel();
    let req = GenerationRequest {
        prompt,
        params,
        events,
        arrival: Instant::now(),
    };
    (req, rx)
}

/// Steps until idle (at most `limit` steps); returns the token events of each receiver.
fn run(
    s: &mut Scheduler<Recorder>,
    rxs: &mut [tokio::sync::mpsc::UnboundedReceiver<SeqEvent>],
    limit: usize,
) -> Vec<Vec<TokenEvent>> {
    for _ in 0..limit {
        if !s.step() && s.is_idle() {
            break;
        }
    }
    assert!(s.is_idle(), "the scheduler did not finish in {limit} steps");
    rxs.iter_mut()
        .map(|rx| {
            let mut out = Vec::new();
            while let Ok(ev) = rx.try_recv() {
                match ev {
                    SeqEvent::Token(t) => out.push(t),
                    other => panic!("{other:?}"),
                }
            }
            out
        })
        .collect()
}

fn config(max_tokens: usize) -> SchedulerConfig {
    SchedulerConfig {
        max_num_batched_tokens: max_tokens,
        max_seq_len: 256,
        max_step: StepTarget::Off,
        ..SchedulerConfig::default()
    }
}

#[test]
fn prompts_are_chunked_within_the_token_budget() {
    let (mut s, steps) = scheduler(64, config(16));
    let (req, rx) = request((1..=40).collect(), SamplingParams::greedy(3));
    s.add(req);
    let events = run(&mut s, &mut [rx], 50);
    assert_eq!(*steps.lock().unwrap(), vec![16, 16, 8, 1, 1]);
    let ev = &events[0];
    assert_eq!(
        ev.iter().map(|e| e.token_id).collect::<Vec<_>>(),
        vec![7, 7, 7]
    );
    assert_eq!(ev.last().unwrap().finished, Some(FinishReason::Length));
    assert_eq!(s.blocks.num_used(), 0);
}

/// Every prompt token but the first gets an entry (across prefill chunks): the row at
/// position `pos` forces prompt token `pos + 1`, whose log-probability the entry reports.
#[test]
fn prompt_logprobs_cover_every_position_across_chunks() {
    for n in [3, 0] {
        let (mut s, steps, specs) = scheduler_with_specs(64, config(16));
        let params = SamplingParams {
            prompt_logprobs: Some(n),
            logprobs: 2,
            token_logprobs: true,
            ..SamplingParams::greedy(2)
        };
        // Not in id order, so that an entry off by one position shows.
        let prompt: Vec<u32> = (1..=40).map(|i| (i * 37) % 101).collect();
        let (req, rx) = request(prompt.clone(), params);
        s.add(req);
        let events = run(&mut s, &mut [rx], 50);
        assert_eq!(
            *steps.lock().unwrap(),
            vec![16, 16, 8, 1],
            "computed whole, chunked"
        );
        let first = &events[0][0];
        let rows = first
            .prompt_logprobs
            .as_ref()
            .expect("prompt log-probabilities");
        assert_eq!(rows.len(), 39, "one entry per prompt token but the first");
        for (i, r) in rows.iter().enumerate() {
            assert_eq!(r.token, prompt[i + 1], "entry {i}");
            assert_eq!(r.logprob, forced_logprob(prompt[i + 1]), "entry {i}");
            assert_eq!(r.top.len(), n, "entry {i}");
        }
        assert_eq!(first.top_logprobs.len(), 2);
        assert_eq!(first.logprob, Some(-1.0));
        assert!(
            events[0][1].prompt_logprobs.is_none(),
            "only on the first token"
        );
        // The prompt rows forced, asking for the token's own log-probability; the sampled rows
        // not forced.
        let specs = specs.lock().unwrap();
        let forced: Vec<u32> = specs.iter().filter_map(|s| s.force).collect();
        assert_eq!(forced, prompt[1..]);
        assert!(specs
            .iter()
            .filter(|s| s.force.is_some())
            .all(|s| s.token_logprob && s.logprobs == n as u32));
        assert_eq!(specs.iter().filter(|s| s.force.is_none()).count(), 2);
    }
}

/// Without prompt log-probabilities nothing is forced and nothing reported.
#[test]
fn no_prompt_logprobs_no_forced_rows() {
    let (mut s, _, specs) = scheduler_with_specs(64, config(16));
    let (req, rx) = request((1..=20).collect(), SamplingParams::greedy(2));
    s.add(req);
    let events = run(&mut s, &mut [rx], 50);
    assert!(events[0].iter().all(|e| e.prompt_logprobs.is_none()));
    assert!(specs.lock().unwrap().iter().all(|s| s.force.is_none()));
}

/// OpenAI's penalties reach the sampled rows as adjustments over the generated tokens only
/// (the stand-in model always answers 7), with the biases; a bias outside the vocabulary is
/// refused when the request is added.
#[test]
fn openai_penalties_and_biases_reach_the_rows() {
    let (mut s, _, specs) = scheduler_with_specs(64, config(64));
    let params = SamplingParams {
        frequency_penalty: 0.5,
        presence_penalty: 0.25,
        logit_bias: vec![(9, 3.0)],
        ..SamplingParams::greedy(3)
    };
    let (req, rx) = request(vec![7, 7, 9], params);
    s.add(req);
    run(&mut s, &mut [rx], 20);
    let adjust: Vec<Vec<(u32, f32)>> = specs
        .lock()
        .unwrap()
        .iter()
        .map(|s| s.adjust.clone())
        .collect();
    assert_eq!(
        adjust,
        vec![
            vec![(9, 3.0)],
            vec![(7, -0.75), (9, 3.0)],
            vec![(7, -1.25), (9, 3.0)],
        ]
    );
    let params = SamplingParams {
        logit_bias: vec![(1, 1.0), (1_000_000, 1.0)],
        ..SamplingParams::greedy(3)
    };
    let (req, mut rx) = request(vec![1, 2], params);
    s.add(req);
    match rx.try_recv() {
        Ok(SeqEvent::Error(m)) => assert!(m.contains("logit_bias"), "{m}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn preempted_sequences_finish_and_free_their_blocks() {
    // 8 blocks of 4 tokens: two sequences growing to 24 tokens each cannot both fit.
    let (mut s, _) = scheduler(8, config(64));
    let mut rxs = Vec::new();
    for p in [vec![1u32; 10], vec![2u32; 10]] {
        let (req, rx) = request(p, SamplingParams::greedy(14));
        s.add(req);
        rxs.push(rx);
    }
    let events = run(&mut s, &mut rxs, 200);
    assert!(
        s.stats().preemptions.load(Ordering::Relaxed) >= 1,
        "no preemption"
    );
    for ev in &events {
        // Every token arrives once (recomputation re-sends nothing), none cut short.
        assert_eq!(
            ev.iter().map(|e| e.token_id).collect::<Vec<_>>(),
            vec![7; 14]
        );
        assert_eq!(ev.last().unwrap().generated_tokens, 14);
        assert_eq!(ev.last().unwrap().finished, Some(FinishReason::Length));
    }
    assert_eq!(s.blocks.num_used(), 0);
}

#[test]
fn a_repeated_prompt_skips_its_cached_blocks() {
    let (mut s, steps) = scheduler(64, config(64));
    let prompt: Vec<u32> = (1..=21).collect();
    for _ in 0..2 {
        let (req, rx) = request(prompt.clone(), SamplingParams::greedy(1));
        s.add(req);
        run(&mut s, &mut [rx], 10);
    }
    // 21 tokens: the second run finds the 5 full blocks (20 tokens) and computes 1.
    assert_eq!(*steps.lock().unwrap(), vec![21, 1]);
    assert_eq!(s.blocks.stats().hit_blocks, 5);
}

/// A constrained row takes only what its grammar allows (the stand-in model picks its highest
/// allowed token) and ends with EOS where the grammar completes, beside a free row in the
/// same batches.
#[test]
fn constrained_rows_follow_their_grammar_beside_free_ones() {
    let (mut s, _) = scheduler(64, config(64));
    let params = SamplingParams {
        constraint: Some(crate::constraint::Constraint::Regex("ab[0-9]{3}".into())),
        ..SamplingParams::greedy(40)
    };
    let (a, rx_a) = request(vec![1, 2, 3], params);
    let (b, rx_b) = request(vec![4, 5], SamplingParams::greedy(4));
    s.add(a);
    s.add(b);
    let events = run(&mut s, &mut [rx_a, rx_b], 100);
    let text: String = events[0].iter().map(|e| e.text.as_str()).collect();
    assert!(
        text.len() == 5 && text.starts_with("ab") && text[2..].chars().all(|c| c.is_ascii_digit()),
        "{text:?}"
    );
    assert_eq!(events[0].last().unwrap().finished, Some(FinishReason::Stop));
    assert_eq!(events[0].last().unwrap().token_id, 2, "ends with EOS");
    assert!(
        events[1].iter().all(|e| e.token_id == 7),
        "the free row is unconstrained"
    );
    assert!(s.stats().mask_rows_steps.load(Ordering::Relaxed) > 0);
}
