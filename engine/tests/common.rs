//! Shared helpers for the engine's model tests.
#![allow(dead_code)]

use std::path::PathBuf;

/// The workspace's `tests/fixtures`.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

/// The default SmolLM2 GGUF: `$LIFTOFF_DEFAULT_MODEL`, else the cache that
/// `scripts/fetch_default_model.sh` fills.
pub fn smollm2_gguf() -> PathBuf {
    if let Some(p) = std::env::var_os("LIFTOFF_DEFAULT_MODEL") {
        return PathBuf::from(p);
    }
    let p = liftoff_engine::cache_dir::default_model_file();
    assert!(
        p.is_file(),
        "{} is missing: run scripts/fetch_default_model.sh",
        p.display()
    );
    p
}

/// One reference case written by scripts/make_reference.py.
#[derive(serde::Deserialize, Debug)]
pub struct RefCase {
    pub name: String,
    pub prompt: Option<String>,
    pub chat: Option<bool>,
    pub prompt_ids: Vec<u32>,
    pub greedy_ids: Vec<u32>,
    /// Per position of prompt + greedy: the top-k `[id, logit]`.
    pub topk: Vec<Vec<(u32, f32)>>,
}

#[derive(serde::Deserialize, Debug)]
pub struct RefFile {
    pub cases: Vec<RefCase>,
}

pub fn load_ref(name: &str) -> RefFile {
    let p = fixtures().join("reference").join(name);
    serde_json::from_str(
        &std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
    )
    .unwrap()
}

/// Largest of `diffs`, infinite if any is NaN or infinite (`f32::max` would drop a NaN).
pub fn worst(diffs: impl IntoIterator<Item = f32>) -> f32 {
    diffs.into_iter().fold(0f32, |w, d| {
        if d.is_finite() {
            w.max(d.abs())
        } else {
            f32::INFINITY
        }
    })
}

/// How far our log-probabilities (`ours`: top-n `(id, logprob)` per position, from the served
/// path) are from the reference's top-k logits, compared as differences from the reference's
/// top token (a log-probability is the logit less the row's log-sum-exp, so differences agree):
/// the largest `|(lp_i - lp_top) - (logit_i - logit_top)|`. Infinite if a reference token is
/// missing from ours, or a value is NaN or infinite.
pub fn max_topk_error(ours: &[Vec<(u32, f32)>], reference: &[Vec<(u32, f32)>]) -> f32 {
    assert_eq!(ours.len(), reference.len());
    let lookup = |row: &[(u32, f32)], id: u32| row.iter().find(|p| p.0 == id).map(|p| p.1);
    worst(ours.iter().zip(reference).flat_map(|(row, refs)| {
        let top = refs[0];
        let ours_top = lookup(row, top.0);
        refs.iter()
            .map(move |&(id, logit)| match (lookup(row, id), ours_top) {
                (Some(lp), Some(lp_top)) => (lp - lp_top) - (logit - top.1),
                _ => f32::INFINITY,
            })
    }))
}

/// Index of the largest value.
pub fn argmax(row: &[f32]) -> u32 {
    // A NaN would never compare greater and could hide behind index 0.
    assert!(
        row.iter().all(|x| x.is_finite()),
        "non-finite logit in a row"
    );
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best as u32
}
