//! systemd integration against the real binary: sd_notify readiness and
//! stopping on a `NOTIFY_SOCKET`, and socket activation (`LISTEN_FDS`) with
//! `listen = "systemd:NAME"`, TCP and Unix.
mod common;

use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStderr, Command};

/// How long any one step may take before the test fails.
const STEP: Duration = Duration::from_secs(10);

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("holdfast-systemd-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write_config(dir: &Path, listen: &str, server: &str) -> PathBuf {
    let cfg = dir.join("holdfast.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
[lifecycle]
drain_timeout = "500ms"

[[listener]]
name = "orders"
listen = "{listen}"
backend = "b"

[[backend]]
name = "b"
servers = ["{server}"]
ack = "none"
"#
        ),
    )
    .unwrap();
    cfg
}

/// Reads the child's log until "holdfast running"; returns the last `addr=`
/// seen, the log so far, and the reader (kept so the child's stderr stays open).
async fn wait_running(child: &mut Child) -> (String, String, BufReader<ChildStderr>) {
    let mut lines = BufReader::new(child.stderr.take().unwrap());
    let mut log = String::new();
    let mut addr = None;
    loop {
        let mut line = String::new();
        let n = tokio::time::timeout(STEP, lines.read_line(&mut line))
            .await
            .expect("a log line in time")
            .unwrap();
        assert!(n > 0, "holdfast exited early:\n{log}");
        log.push_str(&line);
        if let Some(i) = line.find("addr=") {
            addr = line[i + 5..].split_whitespace().next().map(str::to_string);
        }
        if line.contains("holdfast running") {
            break;
        }
    }
    (addr.expect("a listening line with addr="), log, lines)
}

async fn sigterm_and_expect_success(mut child: Child) {
    let pid = child.id().unwrap();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = tokio::time::timeout(STEP, child.wait())
        .await
        .expect("exits in time")
        .unwrap();
    assert!(status.success(), "exit status {status:?}");
}

async fn recv_datagram(sock: &tokio::net::UnixDatagram) -> String {
    let mut buf = [0u8; 512];
    let n = tokio::time::timeout(STEP, sock.recv(&mut buf))
        .await
        .expect("a notification in time")
        .unwrap();
    String::from_utf8(buf[..n].to_vec()).unwrap()
}

async fn echo_round_trip<S: AsyncReadExt + AsyncWriteExt + Unpin>(mut c: S) {
    c.write_all(b"hello systemd\n").await.unwrap();
    let mut buf = [0u8; 14];
    tokio::time::timeout(STEP, c.read_exact(&mut buf))
        .await
        .expect("echo in time")
        .unwrap();
    assert_eq!(&buf, b"hello systemd\n");
}

/// Runs `holdfast run --config cfg` with a notification socket in `dir`
/// (as systemd would, without socket activation); returns that socket.
fn spawn_notified(dir: &Path, cfg: &Path) -> (tokio::net::UnixDatagram, Child) {
    let notify_path = dir.join("notify.sock");
    let notify = tokio::net::UnixDatagram::bind(&notify_path).unwrap();
    let child = Command::new(BIN)
        .args(["run", "--config", cfg.to_str().unwrap()])
        .env("NOTIFY_SOCKET", &notify_path)
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_FDNAMES")
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    (notify, child)
}

