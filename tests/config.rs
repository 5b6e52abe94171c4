//! The `sv2-tpd` binary's configuration handling, seen from outside: precedence,
//! provenance, rejection of bad input, the shipped examples and the systemd unit.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_sv2-tpd");

/// Runs the binary with a clean environment (only `HOME` and the given variables).
fn run(home: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(BIN);
    command.env_clear().env("HOME", home).args(args);
    for (name, value) in env {
        command.env(name, value);
    }
    command.output().expect("run sv2-tpd")
}

/// One line of `sv2-tpd config`: the value (as TOML) and its source comment.
struct Shown {
    value: toml::Value,
    source: String,
}

/// Runs `sv2-tpd config` and returns each key's value and source.
fn show_config(home: &Path, args: &[&str], env: &[(&str, &str)]) -> BTreeMap<String, Shown> {
    let mut all_args = vec!["config"];
    all_args.extend_from_slice(args);
    let output = run(home, &all_args, env);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "sv2-tpd config failed: {}{}",
        stdout,
        String::from_utf8_lossy(&output.stderr)
    );
    let values: toml::Table = stdout.parse().expect("`config` prints valid TOML");
    stdout
        .lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .map(|line| {
            let key = line.split('=').next().unwrap().trim().to_string();
            let source = line
                .rsplit_once(" # ")
                .expect("source comment")
                .1
                .to_string();
            let value = values[&key].clone();
            (key, Shown { value, source })
        })
        .collect()
}

fn write(path: &Path, text: &str) -> PathBuf {
    std::fs::write(path, text).unwrap();
    path.to_path_buf()
}

#[test]
fn flags_beat_env_beat_file_beat_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        &dir.path().join("tpd.toml"),
        "chain = \"signet\"\nsv2_port = 1111\nfee_delta = 5\ntemplate_interval = 7\n",
    );
    let file_arg = file.to_str().unwrap();
    let shown = show_config(
        dir.path(),
        &["--config", file_arg, "--sv2-port", "3333"],
        &[("SV2TPD_SV2_PORT", "2222"), ("SV2TPD_FEE_DELTA", "6")],
    );

    assert_eq!(shown["sv2_port"].value.as_integer(), Some(3333));
    assert_eq!(shown["sv2_port"].source, "flag --sv2-port");
    assert_eq!(shown["fee_delta"].value.as_integer(), Some(6));
    assert_eq!(shown["fee_delta"].source, "env SV2TPD_FEE_DELTA");
    assert_eq!(shown["template_interval"].value.as_integer(), Some(7));
    assert_eq!(
        shown["template_interval"].source,
        format!("file {file_arg}")
    );
    assert_eq!(shown["chain"].value.as_str(), Some("signet"));
    assert_eq!(shown["max_clients"].value.as_integer(), Some(1024));
    assert_eq!(shown["max_clients"].source, "default");
    // Derived from the file's chain and the default bitcoin_datadir under HOME.
    let socket = dir.path().join(".bitcoin/signet/node.sock");
    assert_eq!(shown["ipc_socket"].value.as_str(), socket.to_str());
    assert!(shown["ipc_socket"].source.starts_with("default"));
}

#[test]
fn chain_picks_port_and_socket_defaults() {
    let dir = tempfile::tempdir().unwrap();
    for (chain, port, subdir) in [
        ("main", 8442, ""),
        ("testnet4", 48442, "testnet4/"),
        ("signet", 38442, "signet/"),
        ("regtest", 18447, "regtest/"),
    ] {
        let shown = show_config(
            dir.path(),
            &["--chain", chain, "--bitcoin-datadir", "/srv/btc"],
            &[],
        );
        assert_eq!(shown["sv2_port"].value.as_integer(), Some(port), "{chain}");
        let socket = format!("/srv/btc/{subdir}node.sock");
        assert_eq!(shown["ipc_socket"].value.as_str(), Some(socket.as_str()));
    }
}

