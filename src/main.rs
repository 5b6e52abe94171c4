//! The `sv2-tpd` command: runs the daemon, shows its configuration, manages its keys.
//!
//! Exit codes: 0 success, 1 runtime failure, 2 configuration or usage error.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use sv2_tpd::config::{Config, ConfigArgs};

/// Stratum V2 Template Provider for Bitcoin Core's IPC Mining interface.
#[derive(Debug, Parser)]
#[command(name = "sv2-tpd", version, about)]
struct Cli {
    #[command(flatten)]
    config: ConfigArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the template provider (the default).
    Run,
    /// Print the effective configuration and where each value came from.
    Config,
    /// Show, generate or import the authority key (its public half goes in pool configs).
    Keys {
        #[command(subcommand)]
        action: KeysAction,
    },
    /// Connect to a Template Provider as a pool would and print every message it sends.
    Watch(WatchArgs),
    /// Ask the running daemon (on its metrics address) how it is; exit 1 when unhealthy.
    Status(StatusArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish or powershell).
    Completions {
        /// The shell to complete for.
        shell: clap_complete::Shell,
    },
    /// Print the manual page, in roff (`sv2-tpd man | man -l -`).
    Man,
}

/// `sv2-tpd status` options.
#[derive(Debug, clap::Args)]
struct StatusArgs {
    /// Print the status as one JSON object.
    #[arg(long)]
    json: bool,
    /// Seconds to wait for the daemon's answer.
    #[arg(long, value_name = "SECS", default_value_t = 5)]
    timeout: u64,
}

/// `sv2-tpd watch` options.
#[derive(Debug, clap::Args)]
struct WatchArgs {
    /// The Template Provider's SV2 address (ip:port).
    #[arg(long, value_name = "ADDR")]
    tp: std::net::SocketAddr,
    /// Its authority public key, as `sv2-tpd keys show` prints it.
    #[arg(long, value_name = "KEY")]
    authority: key_utils::Secp256k1PublicKey,
    /// Print one JSON object per line instead of human-readable lines.
    #[arg(long)]
    json: bool,
    /// Stop after this many Template Distribution messages.
    #[arg(long, value_name = "N")]
    count: Option<usize>,
    /// Coinbase output bytes to reserve (CoinbaseOutputConstraints).
    #[arg(long, value_name = "BYTES", default_value_t = 100)]
    max_additional_size: u32,
    /// Coinbase output sigops to reserve (CoinbaseOutputConstraints).
    #[arg(long, value_name = "N", default_value_t = 4)]
    max_additional_sigops: u16,
}

#[derive(Debug, Subcommand)]
enum KeysAction {
    /// Print the authority public key, alone on stdout.
    Show,
    /// Create the authority key (mode 0600) and print its public key.
    Generate {
        /// Replace keys that already exist.
        #[arg(long)]
        force: bool,
    },
    /// Import an existing authority secret key from a file.
    Import {
        /// File holding the secret key.
        path: PathBuf,
    },
}

