//! Whether the node's IPC socket may be trusted, checked before every connect.
//!
//! Whoever can put a socket at the configured path gets the daemon's calls, solved blocks
//! included. So the path is resolved by hand, symlink by symlink, and the daemon connects
//! to the socket it checked (not to the name it was given), which leaves no window in
//! which a checked symlink could be pointed elsewhere. The rule:
//!
//! - the path leads to a socket;
//! - the socket is owned by root or by the owner of the directory it is in (the node's
//!   user);
//! - every directory on the way — each ancestor of the socket and of every symlink
//!   followed — is owned by root or by that same user, and is writable by nobody else: no
//!   group or other write bit, unless the directory is sticky (like `/tmp`, where others
//!   may add names but not replace someone else's).
//!
//! A path that does not exist (yet) is not refused: the node may not have started.

use std::collections::{BTreeSet, VecDeque};
use std::ffi::OsString;
use std::fs::Metadata;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Component, Path, PathBuf};

use super::NodeError;

/// Group and other write bits.
const WRITABLE_BY_OTHERS: u32 = 0o022;
/// The sticky bit: only an entry's owner may rename or remove it.
const STICKY: u32 = 0o1000;
/// Symlinks followed before giving up, as the kernel's `ELOOP` limit.
const MAX_SYMLINKS: u32 = 40;

/// The socket `path` leads to once checked, or `None` when nothing is there yet.
/// [`NodeError::UntrustedSocket`] when someone other than the node's user (or root) could
/// have put it there.
pub(crate) fn trusted_socket(path: &Path) -> Result<Option<PathBuf>, NodeError> {
    let io_error = |e: io::Error| match e.kind() {
        io::ErrorKind::NotFound => None,
        io::ErrorKind::PermissionDenied => Some(NodeError::PermissionDenied {
            path: path.to_path_buf(),
        }),
        _ => Some(NodeError::Connect {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }),
    };
    let untrusted = |reason: String| NodeError::UntrustedSocket {
        path: path.to_path_buf(),
        reason,
    };
    let walk = match Walk::resolve(path) {
        Ok(walk) => walk,
        Err(e) => return io_error(e).map_or(Ok(None), Err),
    };
    match judge(&walk) {
        Ok(Ok(())) => Ok(Some(walk.socket)),
        Ok(Err(reason)) => Err(untrusted(reason)),
        Err(e) => io_error(e).map_or(Ok(None), Err),
    }
}

/// Where a path leads and the directories it passes through.
#[derive(Debug)]
struct Walk {
    /// The path with every symlink resolved.
    socket: PathBuf,
    /// Ancestors of `socket` and of every symlink followed on the way.
    directories: BTreeSet<PathBuf>,
}

/// One component of a path still to walk.
enum Step {
    Root,
    Up,
    Name(OsString),
}

fn steps(path: &Path) -> Vec<Step> {
    path.components()
        .filter_map(|c| match c {
            Component::RootDir => Some(Step::Root),
            Component::ParentDir => Some(Step::Up),
            Component::Normal(name) => Some(Step::Name(name.to_owned())),
            Component::CurDir | Component::Prefix(_) => None,
        })
        .collect()
}

impl Walk {
    /// Follows `path` component by component (`at` never holds a symlink), noting the
    /// directory of each symlink on the way.
    fn resolve(path: &Path) -> io::Result<Walk> {
        let start = match path.is_absolute() {
            true => path.to_path_buf(),
            false => std::env::current_dir()?.join(path),
        };
        let mut todo: VecDeque<Step> = steps(&start).into();
        let mut at = PathBuf::from("/");
        let mut directories = BTreeSet::new();
        let mut followed = 0;
        while let Some(step) = todo.pop_front() {
            match step {
                Step::Root => at = PathBuf::from("/"),
                Step::Up => {
                    at.pop();
                }
                Step::Name(name) => {
                    let next = at.join(name);
                    if !std::fs::symlink_metadata(&next)?.file_type().is_symlink() {
                        at = next;
                        continue;
                    }
                    followed += 1;
                    if followed > MAX_SYMLINKS {
                        return Err(io::Error::other(format!(
                            "more than {MAX_SYMLINKS} symlinks on the way"
                        )));
                    }
                    directories.extend(at.ancestors().map(Path::to_path_buf));
                    let target = std::fs::read_link(&next)?;
                    for step in steps(&target).into_iter().rev() {
                        todo.push_front(step);
                    }
                }
            }
        }
        if let Some(parent) = at.parent() {
            directories.extend(parent.ancestors().map(Path::to_path_buf));
        }
        Ok(Walk {
            socket: at,
            directories,
        })
    }
}