#[test]
fn default_file_in_datadir_is_read_and_may_be_missing() {
    let dir = tempfile::tempdir().unwrap();
    let datadir = dir.path().join("tpd");
    std::fs::create_dir(&datadir).unwrap();
    let datadir_arg = datadir.to_str().unwrap();

    let shown = show_config(dir.path(), &["--datadir", datadir_arg], &[]);
    assert_eq!(shown["log_format"].source, "default");

    let file = write(&datadir.join("sv2-tpd.toml"), "log_format = \"json\"\n");
    let shown = show_config(dir.path(), &[], &[("SV2TPD_DATADIR", datadir_arg)]);
    assert_eq!(shown["log_format"].value.as_str(), Some("json"));
    assert_eq!(
        shown["log_format"].source,
        format!("file {}", file.display())
    );
    let key = datadir.join("authority.key");
    assert_eq!(shown["authority_key_path"].value.as_str(), key.to_str());
}

#[test]
fn config_file_can_come_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(&dir.path().join("x.toml"), "max_clients = 3\n");
    let shown = show_config(
        dir.path(),
        &[],
        &[("SV2TPD_CONFIG", file.to_str().unwrap())],
    );
    assert_eq!(shown["max_clients"].value.as_integer(), Some(3));
}

/// Asserts a configuration error: exit code 2 and every `needle` on stderr.
fn assert_config_error(output: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "stderr: {stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "{needle:?} not in: {stderr}");
    }
}

#[test]
fn unknown_key_in_file_is_rejected_with_key_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        &dir.path().join("bad.toml"),
        "chain = \"main\"\nsv2_prot = 1\n",
    );
    let file_arg = file.to_str().unwrap();
    let output = run(dir.path(), &["--config", file_arg, "config"], &[]);
    assert_config_error(&output, &["sv2_prot", file_arg, "sv2_port"]);
}

#[test]
fn bad_value_in_file_is_rejected_with_key_file_and_allowed_values() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(&dir.path().join("bad.toml"), "chain = \"testnet3\"\n");
    let file_arg = file.to_str().unwrap();
    let output = run(dir.path(), &["--config", file_arg, "config"], &[]);
    assert_config_error(
        &output,
        &["`chain`", file_arg, "testnet3", "main, testnet4"],
    );

    // `run` rejects it the same way, before doing anything else.
    let output = run(dir.path(), &["--config", file_arg, "run"], &[]);
    assert_config_error(&output, &["`chain`", file_arg]);
}

#[test]
fn bad_values_from_env_and_flags_name_their_source() {
    let dir = tempfile::tempdir().unwrap();
    let output = run(dir.path(), &["config"], &[("SV2TPD_METRICS_BIND", "9842")]);
    assert_config_error(
        &output,
        &["`metrics_bind`", "env SV2TPD_METRICS_BIND", "off"],
    );

    let output = run(dir.path(), &["config", "--sv2-port", "70000"], &[]);
    assert_config_error(&output, &["`sv2_port`", "flag --sv2-port"]);

    let output = run(dir.path(), &["config"], &[("SV2TPD_SV2PORT", "1")]);
    assert_config_error(&output, &["sv2port", "SV2TPD_SV2PORT"]);
}

#[test]
fn explicit_missing_config_file_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.toml");
    let output = run(dir.path(), &["--config", missing.to_str().unwrap()], &[]);
    assert_config_error(&output, &[missing.to_str().unwrap()]);
}

#[test]
fn example_configs_are_valid_with_every_key_uncommented() {
    let dir = tempfile::tempdir().unwrap();
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut seen = 0;
    for entry in std::fs::read_dir(&examples).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        seen += 1;
        show_config(dir.path(), &["--config", path.to_str().unwrap()], &[]);

        // The commented-out keys document defaults: they must be real keys with
        // acceptable values too (the first mention of each).
        let text = std::fs::read_to_string(&path).unwrap();
        let mut keys = std::collections::BTreeSet::new();
        let uncommented: String = text
            .lines()
            .map(|line| {
                let candidate = line.strip_prefix("# ").unwrap_or(line);
                let is_setting = candidate.split_once(" = ").is_some_and(|(k, _)| {
                    k.chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
                });
                let key = candidate.split(" = ").next().unwrap_or("").to_string();
                if is_setting && keys.insert(key) {
                    format!("{candidate}\n")
                } else {
                    "\n".to_string()
                }
            })
            .collect();
        let full = write(&dir.path().join("full.toml"), &uncommented);
        let shown = show_config(dir.path(), &["--config", full.to_str().unwrap()], &[]);
        assert_eq!(
            keys.len(),
            sv2_tpd::config::KEYS.len(),
            "{}: every key is documented; found {keys:?}",
            path.display()
        );
        for key in &keys {
            assert!(
                shown[key].source.starts_with("file "),
                "{}: {key} not taken from the file",
                path.display()
            );
        }
    }
    assert_eq!(seen, 4, "one example per chain");
}

