//! Latency-aware chunked prefill (Sarathi-Serve's stall-free batching): the prefill tokens
//! added to a step that also decodes are bounded by time, not by a fixed count. A step's cost
//! is learned online as `t = c0 + c1 * tokens` from recent steps, and each mixed step gets as
//! many prefill tokens as fit in the target step time.

use std::time::Duration;

/// The step-time target.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum StepTarget {
    /// `AUTO_FACTOR` times the streams' pace: the predicted time of a decode step of every
    /// sequence running or waiting (up to the batch limit), the step the streams settle at once
    /// the prompts in hand decode too. A step that prefills beside the decodes is never much
    /// slower than that, so streams keep their pace (inter-token p99 within 1.5x of the median,
    /// with room left for the machine's own jitter), and while the batch fills up (few rows
    /// decode, many prompts wait) the prompts get the time the full batch will take anyway.
    Auto,
    /// A fixed bound on a mixed step's time.
    Fixed(Duration),
    /// No time bound: prefill chunks are limited by the token budget only.
    Off,
}

/// How much longer than the streams' pace an automatic mixed step may take. On a 2-core Zen 4
/// at concurrency 16, decode steps alone already spread to 1.2-1.5x their median (the
/// machine); with 1.2 the median ITL p99/p50 of 6 alternated runs was 1.36, with the
/// previous 1.4 (relative to the decode rows alone) 1.57. Tried again with the two-panel
/// kernels (alternated whole runs, 2026-12-03): 1.1 gave 1.37-2.07 and less throughput, 1.4
/// and 1.7 1.57-1.87, against 1.41-1.88 for 1.2 (see docs/benchmarks.md).
pub const AUTO_FACTOR: f64 = 1.2;

/// Prefill tokens a mixed step always gets while a prompt waits, so prompts make progress
/// even when the target leaves no room.
pub const MIN_PREFILL_TOKENS: usize = 4;

/// Prefill tokens per mixed step before any step has been timed.
const COLD_PREFILL_TOKENS: usize = 64;

/// Forgetting factor of the cost fit (per step): recent steps count most.
const DECAY: f64 = 0.97;

/// Weight of the newest step in the calibration ratios.
const CALIBRATION_WEIGHT: f64 = 0.1;

/// Exponentially weighted least-squares fit of step time against tokens, and how far off it
/// is for the two kinds of step it bounds (see [`StepCostModel::calibrate`]).
#[derive(Debug, Clone)]
pub struct StepCostModel {
    w: f64,
    sx: f64,
    sy: f64,
    sxx: f64,
    sxy: f64,
    /// Measured over predicted time of decode-only steps, and of mixed steps (decode rows and
    /// prefill tokens), weighted towards recent steps.
    decode_bias: f64,
    mixed_bias: f64,
}

impl Default for StepCostModel {
    fn default() -> Self {
        Self {
            w: 0.0,
            sx: 0.0,
            sy: 0.0,
            sxx: 0.0,
            sxy: 0.0,
            decode_bias: 1.0,
            mixed_bias: 1.0,
        }
    }
}

impl StepCostModel {
    /// Records a step of `tokens` tokens that took `took`.
    pub fn observe(&mut self, tokens: usize, took: Duration) {
        let (x, y) = (tokens as f64, took.as_secs_f64());
        if tokens == 0 || !y.is_finite() {
            return;
        }
        self.w = self.w * DECAY + 1.0;
        self.sx = self.sx * DECAY + x;
        self.sy = self.sy * DECAY + y;
        self.sxx = self.sxx * DECAY + x * x;
        self.sxy = self.sxy * DECAY + x * y;
    }

    /// Records how long a step that decoded `decode_rows` rows and prefilled `prefill` tokens
    /// took against what the fit predicted for it before it ran. One line through every step
    /// size misjudges the steps the budget bounds: on a 2-core Zen 4 at concurrency 16, steps
    /// of 16 decode rows and 8 prefill tokens took 1.42x the decode-only steps' median when the
    /// fit allowed 1.2x (the kernels' cost grows by tiles of activation rows, not by rows). The
    /// ratios correct the prediction of each kind.
    pub fn calibrate(
        &mut self,
        decode_rows: usize,
        prefill: usize,
        predicted: Duration,
        took: Duration,
    ) {
        let ratio = took.as_secs_f64() / predicted.as_secs_f64();
        if decode_rows == 0 || !ratio.is_finite() || ratio <= 0.0 {
            return;
        }
        let ratio = ratio.clamp(0.5, 2.0);
        let bias = if prefill == 0 {
            &mut self.decode_bias
        } else {
            &mut self.mixed_bias
        };
        *bias += CALIBRATION_WEIGHT * (ratio - *bias);
    }

