//! TLS: clients over TLS across server kills, SNI routing, mutual TLS
//! between an edge and a core holdfast (over protocol = "tcp" and over the
//! resume protocol), certificate rotation on SIGHUP of the real binary,
//! `holdfast check` on bad certificate files, and plaintext clients on TLS
//! listeners. Certificates are generated at test time.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::pki::Pki;
use common::relay::Relay;
use common::*;
use holdfast::config;
use holdfast::proxy::Runtime;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// Connects over TLS to `addr` asking for `sni`.
async fn tls_connect(
    config: Arc<rustls::ClientConfig>,
    addr: &str,
    sni: &str,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let name = ServerName::try_from(sni.to_string()).unwrap();
    tokio::time::timeout(
        Duration::from_secs(10),
        tokio_rustls::TlsConnector::from(config).connect(name, tcp),
    )
    .await
    .map_err(|_| std::io::Error::other("tls connect timed out"))?
}

/// The certificate (DER) a TLS connection got.
fn peer_cert(s: &TlsStream<TcpStream>) -> Vec<u8> {
    s.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

fn rejected(rt: &Runtime, listener: &str, reason: &str) -> f64 {
    sample(
        rt,
        &format!(
            "holdfast_client_connections_rejected_total{{listener=\"{listener}\",reason=\"{reason}\"}}"
        ),
    )
}

/// The value of one series (`name{labels}`), 0 when absent.
fn sample(rt: &Runtime, series: &str) -> f64 {
    rt.metrics
        .encode()
        .lines()
        .find_map(|l| l.strip_prefix(series).filter(|v| v.starts_with(' ')))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

/// The sum of every series of metric `name`.
fn sum(rt: &Runtime, name: &str) -> f64 {
    rt.metrics
        .encode()
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum()
}

/// Waits (bounded) until `cond` holds.
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// (a) TLS clients through holdfast to a plain lines server across 20
/// SIGKILLs with ack = "response": no reset, every response exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_clients_survive_20_server_kills() {
    let pki = Pki::new("kills");
    let (cert, key) = pki.leaf("server", "localhost", 1, &["localhost"]);
    let mut server = Server::start("127.0.0.1:0", "lines").await;
    let proxy = start_running(&format!(
        r#"
[[listener]]
name = "secure"
listen = "127.0.0.1:0"
backend = "b"
tls = {{ cert = "{cert}", key = "{key}" }}

[[backend]]
name = "b"
servers = ["{}"]
ack = "response"
framing = "lines"
hold_timeout = "20s"
"#,
        server.addr
    ))
    .await;
    let progress = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let config = pki.client_config(None);
    let mut clients = Vec::new();
    for id in 0..6 {
        let stream = tls_connect(config.clone(), &proxy.addrs[0], "localhost")
            .await
            .unwrap();
        let (progress, stop) = (progress.clone(), stop.clone());
        clients.push(tokio::spawn(verified_lines_until(
            stream, id, progress, stop,
        )));
    }
    chaos(&mut server, 20, progress.clone()).await;
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for c in clients {
        total += c.await.unwrap().unwrap_or_else(|e| panic!("{e}"));
    }
    assert!(total > 20 * 50, "traffic flowed: {total}");
    assert_eq!(rejected(&proxy.rt, "secure", "tls_handshake"), 0.0);
    proxy.shutdown.stop.cancel();
}

/// Reads the greeting line a backend's example server sends.
async fn greeting(config: Arc<rustls::ClientConfig>, addr: &str, sni: &str) -> String {
    let s = tls_connect(config, addr, sni).await.unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(10), r.read_line(&mut line))
        .await
        .unwrap()
        .unwrap();
    line
}

/// (b) SNI: exact and wildcard names reach their backends (with their own
/// certificate where given); an unknown name reaches the default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_routes_to_backends() {
    let pki = Pki::new("sni");
    let (cert, key) = pki.leaf("default", "default", 1, &["localhost", "other.test"]);
    let (a_cert, a_key) = pki.leaf("a", "a", 2, &["a.example.com"]);
    let srv_a = Server::start_with("127.0.0.1:0", "echo", Some("A\\n")).await;
    let srv_b = Server::start_with("127.0.0.1:0", "echo", Some("B\\n")).await;
    let srv_d = Server::start_with("127.0.0.1:0", "echo", Some("D\\n")).await;
    let proxy = start_running(&format!(
        r#"
[[listener]]
name = "secure"
listen = "127.0.0.1:0"
backend = "d"
tls = {{ cert = "{cert}", key = "{key}" }}
[[listener.sni]]
name = "a.example.com"
backend = "a"
cert = "{a_cert}"
key = "{a_key}"
[[listener.sni]]
name = "*.b.test"
backend = "b"

[[backend]]
name = "a"
servers = ["{}"]
ack = "none"
[[backend]]
name = "b"
servers = ["{}"]
ack = "none"
[[backend]]
name = "d"
servers = ["{}"]
ack = "none"
"#,
        srv_a.addr, srv_b.addr, srv_d.addr
    ))
    .await;
    let config = pki.client_config(None);
    let addr = &proxy.addrs[0];
    assert_eq!(greeting(config.clone(), addr, "a.example.com").await, "A\n");
    // The wildcard route uses the default certificate, which does not name
    // x.b.test: a client that checks names would refuse it, so ask by a
    // name the default certificate has only for the default route, and
    // check the wildcard with a certificate-agnostic client below.
    assert_eq!(greeting(config.clone(), addr, "other.test").await, "D\n");
    assert_eq!(greeting(config.clone(), addr, "localhost").await, "D\n");
    let lax = lax_client();
    assert_eq!(greeting(lax.clone(), addr, "x.b.test").await, "B\n");
    assert_eq!(greeting(lax.clone(), addr, "deep.x.b.test").await, "B\n");
    assert_eq!(greeting(lax.clone(), addr, "unknown.example").await, "D\n");
    proxy.shutdown.stop.cancel();
}

