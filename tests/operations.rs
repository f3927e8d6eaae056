//! Operating holdfast: metrics across a server restart, the admin endpoint,
//! and reloads (in-process and by SIGHUP to the real binary).

mod common;

use std::time::Duration;

use common::*;
use holdfast::config;
use holdfast::lifecycle::Phase;
use holdfast::proxy::ReloadRequest;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::oneshot;

/// holdfast in-process, seen from inside.
type Ops = Running;

async fn start(toml: &str) -> Ops {
    start_running(toml).await
}

/// A plain HTTP/1.1 GET; returns (status, content type, body).
async fn get(addr: &str, path: &str) -> (u16, String, String) {
    let mut s = connect(addr).await;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("http response");
    let status = head[9..12].parse().unwrap();
    let ctype = head
        .lines()
        .find_map(|l| l.strip_prefix("content-type: "))
        .unwrap_or("")
        .to_string();
    (status, ctype, body.to_string())
}

/// The value of one sample in Prometheus text, 0 when absent.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0.0)
}

fn lines_config(server: &str) -> String {
    format!(
        r#"
[admin]
listen = "127.0.0.1:0"

[[listener]]
name = "front"
listen = "127.0.0.1:0"
backend = "lines"

[[backend]]
name = "lines"
servers = ["{server}"]
ack = "response"
framing = "lines"
hold_timeout = "20s"
"#
    )
}