#[tokio::test]
async fn notify_socket_gets_ready_after_bind_and_stopping_on_sigterm() {
    let server = Server::start("127.0.0.1:0", "echo").await;
    let dir = temp_dir("notify");
    let cfg = write_config(&dir, "127.0.0.1:0", &server.addr);
    let (notify, mut child) = spawn_notified(&dir, &cfg);

    assert_eq!(recv_datagram(&notify).await, "READY=1");
    // READY=1 comes after the listener is bound: its log line is written.
    let (addr, _log, _stderr) = wait_running(&mut child).await;
    echo_round_trip(connect(&addr).await).await;

    sigterm_and_expect_success_after(&notify, child).await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// SIGTERM; STOPPING=1 arrives before the process exits 0.
async fn sigterm_and_expect_success_after(notify: &tokio::net::UnixDatagram, mut child: Child) {
    let pid = child.id().unwrap();
    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert_eq!(recv_datagram(notify).await, "STOPPING=1");
    let status = tokio::time::timeout(STEP, child.wait())
        .await
        .expect("exits in time")
        .unwrap();
    assert!(status.success(), "exit status {status:?}");
}

/// Runs holdfast the way systemd does with socket activation: `fd` at
/// descriptor 3, `LISTEN_FDS=1`, `LISTEN_FDNAMES=name`, and `LISTEN_PID` the
/// pid of the holdfast process itself (sh's `$$`, which `exec` keeps).
fn spawn_activated(cfg: &Path, fd: RawFd, name: &str) -> Child {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(r#"LISTEN_PID=$$; export LISTEN_PID; exec "$0" run --config "$1""#)
        .arg(BIN)
        .arg(cfg)
        .env("LISTEN_FDS", "1")
        .env("LISTEN_FDNAMES", name)
        .env_remove("LISTEN_PID")
        .env_remove("NOTIFY_SOCKET")
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    // SAFETY: only async-signal-safe calls (dup2, fcntl) between fork and
    // exec; `fd` stays open in the parent until the child has been spawned.
    unsafe {
        cmd.pre_exec(move || {
            if fd == 3 {
                // dup2 onto itself would keep FD_CLOEXEC: clear it.
                if libc::fcntl(3, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn().unwrap()
}

#[tokio::test]
async fn socket_activation_serves_the_passed_tcp_listener() {
    let server = Server::start("127.0.0.1:0", "echo").await;
    let dir = temp_dir("tcp");
    let cfg = write_config(&dir, "systemd:orders", &server.addr);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();

    let mut child = spawn_activated(&cfg, listener.as_raw_fd(), "orders");
    let (logged, log, _stderr) = wait_running(&mut child).await;
    assert_eq!(logged, addr, "it listens on the passed socket:\n{log}");
    assert!(log.contains("systemd passed sockets"), "{log}");
    // The test's own copy of the socket never accepts: holdfast does.
    echo_round_trip(connect(&addr).await).await;
    echo_round_trip(connect(&addr).await).await;

    sigterm_and_expect_success(child).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn socket_activation_unix_listener_keeps_its_socket_file() {
    let server = Server::start("127.0.0.1:0", "echo").await;
    let dir = temp_dir("unix");
    let cfg = write_config(&dir, "systemd:orders", &server.addr);
    let path = dir.join("orders.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();

    let mut child = spawn_activated(&cfg, listener.as_raw_fd(), "orders");
    let (logged, log, _stderr) = wait_running(&mut child).await;
    assert_eq!(logged, format!("unix:{}", path.display()), "{log}");
    let c = tokio::net::UnixStream::connect(&path).await.unwrap();
    echo_round_trip(c).await;

    sigterm_and_expect_success(child).await;
    // systemd owns the file: holdfast must not have removed it.
    assert!(path.exists(), "{} was unlinked", path.display());
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_missing_systemd_name_fails_with_the_passed_names() {
    let dir = temp_dir("missing");
    let cfg = write_config(&dir, "systemd:payments", "127.0.0.1:9");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut child = spawn_activated(&cfg, listener.as_raw_fd(), "orders");
    let mut log = String::new();
    let mut stderr = child.stderr.take().unwrap();
    tokio::time::timeout(STEP, stderr.read_to_string(&mut log))
        .await
        .expect("exits in time")
        .unwrap();
    let status = child.wait().await.unwrap();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains(r#"systemd passed no socket named "payments" (passed: orders)"#),
        "{log}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// An upgrade under systemd: the new process (a child of the old one)
/// tells systemd it is the main process now (`MAINPID=` with `READY=1`),
/// the old one exits without `STOPPING=1` (the service is not stopping),
/// and the session opened before carries on in the new process.
#[tokio::test]
async fn an_upgrade_tells_systemd_the_new_main_pid() {
    let server = Server::start("127.0.0.1:0", "echo").await;
    let dir = temp_dir("upgrade");
    let cfg = write_config(&dir, "127.0.0.1:0", &server.addr);
    let mut toml = std::fs::read_to_string(&cfg).unwrap();
    toml.push_str(&format!(
        "\n[handover]\nsocket = \"{}\"\n",
        dir.join("run/handover.sock").display()
    ));
    std::fs::write(&cfg, toml).unwrap();
    let (notify, mut old) = spawn_notified(&dir, &cfg);
    assert_eq!(recv_datagram(&notify).await, "READY=1");
    let (addr, log, mut stderr) = wait_running(&mut old).await;
    // The hand-over socket is in place once this line is logged (before or
    // after "holdfast running": they come from different tasks).
    let mut placed = log.contains("hand-over socket listening");
    while !placed {
        let mut line = String::new();
        let n = tokio::time::timeout(STEP, stderr.read_line(&mut line))
            .await
            .expect("a log line in time")
            .unwrap();
        assert!(n > 0, "holdfast exited early");
        placed = line.contains("hand-over socket listening");
    }
    let mut session = connect(&addr).await;
    session.write_all(b"before\n").await.unwrap();
    let mut buf = [0u8; 7];
    session.read_exact(&mut buf).await.unwrap();

    let old_pid = old.id().unwrap();
    std::process::Command::new("kill")
        .args(["-USR2", &old_pid.to_string()])
        .status()
        .unwrap();
    let new_pid = loop {
        let msg = recv_datagram(&notify).await;
        assert_ne!(msg, "STOPPING=1", "the old process must not say STOPPING=1");
        if let Some(rest) = msg.strip_prefix("MAINPID=") {
            let (pid, ready) = rest.split_once('\n').expect("MAINPID= then READY=1");
            assert_eq!(ready, "READY=1");
            break pid.parse::<u32>().unwrap();
        }
    };
    assert_ne!(new_pid, old_pid);
    // Drain the old process's stderr so it never blocks on a full pipe.
    tokio::spawn(async move {
        let mut sink = Vec::new();
        let _ = stderr.read_to_end(&mut sink).await;
    });
    let status = tokio::time::timeout(STEP, old.wait())
        .await
        .expect("the old process exits")
        .unwrap();
    assert!(status.success(), "{status:?}");
    // Nothing more from the old process: in particular no STOPPING=1.
    let mut buf = [0u8; 512];
    while let Ok(n) = notify.try_recv(&mut buf) {
        let msg = String::from_utf8_lossy(&buf[..n]).to_string();
        assert_ne!(msg, "STOPPING=1", "STOPPING=1 after a hand-over");
    }
    // The session lives on in the new process.
    session.write_all(b"after!\n").await.unwrap();
    let mut buf = [0u8; 7];
    tokio::time::timeout(STEP, session.read_exact(&mut buf))
        .await
        .expect("echo in time")
        .unwrap();
    assert_eq!(&buf, b"after!\n");
    drop(session);
    std::process::Command::new("kill")
        .args(["-TERM", &new_pid.to_string()])
        .status()
        .unwrap();
    assert_eq!(recv_datagram(&notify).await, "STOPPING=1");
    let _ = std::fs::remove_dir_all(&dir);
}