/// A client that accepts any server certificate (to test routing alone).
fn lax_client() -> Arc<rustls::ClientConfig> {
    #[derive(Debug)]
    struct AnyCert(Arc<rustls::crypto::CryptoProvider>);
    impl rustls::client::danger::ServerCertVerifier for AnyCert {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: rustls::pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                m,
                c,
                d,
                &self.0.signature_verification_algorithms,
            )
        }
        fn verify_tls13_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                m,
                c,
                d,
                &self.0.signature_verification_algorithms,
            )
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
            .with_no_client_auth(),
    )
}

/// (c) Mutual TLS between an edge and a core holdfast: bytes exact; a
/// client without a certificate is refused by the core (metric).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_between_edge_and_core() {
    let pki = Pki::new("mtls");
    let (core_cert, core_key) = pki.leaf("core", "core", 1, &["core.internal"]);
    let (edge_cert, edge_key) = pki.leaf("edge", "edge", 2, &["edge.internal"]);
    let ca = pki.path("ca.pem");
    let server = Server::start("127.0.0.1:0", "echo").await;
    let core = start_running(&format!(
        r#"
[[listener]]
name = "core"
listen = "127.0.0.1:0"
backend = "app"
tls = {{ cert = "{core_cert}", key = "{core_key}", client_ca = "{ca}", min_version = "1.3" }}

[[backend]]
name = "app"
servers = ["{}"]
ack = "none"
"#,
        server.addr
    ))
    .await;
    let edge = start_running(&format!(
        r#"
[[listener]]
name = "edge"
listen = "127.0.0.1:0"
backend = "core"

[[backend]]
name = "core"
servers = ["{}"]
ack = "none"
tls = {{ ca = "{ca}", server_name = "core.internal", cert = "{edge_cert}", key = "{edge_key}" }}
"#,
        core.addrs[0]
    ))
    .await;
    let data = pattern(3 << 20, 7);
    let got = send_and_collect(connect(&edge.addrs[0]).await, data.clone())
        .await
        .unwrap();
    assert_bytes_eq(&got, &data, "echo through edge and core over mutual TLS");
    assert_eq!(rejected(&core.rt, "core", "tls_handshake"), 0.0);

    // No client certificate: the core refuses the handshake.
    let res = async {
        let mut s = tls_connect(pki.client_config(None), &core.addrs[0], "core.internal").await?;
        s.write_all(b"hello\n").await?;
        let mut buf = [0u8; 16];
        s.read(&mut buf).await
    }
    .await;
    assert!(
        !matches!(res, Ok(n) if n > 0),
        "a client without a certificate got data: {res:?}"
    );
    let mut n = 0;
    while rejected(&core.rt, "core", "tls_handshake") < 1.0 && n < 200 {
        tokio::time::sleep(Duration::from_millis(10)).await;
        n += 1;
    }
    assert_eq!(rejected(&core.rt, "core", "tls_handshake"), 1.0);
    // The edge link still works.
    let got = send_and_collect(connect(&edge.addrs[0]).await, b"again".to_vec())
        .await
        .unwrap();
    assert_eq!(got, b"again");
    edge.shutdown.stop.cancel();
    core.shutdown.stop.cancel();
}

