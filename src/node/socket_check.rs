//! Whether the node's IPC socket may be trusted, checked before every connect.
//!
//! Whoever can put a socket at the configured path gets the daemon's calls, solved blocks
//! included. So the path is resolved by hand, symlink by symlink, and the daemon connects
//! to the socket it checked (not to the name it was given), which leaves no window in
//! which a checked symlink could be pointed elsewhere. Trusted owners are root, the
//! daemon's own user and the node's user: the owner of the directory the socket is in.
//! The rule:
//!
//! - the path leads to a socket, owned by a trusted owner;
//! - every directory on the way — each ancestor of the socket and of every symlink
//!   followed — is owned by a trusted owner and is writable by nobody else: no group or
//!   other write bit, unless the directory is sticky (like `/tmp`, where others may add
//!   names but not replace someone else's);
//! - every entry on the way that sits in a sticky directory — directory, symlink or the
//!   socket itself — is owned by root, the daemon's own user or that sticky directory's
//!   owner, much as the kernel's `fs.protected_symlinks` does for symlinks there.
//!
//! The last rule is what makes the node's user trustworthy: anyone may create a
//! directory in `/tmp` and so become the owner of the socket's directory, but only by
//! leaving an entry of their own in a sticky directory on the way, which is refused. Above
//! the first sticky directory nobody but root and the owners of the directories on the
//! way could have placed anything. A directory writable by its group and not sticky (like
//! a shared `root:bitcoin 2770` socket directory) is refused: any member of the group
//! could have put the socket there, and nothing on disk tells which member did. Made
//! sticky (3770), it is accepted, but only for what root or the daemon's user put there.
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
    /// Every name looked up on the way, in order, with the directory it was looked up in.
    entries: Vec<(PathBuf, PathBuf)>,
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
        let mut entries = Vec::new();
        let mut followed = 0;
        while let Some(step) = todo.pop_front() {
            match step {
                Step::Root => at = PathBuf::from("/"),
                Step::Up => {
                    at.pop();
                }
                Step::Name(name) => {
                    let next = at.join(name);
                    entries.push((at.clone(), next.clone()));
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
            entries,
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
    let owners = Owners {
        node_user: std::fs::metadata(dir)?.uid(),
        daemon_user: daemon_uid(),
    };
    if !owners.trusted(meta.uid()) {
        return Ok(Err(format!(
            "{} is owned by uid {}, but its directory {} by uid {}: only root, the \
             node's user or this daemon's user may own it. If the node did not make it, remove it and restart the \
             node",
            socket.display(),
            meta.uid(),
            dir.display(),
            owners.node_user
        )));
    }
    for dir in &walk.directories {
        if let Err(why) = directory_is_safe(dir, &std::fs::metadata(dir)?, owners) {
            return Ok(Err(why));
        }
    }
    for (dir, entry) in &walk.entries {
        let dir_meta = std::fs::metadata(dir)?;
        if dir_meta.mode() & STICKY == 0 {
            continue;
        }
        let entry_meta = std::fs::symlink_metadata(entry)?;
        if let Err(why) = shared_entry_is_safe(entry, &entry_meta, dir, &dir_meta, owners) {
            return Ok(Err(why));
        }
    }
    Ok(Ok(()))
}

/// Who may own what is on the way to the socket, besides root.
#[derive(Clone, Copy, Debug)]
struct Owners {
    /// The owner of the socket's directory.
    node_user: u32,
    /// The user this daemon runs as.
    daemon_user: u32,
}

impl Owners {
    fn trusted(self, uid: u32) -> bool {
        uid == 0 || uid == self.node_user || uid == self.daemon_user
    }
}

fn daemon_uid() -> u32 {
    // SAFETY: geteuid takes nothing, cannot fail and touches no memory of ours.
    unsafe { libc::geteuid() }
}

/// Nobody but the trusted owners may change what `dir` holds.
fn directory_is_safe(dir: &Path, meta: &Metadata, owners: Owners) -> Result<(), String> {
    if !owners.trusted(meta.uid()) {
        return Err(format!(
            "the directory {} on the way to the socket is owned by uid {}, neither root \
             nor the node's user (uid {}), so that user could replace the socket; give \
             the node a data directory under directories of root or its own user, or \
             point ipc_socket at the socket itself",
            dir.display(),
            meta.uid(),
            owners.node_user
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

/// `entry`, found in the sticky directory `dir`, was put there by root, this daemon's
/// user or `dir`'s owner: anyone else may create names there.
fn shared_entry_is_safe(
    entry: &Path,
    meta: &Metadata,
    dir: &Path,
    dir_meta: &Metadata,
    owners: Owners,
) -> Result<(), String> {
    let uid = meta.uid();
    if uid == 0 || uid == owners.daemon_user || uid == dir_meta.uid() {
        return Ok(());
    }
    let kind = match meta.file_type() {
        t if t.is_symlink() => "the symlink",
        t if t.is_dir() => "the directory",
        t if t.is_socket() => "the socket",
        _ => "the file",
    };
    Err(format!(
        "{kind} {} on the way to the socket is owned by uid {uid} and sits in {} (mode \
         {:o}), where any user may create names, so another user may have put it there; \
         point ipc_socket (or bitcoin_datadir) at a path outside shared directories such \
         as /tmp (the node's own data directory, or /run/bitcoind), or remove {} if \
         neither you nor the node made it",
        entry.display(),
        dir.display(),
        dir_meta.mode() & 0o7777,
        entry.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{chown, lchown, symlink, PermissionsExt};
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

    /// Only root may hand files to another user; elsewhere the ownership cases are skipped.
    fn skipped_without_root() -> bool {
        let root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
        if !root {
            eprintln!("skipped: needs root to give files to another user");
        }
        !root
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
        if skipped_without_root() {
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
        if skipped_without_root() {
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

    /// A directory like `/tmp`: sticky and writable by all.
    fn sticky_dir(root: &Path) -> PathBuf {
        let dir = root.join("tmp");
        std::fs::create_dir(&dir).expect("mkdir");
        chmod(&dir, 0o1777);
        dir
    }

    /// `dir/node.sock` and `dir` itself handed to `uid`, as another user would make them.
    fn give(dir: &Path, uid: u32) {
        chown(dir, Some(uid), None).expect("chown");
        chown(dir.join("node.sock"), Some(uid), None).expect("chown");
    }

    /// `root/name` (mode 0755) and its listening `node.sock`, both another user's.
    fn another_users_dir(root: &Path, name: &str) -> (PathBuf, UnixListener) {
        let (dir, listener) = node_dir(root, name);
        chmod(&dir, 0o755);
        give(&dir, OTHER_UID);
        (dir, listener)
    }

    #[test]
    fn a_directory_another_user_squatted_in_a_sticky_directory_is_refused() {
        if skipped_without_root() {
            return;
        }
        let tmp = tempfile::tempdir().expect("tempdir");
        let sticky = sticky_dir(tmp.path());
        // The attacker made `bitcoin` before the node did, and owns all of it.
        let (squatted, _listener) = another_users_dir(&sticky, "bitcoin");
        let why = refusal(&squatted.join("node.sock"));
        assert!(
            why.contains(&format!(
                "the directory {} on the way to the socket is owned by uid {OTHER_UID}",
                squatted.display()
            )),
            "{why}"
        );
        assert!(why.contains("outside shared directories"), "{why}");
        // Made by root (or the daemon's user), the same layout is fine.
        give(&squatted, 0);
        assert!(trusted_socket(&squatted.join("node.sock")).is_ok());
    }

    #[test]
    fn a_symlink_another_user_left_in_a_sticky_directory_is_refused() {
        if skipped_without_root() {
            return;
        }
        let tmp = tempfile::tempdir().expect("tempdir");
        let sticky = sticky_dir(tmp.path());
        let (evil, _listener) = another_users_dir(&sticky, "evil");
        let link = sticky.join("node.sock");
        symlink(evil.join("node.sock"), &link).expect("symlink");
        lchown(&link, Some(OTHER_UID), None).expect("lchown");
        let why = refusal(&link);
        assert!(
            why.contains(&format!("the symlink {}", link.display())),
            "{why}"
        );
        // Even pointing at a socket that is fine on its own, as with fs.protected_symlinks.
        let (safe, _safe_listener) = node_dir(tmp.path(), "safe");
        std::fs::remove_file(&link).expect("rm");
        symlink(safe.join("node.sock"), &link).expect("symlink");
        lchown(&link, Some(OTHER_UID), None).expect("lchown");
        assert!(refusal(&link).contains("the symlink"));
        // Root's own link there is followed.
        lchown(&link, Some(0), None).expect("lchown");
        assert!(trusted_socket(&link).is_ok());
    }

    #[test]
    fn a_socket_another_user_left_in_a_sticky_directory_is_refused() {
        if skipped_without_root() {
            return;
        }
        let tmp = tempfile::tempdir().expect("tempdir");
        let sticky = sticky_dir(tmp.path());
        let socket = sticky.join("node.sock");
        let _listener = UnixListener::bind(&socket).expect("bind");
        chown(&socket, Some(OTHER_UID), None).expect("chown");
        let why = refusal(&socket);
        assert!(why.contains(&format!("owned by uid {OTHER_UID}")), "{why}");
    }

    #[test]
    fn the_debian_layout_with_a_node_user_is_trusted() {
        if skipped_without_root() {
            return;
        }
        let tmp = tempfile::tempdir().expect("tempdir");
        // /var/lib/bitcoind and /run/bitcoind: root's parents, the node's 0710 directory.
        for mode in [0o710, 0o750] {
            let name = format!("bitcoind-{mode:o}");
            let (datadir, _listener) = node_dir(tmp.path(), &name);
            chmod(&datadir, mode);
            give(&datadir, OTHER_UID);
            assert!(
                trusted_socket(&datadir.join("node.sock")).is_ok(),
                "{mode:o}"
            );
        }
    }

    #[test]
    fn a_group_writable_shared_socket_directory_is_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (dir, _listener) = node_dir(tmp.path(), "bitcoin-ipc");
        chmod(&dir, 0o2770);
        let why = refusal(&dir.join("node.sock"));
        assert!(why.contains("writable by its group"), "{why}");
        assert!(why.contains("chmod go-w"), "{why}");
    }

    #[test]
    fn a_group_member_cannot_plant_in_a_sticky_group_directory() {
        if skipped_without_root() {
            return;
        }
        let tmp = tempfile::tempdir().expect("tempdir");
        // Like `/run/bitcoin-ipc` root:bitcoin 3770: the group may add names, sticky.
        let shared = tmp.path().join("bitcoin-ipc");
        std::fs::create_dir(&shared).expect("mkdir");
        chmod(&shared, 0o3770);
        let socket = shared.join("node.sock");
        let _listener = UnixListener::bind(&socket).expect("bind");
        assert!(trusted_socket(&socket).is_ok(), "root's own socket there");
        chown(&socket, Some(OTHER_UID), None).expect("chown");
        assert!(refusal(&socket).contains(&format!("owned by uid {OTHER_UID}")));
        // A member's own directory there does not make that member the node's user.
        let (theirs, _theirs_listener) = another_users_dir(&shared, "mine");
        let why = refusal(&theirs.join("node.sock"));
        assert!(
            why.contains(&format!("the directory {}", theirs.display())),
            "{why}"
        );
    }
}
