//! `liftoff health`: exits 0 when the local server answers `GET /health` with 200, 1 otherwise
//! (the container's `HEALTHCHECK`, so the image needs no HTTP client besides the binary).

use anyhow::{bail, Context, Result};
use clap::Args;
use std::time::Duration;

#[derive(Args, Debug)]
pub struct HealthArgs {
    /// The server's inference port.
    #[arg(long, env = "TAKEOFF_PORT", default_value_t = 3000)]
    port: u16,
    /// Seconds to wait for the answer.
    #[arg(long, default_value_t = 5)]
    timeout_secs: u64,
}

/// Runs `liftoff health`.
pub fn run(args: HealthArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let url = format!("http://127.0.0.1:{}/health", args.port);
        let resp = reqwest::Client::builder()
            .timeout(Duration::from_secs(args.timeout_secs))
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
