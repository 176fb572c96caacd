//! The settings of `liftoff serve` from all their sources, with precedence
//! flag > `TAKEOFF_*` variable > manifest > default.
//!
//! clap handles flags, variables and defaults. A manifest setting is applied by appending it as
//! a flag to the command line, but only where clap reports that the value would otherwise be
//! the default, so a flag or a variable always wins over it.

use crate::manifest::Manifest;
use crate::serve::ServeArgs;
use anyhow::Result;
use clap::parser::ValueSource;
use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser};
use std::ffi::OsString;

/// `serve`'s arguments at the top level, to parse them on their own.
#[derive(Parser, Debug)]
#[command(name = "liftoff")]
struct ServeOnly {
    /// The global `--log-level`, which may follow `serve` (read by `main`).
    #[arg(long, env = "TAKEOFF_LOG_LEVEL", default_value = "info")]
    log_level: String,
    #[command(flatten)]
    args: ServeArgs,
}

/// The settings of every reader to serve: one without a manifest, else one per manifest reader.
pub fn readers() -> Result<Vec<ServeArgs>> {
    readers_from(std::env::args_os().collect())
}

pub(crate) fn readers_from(argv: Vec<OsString>) -> Result<Vec<ServeArgs>> {
    // The flags after `serve` (none for a bare `liftoff`).
    let mut base: Vec<OsString> = vec!["liftoff".into()];
    if let Some(i) = argv.iter().position(|a| a == "serve") {
        base.extend(argv[i + 1..].iter().cloned());
    }
    let matches = ServeOnly::command().try_get_matches_from(&base)?;
    let first = ServeArgs::from_arg_matches(&matches)?;
    let Some(path) = first.config_file.clone() else {
        return Ok(vec![first]);
    };
    let manifest = Manifest::load(&path, &setting_ids())?;
    type Named = (Option<String>, Vec<(String, String)>);
    let readers: Vec<Named> = if manifest.readers.is_empty() {
        vec![(None, Vec::new())]
    } else {
        manifest
            .readers
            .iter()
            .map(|(id, settings)| (Some(id.clone()), settings.clone()))
            .collect()
    };
    readers
        .iter()
        .map(|reader| {
            let mut argv = base.clone();
            for (id, value) in manifest.server.iter().chain(&reader.1) {
                append_if_default(&mut argv, &matches, id, value);
            }
            if let Some(name) = &reader.0 {
                append_if_default(&mut argv, &matches, "reader_id", name);
            }
            let m = ServeOnly::command().try_get_matches_from(&argv)?;
            Ok(ServeArgs::from_arg_matches(&m)?)
        })
        .collect()
}

/// Every setting id `serve` has (the manifest's keys).
pub fn setting_ids() -> Vec<String> {
    ServeArgs::augment_args(clap::Command::new("serve"))
        .get_arguments()
        .map(|a| a.get_id().to_string())
        .filter(|id| id != "config_file" && id != "help")
        .collect()
}

/// One reader's settings from `(setting id, value)` pairs alone (a `POST /reader` body);
/// `TAKEOFF_*` variables fill what the pairs leave unset.
pub(crate) fn reader_from_pairs(pairs: &[(String, String)]) -> Result<ServeArgs, clap::Error> {
    let mut argv: Vec<OsString> = vec!["liftoff".into()];
    for (id, value) in pairs {
        append(&mut argv, id, value);
    }
    let m = ServeOnly::command().try_get_matches_from(&argv)?;
    ServeArgs::from_arg_matches(&m)
}

fn append_if_default(argv: &mut Vec<OsString>, matches: &ArgMatches, id: &str, value: &str) {
    if matches!(
        matches.value_source(id),
        Some(ValueSource::CommandLine | ValueSource::EnvVariable)
    ) {
        return;
    }
    append(argv, id, value);
}

/// Appends setting `id` as its flag.
fn append(argv: &mut Vec<OsString>, id: &str, value: &str) {
    let flag = format!("--{}", id.replace('_', "-"));
    let takes_value = ServeOnly::command()
        .get_arguments()
        .find(|a| a.get_id() == id)
        .is_some_and(|a| a.get_action().takes_values());
    if takes_value {
        argv.push(flag.into());
        argv.push(value.into());
    } else if value == "true" {
        argv.push(flag.into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_beat_variables_beat_the_manifest_beats_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("manifest.yaml");
        std::fs::write(
            &path,
            "takeoff:\n  server_config:\n    port: 4100\n    management_port: 4101\n  readers_config:\n    r1:\n      model_name: m1\n      max_batch_size: 4\n      max_waiting: 9\n      disable_prefix_caching: true\n    r2:\n      model_name: m2\n      consumer_group: second\n",
        )
        .unwrap();
        // Only this test sets these variables (tests in this binary use distinct names).
        std::env::set_var("TAKEOFF_MAX_WAITING", "77");
        let argv: Vec<OsString> = ["liftoff", "serve", "--port", "5000", "--config-file"]
            .iter()
            .map(OsString::from)
            .chain([path.clone().into_os_string()])
            .collect();
        let r = readers_from(argv).unwrap();
        std::env::remove_var("TAKEOFF_MAX_WAITING");
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].port, 5000, "the flag wins over the manifest");
        assert_eq!(
            r[0].management_port, 4101,
            "the manifest wins over the default"
        );
        assert_eq!(r[0].model, "m1");
        assert_eq!(r[0].max_batch_size, 4);
        assert_eq!(r[0].max_waiting, 77, "the variable wins over the manifest");
        assert!(r[0].disable_prefix_caching);
        assert_eq!(r[1].model, "m2");
        assert_eq!(r[1].consumer_group, "second");
        assert_eq!(r[1].max_batch_size, 16, "default");
        assert!(!r[1].disable_prefix_caching);
    }

    #[test]
    fn manifest_keys_are_the_serve_settings() {
        let ids = setting_ids();
        for id in [
            "model",
            "device",
            "tensor_parallel",
            "max_batch_size",
            "port",
        ] {
            assert!(ids.contains(&id.to_string()), "{id}");
        }
    }
}
