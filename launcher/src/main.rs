//! `liftoff`: the launcher and command-line interface.

mod bench;
mod bench_limits;
mod bench_plot;
mod config_doc;
mod generate;
mod health;
mod kernel_check;
mod loader;
mod manifest;
mod model_resolve;
mod plan;
mod reader;
mod serve;
mod serve_config;
mod supervisor;
mod worker_cmd;

use clap::{Parser, Subcommand};
use std::io::IsTerminal;

/// liftoff: a tensor-parallel LLM serving engine.
#[derive(Parser, Debug)]
#[command(name = "liftoff", version, about)]
struct Cli {
    /// Log level (error, warn, info, debug, trace).
    #[arg(long, global = true, env = "TAKEOFF_LOG_LEVEL", default_value = "info")]
    log_level: String,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the HTTP APIs (Takeoff and OpenAI) on the model (the default command).
    Serve(Box<serve::ServeArgs>),
    /// Generate text from one prompt and print it.
    Generate(generate::GenerateArgs),
    /// Load-test an OpenAI-compatible server and plot the results.
    Bench(bench::BenchArgs),
    /// Check the attention, KV-cache and rotary kernels against their references on a device.
    KernelCheck(kernel_check::KernelCheckArgs),
    /// Exit 0 if the local server is healthy (a container health check).
    Health(health::HealthArgs),
    /// One rank of a replica group (started by the launcher, not by hand).
    #[command(hide = true)]
    Worker(worker_cmd::WorkerArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&cli.log_level))
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal: logs redirected to a file or collected by a
        // container runtime stay plain text.
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
        .init();
    let result = match cli.command {
        Some(Command::Generate(args)) => generate::run(args, &cli.log_level),
        Some(Command::Bench(args)) => bench::run(args),
        Some(Command::Worker(args)) => worker_cmd::run(args),
        Some(Command::KernelCheck(args)) => kernel_check::run(args),
        Some(Command::Health(args)) => health::run(args),
        Some(Command::Serve(_)) | None => {
            serve_config::readers().and_then(|r| serve::run(r, &cli.log_level))
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line, whatever the causes contain.
            let msg = format!("{e:#}").replace('\n', " ");
            eprintln!("error: {msg}");
            std::process::ExitCode::FAILURE
        }
    }
}