const EXIT_FAILURE: u8 = 1;
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // These two describe the command line itself and need no configuration.
    match &cli.command {
        Some(Command::Completions { shell }) => {
            let mut command = Cli::command();
            clap_complete::generate(*shell, &mut command, "sv2-tpd", &mut std::io::stdout());
            return ExitCode::SUCCESS;
        }
        Some(Command::Man) => return man_page(),
        _ => {}
    }
    let (config, unused) = match Config::load(&cli.config) {
        Ok((config, provenance)) => {
            if matches!(cli.command, Some(Command::Config)) {
                print!("{}", config.to_annotated_toml(&provenance));
                return ExitCode::SUCCESS;
            }
            let unused = config.unused_settings(&provenance);
            (config, unused)
        }
        Err(e) => {
            eprintln!("sv2-tpd: configuration error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Err(e) = sv2_tpd::logging::init(&config.log_level, config.log_format) {
        eprintln!("sv2-tpd: {e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    if let Some(warning) = unused {
        tracing::warn!("{warning}");
    }
    let outcome = match cli.command.unwrap_or(Command::Run) {
        Command::Run => block_on(sv2_tpd::daemon::run(config)),
        Command::Config => Ok(()),
        Command::Keys { action } => keys_command(&config, action),
        Command::Watch(args) => block_on(watch_command(args)),
        Command::Status(args) => return status_command(&config, args),
        Command::Completions { .. } | Command::Man => Ok(()),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Logging goes to stderr, so this is also what a terminal user sees.
            tracing::error!("{e:#}");
            ExitCode::from(failure_code(&e))
        }
    }
}

/// A node socket that is not to be trusted, or a node on another chain, is the operator's
/// setup to fix, like a bad configuration (2); every other failure is a runtime one (1).
fn failure_code(e: &anyhow::Error) -> u8 {
    use sv2_tpd::node::NodeError;
    use sv2_tpd::template::EngineError;
    match e.downcast_ref::<EngineError>() {
        Some(EngineError::Unsupported(
            NodeError::UntrustedSocket { .. } | NodeError::WrongChain { .. },
        )) => EXIT_CONFIG,
        _ => EXIT_FAILURE,
    }
}

/// `sv2-tpd man`: the manual page (options, every configuration flag, subcommands).
fn man_page() -> ExitCode {
    let page = clap_mangen::Man::new(Cli::command());
    match page.render(&mut std::io::stdout().lock()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sv2-tpd: cannot write the manual page: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// Runs `future` on a multi-threaded tokio runtime.
fn block_on(future: impl std::future::Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(future)
}

/// `sv2-tpd keys ...`: to be routed to `sv2_tpd::keys`.
fn keys_command(config: &Config, action: KeysAction) -> anyhow::Result<()> {
    use anyhow::Context;
    use sv2_tpd::keys;
    let path = &config.authority_key_path;
    let keys = match action {
        KeysAction::Show => keys::load(path).with_context(|| {
            format!(
                "no usable authority key at {} (create one with `sv2-tpd keys generate`)",
                path.display()
            )
        })?,
        KeysAction::Generate { force } => keys::generate(path, force)?,
        KeysAction::Import { path: from } => {
            let secret = std::fs::read_to_string(&from)
                .with_context(|| format!("cannot read {}", from.display()))?;
            keys::import_authority(path, &secret)?
        }
    };
    println!("{}", keys.authority_pubkey_string());
    Ok(())
}

/// `sv2-tpd status`: prints the daemon's status; 0 healthy, 1 unhealthy or unreachable,
/// 2 when the metrics endpoint is switched off.
fn status_command(config: &Config, args: StatusArgs) -> ExitCode {
    use sv2_tpd::status_client::{fetch, local_address};
    let Some(bind) = config.metrics_bind else {
        eprintln!("sv2-tpd: metrics_bind is off; `status` asks the daemon on that address");
        return ExitCode::from(EXIT_CONFIG);
    };
    let addr = local_address(bind);
    let limit = std::time::Duration::from_secs(args.timeout);
    let fetched = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::new)
        .and_then(|rt| Ok(rt.block_on(fetch(addr, limit))?));
    let status = match fetched {
        Ok(status) => status,
        Err(e) => {
            eprintln!("sv2-tpd: {e:#}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    if args.json {
        match serde_json::to_string_pretty(&status) {
            Ok(json) => println!("{json}"),
            Err(e) => {
                eprintln!("sv2-tpd: {e}");
                return ExitCode::from(EXIT_FAILURE);
            }
        }
    } else {
        print!("{}", status.to_text());
    }
    if status.healthy {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_FAILURE)
    }
}

/// `sv2-tpd watch`: prints what a Template Provider sends, on stdout.
async fn watch_command(args: WatchArgs) -> anyhow::Result<()> {
    let opts = sv2_tpd::watch::WatchOptions {
        addr: args.tp,
        authority: args.authority,
        max_additional_size: args.max_additional_size,
        max_additional_sigops: args.max_additional_sigops,
        json: args.json,
        count: args.count,
    };
    sv2_tpd::watch::run(opts, &mut std::io::stdout().lock()).await
}
