//! `custody console`: the review console over a trail (`docs/console.md`).

use std::{path::Path, process::ExitCode};

use anyhow::Context;

pub fn run(path: &Path) -> anyhow::Result<ExitCode> {
    let (console, reviewers) = custody_config::console::load(path)?;
    super::runtime()?.block_on(async {
        let listener = tokio::net::TcpListener::bind(console.listen)
            .await
            .with_context(|| format!("binding {}", console.listen))?;
        let scheme = if console.tls.is_some() {
            "https"
        } else {
            "http"
        };
        println!(
            "custody console listening on {scheme}://{}",
            listener.local_addr()?
        );
        custody_proxy::console::run(&console, &reviewers, listener, super::shutdown_signal())
            .await?;
        Ok(ExitCode::SUCCESS)
    })
}