/// The systemd unit passes `systemd-analyze verify`, pointed at the built binary.
#[test]
fn systemd_unit_verifies() {
    let in_ci = std::env::var("CI").is_ok_and(|v| v == "true");
    let available = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !available {
        assert!(
            !in_ci,
            "systemd-analyze is required in CI (install systemd)"
        );
        use std::io::Write;
        // Written to the real stderr so the skip shows without --nocapture.
        let _ = writeln!(
            std::io::stderr(),
            "skipped: systemd-analyze not found; unit not verified"
        );
        return;
    }
    let unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/sv2-tpd.service"),
    )
    .unwrap();
    assert!(unit.contains("ExecStart=/usr/local/bin/sv2-tpd "));
    let dir = tempfile::tempdir().unwrap();
    let copy = write(
        &dir.path().join("sv2-tpd.service"),
        &unit.replace("/usr/local/bin/sv2-tpd", BIN),
    );
    let output = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    // Unknown or unparsable settings are only warnings: treat them as failures.
    let complaints: Vec<&str> = stderr
        .lines()
        .filter(|line| line.contains("sv2-tpd.service"))
        .collect();
    assert!(complaints.is_empty(), "{}", complaints.join("\n"));
}

/// `config/*.toml` and the README's table of keys are generated from the key
/// declarations in src/config/keys.rs; `SV2TPD_UPDATE_DOCS=1` rewrites them.
#[test]
fn example_files_and_the_readme_table_are_generated_from_the_declarations() {
    use sv2_tpd::config::{docs, Chain};
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let update = std::env::var_os("SV2TPD_UPDATE_DOCS").is_some();
    let mut stale = Vec::new();
    let mut check = |path: PathBuf, expected: String| {
        let actual = std::fs::read_to_string(&path).unwrap_or_default();
        if actual != expected {
            if update {
                std::fs::write(&path, expected).unwrap();
            } else {
                stale.push(path.display().to_string());
            }
        }
    };
    for chain in Chain::ALL {
        let path = root.join("config").join(docs::example_file_name(chain));
        check(path, docs::example_toml(chain));
    }
    let readme_path = root.join("README.md");
    let readme = std::fs::read_to_string(&readme_path).unwrap();
    let (start, end) = docs::README_TABLE_MARKERS;
    let (before, rest) = readme
        .split_once(start)
        .expect("README has the table's start marker");
    let (_, after) = rest
        .split_once(end)
        .expect("README has the table's end marker");
    check(
        readme_path,
        format!("{before}{start}\n{}{end}{after}", docs::readme_table()),
    );
    assert!(
        stale.is_empty(),
        "out of date with src/config/keys.rs (run SV2TPD_UPDATE_DOCS=1 cargo test --test config): {}",
        stale.join(", ")
    );
}

/// Every declared key has its flag in `--help`, spelled as the documentation says.
#[test]
fn every_declared_key_has_its_flag() {
    let dir = tempfile::tempdir().unwrap();
    let output = run(dir.path(), &["--help"], &[]);
    let help = String::from_utf8_lossy(&output.stdout);
    for doc in sv2_tpd::config::KEY_DOCS {
        assert_eq!(doc.flag, format!("--{}", doc.key.replace('_', "-")));
        assert!(
            help.contains(&format!("{} <{}>", doc.flag, doc.value_name)),
            "{} missing from --help",
            doc.flag
        );
    }
}