/// Scraping /metrics across a server restart shows the restart in resumes,
/// hold duration and replayed bytes, and no client reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_across_a_server_restart() {
    let mut server = Server::start("127.0.0.1:0", "lines").await;
    let ops = start(&lines_config(&server.addr)).await;
    let c = connect(&ops.addrs[0]).await;
    let (r, mut w) = c.into_split();
    let mut r = BufReader::new(r);
    let mut line = String::new();
    w.write_all(b"before\n").await.unwrap();
    r.read_line(&mut line).await.unwrap();
    assert_eq!(line, "before\n");

    let (_, ctype, text) = get(&ops.admin, "/metrics").await;
    assert!(ctype.starts_with("text/plain; version=0.0.4"), "{ctype}");
    assert_eq!(sample(&text, "holdfast_sessions{listener=\"front\"}"), 1.0);
    assert_eq!(
        sample(
            &text,
            "holdfast_client_connections_accepted_total{listener=\"front\"}"
        ),
        1.0
    );
    assert_eq!(
        sample(&text, "holdfast_resumes_total{backend=\"lines\"}"),
        0.0
    );

    // The server dies; a request sent while it is down is held and replayed.
    server.kill().await;
    w.write_all(b"during\n").await.unwrap();
    // Wait until the session is seen held.
    let mut held = false;
    for _ in 0..500 {
        let (_, _, t) = get(&ops.admin, "/metrics").await;
        if sample(&t, "holdfast_sessions_held{backend=\"lines\"}") == 1.0 {
            held = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(held, "holdfast_sessions_held went to 1");
    server.restart().await;
    line.clear();
    r.read_line(&mut line).await.unwrap();
    assert_eq!(line, "during\n");

    let (_, _, text) = get(&ops.admin, "/metrics").await;
    assert!(
        sample(&text, "holdfast_resumes_total{backend=\"lines\"}") >= 1.0,
        "{text}"
    );
    assert!(
        sample(
            &text,
            "holdfast_hold_duration_seconds_count{backend=\"lines\"}"
        ) >= 1.0
    );
    assert!(
        sample(
            &text,
            "holdfast_replayed_bytes_total{backend=\"lines\",direction=\"up\"}"
        ) >= 7.0,
        "the held request was replayed"
    );
    assert!(
        sample(
            &text,
            "holdfast_legs_failed_total{backend=\"lines\",reason=\"closed\"}"
        ) + sample(
            &text,
            "holdfast_legs_failed_total{backend=\"lines\",reason=\"error\"}"
        ) >= 1.0
    );
    assert_eq!(
        sample(&text, "holdfast_sessions_held{backend=\"lines\"}"),
        0.0
    );
    assert!(
        !text.contains("holdfast_client_resets_total{"),
        "no client reset"
    );
    assert!(text.contains("holdfast_build_info{version=\""));

    // The session's end is counted with its reason.
    w.shutdown().await.unwrap();
    let mut rest = Vec::new();
    r.read_to_end(&mut rest).await.unwrap();
    let mut closed = 0.0;
    for _ in 0..500 {
        let (_, _, t) = get(&ops.admin, "/metrics").await;
        closed = sample(
            &t,
            "holdfast_sessions_closed_total{listener=\"front\",reason=\"client_closed\"}",
        );
        if closed == 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(closed, 1.0);
    ops.shutdown.stop.cancel();
}

/// /sessions shows each live session's offsets; /healthz and /ready answer;
/// anything else is 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoint_shows_live_sessions() {
    let server = Server::start("127.0.0.1:0", "lines").await;
    let ops = start(&lines_config(&server.addr)).await;
    assert_eq!(get(&ops.admin, "/healthz").await.0, 200);
    assert_eq!(get(&ops.admin, "/ready").await.0, 200);
    assert_eq!(get(&ops.admin, "/nope").await.0, 404);
    assert_eq!(get(&ops.admin, "/").await.0, 404);

    let c = connect(&ops.addrs[0]).await;
    let (r, mut w) = c.into_split();
    let mut r = BufReader::new(r);
    w.write_all(b"0123456789\n").await.unwrap();
    let mut line = String::new();
    r.read_line(&mut line).await.unwrap();

    // The session publishes its offsets after each turn of its loop, a
    // moment after the client can read the response: wait for them.
    let mut reply = get(&ops.admin, "/sessions").await;
    for _ in 0..500 {
        if reply.2.contains("\"sent\": 11") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        reply = get(&ops.admin, "/sessions").await;
    }
    let (status, ctype, body) = reply;
    assert_eq!(status, 200);
    assert_eq!(ctype, "application/json");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let list = v.as_array().unwrap();
    assert_eq!(list.len(), 1, "{body}");
    let s = &list[0];
    assert_eq!(s["listener"], "front");
    assert_eq!(s["backend"], "lines");
    assert_eq!(s["state"], "up");
    assert_eq!(s["up"]["read"], 11);
    assert_eq!(s["up"]["acked"], 11);
    assert_eq!(s["down"]["sent"], 11);
    assert_eq!(s["id"].as_str().unwrap().len(), 32);
    assert!(s["client"].as_str().unwrap().starts_with("127.0.0.1:"));
    let (age, idle) = (
        s["age_seconds"].as_f64().unwrap(),
        s["idle_seconds"].as_f64().unwrap(),
    );
    assert!((0.0..=age).contains(&idle), "{body}");

    ops.shutdown.drain.cancel();
    let mut phase = ops.phase.clone();
    phase.wait_for(|p| *p != Phase::Running).await.unwrap();
    drop(w);
}

async fn reload(ops: &Ops, toml: &str) -> Result<(), String> {
    let config = config::parse(toml).unwrap_or_else(|e| panic!("{e}"));
    let (done, result) = oneshot::channel();
    ops.reload
        .send(ReloadRequest { config, done })
        .await
        .unwrap();
    result.await.unwrap()
}

/// A reload adds a listener and removes another while a session on a third
/// streams on undisturbed; the removed listener's socket is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_adds_and_removes_listeners_without_disturbing_sessions() {
    let server = Server::start("127.0.0.1:0", "echo").await;
    let listeners = |names: &[&str]| {
        let mut t = String::from("[admin]\nlisten = \"127.0.0.1:0\"\n");
        for n in names {
            t.push_str(&format!(
                "[[listener]]\nname = \"{n}\"\nlisten = \"127.0.0.1:0\"\nbackend = \"echo\"\n"
            ));
        }
        t.push_str(&format!(
            "[[backend]]\nname = \"echo\"\nservers = [\"{}\"]\nack = \"tcp\"\n",
            server.addr
        ));
        t
    };
    let ops = start(&listeners(&["a", "keep"])).await;
    let (a_addr, keep_addr) = (ops.addrs[0].clone(), ops.addrs[1].clone());

    // A session on "keep" streams during the reload.
    let mut keep = connect(&keep_addr).await;
    let data = pattern(4 << 20, 9);
    let (mut kr, mut kw) = keep.split();
    let stream = async {
        for chunk in data.chunks(64 * 1024) {
            kw.write_all(chunk).await.unwrap();
        }
        kw.shutdown().await.unwrap();
    };
    let mut got = Vec::new();
    let collect = kr.read_to_end(&mut got);
    let reload_it = async {
        // "keep" keeps its port 0 listener: same name and same listen string.
        reload(&ops, &listeners(&["keep", "b"])).await
    };
    let (_, r, res) = tokio::join!(stream, collect, reload_it);
    r.unwrap();
    res.expect("reload applied");
    assert_bytes_eq(&got, &data, "the session on the kept listener");
    drop(keep);

    // "a" is gone and "keep" still accepts (that a new listener answers is
    // checked through the real binary in `sighup_reload_of_the_real_binary`).
    assert!(
        tokio::net::TcpStream::connect(&a_addr).await.is_err(),
        "a removed"
    );
    let mut k = connect(&keep_addr).await;
    k.write_all(b"x").await.unwrap();
    let mut one = [0u8; 1];
    k.read_exact(&mut one).await.unwrap();
    let (_, _, text) = get(&ops.admin, "/metrics").await;
    assert_eq!(
        sample(&text, "holdfast_config_reloads_total{result=\"ok\"}"),
        1.0
    );
    ops.shutdown.stop.cancel();
}