    /// `(c0, c1)`: fixed seconds per step and seconds per token; `None` before any step.
    pub fn coefficients(&self) -> Option<(f64, f64)> {
        if self.w <= 0.0 {
            return None;
        }
        let (mx, my) = (self.sx / self.w, self.sy / self.w);
        let var = self.sxx / self.w - mx * mx;
        let per_token_avg = my / mx.max(1.0);
        // Too little spread in step sizes for a slope: treat the cost as proportional.
        if var < 1.0 {
            return Some((0.0, per_token_avg));
        }
        let slope = (self.sxy / self.w - mx * my) / var;
        if !slope.is_finite() || slope <= 0.0 {
            return Some((0.0, per_token_avg));
        }
        let c0 = (my - slope * mx).max(0.0);
        Some((c0, slope))
    }

    /// Predicted time of a step of `tokens` tokens.
    pub fn predict(&self, tokens: usize) -> Option<Duration> {
        let c = self.coefficients()?;
        Some(Duration::from_secs_f64(step_seconds(c, tokens)))
    }

    /// Prefill tokens that a step with `decode_rows` decode rows may add under `target`, when
    /// `pace_rows` sequences (running or waiting, within the batch limit) will decode together
    /// once their prompts are in; `None` means no time bound (only the token budget applies).
    pub fn prefill_tokens(
        &self,
        target: StepTarget,
        decode_rows: usize,
        pace_rows: usize,
    ) -> Option<usize> {
        if decode_rows == 0 || target == StepTarget::Off {
            // A lone prompt (or a batch of prompts only) prefills at full speed.
            return None;
        }
        let Some(c) = self.coefficients() else {
            return Some(COLD_PREFILL_TOKENS);
        };
        // What a decode step at the streams' pace takes, as measured against the fit.
        let pace = step_seconds(c, pace_rows.max(decode_rows)) * self.decode_bias;
        let limit = match target {
            StepTarget::Auto => pace * AUTO_FACTOR,
            StepTarget::Fixed(d) => d.as_secs_f64(),
            StepTarget::Off => unreachable!("handled above"),
        };
        // The largest mixed step whose fitted time, corrected as mixed steps have measured,
        // stays within the limit.
        let room = ((limit / self.mixed_bias - c.0) / c.1 - decode_rows as f64).floor();
        let tokens = if room.is_finite() && room > 0.0 {
            room.min(1e9) as usize
        } else {
            0
        };
        Some(tokens.max(MIN_PREFILL_TOKENS))
    }
}