/// The shell completions and the manual page the package ships know every flag.
#[test]
fn completions_and_man_page_name_every_flag() {
    let dir = tempfile::tempdir().unwrap();
    let bash = run(dir.path(), &["completions", "bash"], &[]);
    let man = run(dir.path(), &["man"], &[]);
    assert!(bash.status.success() && man.status.success());
    let bash = String::from_utf8_lossy(&bash.stdout);
    let man = String::from_utf8_lossy(&man.stdout);
    assert!(
        man.starts_with(".ie") && man.contains(".TH sv2-tpd 1"),
        "{man}"
    );
    for doc in sv2_tpd::config::KEY_DOCS {
        assert!(bash.contains(doc.flag), "{} not completed", doc.flag);
        // roff escapes the dashes.
        assert!(
            man.contains(&doc.flag.replace('-', "\\-")),
            "{} not in man",
            doc.flag
        );
    }
}

#[test]
fn nodes_come_from_repeated_flags_a_toml_list_or_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let shown = |args: &[&str], env: &[(&str, &str)]| {
        let config = show_config(dir.path(), args, env);
        let nodes = &config["nodes"];
        (
            nodes.value.as_str().unwrap_or("").to_string(),
            nodes.source.clone(),
        )
    };
    let (nodes, source) = shown(
        &[
            "--node",
            "a=unix:/srv/a/node.sock",
            "--node",
            "b=tcp:10.0.0.2:8336",
        ],
        &[],
    );
    assert_eq!(nodes, "a=unix:/srv/a/node.sock,b=tcp:10.0.0.2:8336");
    assert!(source.contains("--node"), "{source}");

    let file = write(
        &dir.path().join("nodes.toml"),
        "nodes = [\"a=unix:~/a/node.sock\", \"b=tcp:127.0.0.1:9000\"]\n",
    );
    let (nodes, _) = shown(&["--config", file.to_str().unwrap()], &[]);
    let home = dir.path().display();
    assert_eq!(
        nodes,
        format!("a=unix:{home}/a/node.sock,b=tcp:127.0.0.1:9000")
    );

    let (nodes, source) = shown(&[], &[("SV2TPD_NODES", "x=unix:/x.sock, y=unix:/y.sock")]);
    assert_eq!(nodes, "x=unix:/x.sock,y=unix:/y.sock");
    assert!(source.contains("SV2TPD_NODES"), "{source}");

    // None given: the one node at ipc_socket is used.
    let (nodes, _) = shown(&[], &[]);
    assert_eq!(nodes, "none");
}

#[test]
fn bad_node_lists_are_refused_with_what_was_meant() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&[&str], &[&str]); 4] = [
        (
            &["--node", "a=/srv/node.sock"],
            &["`nodes`", "unix:PATH", "tcp:HOST:PORT"],
        ),
        (
            &["--node", "a=unix:/x", "--node", "a=unix:/y"],
            &["`a` is given twice"],
        ),
        (&["--node", "no name=unix:/x"], &["node name `no name`"]),
        (&["--node", "a=tcp:host"], &["HOST:PORT"]),
    ];
    for (args, needles) in cases {
        let mut all = vec!["config"];
        all.extend_from_slice(args);
        assert_config_error(&run(dir.path(), &all, &[]), needles);
    }
    // The same node twice, once through `~`.
    let home = dir.path().display().to_string();
    let twice = [
        "--node".to_string(),
        "a=unix:~/n.sock".to_string(),
        "--node".to_string(),
        format!("b=unix:{home}/n.sock"),
    ];
    let mut all = vec!["config"];
    all.extend(twice.iter().map(String::as_str));
    assert_config_error(
        &run(dir.path(), &all, &[]),
        &["`a` and `b` are the same node"],
    );
    // A list where one value is wanted.
    let file = write(
        &dir.path().join("list.toml"),
        "ipc_socket = [\"/a\", \"/b\"]\n",
    );
    let output = run(
        dir.path(),
        &["--config", file.to_str().unwrap(), "config"],
        &[],
    );
    assert_config_error(&output, &["`ipc_socket` takes one value, not a list"]);
}