/// A reload whose new listener cannot bind changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_that_cannot_bind_keeps_everything() {
    let server = Server::start("127.0.0.1:0", "echo").await;
    let ops = start(&lines_config(&server.addr)).await;
    // Occupy a port so the new listener cannot bind it.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap();
    let bad = format!(
        "{}\n[[listener]]\nname = \"second\"\nlisten = \"{taken_addr}\"\nbackend = \"lines\"\n",
        lines_config(&server.addr)
    );
    let err = reload(&ops, &bad).await.expect_err("cannot bind");
    assert!(err.contains("second"), "{err}");
    let (_, _, text) = get(&ops.admin, "/metrics").await;
    assert_eq!(
        sample(&text, "holdfast_config_reloads_total{result=\"error\"}"),
        1.0
    );
    // The original listener still works.
    let mut c = connect(&ops.addrs[0]).await;
    c.write_all(b"ping\n").await.unwrap();
    let mut buf = [0u8; 5];
    c.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping\n");
    ops.shutdown.stop.cancel();
}

/// The real binary: SIGHUP with a broken file changes nothing and says why;
/// with a good file, a new listener answers and the old session carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reload_of_the_real_binary() {
    let server = Server::start("127.0.0.1:0", "echo").await;
    let dir = std::env::temp_dir().join(format!("holdfast-hup-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("holdfast.toml");
    let one = format!(
        "[[listener]]\nname = \"one\"\nlisten = \"127.0.0.1:0\"\nbackend = \"b\"\n\
         [[backend]]\nname = \"b\"\nservers = [\"{}\"]\nack = \"tcp\"\n",
        server.addr
    );
    std::fs::write(&path, &one).unwrap();
    let mut child = tokio::process::Command::new(BIN)
        .args(["run", "--config", path.to_str().unwrap()])
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = child.id().unwrap().to_string();
    let mut log = BufReader::new(child.stderr.take().unwrap()).lines();
    // Reads log lines until one contains `want`; returns the addr= of the
    // last "listening" line seen on the way.
    async fn until(
        log: &mut tokio::io::Lines<BufReader<tokio::process::ChildStderr>>,
        want: &str,
    ) -> (String, Option<String>) {
        let mut addr = None;
        loop {
            let line = tokio::time::timeout(Duration::from_secs(10), log.next_line())
                .await
                .unwrap_or_else(|_| panic!("no {want:?} in the log in time"))
                .unwrap()
                .unwrap_or_else(|| panic!("holdfast exited before {want:?}"));
            if line.contains("listening") {
                if let Some(i) = line.find("addr=") {
                    addr = line[i + 5..].split_whitespace().next().map(str::to_string);
                }
            }
            if line.contains(want) {
                return (line, addr);
            }
        }
    }
    let (_, addr_one) = until(&mut log, "holdfast running").await;
    let addr_one = addr_one.unwrap();
    let mut c = connect(&addr_one).await;
    c.write_all(b"hello").await.unwrap();
    let mut buf = [0u8; 5];
    c.read_exact(&mut buf).await.unwrap();

    // A broken file: rejected, with the reason.
    std::fs::write(
        &path,
        one.replace("ack = \"tcp\"", "ack = \"tcp\"\ncolour = \"red\""),
    )
    .unwrap();
    std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap();
    let (line, _) = until(&mut log, "reload: invalid config").await;
    assert!(line.contains("colour"), "{line}");
    until(&mut log, "reload rejected").await;

    // A good file adding a listener.
    std::fs::write(
        &path,
        one.replace(
            "[[backend]]",
            "[[listener]]\nname = \"two\"\nlisten = \"127.0.0.1:0\"\nbackend = \"b\"\n[[backend]]",
        ),
    )
    .unwrap();
    std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap();
    let (_, addr_two) = until(&mut log, "configuration reloaded").await;
    let addr_two = addr_two.expect("the new listener's address");
    assert_ne!(addr_two, addr_one);
    tokio::spawn(async move { while let Ok(Some(_)) = log.next_line().await {} });
    let mut c2 = connect(&addr_two).await;
    c2.write_all(b"two").await.unwrap();
    let mut b2 = [0u8; 3];
    c2.read_exact(&mut b2).await.unwrap();
    assert_eq!(&b2, b"two");
    // The old session never noticed.
    c.write_all(b"again").await.unwrap();
    c.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"again");
    child.start_kill().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// `[log] access`: one JSON line per session end with its reason, bytes and
/// legs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_has_one_line_per_session() {
    let server = Server::start("127.0.0.1:0", "lines").await;
    let dir = std::env::temp_dir().join(format!("holdfast-access-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("access.log");
    let _ = std::fs::remove_file(&path);
    let toml = format!(
        "[log]\naccess = \"{}\"\n{}",
        path.display(),
        lines_config(&server.addr)
    );
    let ops = start(&toml).await;
    for i in 0..3 {
        let mut c = connect(&ops.addrs[0]).await;
        c.write_all(format!("request {i}\n").as_bytes())
            .await
            .unwrap();
        c.shutdown().await.unwrap();
        let mut got = String::new();
        c.read_to_string(&mut got).await.unwrap();
        assert_eq!(got, format!("request {i}\n"));
    }
    // Lines are written when each session task ends: wait for all three.
    let mut text = String::new();
    for _ in 0..500 {
        text = std::fs::read_to_string(&path).unwrap_or_default();
        if text.lines().count() == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "{text}");
    for l in &lines {
        assert_eq!(l["listener"], "front");
        assert_eq!(l["backend"], "lines");
        assert_eq!(l["reason"], "client_closed");
        assert_eq!(l["bytes_up"], 10);
        assert_eq!(l["bytes_down"], 10);
        assert_eq!(l["legs"], 1);
        assert_eq!(l["replayed_bytes"], 0);
        assert_eq!(l["session"].as_str().unwrap().len(), 32);
        assert!(l["client"].as_str().unwrap().starts_with("127.0.0.1:"));
    }
    ops.shutdown.stop.cancel();
    let _ = std::fs::remove_dir_all(&dir);
}
