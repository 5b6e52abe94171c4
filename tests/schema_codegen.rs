//! The Rust code generated from `schema/` is committed (so a build needs only cargo).
//! This test regenerates it with the `capnp` tool and fails when the two drift apart.
//! `SV2TPD_REGEN=1 cargo test --test schema_codegen` rewrites the committed files.

use std::path::{Path, PathBuf};
use std::process::Command;

const SCHEMAS: [&str; 4] = ["proxy", "common", "mining", "init"];

fn committed_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src/node/schema")
}

fn capnp_tool_present() -> bool {
    Command::new("capnp")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn generated_code_matches_schema() {
    if !capnp_tool_present() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must have the capnp tool (Debian package capnproto)"
        );
        eprintln!("skipped: no `capnp` tool on PATH, generated code not checked");
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = tempfile::tempdir().expect("temp dir");
    let mut cmd = capnpc::CompilerCommand::new();
    cmd.src_prefix(root.join("schema"))
        .output_path(out.path())
        .default_parent_module(vec!["node".into(), "schema".into()]);
    for name in SCHEMAS {
        cmd.file(root.join("schema").join(format!("{name}.capnp")));
    }
    cmd.run().expect("capnp compile");

    let regen = std::env::var_os("SV2TPD_REGEN").is_some();
    let mut drifted = Vec::new();
    for name in SCHEMAS {
        let file = format!("{name}_capnp.rs");
        let fresh = std::fs::read_to_string(out.path().join(&file)).expect("generated file");
        let committed_path = committed_dir().join(&file);
        if regen {
            std::fs::write(&committed_path, &fresh).expect("write generated file");
            continue;
        }
        let committed = std::fs::read_to_string(&committed_path).unwrap_or_default();
        if committed != fresh {
            drifted.push(file);
        }
    }
    assert!(
        drifted.is_empty(),
        "generated code out of date: {drifted:?}; run SV2TPD_REGEN=1 cargo test --test schema_codegen"
    );
}