/// (f) A plaintext client on a TLS listener is refused (metric) and a TLS
/// session running next to it is untouched; a silent client times out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_client_on_tls_listener_is_refused() {
    let pki = Pki::new("plain");
    let (cert, key) = pki.leaf("server", "localhost", 1, &["localhost"]);
    let server = Server::start("127.0.0.1:0", "echo").await;
    let proxy = start_running(&format!(
        r#"
[[listener]]
name = "secure"
listen = "127.0.0.1:0"
backend = "b"
tls = {{ cert = "{cert}", key = "{key}", handshake_timeout = "300ms" }}

[[backend]]
name = "b"
servers = ["{}"]
ack = "none"
"#,
        server.addr
    ))
    .await;
    let addr = &proxy.addrs[0];
    let mut good = tls_connect(pki.client_config(None), addr, "localhost")
        .await
        .unwrap();
    good.write_all(b"one").await.unwrap();
    let mut buf = [0u8; 3];
    good.read_exact(&mut buf).await.unwrap();

    let mut plain = connect(addr).await;
    plain
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut junk = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut junk)).await;
    assert!(
        !junk.windows(4).any(|w| w == b"GET "),
        "the plaintext request reached the server"
    );
    let _silent = connect(addr).await;
    let mut n = 0;
    while (rejected(&proxy.rt, "secure", "tls_handshake") < 1.0
        || rejected(&proxy.rt, "secure", "tls_timeout") < 1.0)
        && n < 300
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
        n += 1;
    }
    assert_eq!(rejected(&proxy.rt, "secure", "tls_handshake"), 1.0);
    assert_eq!(rejected(&proxy.rt, "secure", "tls_timeout"), 1.0);
    good.write_all(b"two").await.unwrap();
    good.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"two");
    proxy.shutdown.stop.cancel();
}

/// Reads `log` until a line contains `want`; returns that line.
async fn until(
    log: &mut tokio::io::Lines<BufReader<tokio::process::ChildStderr>>,
    want: &str,
) -> String {
    loop {
        let line = tokio::time::timeout(Duration::from_secs(10), log.next_line())
            .await
            .unwrap_or_else(|_| panic!("no {want:?} in the log in time"))
            .unwrap()
            .unwrap_or_else(|| panic!("holdfast exited before {want:?}"));
        if line.contains(want) {
            return line;
        }
    }
}

/// (d) Certificate rotation on SIGHUP of the real binary: new handshakes
/// get the new certificate, the old session carries on; a plaintext client
/// gets a warn line with its address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rotates_certificates() {
    let pki = Pki::new("rotate");
    let (cert, key) = pki.leaf("server", "first", 1, &["localhost"]);
    let server = Server::start("127.0.0.1:0", "echo").await;
    // A fixed free port, so the log need not be parsed for it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let path = pki.dir.join("holdfast.toml");
    std::fs::write(
        &path,
        format!(
            "[[listener]]\nname = \"secure\"\nlisten = \"{addr}\"\nbackend = \"b\"\n\
             tls = {{ cert = \"{cert}\", key = \"{key}\" }}\n\
             [[backend]]\nname = \"b\"\nservers = [\"{}\"]\nack = \"none\"\n",
            server.addr
        ),
    )
    .unwrap();
    let mut child = tokio::process::Command::new(BIN)
        .args(["run", "--config", path.to_str().unwrap()])
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = child.id().unwrap().to_string();
    let mut log = BufReader::new(child.stderr.take().unwrap()).lines();
    until(&mut log, "holdfast running").await;
    let config = pki.client_config(None);
    let mut old = tls_connect(config.clone(), &addr, "localhost")
        .await
        .unwrap();
    let first = peer_cert(&old);
    old.write_all(b"hello").await.unwrap();
    let mut buf = [0u8; 5];
    old.read_exact(&mut buf).await.unwrap();

    // Replace the files with a new certificate, then SIGHUP.
    pki.leaf("server", "second", 2, &["localhost"]);
    std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap();
    until(&mut log, "configuration reloaded").await;
    let new = tls_connect(config.clone(), &addr, "localhost")
        .await
        .unwrap();
    let second = peer_cert(&new);
    assert_ne!(first, second, "a new handshake sees the new certificate");
    assert_eq!(
        second,
        CertificateDer::from_pem_file(&cert).unwrap().to_vec(),
        "the new certificate is the one in the file now"
    );
    // The old session carries on.
    old.write_all(b"again").await.unwrap();
    old.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"again");

    // A plaintext client: a warn line with its address and the error.
    let mut plain = connect(&addr).await;
    let local = plain.local_addr().unwrap().to_string();
    plain.write_all(b"hello there\r\n\r\n").await.unwrap();
    let line = until(&mut log, "tls handshake failed").await;
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains(&local), "{line}");
    assert!(line.contains("tls_handshake"), "{line}");
    child.start_kill().unwrap();
}