/// `c0 + c1 * tokens`: the fitted cost of a step of `tokens` tokens, in seconds.
fn step_seconds((c0, c1): (f64, f64), tokens: usize) -> f64 {
    c0 + c1 * tokens as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: f64) -> Duration {
        Duration::from_secs_f64(v / 1000.0)
    }

    /// Steps that cost 5 ms + 2 ms per token.
    fn trained() -> StepCostModel {
        let mut m = StepCostModel::default();
        for i in 0..200 {
            let tokens = [1, 16, 40, 16, 100][i % 5];
            m.observe(tokens, ms(5.0 + 2.0 * tokens as f64));
        }
        m
    }

    #[test]
    fn fit_recovers_a_linear_cost() {
        let (c0, c1) = trained().coefficients().unwrap();
        assert!(
            (c0 - 0.005).abs() < 1e-6 && (c1 - 0.002).abs() < 1e-7,
            "{c0} {c1}"
        );
    }

    #[test]
    fn prefill_fits_the_fixed_target() {
        let m = trained();
        // 16 decode rows cost 37 ms; a 100 ms target leaves 63 ms = 31 tokens.
        let t = m
            .prefill_tokens(StepTarget::Fixed(ms(100.0)), 16, 16)
            .unwrap();
        assert_eq!(t, 31);
        let step = m.predict(16 + t).unwrap();
        assert!(step <= ms(100.0) && m.predict(16 + t + 1).unwrap() > ms(100.0));
    }

    #[test]
    fn auto_keeps_mixed_steps_within_the_factor() {
        let m = trained();
        for rows in [64, 32, 20] {
            let t = m.prefill_tokens(StepTarget::Auto, rows, rows).unwrap();
            // The mixed step fills the room up to 1.2x the decode rows' own step.
            let alone = m.predict(rows).unwrap().as_secs_f64();
            let ratio = m.predict(rows + t).unwrap().as_secs_f64() / alone;
            assert!(
                ratio <= AUTO_FACTOR
                    && m.predict(rows + t + 1).unwrap().as_secs_f64() / alone > AUTO_FACTOR,
                "{rows} rows + {t}: {ratio}"
            );
        }
        // One decode row leaves less room than the minimum chunk: prompts still progress.
        assert_eq!(
            m.prefill_tokens(StepTarget::Auto, 1, 1),
            Some(MIN_PREFILL_TOKENS)
        );
    }

    /// Mixed steps that take 1.1x the fit's prediction (and decode steps as predicted): after
    /// they are recorded, the chunk is the one whose corrected time fits 1.2x the pace; decode
    /// steps slower than predicted raise the pace, and so the room, in proportion.
    #[test]
    fn calibration_corrects_the_chunk_to_what_steps_measured() {
        // 64 decode rows: 133 ms, room for 13 prefill tokens uncorrected.
        const R: usize = 64;
        let mut m = trained();
        let before = m.prefill_tokens(StepTarget::Auto, R, R).unwrap();
        for _ in 0..100 {
            let t = R + before;
            m.calibrate(
                R,
                before,
                m.predict(t).unwrap(),
                m.predict(t).unwrap().mul_f64(1.1),
            );
            m.calibrate(R, 0, m.predict(R).unwrap(), m.predict(R).unwrap());
        }
        let t = m.prefill_tokens(StepTarget::Auto, R, R).unwrap();
        let pace = m.predict(R).unwrap().as_secs_f64();
        // Calibrating leaves the fit as it is: predictions from a copy of it.
        let fit = m.clone();
        let corrected = |t: usize| fit.predict(R + t).unwrap().as_secs_f64() * 1.1;
        assert!(t < before, "{t} tokens, {before} before");
        // Within 1 % of the limit: the bias approaches 1.1 geometrically.
        assert!(corrected(t) <= pace * AUTO_FACTOR * 1.01, "{t}");
        assert!(corrected(t + 1) > pace * AUTO_FACTOR * 0.99, "{t}");
        // Decode steps measured at 1.3x: the pace is 1.3x, and the room with it.
        for _ in 0..100 {
            m.calibrate(
                R,
                0,
                m.predict(R).unwrap(),
                m.predict(R).unwrap().mul_f64(1.3),
            );
        }
        let slower = m.prefill_tokens(StepTarget::Auto, R, R).unwrap();
        assert!(corrected(slower) <= pace * 1.3 * AUTO_FACTOR * 1.01);
        assert!(corrected(slower + 1) > pace * 1.3 * AUTO_FACTOR * 0.99);
        assert!(slower > t);
        // Nothing to correct without decode rows, or from a ratio that is not a number.
        let mut n = trained();
        n.calibrate(0, 10, ms(1.0), ms(5.0));
        n.calibrate(16, 4, ms(0.0), ms(5.0));
        n.calibrate(16, 4, ms(1.0), Duration::ZERO);
        assert_eq!(
            n.prefill_tokens(StepTarget::Auto, R, R),
            trained().prefill_tokens(StepTarget::Auto, R, R)
        );
    }

    #[test]
    fn a_filling_batch_prefills_within_the_full_batch_pace() {
        let m = trained();
        // 2 rows decode while 14 more sequences are in hand: the streams' pace is a 16-row
        // step (37 ms), so the mixed step may take up to 1.2 x 37 ms, far more prefill than
        // 1.2x the 2 rows' own 9 ms step would allow.
        let t = m.prefill_tokens(StepTarget::Auto, 2, 16).unwrap();
        let pace = m.predict(16).unwrap().as_secs_f64();
        assert!(m.predict(2 + t).unwrap().as_secs_f64() <= pace * AUTO_FACTOR);
        assert!(m.predict(2 + t + 1).unwrap().as_secs_f64() > pace * AUTO_FACTOR);
        assert!(t > m.prefill_tokens(StepTarget::Auto, 2, 2).unwrap());
        // A pace below the decode rows (more decode than in hand cannot happen) counts as
        // the decode rows.
        assert_eq!(
            m.prefill_tokens(StepTarget::Auto, 16, 4),
            m.prefill_tokens(StepTarget::Auto, 16, 16)
        );
    }

    #[test]
    fn prompts_always_progress_and_lone_prompts_run_free() {
        let m = trained();
        // A target below the decode rows' own cost still admits the minimum chunk.
        assert_eq!(
            m.prefill_tokens(StepTarget::Fixed(ms(1.0)), 16, 16),
            Some(MIN_PREFILL_TOKENS)
        );
        assert_eq!(m.prefill_tokens(StepTarget::Auto, 0, 16), None);
        assert_eq!(m.prefill_tokens(StepTarget::Off, 16, 16), None);
        let cold = StepCostModel::default();
        assert_eq!(
            cold.prefill_tokens(StepTarget::Auto, 4, 4),
            Some(COLD_PREFILL_TOKENS)
        );
    }

    #[test]
    fn one_step_size_gives_a_proportional_cost() {
        let mut m = StepCostModel::default();
        for _ in 0..10 {
            m.observe(16, ms(32.0));
        }
        let (c0, c1) = m.coefficients().unwrap();
        assert_eq!(c0, 0.0);
        assert!((c1 - 0.002).abs() < 1e-9);
    }
}