/// The rule of this module applied to `walk`: `Ok(Err(why))` when it fails, with the fix.
fn judge(walk: &Walk) -> io::Result<Result<(), String>> {
    let socket = &walk.socket;
    let meta = std::fs::symlink_metadata(socket)?;
    if !meta.file_type().is_socket() {
        return Ok(Err(format!(
            "{} is not a socket; point ipc_socket (or bitcoin_datadir) at the node's node.sock",
            socket.display()
        )));
    }
    let dir = socket.parent().unwrap_or(Path::new("/"));
    let node_user = std::fs::metadata(dir)?.uid();
    if !trusted_owner(meta.uid(), node_user) {
        return Ok(Err(format!(
            "{} is owned by uid {}, but its directory {} by uid {node_user}: only the \
             node's user or root may own it. If the node did not make it, remove it and \
             restart the node",
            socket.display(),
            meta.uid(),
            dir.display()
        )));
    }
    for dir in &walk.directories {
        if let Err(why) = directory_is_safe(dir, &std::fs::metadata(dir)?, node_user) {
            return Ok(Err(why));
        }
    }
    Ok(Ok(()))
}

fn trusted_owner(uid: u32, node_user: u32) -> bool {
    uid == 0 || uid == node_user
}

/// Nobody but root and `node_user` may change what `dir` holds.
fn directory_is_safe(dir: &Path, meta: &Metadata, node_user: u32) -> Result<(), String> {
    if !trusted_owner(meta.uid(), node_user) {
        return Err(format!(
            "the directory {} on the way to the socket is owned by uid {}, neither root \
             nor the node's user (uid {node_user}), so that user could replace the \
             socket; give the node a data directory under directories of root or its own \
             user, or point ipc_socket at the socket itself",
            dir.display(),
            meta.uid()
        ));
    }
    let mode = meta.mode();
    if mode & WRITABLE_BY_OTHERS != 0 && mode & STICKY == 0 {
        return Err(format!(
            "the directory {} on the way to the socket is writable by {} (mode {:o}), so \
             another user could replace the socket; run `chmod go-w {}`",
            dir.display(),
            match (mode & 0o020 != 0, mode & 0o002 != 0) {
                (true, true) => "its group and others",
                (true, false) => "its group",
                _ => "others",
            },
            mode & 0o7777,
            dir.display()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{chown, symlink, PermissionsExt};
    use std::os::unix::net::UnixListener;

    /// A uid that is neither root nor the test's user (`nobody` on Debian).
    const OTHER_UID: u32 = 65534;

    fn chmod(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }

    /// A private directory (mode 0700) holding a listening `node.sock`.
    fn node_dir(root: &Path, name: &str) -> (PathBuf, UnixListener) {
        let dir = root.join(name);
        std::fs::create_dir(&dir).expect("mkdir");
        chmod(&dir, 0o700);
        let listener = UnixListener::bind(dir.join("node.sock")).expect("bind");
        (dir, listener)
    }

    /// A private directory `root/name` whose `node.sock` is a symlink to `target`.
    fn link_dir(root: &Path, name: &str, target: &Path) -> PathBuf {
        let dir = root.join(name);
        std::fs::create_dir(&dir).expect("mkdir");
        chmod(&dir, 0o700);
        symlink(target, dir.join("node.sock")).expect("symlink");
        dir
    }

    fn refusal(path: &Path) -> String {
        match trusted_socket(path) {
            Err(e @ NodeError::UntrustedSocket { .. }) => e.to_string(),
            other => panic!("{} was not refused: {other:?}", path.display()),
        }
    }

    /// Root may hand files to another user; elsewhere the ownership cases cannot be built.
    fn can_chown() -> bool {
        std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
    }

    #[test]
    fn the_nodes_own_socket_in_a_private_directory_is_trusted() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (dir, _listener) = node_dir(tmp.path(), "regtest");
        let socket = dir.join("node.sock");
        let trusted = trusted_socket(&socket).expect("trusted");
        assert_eq!(
            trusted,
            Some(std::fs::canonicalize(&socket).expect("resolves"))
        );
    }

    #[test]
    fn a_socket_that_is_not_there_yet_is_waited_for() {
        let tmp = tempfile::tempdir().expect("tempdir");
        assert_eq!(
            trusted_socket(&tmp.path().join("node.sock")).expect("ok"),
            None
        );
        let absent_dir = tmp.path().join("regtest/node.sock");
        assert_eq!(trusted_socket(&absent_dir).expect("ok"), None);
        symlink(tmp.path().join("gone"), tmp.path().join("dangling")).expect("symlink");
        assert_eq!(
            trusted_socket(&tmp.path().join("dangling")).expect("ok"),
            None
        );
    }

    #[test]
    fn a_regular_file_is_not_a_socket() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let file = tmp.path().join("node.sock");
        std::fs::write(&file, b"").expect("write");
        assert!(refusal(&file).contains("is not a socket"));
    }

    #[test]
    fn a_directory_others_may_write_is_refused_unless_sticky() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (dir, _listener) = node_dir(tmp.path(), "shared");
        let socket = dir.join("node.sock");
        chmod(&dir, 0o777);
        let why = refusal(&socket);
        assert!(why.contains("writable by its group and others"), "{why}");
        assert!(why.contains("chmod go-w"), "{why}");
        chmod(&dir, 0o770);
        assert!(refusal(&socket).contains("writable by its group"));
        chmod(&dir, 0o1777);
        assert!(trusted_socket(&socket).is_ok(), "sticky like /tmp");
        chmod(&dir, 0o750);
        assert!(trusted_socket(&socket).is_ok(), "group may read and enter");
    }

    #[test]
    fn an_ancestor_others_may_write_is_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let outer = tmp.path().join("outer");
        std::fs::create_dir(&outer).expect("mkdir");
        let (dir, _listener) = node_dir(&outer, "regtest");
        chmod(&outer, 0o757);
        let why = refusal(&dir.join("node.sock"));
        assert!(why.contains(&outer.display().to_string()), "{why}");
    }

    #[test]
    fn a_symlink_into_a_world_writable_directory_is_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (shared, _listener) = node_dir(tmp.path(), "shared");
        chmod(&shared, 0o777);
        let dir = link_dir(tmp.path(), "regtest", &shared.join("node.sock"));
        let why = refusal(&dir.join("node.sock"));
        assert!(why.contains(&shared.display().to_string()), "{why}");
    }

    #[test]
    fn a_symlink_between_safe_directories_resolves_to_its_socket() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (real, _listener) = node_dir(tmp.path(), "real");
        let links = tmp.path().join("links");
        std::fs::create_dir(&links).expect("mkdir");
        symlink("../real/node.sock", links.join("hop")).expect("symlink");
        symlink("hop", links.join("node.sock")).expect("symlink");
        let trusted = trusted_socket(&links.join("node.sock")).expect("trusted");
        assert_eq!(
            trusted,
            Some(std::fs::canonicalize(real.join("node.sock")).expect("real"))
        );
        // The directory holding a link counts too: others must not re-point it.
        chmod(&links, 0o777);
        assert!(refusal(&links.join("node.sock")).contains(&links.display().to_string()));
    }

    #[test]
    fn a_socket_owned_by_another_user_is_refused() {
        if !can_chown() {
            eprintln!("skipped: needs root to give the socket to another user");
            return;
        }
        let tmp = tempfile::tempdir().expect("tempdir");
        let (dir, _listener) = node_dir(tmp.path(), "regtest");
        let socket = dir.join("node.sock");
        chown(&socket, Some(OTHER_UID), None).expect("chown");
        let why = refusal(&socket);
        assert!(why.contains(&format!("owned by uid {OTHER_UID}")), "{why}");
        // Owned by the directory's owner, it is the node's.
        chown(&dir, Some(OTHER_UID), None).expect("chown");
        assert!(trusted_socket(&socket).is_ok());
    }

    #[test]
    fn a_symlink_into_another_users_directory_is_refused() {
        if !can_chown() {
            eprintln!("skipped: needs root to give a directory to another user");
            return;
        }
        let tmp = tempfile::tempdir().expect("tempdir");
        // Another user's own directory and socket pass the socket's own tests...
        let (theirs, _listener) = node_dir(tmp.path(), "theirs");
        chown(&theirs, Some(OTHER_UID - 1), None).expect("chown");
        chown(theirs.join("node.sock"), Some(OTHER_UID - 1), None).expect("chown");
        // ...but the way there also goes through a directory of a second user.
        let dir = link_dir(tmp.path(), "regtest", &theirs.join("node.sock"));
        chown(&dir, Some(OTHER_UID), None).expect("chown");
        let why = refusal(&dir.join("node.sock"));
        assert!(why.contains("neither root nor the node's user"), "{why}");
    }
}
