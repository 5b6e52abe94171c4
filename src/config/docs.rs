//! Documentation generated from the key declarations: the example configuration file
//! of each chain (`config/<chain>.toml`) and the README's table of keys. Tests compare
//! the checked-in copies with these (and rewrite them with `SV2TPD_UPDATE_DOCS=1`).

use std::path::Path;

use super::values::toml_value;
use super::{Chain, Config, Section, KEY_DOCS};

/// Where the README's key table starts and ends.
pub const README_TABLE_MARKERS: (&str, &str) = (
    "<!-- config-table: generated from src/config/keys.rs -->",
    "<!-- config-table end -->",
);

/// The example file's name for `chain`, inside `config/`.
pub fn example_file_name(chain: Chain) -> String {
    let name = match chain {
        Chain::Main => "mainnet",
        other => other.as_str(),
    };
    format!("{name}.toml")
}

/// Keys the example for `chain` sets (uncommented), with a comment saying why.
fn example_settings(chain: Chain) -> &'static [(&'static str, &'static str, &'static str)] {
    match chain {
        Chain::Regtest => &[
            (
                "fee_delta",
                "1",
                "On regtest the mempool is what your tests put in it: react to every change\n\
                 and check often.",
            ),
            ("template_interval", "5", ""),
            ("log_level", "debug", ""),
        ],
        _ => &[],
    }
}

fn chain_title(chain: Chain) -> &'static str {
    match chain {
        Chain::Main => "Mainnet",
        Chain::Testnet4 => "Testnet 4",
        Chain::Signet => "Signet",
        Chain::Regtest => "Regtest",
    }
}

fn comment(out: &mut String, text: &str) {
    for line in text.lines() {
        out.push_str(&format!("# {line}\n"));
    }
}

/// The example configuration file for `chain`: every key, commented out at its default
/// (as the chain derives it) unless the example sets it, under its documentation.
pub fn example_toml(chain: Chain) -> String {
    // `~` as the home keeps the defaults as written ("~/.bitcoin", not a real home).
    let (_, provenance) = Config::defaults(chain, Path::new("~"));
    let chain_dir = chain
        .bitcoin_subdir()
        .map(|dir| format!("{dir}/"))
        .unwrap_or_default();
    let chain_flag = match chain {
        Chain::Main => String::new(),
        other => format!(" -chain={other}"),
    };
    let mut out = format!(
        "# sv2-tpd configuration for {}.\n\
         #\n\
         # Generated from src/config/keys.rs (SV2TPD_UPDATE_DOCS=1 cargo test --test config\n\
         # rewrites it); edit the declarations there, not this file.\n\
         #\n\
         # Copy to <datadir>/sv2-tpd.toml (default ~/.sv2-tpd/sv2-tpd.toml), or to\n\
         # /etc/sv2-tpd/sv2-tpd.toml with the systemd unit, or pass --config PATH.\n\
         # Every key can also be set as an environment variable SV2TPD_<KEY> (for example\n\
         # SV2TPD_SV2_PORT) or a flag --<key-with-dashes>; flags win over the environment,\n\
         # which wins over this file. `sv2-tpd config` prints the result and where each\n\
         # value came from. Commented-out keys show their defaults.\n",
        chain_title(chain)
    );
    for section in Section::ALL {
        if let Some(title) = section.title() {
            out.push_str(&format!(
                "\n# --- {title} {}\n",
                "-".repeat(74 - title.len())
            ));
        }
        for doc in KEY_DOCS.iter().filter(|doc| doc.section == section) {
            if !doc.about.is_empty() {
                out.push('\n');
                let about = doc
                    .about
                    .replace("{chain_dir}", &chain_dir)
                    .replace("{chain_flag}", &chain_flag);
                comment(&mut out, &about);
            }
            let setting = example_settings(chain)
                .iter()
                .find(|(key, _, _)| *key == doc.key);
            match (doc.key, setting) {
                ("chain", _) => {
                    out.push_str(&format!("\nchain = {}\n", toml_value(chain.as_str())))
                }
                (_, Some((key, value, why))) => {
                    comment(&mut out, why);
                    out.push_str(&format!("{key} = {}\n", toml_value(value)));
                }
                (key, None) => {
                    let default = provenance
                        .default_text(key)
                        .expect("every key takes its default");
                    out.push_str(&format!("# {key} = {}\n", toml_value(default)));
                }
            }
        }
    }
    out
}

/// The README's table of keys, between [`README_TABLE_MARKERS`].
pub fn readme_table() -> String {
    let mut out =
        String::from("| Key | Default | Flag / environment | Meaning |\n|---|---|---|---|\n");
    for doc in KEY_DOCS {
        let default = if doc.derived {
            doc.default.to_string()
        } else {
            format!("`{}`", doc.default)
        };
        out.push_str(&format!(
            "| `{}` | {default} | `{}` / `{}` | {} |\n",
            doc.key,
            doc.flag,
            doc.env_var(),
            doc.help
        ));
    }
    out
}
