//! Takeoff's manifest YAML:
//!
//! ```yaml
//! takeoff:
//!   server_config:
//!     port: 3000
//!   readers_config:
//!     reader1:
//!       model_name: SmolLM2-135M-Instruct
//!       device: cpu
//!       consumer_group: primary
//!       max_batch_size: 16
//! ```
//!
//! Each key is a `liftoff serve` setting (`model_name` is `--model`; the rest are the flags'
//! names with `_` for `-`). The manifest ranks below flags and `TAKEOFF_*` variables: a
//! setting is taken from it only where neither gave one.

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    takeoff: Takeoff,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Takeoff {
    #[serde(default)]
    server_config: BTreeMap<String, serde_yaml_ng::Value>,
    #[serde(default)]
    readers_config: BTreeMap<String, BTreeMap<String, serde_yaml_ng::Value>>,
}

/// A manifest, flattened to `(setting id, value)` pairs.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Manifest {
    pub server: Vec<(String, String)>,
    /// `(reader id, its settings)`, in the file's (sorted) order.
    pub readers: Vec<(String, Vec<(String, String)>)>,
}

impl Manifest {
    /// Reads and checks `path`; `known` are the setting ids keys may name.
    pub fn load(path: &Path, known: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the manifest {}", path.display()))?;
        Self::parse(&text, known).with_context(|| format!("manifest {}", path.display()))
    }

    /// Parses manifest text.
    pub fn parse(text: &str, known: &[String]) -> Result<Self> {
        let file: File = serde_yaml_ng::from_str(text)?;
        let convert = |section: &str,
                       map: &BTreeMap<String, serde_yaml_ng::Value>|
         -> Result<Vec<(String, String)>> {
            map.iter()
                .map(|(k, v)| {
                    let id = setting_id(k);
                    if !known.contains(&id) {
                        bail!(
                            "{section}: unknown key '{k}' (known: model_name, {})",
                            known.join(", ")
                        );
                    }
                    Ok((id, scalar(section, k, v)?))
                })
                .collect()
        };
        let server = convert("server_config", &file.takeoff.server_config)?;
        let readers = file
            .takeoff
            .readers_config
            .iter()
            .map(|(id, map)| Ok((id.clone(), convert(&format!("readers_config.{id}"), map)?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { server, readers })
    }
}

/// The clap id a manifest key names.
fn setting_id(key: &str) -> String {
    match key {
        "model_name" => "model".into(),
        other => other.replace('-', "_"),
    }
}

fn scalar(section: &str, key: &str, v: &serde_yaml_ng::Value) -> Result<String> {
    use serde_yaml_ng::Value;
    Ok(match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        // e.g. cuda_visible_devices: [0, 1]
        Value::Sequence(items) => items
            .iter()
            .map(|i| scalar(section, key, i))
            .collect::<Result<Vec<_>>>()?
            .join(","),
        _ => bail!("{section}.{key}: expected a string, number, boolean or list"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn known() -> Vec<String> {
        [
            "model",
            "device",
            "port",
            "max_batch_size",
            "cuda_visible_devices",
        ]
        .map(String::from)
        .to_vec()
    }

    #[test]
    fn reads_takeoff_shape() {
        let m = Manifest::parse(
            "takeoff:\n  server_config:\n    port: 4000\n  readers_config:\n    b:\n      model_name: m2\n    a:\n      model_name: m1\n      max_batch_size: 8\n      cuda_visible_devices: [0, 1]\n",
            &known(),
        )
        .unwrap();
        assert_eq!(m.server, vec![("port".into(), "4000".into())]);
        assert_eq!(m.readers[0].0, "a");
        assert_eq!(
            m.readers[0].1,
            vec![
                ("cuda_visible_devices".into(), "0,1".into()),
                ("max_batch_size".into(), "8".into()),
                ("model".into(), "m1".into())
            ]
        );
        assert_eq!(m.readers[1].1, vec![("model".into(), "m2".into())]);
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = Manifest::parse(
            "takeoff:\n  readers_config:\n    r:\n      max_batchsize: 8\n",
            &known(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("readers_config.r: unknown key 'max_batchsize'"),
            "{err}"
        );
    }
}