fn check(path: &Path) -> (bool, String) {
    let out = std::process::Command::new(BIN)
        .args(["check", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// (e) `holdfast check`: a missing certificate file, a key that does not
/// match its certificate and garbage PEM are each reported with the key
/// path and line; `ack = "tcp"` with backend TLS is refused.
#[test]
fn check_rejects_bad_certificate_files() {
    let pki = Pki::new("check");
    let (cert, _) = pki.leaf("server", "a", 1, &["localhost"]);
    let (_, other_key) = pki.leaf("other", "b", 2, &["localhost"]);
    let garbage = pki.path("garbage.pem");
    std::fs::write(
        &garbage,
        "-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let not_pem = pki.path("not.pem");
    std::fs::write(&not_pem, "just some text\n").unwrap();
    let ca = pki.path("ca.pem");
    let path = pki.dir.join("bad.toml");
    let toml = format!(
        r#"[[listener]]
name = "a"
listen = "127.0.0.1:7000"
backend = "b"
tls = {{ cert = "{missing}", key = "{other_key}" }}

[[listener]]
name = "b"
listen = "127.0.0.1:7001"
backend = "b"
tls = {{ cert = "{cert}", key = "{other_key}" }}

[[listener]]
name = "c"
listen = "127.0.0.1:7002"
backend = "b"
tls = {{ cert = "{garbage}", key = "{other_key}", client_ca = "{not_pem}" }}

[[backend]]
name = "b"
servers = ["127.0.0.1:9"]
tls = {{ ca = "{ca}" }}
"#,
        missing = pki.path("missing.pem"),
    );
    std::fs::write(&path, &toml).unwrap();
    let errors = config::load(&path).unwrap_err();
    let got: Vec<(String, usize)> = errors.0.iter().map(|e| (e.key.clone(), e.line)).collect();
    assert_eq!(
        got,
        [
            ("listener[0].tls.cert".to_string(), 5),
            ("listener[1].tls.key".to_string(), 11),
            ("listener[2].tls.cert".to_string(), 17),
            ("listener[2].tls.client_ca".to_string(), 17),
            ("backend[0].tls".to_string(), 22),
        ],
        "{errors}"
    );
    let text = errors.to_string();
    assert!(text.contains("no such file"), "{text}");
    assert!(text.contains("does not fit the certificate"), "{text}");
    assert!(text.contains("holds no PEM certificate"), "{text}");
    assert!(text.contains("ack = \"tcp\""), "{text}");
    let (ok, out) = check(&path);
    assert!(!ok);
    assert!(out.contains("listener[1].tls.key (line 11"), "{out}");
}

// ---- TLS on the resume-protocol path (an edge and a core holdfast) ----

/// Writes the resume key shared by an edge and a core.
fn resume_key(pki: &Pki) -> String {
    let key = pki.path("resume.key");
    std::fs::write(&key, pattern(32, 99)).unwrap();
    key
}

/// A core holdfast's config: a resume listener with mutual TLS on
/// `listen`, towards a lines server with response acks.
fn core_toml(listen: &str, pki: &Pki, key: &str, cert: &str, ckey: &str, server: &str) -> String {
    format!(
        r#"
[[listener]]
name = "from-edge"
listen = "{listen}"
backend = "app"
protocol = "resume"
resume = {{ secret_file = "{key}", heartbeat_interval = "100ms", dead_peer_timeout = "2s", resume_timeout = "60s" }}
tls = {{ cert = "{cert}", key = "{ckey}", client_ca = "{ca}", handshake_timeout = "5s" }}

[[backend]]
name = "app"
servers = ["{server}"]
ack = "response"
framing = "lines"
hold_timeout = "30s"
"#,
        ca = pki.path("ca.pem"),
    )
}

/// An edge holdfast's config: a plain listener, a resume backend at
/// `core`, with `tls` as given ("" for none).
fn edge_toml(core: &str, key: &str, tls: &str) -> String {
    format!(
        r#"
[[listener]]
name = "apps"
listen = "127.0.0.1:0"
backend = "core"

[[backend]]
name = "core"
servers = ["{core}"]
protocol = "resume"
resume = {{ secret_file = "{key}", heartbeat_interval = "100ms", dead_peer_timeout = "2s" }}
hold_timeout = "60s"
connect_timeout = "5s"
{tls}
"#
    )
}

/// The edge's backend `tls` line for mutual TLS with `cert`/`key`.
fn edge_tls(pki: &Pki, cert: &str, key: &str) -> String {
    format!(
        r#"tls = {{ ca = "{}", server_name = "core.internal", cert = "{cert}", key = "{key}" }}"#,
        pki.path("ca.pem")
    )
}

/// Waits until `progress` has moved by `n` (bounded).
async fn progressed(progress: &Arc<AtomicU64>, n: u64) {
    let before = progress.load(Ordering::Relaxed);
    wait_until("progress", || {
        progress.load(Ordering::Relaxed) >= before + n
    })
    .await;
}

/// (g) Mutual TLS over the resume protocol: an edge (backend protocol =
/// "resume" with a client certificate) and a core (resume listener with
/// client_ca) carry pipelining clients across 10 SIGKILLs of the server
/// behind the core and 10 cuts and resets of the TLS link between them
/// (each resume is a new TLS handshake); every response is exact, no
/// client sees a reset or an EOF, nothing is rejected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_resume_link_survives_kills_and_cuts() {
    const CLIENTS: usize = 4;
    let pki = Pki::new("resume-mtls");
    let key = resume_key(&pki);
    let (core_cert, core_key) = pki.leaf("core", "core", 1, &["core.internal"]);
    let (edge_cert, edge_key) = pki.leaf("edge", "edge", 2, &["edge.internal"]);
    let mut server = Server::start("127.0.0.1:0", "lines").await;
    let core = start_running(&core_toml(
        "127.0.0.1:0",
        &pki,
        &key,
        &core_cert,
        &core_key,
        &server.addr,
    ))
    .await;
    let relay = Relay::start(core.addrs[0].clone()).await;
    let edge = start_running(&edge_toml(
        &relay.addr,
        &key,
        &edge_tls(&pki, &edge_cert, &edge_key),
    ))
    .await;
    let progress = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for id in 0..CLIENTS {
        let stream = connect(&edge.addrs[0]).await;
        let (progress, stop) = (progress.clone(), stop.clone());
        clients.push(tokio::spawn(verified_lines_until(
            stream, id, progress, stop,
        )));
    }
    for i in 0..20 {
        progressed(&progress, 50).await;
        match i % 4 {
            0 | 2 => {
                server.kill().await;
                server.restart().await;
            }
            1 => relay.cut(),
            _ => relay.reset(),
        }
    }
    progressed(&progress, 50).await;
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for c in clients {
        total += c.await.unwrap().unwrap_or_else(|e| panic!("{e}"));
    }
    assert!(total > 21 * 50, "traffic flowed: {total}");
    assert!(
        relay.accepted.load(Ordering::Relaxed) > 10,
        "the TLS link was really cut: {} connections",
        relay.accepted.load(Ordering::Relaxed)
    );
    assert_eq!(rejected(&core.rt, "from-edge", "tls_handshake"), 0.0);
    assert_eq!(rejected(&core.rt, "from-edge", "tls_timeout"), 0.0);
    // One core session per client, however many TLS connections it took.
    assert_eq!(
        sample(
            &core.rt,
            "holdfast_client_connections_accepted_total{listener=\"from-edge\"}"
        ),
        CLIENTS as f64
    );
    edge.shutdown.stop.cancel();
    core.shutdown.stop.cancel();
}

/// (h) A core with mutual TLS on its resume listener refuses an edge
/// without a client certificate and an edge whose certificate comes from
/// another CA (metric `tls_handshake`; neither opens a session), while a
/// good edge's sessions stream on undisturbed (no leg failed, no resume).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_refuses_edges_without_a_trusted_certificate() {
    const CLIENTS: usize = 3;
    let pki = Pki::new("resume-refuse");
    let other = Pki::new("resume-other");
    let key = resume_key(&pki);
    let (core_cert, core_key) = pki.leaf("core", "core", 1, &["core.internal"]);
    let (edge_cert, edge_key) = pki.leaf("edge", "edge", 2, &["edge.internal"]);
    let (bad_cert, bad_key) = other.leaf("edge", "intruder", 3, &["edge.internal"]);
    let server = Server::start("127.0.0.1:0", "lines").await;
    let core = start_running(&core_toml(
        "127.0.0.1:0",
        &pki,
        &key,
        &core_cert,
        &core_key,
        &server.addr,
    ))
    .await;
    let core_addr = core.addrs[0].clone();
    let good = start_running(&edge_toml(
        &core_addr,
        &key,
        &edge_tls(&pki, &edge_cert, &edge_key),
    ))
    .await;
    let progress = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for id in 0..CLIENTS {
        let stream = connect(&good.addrs[0]).await;
        let (progress, stop) = (progress.clone(), stop.clone());
        clients.push(tokio::spawn(verified_lines_until(
            stream, id, progress, stop,
        )));
    }
    progressed(&progress, 50).await;

    let no_cert = format!(
        r#"tls = {{ ca = "{}", server_name = "core.internal" }}"#,
        pki.path("ca.pem")
    );
    let wrong_ca = edge_tls(&pki, &bad_cert, &bad_key);
    for (i, tls) in [no_cert, wrong_ca].iter().enumerate() {
        let bad = start_running(&edge_toml(&core_addr, &key, tls)).await;
        let mut client = connect(&bad.addrs[0]).await;
        client.write_all(b"c99 r0000000 intruder\n").await.unwrap();
        let want = (i + 1) as f64;
        wait_until("the core refuses the edge's handshake", || {
            rejected(&core.rt, "from-edge", "tls_handshake") >= want
        })
        .await;
        // The bad edge holds its client: it got nothing back.
        let mut buf = [0u8; 64];
        assert!(
            tokio::time::timeout(Duration::from_millis(200), client.read(&mut buf))
                .await
                .is_err(),
            "a client of an untrusted edge got an answer"
        );
        // Over TLS 1.3 the edge learns of the refusal from the core's
        // alert, on its first read: a failed leg, not a failed connect.
        assert!(
            sum(&bad.rt, "holdfast_legs_failed_total") >= 1.0,
            "the bad edge counts its failed legs"
        );
        bad.shutdown.stop.cancel();
        progressed(&progress, 50).await;
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap().unwrap_or_else(|e| panic!("{e}"));
    }
    // Only the good edge's sessions were ever opened on the core.
    assert_eq!(
        sample(
            &core.rt,
            "holdfast_client_connections_accepted_total{listener=\"from-edge\"}"
        ),
        CLIENTS as f64
    );
    assert_eq!(sum(&good.rt, "holdfast_legs_failed_total"), 0.0);
    assert_eq!(sum(&good.rt, "holdfast_resumes_total"), 0.0);
    good.shutdown.stop.cancel();
    core.shutdown.stop.cancel();
}

/// (i) The real binary as a core with a mutual-TLS resume listener: a
/// plaintext HFRP client is refused with a warn line (its address, reason
/// `tls_handshake`) and gets no WELCOME; after the certificate files are
/// replaced and SIGHUP sent, a new handshake sees the new certificate,
/// and a live session forced onto a new TLS connection (the link is cut)
/// resumes exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_listener_refuses_plaintext_and_rotates_on_sighup() {
    let pki = Pki::new("resume-hup");
    let key = resume_key(&pki);
    let (core_cert, core_key) = pki.leaf("core", "core one", 1, &["core.internal"]);
    let (edge_cert, edge_key) = pki.leaf("edge", "edge", 2, &["edge.internal"]);
    let server = Server::start("127.0.0.1:0", "lines").await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let path = pki.dir.join("core.toml");
    std::fs::write(
        &path,
        core_toml(&addr, &pki, &key, &core_cert, &core_key, &server.addr),
    )
    .unwrap();
    let mut child = tokio::process::Command::new(BIN)
        .args(["run", "--config", path.to_str().unwrap()])
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = child.id().unwrap().to_string();
    let mut log = BufReader::new(child.stderr.take().unwrap()).lines();
    until(&mut log, "holdfast running").await;

    // A plaintext HFRP initiator: a valid HELLO, but no TLS.
    let mut plain = connect(&addr).await;
    let local = plain.local_addr().unwrap().to_string();
    let mut hello = holdfast::proto::Hello {
        version_min: 1,
        version_max: 1,
        resume: false,
        session_id: [5; 16],
        epoch: 0,
        recv_offset: 0,
        max_frame: 65536,
        window: 1 << 20,
        heartbeat_ms: 0,
        client: holdfast::proto::ClientAddr::Unknown,
        token: [0; holdfast::proto::TOKEN_LEN],
    };
    plain
        .write_all(&hello.encode(&pattern(32, 99)))
        .await
        .unwrap();
    let line = until(&mut log, "tls handshake failed").await;
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains(&local), "{line}");
    assert!(line.contains("tls_handshake"), "{line}");
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), plain.read_to_end(&mut got))
        .await
        .expect("the core closes the plaintext client")
        .ok();
    let dec = holdfast::proto::Decoder::new(1 << 20);
    assert!(
        !matches!(
            dec.decode(&mut bytes::BytesMut::from(&got[..])),
            Ok(Some(holdfast::proto::Frame::Welcome(_)))
        ),
        "a plaintext client got a WELCOME"
    );

    // A live session through an edge with mutual TLS, over a relay.
    let relay = Relay::start(addr.clone()).await;
    let edge = start_running(&edge_toml(
        &relay.addr,
        &key,
        &edge_tls(&pki, &edge_cert, &edge_key),
    ))
    .await;
    let progress = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let client = tokio::spawn(verified_lines_until(
        connect(&edge.addrs[0]).await,
        0,
        progress.clone(),
        stop.clone(),
    ));
    progressed(&progress, 50).await;
    let edge_client = pki.client_config(Some((&edge_cert, &edge_key)));
    let first = peer_cert(
        &tls_connect(edge_client.clone(), &addr, "core.internal")
            .await
            .unwrap(),
    );

    // Rotate: new files, SIGHUP.
    pki.leaf("core", "core two", 9, &["core.internal"]);
    std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap();
    until(&mut log, "configuration reloaded").await;
    let second = peer_cert(
        &tls_connect(edge_client.clone(), &addr, "core.internal")
            .await
            .unwrap(),
    );
    assert_ne!(first, second, "a new handshake sees the new certificate");
    assert_eq!(
        second,
        CertificateDer::from_pem_file(&core_cert).unwrap().to_vec(),
        "the new certificate is the one in the file now"
    );
    // The live session, forced onto a new TLS connection, resumes.
    let links = relay.accepted.load(Ordering::Relaxed);
    relay.cut();
    wait_until("the edge reconnects", || {
        relay.accepted.load(Ordering::Relaxed) > links
    })
    .await;
    progressed(&progress, 50).await;
    stop.store(true, Ordering::Relaxed);
    client.await.unwrap().unwrap_or_else(|e| panic!("{e}"));
    edge.shutdown.stop.cancel();
    child.start_kill().unwrap();
}

