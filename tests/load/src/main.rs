//! `custody-load`: the benchmark's tools.
//!
//! - `upstream`: an OpenAI-shaped chat endpoint with canned answers (plain JSON, or SSE
//!   with a configurable interval between chunks). It reads every request body but
//!   parses nothing, so the proxies under test, not the upstream, decide the numbers.
//! - `run`: a load generator. Closed loop (saturation) or open loop at a fixed rate
//!   (latency measured from each request's intended start, so a stall is not hidden by
//!   the requests it delays), HTTP/1.1 or HTTP/2 (prior knowledge), with time to first
//!   byte and the gaps between streamed chunks. Prints one JSON object.
//! - `proxy`: a bare reverse proxy on custody's HTTP stack, for reference.
//!
//! `tests/load/bench.py` drives them against direct, nginx and custody.
#![forbid(unsafe_code)]

mod proxy;
mod run;
mod upstream;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve canned chat completions; prints `upstream on http://ADDR`.
    Upstream(upstream::Args),
    /// Send load and print the results as JSON.
    Run(run::Args),
    /// A bare proxy on custody's HTTP stack, nothing else; prints `proxy on http://ADDR`.
    Proxy(proxy::Args),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Upstream(a) => upstream::main(a),
        Command::Run(a) => run::main(a),
        Command::Proxy(a) => proxy::main(a),
    }
}
