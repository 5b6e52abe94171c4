//! A node socket someone else could have planted is refused by the real binary: exit code
//! 2 and a message that names the fix, and nothing is sent to the socket. Checked at
//! start and again when a socket appears later.
//!
//! The tests run as root, where every file is root's; the wrong owner is made with
//! `chown` to `nobody` (65534).

mod support;

use std::os::unix::fs::{chown, lchown, symlink, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use support::daemon_proc::DaemonProcess;

const NOBODY: u32 = 65534;

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// A node-like socket: `<root>/<name>/node.sock` in a directory of `mode`.
fn plant(root: &Path, name: &str, mode: u32) -> (PathBuf, UnixListener) {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).expect("mkdir");
    chmod(&dir, mode);
    let socket = dir.join("node.sock");
    let listener = UnixListener::bind(&socket).expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    (socket, listener)
}

fn assert_untouched(listener: &UnixListener) {
    match listener.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("the daemon connected to a socket it refused: {other:?}"),
    }
}

/// A directory like `/tmp` in `root`: sticky, writable by all, root's.
fn sticky_dir(root: &Path) -> PathBuf {
    let dir = root.join("tmp");
    std::fs::create_dir(&dir).expect("mkdir");
    chmod(&dir, 0o1777);
    dir
}

/// A socket another user made in their own directory `<sticky>/<name>` (mode 0755).
fn plant_as_nobody(sticky: &Path, name: &str) -> (PathBuf, UnixListener) {
    let (socket, listener) = plant(sticky, name, 0o755);
    chown(socket.parent().expect("dir"), Some(NOBODY), None).expect("chown");
    chown(&socket, Some(NOBODY), None).expect("chown");
    (socket, listener)
}

fn running_as_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
}

#[test]
fn a_socket_owned_by_another_user_is_refused_with_exit_code_2() {
    if !running_as_root() {
        eprintln!("skipped: needs root to give the socket to another user");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (socket, listener) = plant(dir.path(), "regtest", 0o700);
    chown(&socket, Some(NOBODY), None).expect("chown");
    let mut daemon = DaemonProcess::spawn(&socket, &dir.path().join("tpd"), &[]);
    let message = daemon.failure_message(2);
    assert!(
        message.contains("refusing the node's IPC socket"),
        "{message}"
    );
    assert!(
        message.contains(&format!("owned by uid {NOBODY}")),
        "{message}"
    );
    assert!(
        message.contains("remove it and restart the node"),
        "{message}"
    );
    assert_untouched(&listener);
}

#[test]
fn a_symlink_into_a_world_writable_directory_is_refused_with_exit_code_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (target, listener) = plant(dir.path(), "shared", 0o777);
    let shared = target.parent().expect("dir").to_path_buf();
    let regtest = dir.path().join("bitcoin/regtest");
    std::fs::create_dir_all(&regtest).expect("mkdir");
    let socket = regtest.join("node.sock");
    symlink(&target, &socket).expect("symlink");
    let mut daemon = DaemonProcess::spawn(&socket, &dir.path().join("tpd"), &[]);
    let message = daemon.failure_message(2);
    assert!(message.contains(&socket.display().to_string()), "{message}");
    assert!(
        message.contains(&format!("{} on the way", shared.display())),
        "{message}"
    );
    assert!(message.contains("chmod go-w"), "{message}");
    assert_untouched(&listener);
}

#[test]
fn a_socket_planted_while_the_daemon_waits_is_refused_too() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("regtest/node.sock");
    let mut daemon = DaemonProcess::start(&socket, &dir.path().join("tpd"), &[]);
    daemon.wait_for_log("waiting for the node");
    // Someone makes the directory writable for all and puts a socket there.
    let (planted, listener) = plant(dir.path(), "regtest", 0o777);
    assert_eq!(planted, socket);
    let message = daemon.failure_message(2);
    assert!(
        message.contains("writable by its group and others"),
        "{message}"
    );
    assert_untouched(&listener);
}

/// The daemon started on `socket` exits with code 2, logs every one of `needles`, and
/// never connects to `listener`.
fn assert_refused(socket: &Path, listener: &UnixListener, needles: &[String]) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut daemon = DaemonProcess::spawn(socket, &dir.path().join("tpd"), &[]);
    let message = daemon.failure_message(2);
    for needle in needles {
        assert!(message.contains(needle.as_str()), "{needle:?} in {message}");
    }
    assert_untouched(listener);
}

#[test]
fn another_users_symlink_in_a_sticky_directory_is_refused_with_exit_code_2() {
    if !running_as_root() {
        eprintln!("skipped: needs root to give the symlink to another user");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let sticky = sticky_dir(dir.path());
    let (target, listener) = plant_as_nobody(&sticky, "evil-poc");
    let link = sticky.join("sv2poc-node.sock");
    symlink(&target, &link).expect("symlink");
    lchown(&link, Some(NOBODY), None).expect("lchown");
    let owned = format!(
        "the symlink {} on the way to the socket is owned by uid {NOBODY}",
        link.display()
    );
    assert_refused(
        &link,
        &listener,
        &[owned, "outside shared directories".into()],
    );
}

#[test]
fn a_directory_squatted_in_a_sticky_directory_is_refused_with_exit_code_2() {
    if !running_as_root() {
        eprintln!("skipped: needs root to give the directory to another user");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let sticky = sticky_dir(dir.path());
    // Another user made `<sticky>/bitcoin` before the node did, socket and all.
    let (socket, listener) = plant_as_nobody(&sticky, "bitcoin");
    let owned = format!(
        "the directory {} on the way to the socket is owned by uid {NOBODY}",
        sticky.join("bitcoin").display()
    );
    assert_refused(
        &socket,
        &listener,
        &[owned, "outside shared directories".into()],
    );
}