/// (j) Config: `tls` on a resume listener takes the keys of a TCP
/// listener's (files checked, errors with key and line); SNI may pick a
/// certificate there but not a backend.
#[test]
fn resume_listener_tls_is_checked_like_a_tcp_listener() {
    let pki = Pki::new("resume-check");
    let key = resume_key(&pki);
    let (cert, ckey) = pki.leaf("core", "core", 1, &["core.internal"]);
    let (a_cert, a_key) = pki.leaf("a", "a", 2, &["a.internal"]);
    let ca = pki.path("ca.pem");
    let good = format!(
        r#"[[listener]]
name = "core"
listen = "127.0.0.1:7000"
backend = "b"
protocol = "resume"
resume = {{ secret_file = "{key}" }}
tls = {{ cert = "{cert}", key = "{ckey}", client_ca = "{ca}", min_version = "1.3", alpn = ["hfrp/1"], handshake_timeout = "2s" }}
[[listener.sni]]
name = "a.internal"
cert = "{a_cert}"
key = "{a_key}"

[[backend]]
name = "b"
servers = ["127.0.0.1:9"]
"#
    );
    let cfg = config::parse(&good).unwrap_or_else(|e| panic!("{e}"));
    let l = &cfg.listeners[0];
    assert!(matches!(l.protocol, config::ListenerProtocol::Resume(_)));
    let tls = l.tls.as_ref().expect("tls on the resume listener");
    assert!(tls.client_ca.is_some());
    assert_eq!(tls.handshake_timeout, Duration::from_secs(2));
    assert_eq!(tls.alpn, ["hfrp/1"]);

    let bad = format!(
        r#"[[listener]]
name = "core"
listen = "127.0.0.1:7000"
backend = "b"
protocol = "resume"
resume = {{ secret_file = "{key}" }}
tls = {{ cert = "{cert}", key = "{missing}", client_ca = "{ca}" }}
[[listener.sni]]
name = "a.internal"
backend = "b"

[[backend]]
name = "b"
servers = ["127.0.0.1:9"]
"#,
        missing = pki.path("missing-key.pem"),
    );
    let errors = config::parse(&bad).unwrap_err();
    let got: Vec<(String, usize)> = errors.0.iter().map(|e| (e.key.clone(), e.line)).collect();
    assert_eq!(
        got,
        [
            ("listener[0].tls.key".to_string(), 7),
            ("listener[0].sni[0].backend".to_string(), 10),
        ],
        "{errors}"
    );
    let text = errors.to_string();
    assert!(text.contains("cannot route by sni"), "{text}");
    assert!(text.contains("no such file"), "{text}");
}

