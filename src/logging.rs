//! Process-wide logging through `tracing`: human-readable text by default, one JSON
//! object per line for log collectors.
//!
//! The configured level is a `tracing` filter (`info`, `sv2_tpd=debug,warn`, ...);
//! a non-empty `RUST_LOG` replaces it, as is usual for Rust programs.

use std::fmt;
use std::io::IsTerminal;
use std::str::FromStr;

use tracing_subscriber::EnvFilter;

/// How log lines are written to stderr.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl LogFormat {
    /// The spelling used in configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err("expected one of text, json".to_string()),
        }
    }
}

/// Why logging could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    /// The level (or `RUST_LOG`) is not a valid `tracing` filter.
    #[error("invalid log filter {filter:?} (from {origin}): {reason}")]
    Filter {
        /// The rejected filter text.
        filter: String,
        /// `log_level` or `RUST_LOG`.
        origin: &'static str,
        /// What the filter parser said.
        reason: String,
    },
    /// A global subscriber was already installed in this process.
    #[error("logging is already initialised: {0}")]
    AlreadyInitialised(String),
}

/// Checks that `level` is a usable `tracing` filter, so a bad `log_level` is rejected
/// together with the rest of the configuration.
pub fn validate_level(level: &str) -> Result<(), String> {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    let allowed = "expected a level (off, error, warn, info, debug, trace) or tracing \
                   directives such as sv2_tpd=debug,info";
    // A bare word is a valid filter (it names a target), so a misspelt level such as
    // `inof` would silently log nothing useful: bare words must be levels.
    for directive in level.split(',').map(str::trim) {
        let bare = !directive.contains('=') && !directive.contains('[');
        if directive.is_empty()
            || (bare && !LEVELS.contains(&directive.to_ascii_lowercase().as_str()))
        {
            return Err(allowed.to_string());
        }
    }
    EnvFilter::builder()
        .parse(level)
        .map(|_| ())
        .map_err(|e| format!("{allowed} ({e})"))
}

/// Installs the global subscriber writing to stderr at `level` in `format`.
///
/// A non-empty `RUST_LOG` environment variable takes the place of `level`.
pub fn init(level: &str, format: LogFormat) -> Result<(), LoggingError> {
    let (filter_text, origin) = match std::env::var("RUST_LOG") {
        Ok(from_env) if !from_env.trim().is_empty() => (from_env, "RUST_LOG"),
        _ => (level.to_string(), "log_level"),
    };
    let filter = EnvFilter::builder()
        .parse(&filter_text)
        .map_err(|e| LoggingError::Filter {
            filter: filter_text.clone(),
            origin,
            reason: e.to_string(),
        })?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let installed = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    installed.map_err(|e| LoggingError::AlreadyInitialised(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_round_trip() {
        for format in [LogFormat::Text, LogFormat::Json] {
            assert_eq!(format.as_str().parse::<LogFormat>(), Ok(format));
        }
        assert!("yaml".parse::<LogFormat>().is_err());
    }

    #[test]
    fn levels_are_checked() {
        assert!(validate_level("info").is_ok());
        assert!(validate_level("sv2_tpd=debug,warn").is_ok());
        assert!(validate_level("loud").is_err());
    }
}
