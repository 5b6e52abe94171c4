//! The authority key that signs the Noise certificates of the SV2 server.
//!
//! The key lives in the data directory as one line holding the secret in key-utils'
//! `Secp256k1SecretKey` form (base58-check), mode 0600. Clients (pool_sv2, jd_client_sv2) are
//! configured with the matching public key, shown by [`ServerKeys::authority_pubkey_string`].
//!
//! There is no persistent Noise *static* key: SRI's `noise_sv2::Responder` draws a fresh static
//! key for every handshake and binds it to the authority key through the certificate, so only
//! the authority key identifies the server.

use std::{
    fs,
    io::Write,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use key_utils::{Secp256k1PublicKey, Secp256k1SecretKey};

/// File name of the authority secret key inside the data directory.
pub const AUTHORITY_KEY_FILE: &str = "authority.key";

/// Why the keys could not be loaded or stored.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Reading, creating or writing the key file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The key file may be read by other users.
    #[error(
        "{}: secret key file is accessible by group or others (mode {mode:o}); \
         run `chmod 600 {}`",
        path.display(),
        path.display()
    )]
    Permissions {
        /// The file concerned.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The file or the given string is not a key in key-utils' secret key form.
    #[error("{origin}: not a secp256k1 secret key in base58-check form: {reason}")]
    Malformed {
        /// The file name, or "imported key".
        origin: String,
        /// What the parser said.
        reason: String,
    },
    /// `generate` without `force` found a key already there.
    #[error("{}: a key already exists (use force to replace it)", path.display())]
    AlreadyExists {
        /// The existing file.
        path: PathBuf,
    },
}

/// Where the key files live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyPaths {
    /// The authority secret key file.
    pub authority: PathBuf,
}

impl KeyPaths {
    /// The key file locations inside `datadir`.
    pub fn in_datadir(datadir: &Path) -> Self {
        KeyPaths {
            authority: datadir.join(AUTHORITY_KEY_FILE),
        }
    }
}

/// The authority key pair the server signs its Noise certificates with.
#[derive(Clone, Copy)]
pub struct ServerKeys {
    authority_secret: Secp256k1SecretKey,
    authority_public: Secp256k1PublicKey,
}

impl std::fmt::Debug for ServerKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerKeys")
            .field("authority_public", &self.authority_pubkey_string())
            .finish_non_exhaustive()
    }
}

impl ServerKeys {
    /// Wraps an authority secret key.
    pub fn from_secret(authority_secret: Secp256k1SecretKey) -> Self {
        ServerKeys {
            authority_secret,
            authority_public: authority_secret.into(),
        }
    }

    /// A fresh random authority key that is not stored anywhere (tests, benchmarks).
    pub fn ephemeral() -> Self {
        Self::from_secret(random_secret())
    }

    /// The authority public key.
    pub fn authority_pubkey(&self) -> Secp256k1PublicKey {
        self.authority_public
    }

    /// The authority public key as pool_sv2 / jd_client_sv2 take it in `authority_pubkey`.
    pub fn authority_pubkey_string(&self) -> String {
        self.authority_public.to_string()
    }

    /// The authority secret key.
    pub fn authority_secret(&self) -> Secp256k1SecretKey {
        self.authority_secret
    }
}

/// Loads the authority key file at `path`, generating and storing one (mode 0600) on first
/// start. Refuses a key file readable or writable by group or others.
pub fn load_or_generate(path: &Path) -> Result<ServerKeys, KeyError> {
    match load(path) {
        Ok(keys) => Ok(keys),
        Err(KeyError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            let secret = random_secret();
            create_parent(path)?;
            write_new(path, &secret)?;
            tracing::info!(path = %path.display(), "generated a new SV2 authority key");
            Ok(ServerKeys::from_secret(secret))
        }
        Err(e) => Err(e),
    }
}

/// Loads the authority key file at `path`, checking its permissions first.
pub fn load(path: &Path) -> Result<ServerKeys, KeyError> {
    let io = |source| KeyError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mode = fs::metadata(path).map_err(io)?.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(KeyError::Permissions {
            path: path.to_path_buf(),
            mode: mode & 0o777,
        });
    }
    let text = fs::read_to_string(path).map_err(io)?;
    let secret = parse_secret(text.trim(), &path.display().to_string())?;
    Ok(ServerKeys::from_secret(secret))
}

/// Stores `secret` (key-utils' base58-check form) as the authority key file at `path`,
/// replacing any existing one.
pub fn import_authority(path: &Path, secret: &str) -> Result<ServerKeys, KeyError> {
    let secret = parse_secret(secret.trim(), "imported key")?;
    create_parent(path)?;
    replace(path, &secret)?;
    Ok(ServerKeys::from_secret(secret))
}

/// Generates a new authority key file at `path`. Without `force` an existing key is kept
/// and [`KeyError::AlreadyExists`] returned.
pub fn generate(path: &Path, force: bool) -> Result<ServerKeys, KeyError> {
    if !force && path.exists() {
        return Err(KeyError::AlreadyExists {
            path: path.to_path_buf(),
        });
    }
    let secret = random_secret();
    create_parent(path)?;
    replace(path, &secret)?;
    Ok(ServerKeys::from_secret(secret))
}

fn parse_secret(text: &str, origin: &str) -> Result<Secp256k1SecretKey, KeyError> {
    text.parse()
        .map_err(|e: key_utils::Error| KeyError::Malformed {
            origin: origin.to_string(),
            reason: e.to_string(),
        })
}

fn random_secret() -> Secp256k1SecretKey {
    use bitcoin::secp256k1::{rand::thread_rng, SecretKey};
    // key-utils uses another secp256k1 major than `bitcoin`; its string form (base58-check of
    // the 32 secret bytes) is the bridge between them.
    loop {
        let bytes = SecretKey::new(&mut thread_rng()).secret_bytes();
        if let Ok(secret) = bitcoin::base58::encode_check(&bytes).parse() {
            return secret;
        }
    }
}

fn create_parent(path: &Path) -> Result<(), KeyError> {
    let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) else {
        return Ok(());
    };
    fs::create_dir_all(dir).map_err(|source| KeyError::Io {
        path: dir.to_path_buf(),
        source,
    })
}

fn write_new(path: &Path, secret: &Secp256k1SecretKey) -> Result<(), KeyError> {
    let io = |source| KeyError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    writeln!(file, "{secret}").map_err(io)?;
    file.sync_all().map_err(io)
}

// Writes a sibling temporary file (0600) and renames it over `path`.
fn replace(path: &Path, secret: &Secp256k1SecretKey) -> Result<(), KeyError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let _ = fs::remove_file(&tmp);
    write_new(&tmp, secret)?;
    fs::rename(&tmp, path).map_err(|source| KeyError::Io {
        path: path.to_path_buf(),
        source,
    })
}