/// (k) The ledger example with `--tls-cert/--tls-key/--client-ca` behind a
/// holdfast whose resume backend has mutual TLS: requests across SIGKILLs
/// of the ledger are answered once each, in order (each restart is a new
/// TLS handshake and a restored session), and stored exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_example_over_mutual_tls_across_sigkills() {
    let pki = Pki::new("ledger");
    let key = resume_key(&pki);
    let (cert, ckey) = pki.leaf("ledger", "ledger", 1, &["core.internal"]);
    let (edge_cert, edge_key) = pki.leaf("edge", "edge", 2, &["edge.internal"]);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let bin = Path::new(BIN).parent().unwrap().join("examples/ledger");
    let spawn = || {
        let mut child = tokio::process::Command::new(&bin)
            .args(["--listen", &listen, "--data", pki.dir.to_str().unwrap()])
            .args(["--key-file", &key, "--tls-cert", &cert, "--tls-key", &ckey])
            .args(["--client-ca", &pki.path("ca.pem")])
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn the ledger example (built by cargo test)");
        let out = child.stdout.take().unwrap();
        async move {
            let line = BufReader::new(out).lines().next_line().await.unwrap();
            assert!(
                line.as_deref().is_some_and(|l| l.starts_with("listening ")),
                "ledger said {line:?}"
            );
            child
        }
    };
    let mut ledger = spawn().await;
    let edge = start_running(&edge_toml(
        &listen,
        &key,
        &edge_tls(&pki, &edge_cert, &edge_key),
    ))
    .await;
    let (r, mut w) = connect(&edge.addrs[0]).await.into_split();
    let mut r = BufReader::new(r);
    let mut line = String::new();
    for round in 0..5u64 {
        for k in 0..4 {
            let n = round * 4 + k;
            w.write_all(format!("req {n}\n").as_bytes()).await.unwrap();
            line.clear();
            r.read_line(&mut line).await.unwrap();
            assert_eq!(line, format!("ok {}\n", n + 1), "response to request {n}");
        }
        ledger.start_kill().unwrap();
        ledger.wait().await.unwrap();
        ledger = spawn().await;
    }
    let log = std::fs::read_to_string(pki.dir.join("ledger.log")).unwrap();
    let stored: Vec<&str> = log
        .lines()
        .map(|l| l.splitn(5, ' ').nth(4).unwrap())
        .collect();
    let want: Vec<String> = (0..20).map(|n| format!("req {n}")).collect();
    assert_eq!(stored, want, "every request stored once, in order");
    edge.shutdown.stop.cancel();
}

