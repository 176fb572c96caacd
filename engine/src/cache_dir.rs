//! Where liftoff keeps downloaded models and its tool venvs: `$LIFTOFF_CACHE`, else
//! `$XDG_CACHE_HOME/liftoff`, else `~/.cache/liftoff`. The scripts use the same rule
//! (`scripts/cache_dir.sh`, checked against this by a test).

use std::ffi::OsString;
use std::path::PathBuf;

/// liftoff's cache folder (empty variables count as unset, as in the shell rule).
pub fn cache_dir() -> PathBuf {
    cache_dir_from(|name| std::env::var_os(name))
}

/// The rule over any environment lookup.
pub fn cache_dir_from(env: impl Fn(&str) -> Option<OsString>) -> PathBuf {
    let var = |name: &str| env(name).filter(|v| !v.is_empty());
    if let Some(dir) = var("LIFTOFF_CACHE") {
        return PathBuf::from(dir);
    }
    var("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| var("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"))
        .join("liftoff")
}

/// The folder models are fetched into.
pub fn model_cache_dir() -> PathBuf {
    cache_dir().join("models")
}

/// The default model's file in the cache (`scripts/fetch_default_model.sh` fetches it).
pub fn default_model_file() -> PathBuf {
    model_cache_dir().join("SmolLM2-135M-Instruct.Q4_1.gguf")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// The Rust rule and `scripts/cache_dir.sh` agree under each setting.
    #[test]
    fn rust_and_shell_agree() {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/cache_dir.sh");
        let cases: [&[(&str, &str)]; 5] = [
            &[("HOME", "/home/u")],
            &[("HOME", "/home/u"), ("XDG_CACHE_HOME", "/xdg")],
            &[
                ("HOME", "/home/u"),
                ("XDG_CACHE_HOME", "/xdg"),
                ("LIFTOFF_CACHE", "/lc"),
            ],
            &[
                ("HOME", "/home/u"),
                ("XDG_CACHE_HOME", ""),
                ("LIFTOFF_CACHE", ""),
            ],
            &[],
        ];
        let expected = [
            "/home/u/.cache/liftoff",
            "/xdg/liftoff",
            "/lc",
            "/home/u/.cache/liftoff",
            ".cache/liftoff",
        ];
        for (vars, want) in cases.iter().zip(expected) {
            let rust = cache_dir_from(|n| {
                vars.iter()
                    .find(|(k, _)| *k == n)
                    .map(|(_, v)| OsString::from(v))
            });
            assert_eq!(rust, PathBuf::from(want), "{vars:?}");
            let out = Command::new("bash")
                .arg(script)
                .env_clear()
                .envs(vars.iter().copied())
                .output()
                .expect("bash runs");
            let shell = String::from_utf8_lossy(&out.stdout).trim().to_string();
            assert_eq!(PathBuf::from(shell), rust, "{vars:?}");
        }
    }
}
