//! Runs the daemon: node client, template engine, SV2 server and metrics endpoint.

/// Runs the daemon with `config` until shutdown.
pub async fn run(config: crate::config::Config) -> anyhow::Result<()> {
    let _ = config;
    anyhow::bail!("the daemon is not wired yet")
}
