//! Authority key storage: permissions, import, generation, public key format.

use std::{fs, os::unix::fs::PermissionsExt};

use key_utils::{Secp256k1PublicKey, Secp256k1SecretKey};
use sv2_tpd::keys::{self, KeyError, KeyPaths};

fn mode(path: &std::path::Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn first_start_creates_a_0600_key_and_later_starts_load_it() {
    let dir = tempfile::tempdir().unwrap();
    let datadir = dir.path().join("data");
    let first = keys::load_or_generate(&KeyPaths::in_datadir(&datadir).authority).unwrap();
    let path = KeyPaths::in_datadir(&datadir).authority;
    assert_eq!(mode(&path), 0o600);

    let second = keys::load_or_generate(&KeyPaths::in_datadir(&datadir).authority).unwrap();
    assert_eq!(
        first.authority_pubkey_string(),
        second.authority_pubkey_string()
    );
}

#[test]
fn a_key_readable_by_others_is_refused_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    keys::load_or_generate(&KeyPaths::in_datadir(dir.path()).authority).unwrap();
    let path = KeyPaths::in_datadir(dir.path()).authority;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();

    let err = keys::load_or_generate(&KeyPaths::in_datadir(dir.path()).authority).unwrap_err();
    assert!(
        matches!(err, KeyError::Permissions { mode: 0o644, .. }),
        "{err}"
    );
    let text = err.to_string();
    assert!(text.contains(&path.display().to_string()), "{text}");
    assert!(text.contains("chmod 600"), "{text}");

    fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
    assert!(matches!(
        keys::load(&path),
        Err(KeyError::Permissions { .. })
    ));
}

#[test]
fn an_imported_key_is_stored_and_loaded_back() {
    let dir = tempfile::tempdir().unwrap();
    // A key generated elsewhere, in key-utils' string form.
    let donor = keys::ServerKeys::ephemeral();
    let secret = donor.authority_secret().to_string();

    let imported =
        keys::import_authority(&KeyPaths::in_datadir(dir.path()).authority, &secret).unwrap();
    assert_eq!(
        imported.authority_pubkey_string(),
        donor.authority_pubkey_string()
    );
    let path = KeyPaths::in_datadir(dir.path()).authority;
    assert_eq!(mode(&path), 0o600);
    assert_eq!(fs::read_to_string(&path).unwrap().trim(), secret);

    let loaded = keys::load_or_generate(&KeyPaths::in_datadir(dir.path()).authority).unwrap();
    assert_eq!(
        loaded.authority_pubkey_string(),
        donor.authority_pubkey_string()
    );
    assert_eq!(loaded.authority_secret().to_string(), secret);
}

#[test]
fn importing_garbage_is_refused_and_keeps_the_old_key() {
    let dir = tempfile::tempdir().unwrap();
    let original = keys::load_or_generate(&KeyPaths::in_datadir(dir.path()).authority).unwrap();
    let err = keys::import_authority(&KeyPaths::in_datadir(dir.path()).authority, "not-a-key")
        .unwrap_err();
    assert!(matches!(err, KeyError::Malformed { .. }), "{err}");
    let loaded = keys::load_or_generate(&KeyPaths::in_datadir(dir.path()).authority).unwrap();
    assert_eq!(
        loaded.authority_pubkey_string(),
        original.authority_pubkey_string()
    );
}

#[test]
fn generate_keeps_an_existing_key_unless_forced() {
    let dir = tempfile::tempdir().unwrap();
    let original = keys::generate(&KeyPaths::in_datadir(dir.path()).authority, false).unwrap();
    assert!(matches!(
        keys::generate(&KeyPaths::in_datadir(dir.path()).authority, false),
        Err(KeyError::AlreadyExists { .. })
    ));
    let replaced = keys::generate(&KeyPaths::in_datadir(dir.path()).authority, true).unwrap();
    assert_ne!(
        replaced.authority_pubkey_string(),
        original.authority_pubkey_string()
    );
    let path = KeyPaths::in_datadir(dir.path()).authority;
    assert_eq!(mode(&path), 0o600);
    let loaded = keys::load(&path).unwrap();
    assert_eq!(
        loaded.authority_pubkey_string(),
        replaced.authority_pubkey_string()
    );
}

#[test]
fn the_public_key_string_is_what_sri_configs_parse() {
    let dir = tempfile::tempdir().unwrap();
    let keys = keys::load_or_generate(&KeyPaths::in_datadir(dir.path()).authority).unwrap();
    let text = keys.authority_pubkey_string();
    let parsed: Secp256k1PublicKey = text.parse().unwrap();
    assert_eq!(parsed.into_bytes(), keys.authority_pubkey().into_bytes());
    // And it is the public key of the stored secret.
    let secret: Secp256k1SecretKey = fs::read_to_string(KeyPaths::in_datadir(dir.path()).authority)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(Secp256k1PublicKey::from(secret).to_string(), text);
}