/// A hand-over (`kill -USR2`) leaves TLS sessions with the old process
/// (rustls state is not carried): a TLS session opened before the upgrade
/// keeps working there while a plain session moves to the new process;
/// at `drain_timeout` the old process ends the TLS session cleanly
/// (close_notify, then EOF), and new TLS clients reach the new process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_sessions_stay_with_the_old_process_in_a_hand_over() {
    let pki = Pki::new("handover");
    let (cert, key) = pki.leaf("server", "srv", 1, &["localhost"]);
    let server = Server::start("127.0.0.1:0", "echo").await;
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .to_string()
    };
    let (tls_addr, plain_addr) = (free(), free());
    let path = pki.dir.join("holdfast.toml");
    std::fs::write(
        &path,
        format!(
            "[lifecycle]\ndrain_timeout = \"2s\"\n\
             [handover]\nsocket = \"{}\"\n\
             [[listener]]\nname = \"secure\"\nlisten = \"{tls_addr}\"\nbackend = \"b\"\n\
             tls = {{ cert = \"{cert}\", key = \"{key}\" }}\n\
             [[listener]]\nname = \"plain\"\nlisten = \"{plain_addr}\"\nbackend = \"b\"\n\
             [[backend]]\nname = \"b\"\nservers = [\"{}\"]\nack = \"tcp\"\n",
            pki.dir.join("run/handover.sock").display(),
            server.addr
        ),
    )
    .unwrap();
    let mut child = tokio::process::Command::new(BIN)
        .args(["run", "--config", path.to_str().unwrap()])
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let old_pid = child.id().unwrap();
    let mut log = BufReader::new(child.stderr.take().unwrap()).lines();
    until(&mut log, "hand-over socket listening").await;
    let config = pki.client_config(None);
    let mut secure = tls_connect(config.clone(), &tls_addr, "localhost")
        .await
        .unwrap();
    let mut plain = connect(&plain_addr).await;
    async fn echo<S: AsyncReadExt + AsyncWriteExt + Unpin>(s: &mut S, msg: &[u8]) {
        s.write_all(msg).await.unwrap();
        let mut buf = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut buf))
            .await
            .expect("echo in time")
            .unwrap();
        assert_eq!(buf, msg);
    }
    echo(&mut secure, b"tls before").await;
    echo(&mut plain, b"plain before").await;

    std::process::Command::new("kill")
        .args(["-USR2", &old_pid.to_string()])
        .status()
        .unwrap();
    // The new process's "holdfast running" (the old one's may come late).
    let new_pid = loop {
        let running = until(&mut log, "holdfast running").await;
        let pid = running
            .split_whitespace()
            .find_map(|w| w.strip_prefix("pid="))
            .unwrap()
            .to_string();
        if pid != old_pid.to_string() {
            break pid;
        }
    };
    // The new process is not our child: kill it if the test fails.
    struct KillOnPanic(String);
    impl Drop for KillOnPanic {
        fn drop(&mut self) {
            if std::thread::panicking() {
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", &self.0])
                    .status();
            }
        }
    }
    let _guard = KillOnPanic(new_pid.clone());
    let done = until(&mut log, "sessions handed over").await;
    assert!(done.contains("sessions=1 stayed=1"), "{done}");
    // The plain session moved; the TLS one is still served by the old process.
    echo(&mut plain, b"plain after").await;
    echo(&mut secure, b"tls after").await;
    // New TLS clients are served by the new process.
    let mut fresh = tls_connect(config.clone(), &tls_addr, "localhost")
        .await
        .unwrap();
    echo(&mut fresh, b"fresh").await;
    // At drain_timeout the old process ends the TLS session cleanly.
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(10), secure.read(&mut buf))
        .await
        .expect("closed at drain_timeout")
        .expect("a clean close, not a reset");
    assert_eq!(n, 0);
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("the old process exits")
        .unwrap();
    assert!(status.success(), "{status:?}");
    echo(&mut plain, b"plain at the end").await;
    drop((plain, fresh, secure));
    std::process::Command::new("kill")
        .args(["-INT", &new_pid])
        .status()
        .unwrap();
    loop {
        let line = until(&mut log, "holdfast stopped").await;
        if line.contains(&format!("pid={new_pid}")) {
            break;
        }
    }
}
