//! `liftoff health`: exits 0 when the local server answers `GET /health` with 200, 1 otherwise
//! (the container's `HEALTHCHECK`, so the image needs no HTTP client besides the binary). The
//! server's address is found as `liftoff serve` finds it: `TAKEOFF_*` variables, then a
//! manifest (`TAKEOFF_CONFIG_FILE`, else `/code/config.yaml` where the image's entrypoint would
//! take it from), unless `--port` says.

use crate::serve_config;
use anyhow::{bail, Context, Result};
use clap::Args;
use std::ffi::OsString;
use std::net::IpAddr;
use std::time::Duration;

/// Where the container entrypoint looks for a mounted manifest.
const CONTAINER_MANIFEST: &str = "/code/config.yaml";

#[derive(Args, Debug)]
pub struct HealthArgs {
    /// The server's inference port (default: as `liftoff serve` would listen).
    #[arg(long)]
    port: Option<u16>,
    /// Seconds to wait for the answer.
    #[arg(long, default_value_t = 5)]
    timeout_secs: u64,
}

/// The address `liftoff serve` listens on, from the same settings.
fn served_address() -> Result<(String, u16)> {
    let mut argv: Vec<OsString> = vec!["liftoff".into(), "serve".into()];
    if std::env::var_os("TAKEOFF_CONFIG_FILE").is_none()
        && std::path::Path::new(CONTAINER_MANIFEST).is_file()
    {
        argv.extend(["--config-file".into(), CONTAINER_MANIFEST.into()]);
    }
    let first = serve_config::readers_from(argv)?
        .into_iter()
        .next()
        .context("no server settings")?;
    // A wildcard address is reached on loopback.
    let host = match first.host.parse::<IpAddr>() {
        Ok(ip) if ip.is_unspecified() => "127.0.0.1".to_string(),
        Ok(IpAddr::V6(ip)) => format!("[{ip}]"),
        _ => first.host.clone(),
    };
    Ok((host, first.port))
}

/// Runs `liftoff health`.
pub fn run(args: HealthArgs) -> Result<()> {
    let (host, port) = match args.port {
        Some(p) => ("127.0.0.1".to_string(), p),
        None => served_address()?,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let url = format!("http://{host}:{port}/health");
        let resp = reqwest::Client::builder()
            .timeout(Duration::from_secs(args.timeout_secs))
            // A proxy set for model downloads must not carry the local probe.
            .no_proxy()
            .build()?
            .get(&url)
            .send()
            .await
            .with_context(|| format!("GET {url}"))?;
        if !resp.status().is_success() {
            bail!("GET {url}: {}", resp.status());
        }
        Ok(())
    })
}
